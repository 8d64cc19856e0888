"""PID 1 duty: reap orphans re-parented to cxrd, never cxrd's own children.

As the first process of a PID namespace (a container without ``--init``),
cxrd inherits every process whose parent died: a runtime's helper that
double-forked, a grandchild left when the runtime crashed. Their zombies
are ours to reap, or they pile up for good.

cxrd's own children (the runtime, the proxy, the guard) are reaped by
whoever started them: asyncio's child watcher, or ``Popen.wait``, each by
pid. A ``waitpid(-1)`` here would steal one of their exit statuses, so the
reaper reaps by pid too, and only pids it was not told are ours: on each
SIGCHLD it lists our zombie children in /proc and skips the registered ones.
While a spawn is in flight (forked, pid not yet registered) it reaps
nothing and looks again when the spawn is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator

from cxrd.core.model import describe_exit

log = logging.getLogger(__name__)

# The last processes of the namespace get this long between SIGTERM and SIGKILL.
END_GRACE = 2.0
_END_POLL = 0.02


def is_init() -> bool:
    """True when this process is the first of its PID namespace."""
    return os.getpid() == 1


class OrphanReaper:
    """Reaps re-parented orphans on SIGCHLD; told which pids are cxrd's own."""

    def __init__(self) -> None:
        self._own: set[int] = set()
        self._spawning = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.reaped = 0  # orphans reaped so far

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()

    @contextlib.contextmanager
    def spawning(self) -> Iterator[None]:
        """Around a fork whose pid is registered with :meth:`own` before the block ends."""
        self._spawning += 1
        try:
            yield
        finally:
            self._spawning -= 1
            self.reap()

    def own(self, pid: int) -> None:
        self._own.add(pid)

    def disown(self, pid: int) -> None:
        """``pid`` was reaped by its owner: a later process with that pid is not ours."""
        self._own.discard(pid)
        self.reap()  # an orphan may have got the pid meanwhile

    def reap(self) -> None:
        if self._spawning:
            return
        for pid, comm in _zombie_children():
            if pid in self._own:
                continue
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue  # reaped by someone else meanwhile
            if got == pid:
                self.reaped += 1
                code = os.waitstatus_to_exitcode(status)
                log.info("reaped orphan pid %d (%s): %s", pid, comm, describe_exit(code))

    async def end(self) -> None:
        """The daemon is leaving: end every process left in the namespace, then reap it.

        Only for PID 1, after its own children are gone. SIGTERM, END_GRACE, SIGKILL.
        """
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)
        deadline = time.monotonic() + END_GRACE
        sent = signal.SIGTERM
        left = _others()
        if left:
            log.warning("processes %s are still in the namespace: sending them SIGTERM", left)
            _kill_all(signal.SIGTERM)
        while left:
            self._reap_all()
            await asyncio.sleep(_END_POLL)
            left = _others()
            if left and sent is signal.SIGTERM and time.monotonic() >= deadline:
                log.warning("processes %s ignored SIGTERM for %.1f s: SIGKILL", left, END_GRACE)
                _kill_all(signal.SIGKILL)
                sent = signal.SIGKILL
            elif left and time.monotonic() >= deadline + END_GRACE:
                log.warning("processes %s outlived SIGKILL; leaving them to the kernel", left)
                return
        self._reap_all()

    def _reap_all(self) -> None:
        # Nothing of ours is left to be reaped by its owner: every zombie goes.
        self._own.clear()
        self.reap()


def _kill_all(sig: signal.Signals) -> None:
    # As PID 1, kill(-1) reaches every process of the namespace but ourselves.
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, sig)


def _proc_stats() -> Iterator[tuple[int, str, str, int]]:
    """(pid, comm, state, ppid) of every process in this PID namespace's /proc."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue  # gone meanwhile
        # pid (comm) state ppid ...; comm may hold spaces and parentheses
        head, _, rest = raw.rpartition(b")")
        fields = rest.split()
        if len(fields) < 2:
            continue
        comm = head.partition(b"(")[2].decode(errors="replace")
        yield int(name), comm, fields[0].decode(), int(fields[1])


def _zombie_children() -> list[tuple[int, str]]:
    me = os.getpid()
    return [(pid, comm) for pid, comm, state, ppid in _proc_stats() if ppid == me and state == "Z"]


def _others() -> list[int]:
    """Every process of the namespace but ourselves that is not a zombie."""
    me = os.getpid()
    return [pid for pid, _comm, state, _ppid in _proc_stats() if pid != me and state != "Z"]
