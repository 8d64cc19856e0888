"""The supervisor's ports: everything it does to the machine goes through these.

The daemon passes the real ones (``cxrd.host``); the model-based tests pass
fakes, so the supervisor runs the same code against both. Whatever a port
raises becomes a named failure of one child (``cxrd.core.faults``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from cxrd.config import Config
from cxrd.core.model import ChildSpec, RuntimeLaunch, SessionEvent
from cxrd.errors import CxrdError

Clock = Callable[[], float]


class ChildHandle(Protocol):
    """A spawned child process group."""

    pid: int
    started_at: float  # Unix time

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int:
        """The exit code, once the leader is reaped and its group is gone."""
        ...

    async def stop(self, timeout: float) -> int:
        """SIGTERM, SIGKILL after ``timeout``, reap. Idempotent."""
        ...


class ProxyLaunch(Protocol):
    """The proxy's prepared start: a certificate, a held listening socket, its URLs."""

    @property
    def listener(self) -> object:
        """The bound socket: a reload that keeps host and port keeps this very object."""
        ...

    @property
    def urls(self) -> tuple[str, ...]: ...

    @property
    def url(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def log_path(self) -> Path: ...

    @property
    def stderr_log(self) -> Path: ...

    @property
    def cert_note(self) -> str: ...

    def spec(self, ready_fd: int) -> ChildSpec:
        """The proxy child, which writes READY to ``ready_fd`` once it serves."""
        ...

    def close(self) -> None:
        """Release the port."""
        ...


class Launcher(Protocol):
    async def spawn(self, spec: ChildSpec) -> ChildHandle: ...


class Notifier(Protocol):
    def notify(self, *lines: str) -> None: ...


class ReadyPipe(Protocol):
    """A pipe whose write end a child inherits: ``READY``, then its session events."""

    write_fd: int

    def close_write(self) -> None:
        """The parent's copy of the write end, once the child has its own."""
        ...

    async def wait(self) -> None:
        """Return once READY arrives."""
        ...

    async def next_event(self) -> SessionEvent | None:
        """The next headset session event after READY; None once the child closed the pipe."""
        ...

    def close(self) -> None: ...


class Readiness(Protocol):
    async def file(self, path: Path) -> None:
        """Return once ``path`` exists (the runtime's sentinel)."""
        ...

    def pipe(self) -> ReadyPipe: ...


class Host(Protocol):
    """The files, sockets and checks of the install dir, and the backends."""

    def prepare_runtime(self, config: Config, profile: str) -> RuntimeLaunch:
        """Check that the backend can run; raise a named error if not."""
        ...

    async def prepare_proxy(self, config: Config, keep: ProxyLaunch | None) -> ProxyLaunch:
        """Certificate checked or made, port bound (``keep``'s, when host and port match).

        Slow parts (key generation, name lookups) run off the event loop; a
        cancelled call leaks no socket.
        """
        ...

    def claim_run_dir(self, run_dir: Path) -> list[str]:
        """Refuse a live foreign runtime (AlreadyServing); remove stale files; say which."""
        ...

    def publish_environment(self, run_dir: Path, environment: Mapping[str, str]) -> None: ...

    def clear_run_files(self, run_dir: Path) -> None:
        """Remove cloudxr.env and the stale files our stopped runtime left."""
        ...

    def env_file_event(self) -> str:
        """The last time another program changed cloudxr.env and it was put back; ''."""
        ...

    def record_failure(self, run_dir: Path, error: CxrdError) -> None: ...

    def clear_failure(self, run_dir: Path) -> None: ...

    def log_size(self, path: Path) -> int: ...

    def runtime_diagnosis(self, launch: RuntimeLaunch, since: float, offset: int) -> str:
        """The runtime's log tails written since it started, for errors and last_error."""
        ...

    def server_log(self, launch: RuntimeLaunch, since: float) -> str:
        """The native ``cxr_server.*.log`` this runtime writes; '' until there is one."""
        ...

    def proxy_diagnosis(self, launch: ProxyLaunch) -> str: ...
