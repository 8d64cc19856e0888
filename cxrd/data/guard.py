"""The guard: SIGKILL the registered process groups when the pipe from cxrd closes.

Run as ``python -I -S guard.py`` with the pipe on stdin: lines ``+PGID``,
``-PGID``, ``fPATH`` (a file the children leave), ``sPATH`` (the socket
that tells whether a runtime still serves) and ``.`` (cxrd is leaving in
order). At end of file the groups still registered are SIGKILLed. Without
``.`` first, cxrd died (SIGKILL, the OOM killer) and left its files too: once
the groups are gone (at most ``GONE_WAIT``), they are removed, unless
something answers on the socket (a runtime not ours, which owns them).
cxrd reads nothing from stdout: its end of that pipe sees EOF when the
guard dies, so a killed guard is noticed and replaced.
Standard library only; it must start in a blink.
"""

import contextlib
import os
import signal
import socket
import sys
import time

GONE_WAIT = 2.0


def alive(groups: set[int]) -> bool:
    for pgid in groups:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            return True
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] != b"Z":
                return True
    return False


def answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        except OSError:
            return True  # as cxrd's own check: ambiguous counts as live
    return True


def main() -> None:
    groups: set[int] = set()
    files: list[str] = []
    sockets: list[str] = []
    orderly = False
    for line in sys.stdin:
        line = line.rstrip("\n")
        kind, arg = line[:1], line[1:]
        if kind == "+":
            groups.add(int(arg))
        elif kind == "-":
            groups.discard(int(arg))
        elif kind == "f":
            files.append(arg)
        elif kind == "s":
            sockets.append(arg)
        elif kind == ".":
            orderly = True
    for pgid in groups:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)
    if orderly:
        return  # cxrd cleans up after its children itself
    deadline = time.monotonic() + GONE_WAIT
    while alive(groups) and time.monotonic() < deadline:
        time.sleep(0.01)  # no event says a process group is empty
    if any(answers(path) for path in sockets):
        return
    for path in files:
        with contextlib.suppress(OSError):
            os.unlink(path)


if __name__ == "__main__":
    # The mask is inherited: the first guard starts while cxrd still holds
    # SIGTERM, SIGINT and SIGHUP (cxrd.__main__), its replacements do not.
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    main()
