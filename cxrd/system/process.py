"""Child process groups: spawn, stop, reap. The one home of fork/exec and kill.

Each child runs in a new session, so its pid is its process group id and one
``killpg`` reaches every grandchild that did not leave the group. A child is
over only when its whole group is: :meth:`Child.wait` resolves (and
``returncode`` is set, to the leader's status) once no process is left in the
group, so a restart never overlaps the old run's grandchildren.

- A stop SIGTERMs the group, gives the whole group ``timeout`` to exit, then
  SIGKILLs what is left of it.
- A leader that ends by itself (a crash, or an exit) may leave processes in
  its group: they get SIGTERM at once and SIGKILL after ``LEFTOVER_GRACE``.
- After a SIGKILL the group is waited for at most ``KILL_GRACE`` more (a
  process in uninterruptible sleep dies only when the kernel lets it), then
  given up on with a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from cxrd.core.model import ChildSpec, describe_exit
from cxrd.errors import StartFailed
from cxrd.system.logfiles import Relay, ensure_logs_dir, open_log

if TYPE_CHECKING:
    from cxrd.system.reaper import OrphanReaper

log = logging.getLogger(__name__)


# Variables that speak for the daemon to its service manager; a child must not inherit them.
_DAEMON_ONLY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


# Crash leftovers get this long between SIGTERM and SIGKILL.
LEFTOVER_GRACE = 5.0
# The longest wait for a SIGKILLed group to be gone.
KILL_GRACE = 2.0
# No kernel event says that a process group is empty (a pidfd follows one
# process, and grandchildren are not ours to reap): once the leader is reaped,
# the group is polled, from every 5 ms up to every 100 ms.
_POLL_FIRST = 0.005
_POLL_MAX = 0.1
# Once the group is gone, its last stderr lines reach the file within this.
RELAY_DRAIN = 2.0
# A guard that died younger than this is replaced only this much later.
GUARD_RESPAWN = 1.0


class Child:
    """A running child process group and how to end it."""

    def __init__(
        self,
        spec: ChildSpec,
        proc: asyncio.subprocess.Process,
        guard: Guard,
        reaper: OrphanReaper | None = None,
        relay: Relay | None = None,
    ) -> None:
        self.spec = spec
        self._relay = relay
        self.pid = proc.pid
        self.started_at = time.time()
        self._proc = proc
        self._guard = guard
        self._reaper = reaper
        self._stopping = False
        self._killed_at: float | None = None
        self._gone = asyncio.ensure_future(self._watch())

    @property
    def returncode(self) -> int | None:
        """The leader's exit status once the whole group is gone; None until then."""
        return self._proc.returncode if self._gone.done() else None

    async def wait(self) -> int:
        """The leader's exit status, once no process of the group is left."""
        return await asyncio.shield(self._gone)

    async def stop(self, timeout: float) -> int:
        """SIGTERM the group, SIGKILL it after ``timeout`` unless it is gone. Idempotent."""
        if not self._gone.done():
            if not self._stopping:
                self._stopping = True
                _killpg(self.pid, signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout):
                    return await self.wait()
            except TimeoutError:
                alive = "it" if self._proc.returncode is None else "what is left of its group"
                log.warning(
                    "%s (pid %d): %s ignored SIGTERM for %.1f s; sending SIGKILL",
                    self.spec.name,
                    self.pid,
                    alive,
                    timeout,
                )
                self._kill()
        return await self.wait()

    def _kill(self) -> None:
        _killpg(self.pid, signal.SIGKILL)
        if self._killed_at is None:
            self._killed_at = time.monotonic()

    async def _watch(self) -> int:
        code = await self._proc.wait()
        if self._reaper is not None:
            self._reaper.disown(self.pid)
        log.debug("%s (pid %d) %s", self.spec.name, self.pid, describe_exit(code))
        deadline = None
        if not self._stopping and group_alive(self.pid):
            log.warning(
                "%s (pid %d) %s and left processes in its group: sending them SIGTERM",
                self.spec.name,
                self.pid,
                describe_exit(code),
            )
            _killpg(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + LEFTOVER_GRACE
        await self._until_group_gone(deadline)
        if self._relay is not None:
            await self._relay.drained(RELAY_DRAIN)
        # Not in a finally: a cxrd cancelled meanwhile leaves the group to the guard.
        self._guard.forget(self.pid)
        return code

    async def _until_group_gone(self, deadline: float | None) -> None:
        """Poll the group until it is empty: SIGKILL at ``deadline``, give up KILL_GRACE later."""
        interval = _POLL_FIRST
        while group_alive(self.pid):
            now = time.monotonic()
            if self._killed_at is None and deadline is not None and now >= deadline:
                log.warning(
                    "%s (pid %d): processes left in its group ignored SIGTERM for %.1f s; "
                    "sending SIGKILL",
                    self.spec.name,
                    self.pid,
                    LEFTOVER_GRACE,
                )
                self._kill()
            elif self._killed_at is not None and now - self._killed_at >= KILL_GRACE:
                log.warning(
                    "%s (pid %d): processes %s of its group outlived SIGKILL by %.1f s; "
                    "not waiting for them",
                    self.spec.name,
                    self.pid,
                    group_members(self.pid),
                    KILL_GRACE,
                )
                return
            await asyncio.sleep(interval)
            interval = min(2 * interval, _POLL_MAX)


class ProcessLauncher:
    """Spawns children in new sessions; they die with cxrd, however it ends.

    Two mechanisms, each enough for the leaders: a parent-death signal
    (SIGKILL) set in each child before it runs anything, and the guard, which
    also reaches grandchildren. The signal follows the *thread* that forked,
    so spawn only from the event loop's thread, which lives as long as cxrd.

    Given a reaper (cxrd is PID 1), it tells it every pid it forks, so that
    the reaper leaves their exit statuses to their owners.
    """

    def __init__(self, reaper: OrphanReaper | None = None) -> None:
        self._reaper = reaper
        with _spawning(self._reaper):
            self._guard = Guard(reaper)

    async def spawn(self, spec: ChildSpec) -> Child:
        env = {k: v for k, v in spec.env.items() if k not in _DAEMON_ONLY_ENV}
        ensure_logs_dir(spec.stderr.parent)
        relay = None if spec.stderr_limits is None else Relay(spec.stderr, spec.stderr_limits)
        with contextlib.ExitStack() as stack:
            stack.enter_context(_spawning(self._reaper))
            if relay is None:
                stderr = open_log(spec.stderr)  # 0600, never through a link
                stack.callback(os.close, stderr)
            else:
                stderr = relay.write_fd
            try:
                proc = await asyncio.create_subprocess_exec(
                    *spec.argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=stderr,
                    env=env,
                    pass_fds=spec.pass_fds,
                    start_new_session=True,
                    preexec_fn=_die_with(os.getpid()),
                )
            except OSError as exc:
                if relay is not None:
                    relay.abandon()
                raise StartFailed(f"cannot start the {spec.name} ({spec.argv[0]}): {exc}") from None
            if self._reaper is not None:
                self._reaper.own(proc.pid)
        if relay is not None:
            relay.start()
        self._guard.watch(proc.pid)
        log.info("started %s: pid %d: %s", spec.name, proc.pid, shlex.join(spec.argv))
        return Child(spec, proc, self._guard, self._reaper, relay)

    def leave_clean(self, files: Iterable[Path], unless_answers: Path) -> None:
        """Files the children leave: removed by the guard after a cxrd that died."""
        self._guard.leave_clean(files, unless_answers)

    @property
    def guard_pid(self) -> int:
        return self._guard.pid

    def close(self) -> None:
        self._guard.close()


_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the forked child only calls it
_prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)


def _die_with(parent: int) -> Callable[[], None]:
    """Run in the forked child before exec: SIGKILL it when ``parent`` dies.

    The signal is lost if the parent died before it was set: then it dies now.
    Nothing here but syscalls: other threads may hold locks the fork copied.
    """

    def in_child() -> None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return in_child


class Guard:
    """A tiny process that SIGKILLs the groups it was told about once cxrd is gone.

    systemd's ``KillMode=mixed`` covers a unit; this covers a terminal or a
    container, where a SIGKILLed cxrd would otherwise leave its children (and
    their grandchildren, which no parent-death signal reaches) running. After
    a cxrd that died, it also removes the files given to :meth:`leave_clean`.

    The guard is supervised: its stdout is a pipe that only it holds, so its
    death (the OOM killer, a stray kill) is an EOF on the event loop, and a
    new guard takes over every group and file at once. Needs a running loop.
    """

    def __init__(self, reaper: OrphanReaper | None = None) -> None:
        self._reaper = reaper
        self._loop = asyncio.get_running_loop()
        self._groups: set[int] = set()
        self._lines: list[str] = []  # the files and sockets, for a new guard
        self._closed = False
        self._write_end = -1  # the pipe to the guard running now; -1 while none runs
        self._replacing: asyncio.TimerHandle | None = None
        self._start()

    def _start(self) -> None:
        read_end, write_end = os.pipe()
        script = Path(__file__).parent.parent / "data" / "guard.py"
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(script)],
                stdin=read_end,
                stdout=subprocess.PIPE,
                start_new_session=True,
            )
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        self._write_end = write_end
        self._started = time.monotonic()
        if self._reaper is not None:
            self._reaper.own(self._proc.pid)
        assert self._proc.stdout is not None
        self._loop.add_reader(self._proc.stdout.fileno(), self._died)
        self._send("".join(f"+{pgid}\n" for pgid in self._groups) + "".join(self._lines))

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _died(self) -> None:
        assert self._proc.stdout is not None
        if os.read(self._proc.stdout.fileno(), 512):
            return  # the guard writes nothing, but a line would not be its death
        code = self._end()
        if self._closed:
            return
        # A guard that keeps dying at once (no memory?) is not replaced in a hot loop.
        delay = 0.0 if time.monotonic() - self._started >= GUARD_RESPAWN else GUARD_RESPAWN
        log.warning(
            "the guard (pid %d) %s; starting another%s",
            self._proc.pid,
            describe_exit(code),
            f" in {delay:g} s" if delay else "",
        )
        self._replacing = self._loop.call_later(delay, self._replace)

    def _replace(self) -> None:
        self._replacing = None
        with _spawning(self._reaper):
            try:
                self._start()
            except OSError as exc:
                log.error(
                    "cannot start a new guard: %s; until cxrd restarts, its children die with "
                    "it by their parent-death signal only (grandchildren may outlive it)",
                    exc,
                )
                return
        log.info("guard: pid %d watches %d process group(s)", self._proc.pid, len(self._groups))

    def _end(self) -> int:
        """Stop watching the current guard process and reap it; its exit status."""
        assert self._proc.stdout is not None
        self._loop.remove_reader(self._proc.stdout.fileno())
        self._proc.stdout.close()
        write_end, self._write_end = self._write_end, -1
        os.close(write_end)
        try:
            # Closed by the guard's exit (or by us): it is gone, or about to be.
            code = self._proc.wait(timeout=KILL_GRACE)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            code = self._proc.wait()
        if self._reaper is not None:
            self._reaper.disown(self._proc.pid)
        return code

    def _send(self, text: str) -> None:
        if text and self._write_end >= 0:
            with contextlib.suppress(OSError):
                os.write(self._write_end, text.encode())

    def watch(self, pgid: int) -> None:
        self._groups.add(pgid)
        self._send(f"+{pgid}\n")

    def forget(self, pgid: int) -> None:
        self._groups.discard(pgid)
        self._send(f"-{pgid}\n")

    def leave_clean(self, files: Iterable[Path], unless_answers: Path) -> None:
        """After a cxrd that died: remove ``files``, unless a runtime answers on that socket."""
        paths = [*(f"f{path}" for path in files), f"s{unless_answers}"]
        text = "".join(f"{line}\n" for line in paths if "\n" not in line)
        self._lines.append(text)
        self._send(text)

    def close(self) -> None:
        """Orderly: the guard kills what is still registered, and leaves the files to cxrd."""
        if self._closed:
            return
        self._closed = True
        if self._replacing is not None:
            self._replacing.cancel()
            return  # no guard runs now
        if self._write_end >= 0:
            self._send(".\n")
            self._end()


def _spawning(reaper: OrphanReaper | None) -> contextlib.AbstractContextManager[None]:
    """Around a fork whose pid is told to ``reaper`` (when cxrd is PID 1)."""
    return reaper.spawning() if reaper is not None else contextlib.nullcontext()


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_alive(pgid: int) -> bool:
    """Whether a process other than a zombie is left in the process group ``pgid``.

    killpg(0) alone counts zombies, and orphans stay zombies for good under a
    PID 1 that does not reap (some containers): /proc settles it.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process in the group (a setuid helper)
    try:
        return bool(group_members(pgid))
    except OSError:  # no /proc: trust killpg
        return True


def group_members(pgid: int) -> list[int]:
    """The pids of the live (not zombie) processes in the process group ``pgid``."""
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                # pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[2]) == pgid and fields[0] != b"Z":
            members.append(int(name))
    return members
