"""The real ports of the supervisor: processes' readiness, the run dir, the proxy's socket.

``cxrd.core`` declares what it needs (``cxrd.core.ports``); this module, beside
the composition root (``cxrd.daemon``), is what the daemon passes in: the
adapters (``proxy/``, ``runtimes/``, ``system/``) put together. Nothing here
decides anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path

from cxrd import constants as C
from cxrd.config import Config
from cxrd.core import ports
from cxrd.core.model import RuntimeLaunch, SessionEvent
from cxrd.errors import AlreadyServing, CxrdError
from cxrd.proxy import events
from cxrd.proxy.launch import ProxyLaunch, prepare_proxy
from cxrd.runtimes import prepare_runtime
from cxrd.system import logfiles, rundir, siblings
from cxrd.system.diagnosis import log_section, newest_log
from cxrd.system.envguard import EnvGuard
from cxrd.system.readiness import wait_for_file


class Pipe:
    """A ready pipe: the child writes READY to ``write_fd``, then one line per session event."""

    def __init__(self) -> None:
        self._read, self.write_fd = os.pipe()
        self._write_open = True
        self._read_open = True
        self._reader: asyncio.StreamReader | None = None
        self._transport: asyncio.ReadTransport | None = None

    def close_write(self) -> None:
        if self._write_open:
            self._write_open = False
            os.close(self.write_fd)

    async def _lines(self) -> asyncio.StreamReader:
        if self._reader is None:
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader(limit=events.MAX_LINE)
            self._read_open = False  # the transport owns and closes it from here
            self._transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader),
                os.fdopen(self._read, "rb", buffering=0),
            )
            self._reader = reader
        return self._reader

    async def wait(self) -> None:
        reader = await self._lines()
        while True:
            try:
                line = await reader.readline()
            except ValueError:  # a line over the limit: not ours, skipped
                continue
            if line == events.READY_LINE:
                return
            if not line:
                # Closed without READY: its exit (raced elsewhere) tells the story.
                await asyncio.get_running_loop().create_future()

    async def next_event(self) -> SessionEvent | None:
        reader = await self._lines()
        while True:
            try:
                line = await reader.readline()
            except ValueError:
                continue
            if not line:
                return None
            event = events.decode(line)
            if event is not None:
                return event

    def close(self) -> None:
        self.close_write()
        if self._transport is not None:
            self._transport.close()
        elif self._read_open:
            self._read_open = False
            os.close(self._read)


class SystemReadiness:
    async def file(self, path: Path) -> None:
        await wait_for_file(path)

    def pipe(self) -> Pipe:
        return Pipe()


class SystemHost:
    """The install dir's files and the backends, as the supervisor's Host port.

    ``on_env_event`` is called when another program changed cloudxr.env and it
    was put back (the daemon passes ``supervisor.refresh``, so Status shows it).
    """

    def __init__(self, on_env_event: Callable[[], None] | None = None) -> None:
        self.on_env_event = on_env_event
        self._env_guard = EnvGuard(on_event=self._env_event)

    def _env_event(self) -> None:
        if self.on_env_event is not None:
            self.on_env_event()

    def prepare_runtime(self, config: Config, profile: str) -> RuntimeLaunch:
        siblings.check_ports(config)
        launch = prepare_runtime(config, device_profile=profile)
        # Room for the server log the starting runtime writes.
        logfiles.prune(launch.logs_dir, C.SERVER_LOG_GLOB, config.logs.keep - 1)
        if launch.spec.stderr_limits is None:  # it truncates the file itself
            logfiles.rotate_stale(launch.stderr_log, config.logs)
        return launch

    async def prepare_proxy(self, config: Config, keep: ports.ProxyLaunch | None) -> ProxyLaunch:
        assert keep is None or isinstance(keep, ProxyLaunch), "only this host's launches"
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(None, prepare_proxy, config, keep)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            # The thread goes on; whatever it binds is closed when it ends.
            work.add_done_callback(lambda done: _close_unwanted(done, keep))
            raise

    def claim_run_dir(self, run_dir: Path) -> list[str]:
        # Removed, or replaced by a file: say so, rather than taking the failed
        # connect() to its socket for a live runtime.
        if not stat.S_ISDIR(os.stat(run_dir).st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(run_dir))
        holder = rundir.live_runtime_pid(run_dir)
        if holder is not None:
            who = f" (pid {holder})" if holder else ""
            raise AlreadyServing(
                f"a CloudXR runtime not started by this cxrd{who} already serves "
                f"{run_dir / C.IPC_SOCKET}"
            )
        return rundir.remove_stale(run_dir)

    def publish_environment(self, run_dir: Path, environment: Mapping[str, str]) -> None:
        self._env_guard.publish(run_dir / C.ENV_FILE, environment)

    def clear_run_files(self, run_dir: Path) -> None:
        self._env_guard.stop()
        # A live runtime answering there now is not ours (ours is stopped): its files.
        if rundir.live_runtime_pid(run_dir) is not None:
            return
        with contextlib.suppress(FileNotFoundError):
            (run_dir / C.ENV_FILE).unlink()
        rundir.remove_stale(run_dir)

    def env_file_event(self) -> str:
        return self._env_guard.last_event()

    def record_failure(self, run_dir: Path, error: CxrdError) -> None:
        with contextlib.suppress(OSError, CxrdError):
            rundir.write_last_error(run_dir, error.name, str(error), error.detail)

    def clear_failure(self, run_dir: Path) -> None:
        rundir.clear_last_error(run_dir)

    def log_size(self, path: Path) -> int:
        try:
            return path.stat().st_size
        except OSError:
            return 0

    def runtime_diagnosis(self, launch: RuntimeLaunch, since: float, offset: int) -> str:
        server = newest_log(launch.logs_dir, C.SERVER_LOG_GLOB, since=since)
        sections = [
            log_section(launch.stderr_log, start=offset),
            log_section(server, max_lines=10) if server else "",
        ]
        return "\n".join(s for s in sections if s)

    def server_log(self, launch: RuntimeLaunch, since: float) -> str:
        server = newest_log(launch.logs_dir, C.SERVER_LOG_GLOB, since=since)
        return str(server) if server else ""

    def proxy_diagnosis(self, launch: ports.ProxyLaunch) -> str:
        return log_section(launch.stderr_log, max_lines=10)


def _close_unwanted(done: asyncio.Future[ProxyLaunch], keep: ProxyLaunch | None) -> None:
    if done.cancelled() or done.exception() is not None:
        return
    launch = done.result()
    if keep is None or launch.listener is not keep.listener:
        launch.close()
