"""Child process groups: spawn, stop, reap. The one home of fork/exec and kill.

Each child runs in a new session, so its pid is its process group id and one
``killpg`` reaches every grandchild that did not leave the group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cxrd.errors import StartFailed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChildSpec:
    """How to start one child: what runs, with which environment, logging where."""

    name: str  # "runtime" or "proxy"; used in logs and errors
    argv: tuple[str, ...]
    env: Mapping[str, str]  # the child's whole environment
    stderr: Path  # appended to; never a pipe (stdout goes to /dev/null)
    pass_fds: tuple[int, ...] = field(default=())


# Variables that speak for the daemon to its service manager; a child must not inherit them.
_DAEMON_ONLY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


class Child:
    """A running child process group and how to end it."""

    def __init__(self, spec: ChildSpec, proc: asyncio.subprocess.Process, guard: Guard) -> None:
        self.spec = spec
        self.pid = proc.pid
        self.started_at = time.time()
        self._proc = proc
        self._guard = guard
        self._reaped = asyncio.ensure_future(self._reap())

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def _reap(self) -> int:
        code = await self._proc.wait()
        # The leader is gone; anything left in its group is an orphan of ours.
        _killpg(self.pid, signal.SIGKILL)
        self._guard.forget(self.pid)
        log.debug("%s (pid %d) %s", self.spec.name, self.pid, describe_exit(code))
        return code

    async def wait(self) -> int:
        return await asyncio.shield(self._reaped)

    async def stop(self, timeout: float) -> int:
        """SIGTERM the group, SIGKILL it after ``timeout``, reap. Idempotent."""
        if self.returncode is None:
            _killpg(self.pid, signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout):
                    return await self.wait()
            except TimeoutError:
                log.warning(
                    "%s (pid %d) ignored SIGTERM for %.1f s; sending SIGKILL",
                    self.spec.name,
                    self.pid,
                    timeout,
                )
                _killpg(self.pid, signal.SIGKILL)
        return await self.wait()


class ProcessLauncher:
    """Spawns children in new sessions; the guard kills their groups if cxrd dies."""

    def __init__(self) -> None:
        self._guard = Guard()

    async def spawn(self, spec: ChildSpec) -> Child:
        env = {k: v for k, v in spec.env.items() if k not in _DAEMON_ONLY_ENV}
        spec.stderr.parent.mkdir(parents=True, exist_ok=True)
        with open(spec.stderr, "ab") as stderr:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *spec.argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=stderr,
                    env=env,
                    pass_fds=spec.pass_fds,
                    start_new_session=True,
                )
            except OSError as exc:
                raise StartFailed(f"cannot start the {spec.name} ({spec.argv[0]}): {exc}") from None
        self._guard.watch(proc.pid)
        log.info("started %s: pid %d: %s", spec.name, proc.pid, shlex.join(spec.argv))
        return Child(spec, proc, self._guard)

    def close(self) -> None:
        self._guard.close()


class Guard:
    """A tiny process that SIGKILLs the groups it was told about once cxrd is gone.

    systemd's ``KillMode=mixed`` covers a unit; this covers a terminal or a
    container, where a SIGKILLed cxrd would otherwise leave its children (and
    their grandchildren, which no parent-death signal reaches) running.
    """

    def __init__(self) -> None:
        read_end, self._write_end = os.pipe()
        os.set_inheritable(self._write_end, False)
        script = Path(__file__).parent.parent / "data" / "guard.py"
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(script)],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            os.close(read_end)

    def _send(self, line: str) -> None:
        with contextlib.suppress(OSError):
            os.write(self._write_end, line.encode())

    def watch(self, pgid: int) -> None:
        self._send(f"+{pgid}\n")

    def forget(self, pgid: int) -> None:
        self._send(f"-{pgid}\n")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._write_end)
        try:
            self._proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


async def read_ready_line(fd: int) -> None:
    """Return when the child writes READY on its ready pipe; wait on if it closes without."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[None] = loop.create_future()
    buf = bytearray()

    def on_readable() -> None:
        try:
            chunk = os.read(fd, 64)
        except BlockingIOError:
            return
        buf.extend(chunk)
        if b"READY\n" in buf and not got.done():
            got.set_result(None)
        elif not chunk:
            # Closed without READY: its exit (raced elsewhere) tells the story.
            loop.remove_reader(fd)

    os.set_blocking(fd, False)
    loop.add_reader(fd, on_readable)
    try:
        await got
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def describe_exit(code: int | None) -> str:
    """Words for a return code: 'exited with code 1', 'killed by SIGSEGV'."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"
