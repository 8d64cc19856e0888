"""The guard: SIGKILL the registered process groups when the pipe from cxrd closes.

Run as ``python -I -S guard.py`` with the pipe on stdin: lines ``+PGID`` and
``-PGID``. End of file means cxrd is gone (exited or killed), so every group
still registered is killed. Standard library only; it must start in a blink.
"""

import contextlib
import os
import signal
import sys


def main() -> None:
    groups: set[int] = set()
    for line in sys.stdin:
        line = line.strip()
        if line[:1] == "+":
            groups.add(int(line[1:]))
        elif line[:1] == "-":
            groups.discard(int(line[1:]))
    for pgid in groups:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    main()
