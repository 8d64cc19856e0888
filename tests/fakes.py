"""Fakes for the supervisor's ports, and a harness that drives it through them.

The supervisor runs its real code; only what it does to the machine is fake:
processes are futures the test resolves (ready, crash), a stop ends a fake
at once or, for one that ignores SIGTERM, at the stop timeout. The harness
owns an event loop, so hypothesis' synchronous rules can drive it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from cxrd.config import Config, ProxyConfig, RestartConfig, RuntimeConfig
from cxrd.core.model import ChildSpec, RuntimeLaunch, SessionEvent
from cxrd.core.states import ChildState, State
from cxrd.core.supervisor import Supervisor
from cxrd.errors import CxrdError, EulaNotAccepted, StartFailed
from cxrd.proxy.launch import ProxyLaunch

_T = TypeVar("_T")
_pids = itertools.count(40000)

# Short enough for many steps, long enough to tell "at once" from "at the timeout".
STOP_TIMEOUT = 0.05
STARTUP_TIMEOUT = 0.3
BACKOFF = 0.01


class FakeChild:
    def __init__(self, spec: ChildSpec, world: World) -> None:
        self.name = spec.name
        self.pid = next(_pids)
        self.started_at = 1000.0 + self.pid
        self.world = world
        self.ignores_sigterm = world.ignore_sigterm
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.signals: list[str] = []
        world.live.append(self)
        world.spawned.append(self)

    @property
    def returncode(self) -> int | None:
        return self._exit.result() if self._exit.done() else None

    def end(self, code: int) -> None:
        if not self._exit.done():
            self._exit.set_result(code)
            self.world.live.remove(self)

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)

    async def stop(self, timeout: float) -> int:
        self.world.check("stop")
        self.signals.append("TERM")
        if self.ignores_sigterm and not self._exit.done():
            try:
                async with asyncio.timeout(timeout):
                    return await asyncio.shield(self._exit)
            except TimeoutError:
                self.signals.append("KILL")
                self.end(-9)
        self.end(-15)
        return await self.wait()


class FakeListener:
    """Stands in for the proxy's bound socket; the world counts the open ones."""

    def __init__(self, world: World, port: int) -> None:
        self.world = world
        self.port = port
        self.closed = False
        world.listeners.append(self)

    def fileno(self) -> int:
        return 1000 + self.port

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.world.listeners.remove(self)


@dataclass
class World:
    """What the fakes did: live processes, open listeners, files written."""

    live: list[FakeChild] = field(default_factory=list)
    spawned: list[FakeChild] = field(default_factory=list)
    listeners: list[FakeListener] = field(default_factory=list)
    notified: list[str] = field(default_factory=list)
    taken_ports: set[int] = field(default_factory=set)
    env_published: list[Mapping[str, str]] = field(default_factory=list)
    ignore_sigterm: bool = False
    eula_missing: bool = False
    # Port name (a method of the host, "spawn", "file", "pipe", "stop") -> what it raises now.
    broken: dict[str, Callable[[], BaseException]] = field(default_factory=dict)

    def check(self, port: str) -> None:
        """Raise what ``port`` is broken with, if it is."""
        make = self.broken.get(port)
        if make is not None:
            raise make()

    def latest(self, name: str) -> FakeChild | None:
        for child in reversed(self.spawned):
            if child.name == name:
                return child
        return None

    def alive(self, name: str) -> list[FakeChild]:
        return [c for c in self.live if c.name == name]


class FakeLauncher:
    def __init__(self, world: World) -> None:
        self.world = world

    async def spawn(self, spec: ChildSpec) -> FakeChild:
        await asyncio.sleep(0)  # spawning takes a loop turn, as a real one does
        self.world.check("spawn")
        return FakeChild(spec, self.world)


class FakePipe:
    def __init__(self, world: World) -> None:
        self.world = world
        self.write_fd = -1
        self.child: FakeChild | None = None

    def close_write(self) -> None:
        pass

    async def wait(self) -> None:
        self.child = self.world.latest("proxy")
        assert self.child is not None
        await asyncio.shield(self.child.ready)

    async def next_event(self) -> SessionEvent | None:
        """No headset in the model: the pipe just closes when its proxy exits."""
        assert self.child is not None
        await self.child.wait()
        return None

    def close(self) -> None:
        pass


class FakeReadiness:
    def __init__(self, world: World) -> None:
        self.world = world

    async def file(self, path: Path) -> None:
        self.world.check("file")
        child = self.world.latest("runtime")
        assert child is not None
        await asyncio.shield(child.ready)

    def pipe(self) -> FakePipe:
        self.world.check("pipe")
        return FakePipe(self.world)


class FakeHost:
    def __init__(self, world: World) -> None:
        self.world = world

    def prepare_runtime(self, config: Config, profile: str) -> RuntimeLaunch:
        self.world.check("prepare_runtime")
        if self.world.eula_missing:
            raise EulaNotAccepted("the CloudXR EULA is not accepted")
        env = {"NV_DEVICE_PROFILE": profile, **config.runtime.env}
        if config.runtime.gpu is not None:
            env["NV_CXR_GPU_INDEX_CUDA"] = str(config.runtime.gpu)
        spec = ChildSpec(name="runtime", argv=("fake-runtime",), env=env, stderr=Path("/dev/null"))
        return RuntimeLaunch("sim", spec, env, Path("/dev/null"), Path("/nonexistent"))

    async def prepare_proxy(self, config: Config, keep: ProxyLaunch | None) -> ProxyLaunch:
        await asyncio.sleep(0)  # a thread, for real
        self.world.check("prepare_proxy")
        s = config.proxy
        if keep is not None and keep.settings.port == s.port:
            listener: Any = keep.listener
        elif s.port in self.world.taken_ports:
            raise StartFailed(f"port {s.port} on * is taken by pid 4242 (squatter)")
        else:
            listener = FakeListener(self.world, s.port)
        return ProxyLaunch(
            listener=listener,
            urls=(f"https://127.0.0.1:{s.port}/client/?serverIP=127.0.0.1&port={s.port}",),
            port=s.port,
            log_path=Path("/dev/null"),
            cert=Path("/dev/null"),
            key=Path("/dev/null"),
            settings=s,
        )

    def claim_run_dir(self, run_dir: Path) -> list[str]:
        self.world.check("claim_run_dir")
        return []

    def publish_environment(self, run_dir: Path, environment: Mapping[str, str]) -> None:
        self.world.check("publish_environment")
        self.world.env_published.append(dict(environment))

    def clear_run_files(self, run_dir: Path) -> None:
        self.world.check("clear_run_files")

    def env_file_event(self) -> str:
        self.world.check("env_file_event")
        return ""

    def record_failure(self, run_dir: Path, error: CxrdError) -> None:
        self.world.check("record_failure")

    def clear_failure(self, run_dir: Path) -> None:
        self.world.check("clear_failure")

    def log_size(self, path: Path) -> int:
        self.world.check("log_size")
        return 0

    def runtime_diagnosis(self, launch: RuntimeLaunch, since: float, offset: int) -> str:
        self.world.check("runtime_diagnosis")
        return ""

    def server_log(self, launch: RuntimeLaunch, since: float) -> str:
        self.world.check("server_log")
        return ""

    def proxy_diagnosis(self, launch: ProxyLaunch) -> str:
        self.world.check("proxy_diagnosis")
        return ""


class FakeNotifier:
    def __init__(self, world: World) -> None:
        self.world = world

    def notify(self, *lines: str) -> None:
        self.world.notified.extend(lines)


def base_config(tmp: Path, **sections: Any) -> Config:
    config = Config(
        install_dir=str(tmp),
        runtime=RuntimeConfig(
            backend="sim", startup_timeout=STARTUP_TIMEOUT, stop_timeout=STOP_TIMEOUT
        ),
        proxy=ProxyConfig(port=50000),
        restart=RestartConfig(max_restarts=3, window=60.0, backoff_initial=BACKOFF),
    )
    for name, values in sections.items():
        config = replace(config, **{name: replace(getattr(config, name), **values)})
    return config


class Harness:
    """A supervisor on fake ports, with its own loop; every call settles the loop."""

    def __init__(self, config: Config) -> None:
        self.loop = asyncio.new_event_loop()
        self.world = World()
        self.config = config
        self.sup = self.run(self._make(config))
        self.controller = self.loop.create_task(self.sup.run())
        self.settle()

    async def _make(self, config: Config) -> Supervisor:
        w = self.world
        return Supervisor(
            config,
            launcher=FakeLauncher(w),
            notifier=FakeNotifier(w),
            readiness=FakeReadiness(w),
            host=FakeHost(w),
        )

    def run(self, coro: Awaitable[_T], timeout: float = 5.0) -> _T:
        async def bounded() -> _T:
            async with asyncio.timeout(timeout):
                return await coro

        return self.loop.run_until_complete(bounded())

    def settle(self, seconds: float = 0.0) -> None:
        """Let every message and worker run; ``seconds`` of real time pass at least."""

        async def quiet() -> None:
            await asyncio.sleep(seconds)
            # Workers post after a few turns of their own; 60 turns outlast every chain.
            for _ in range(60):
                await asyncio.sleep(0)

        self.run(quiet())

    def call(self, make: Callable[[], Awaitable[Any]]) -> asyncio.Task[Any]:
        """Start a request in the loop; the task is the caller waiting for the answer."""
        task = self.loop.create_task(_as_coro(make))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # read by the test
        self.settle()
        return task

    def ready(self, name: str) -> bool:
        child = self.world.latest(name)
        if child is None or child.ready.done() or child.returncode is not None:
            return False
        child.ready.set_result(None)
        self.settle()
        return True

    def crash(self, name: str, code: int = 1) -> bool:
        alive = self.world.alive(name)
        if not alive:
            return False
        alive[-1].end(code)
        self.settle()
        return True

    def bring_up(self) -> None:
        """The daemon's own first start, to ready."""
        self.call(self.sup.launch)
        self.ready("runtime")
        self.ready("proxy")
        assert self.sup.state is State.READY, self.sup.state

    def reload_with(self, config: Config | CxrdError) -> asyncio.Task[Any]:
        def read() -> Config:
            if isinstance(config, CxrdError):
                raise config
            return config

        return self.call(lambda: self.sup.reload(read))

    def stop_and_wait(self) -> int:
        self.sup.request_stop("the test ends")
        code = self.run(self.sup.wait_stopped())
        self.run(self.controller)
        return code

    def close(self) -> None:
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:
            gathered = asyncio.gather(*pending, return_exceptions=True)
            self.loop.run_until_complete(gathered)
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def states(self) -> tuple[ChildState, ChildState]:
        return self.sup._runtime.state, self.sup._proxy.state


async def _as_coro(make: Callable[[], Awaitable[Any]]) -> Any:
    return await make()
