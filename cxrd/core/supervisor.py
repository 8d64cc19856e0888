"""The supervisor: the state machine, the two child groups, the restart policy.

Plain asyncio. It knows nothing of D-Bus, sd_notify or signals: the daemon
passes in a launcher, a notifier and a readiness probe, and D-Bus, signal
handlers and tests all call the same methods and subscribe to the same events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from cxrd import __version__
from cxrd import constants as C
from cxrd.config import Config
from cxrd.core.diagnosis import as_verb, headline, log_section, newest_log
from cxrd.core.policy import RestartPolicy
from cxrd.core.snapshot import Lease, ProxyStatus, RuntimeStatus, Snapshot
from cxrd.core.states import DESCRIPTIONS, State, StateChanged, check_transition
from cxrd.errors import (
    AlreadyServing,
    Busy,
    CxrdError,
    GaveUp,
    NoSuchLease,
    ProfileMismatch,
    StartFailed,
    Timeout,
)
from cxrd.proxy.launch import ProxyLaunch, prepare_proxy
from cxrd.runtimes import RuntimeLaunch, prepare_runtime
from cxrd.system import rundir
from cxrd.system.envfile import write_env_file
from cxrd.system.process import ChildSpec, describe_exit, read_ready_line

log = logging.getLogger(__name__)

# While a slow runtime comes up, keep pushing systemd's start timeout this far ahead.
EXTEND_EVERY = 5.0
EXTEND_BY = 15.0


# ---- ports -----------------------------------------------------------------


class ChildHandle(Protocol):
    pid: int
    started_at: float

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    async def stop(self, timeout: float) -> int: ...


class Launcher(Protocol):
    async def spawn(self, spec: ChildSpec) -> ChildHandle: ...


class Notifier(Protocol):
    def notify(self, *lines: str) -> None: ...


Readiness = Callable[[Path], Awaitable[None]]


# ---- events ----------------------------------------------------------------


@dataclass(frozen=True)
class Updated:
    """Something in the snapshot other than the state may have changed."""


Event = StateChanged | Updated


@dataclass
class _ChildRecord:
    """One of the two children: how to start and explain it, and what it has done."""

    name: str  # "runtime" or "proxy"
    start: Callable[[], Awaitable[None]]  # spawn and wait until ready
    diagnose: Callable[[], str]  # log tails that explain its end
    policy: RestartPolicy
    handle: ChildHandle | None = None
    restarts: int = 0
    last_exit: str = ""

    @property
    def pid(self) -> int:
        h = self.handle
        return h.pid if h is not None and h.returncode is None else 0


class Supervisor:
    def __init__(
        self,
        config: Config,
        *,
        launcher: Launcher,
        notifier: Notifier,
        readiness: Readiness,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._launcher = launcher
        self._notifier = notifier
        self._readiness = readiness
        self._clock = clock
        self._born = clock()
        self._state = State.STOPPED
        self._profile = config.runtime.device_profile
        self._listeners: list[Callable[[Event], None]] = []
        self._runtime = _ChildRecord(
            "runtime", self._start_runtime, self._runtime_diagnosis, self._new_policy()
        )
        self._proxy = _ChildRecord(
            "proxy", self._start_proxy, self._proxy_diagnosis, self._new_policy()
        )
        self._runtime_launch: RuntimeLaunch | None = None
        self._proxy_launch: ProxyLaunch | None = None
        self._stderr_offset = 0
        self._proxy_stderr: Path | None = None
        self._server_log = ""
        self._last_error = ""
        self._failure: CxrdError | None = None
        self._leases: dict[str, Lease] = {}
        self._idle_timer: asyncio.TimerHandle | None = None
        self._life: asyncio.Task[None] | None = None
        self._stopper: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._exit: asyncio.Future[int] | None = None

    # ---- observation -------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    def subscribe(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def snapshot(self) -> Snapshot:
        cfg = self._config
        rt, px = self._runtime, self._proxy
        launch, proxy = self._runtime_launch, self._proxy_launch
        running = self._state in (State.STARTING, State.READY, State.RESTARTING)
        logs = {}
        if launch is not None:
            logs["runtime"] = str(launch.stderr_log)
        if self._server_log:
            logs["server"] = self._server_log
        if proxy is not None:
            logs["proxy"] = str(proxy.log_path)
        return Snapshot(
            state=self._state,
            backend=cfg.runtime.backend,
            runtime=RuntimeStatus(
                pid=rt.pid,
                started_at=rt.handle.started_at if rt.handle is not None and rt.pid else 0.0,
                restarts=rt.restarts,
                last_exit=rt.last_exit,
            ),
            proxy=ProxyStatus(
                pid=px.pid,
                port=proxy.port if proxy is not None else 0,
                url=proxy.url if proxy is not None else "",
                restarts=px.restarts,
                last_exit=px.last_exit,
            ),
            device_profile=self._profile,
            environment=dict(launch.environment) if launch is not None and running else {},
            env_file=str(cfg.run_dir / C.ENV_FILE),
            logs=logs,
            install_dir=str(cfg.install_path),
            uptime=self._clock() - self._born,
            last_error=self._last_error,
            version=__version__,
            interface_version=C.INTERFACE_VERSION,
            leases=tuple(self._leases.values()),
        )

    def _emit(self, event: Event) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("a state listener failed")

    def _set_state(self, new: State, reason: str) -> None:
        old = self._state
        if new is old:
            # A second crash while restarting: say so, the state stays.
            log.info("%s (still %s)", reason, new)
            self._notifier.notify(f"STATUS={DESCRIPTIONS[new]}: {reason}")
            self._emit(Updated())
            return
        check_transition(old, new)
        self._state = new
        log.info("%s -> %s: %s", old, new, reason)
        lines = [f"STATUS={DESCRIPTIONS[new]}: {reason}"]
        if new is State.READY:
            lines.append("READY=1")
        self._notifier.notify(*lines)
        self._emit(StateChanged(new, old, reason))

    # ---- control -----------------------------------------------------------

    async def start(
        self, *, timeout: float | None = None, device_profile: str | None = None
    ) -> None:
        """Return once ready; start first when stopped. See SUPERVISOR_API in the docs."""
        self._refuse_when_ending()
        if self._state is State.STOPPED:
            self._begin(device_profile or self._config.runtime.device_profile, "start requested")
        else:
            self._check_profile(device_profile)
            if self._state is State.READY:
                return
        await self._wait_ready(timeout)

    async def restart(
        self, *, timeout: float | None = None, device_profile: str | None = None
    ) -> None:
        """Stop both groups and start them again in this daemon; return once ready."""
        self._refuse_when_ending()
        profile = device_profile or self._profile
        if self._state is not State.STOPPED:
            await self._bring_down("restart requested", final=False)
        self._begin(profile, "restart requested")
        await self._wait_ready(timeout)

    def request_stop(self, reason: str = "stop requested") -> None:
        """Begin stopping and return at once. Idempotent."""
        if self._state in (State.STOPPING, State.FAILED) or self._stopper is not None:
            return
        if self._state is State.STOPPED:
            if not self._exit_future().done():
                self._exit_future().set_result(0)
            return
        self._stopper = asyncio.create_task(self._stop(reason))

    async def stop(self) -> None:
        self.request_stop()
        await self.wait_stopped()

    async def wait_stopped(self) -> int:
        """Resolve when the daemon should exit; the exit code (0 after a clean stop)."""
        return await asyncio.shield(self._exit_future())

    async def reload(self, config: Config) -> None:
        """Adopt a re-read config; restart only the children whose settings changed."""
        old = self._config
        if config.install_path != old.install_path:
            log.warning("install_dir cannot change on reload; keeping %s", old.install_dir)
            config = replace(config, install_dir=old.install_dir)
        self._notifier.notify("RELOADING=1", "STATUS=Reloading the configuration")
        self._config = config
        for record in (self._runtime, self._proxy):
            record.policy = self._new_policy()
        runtime_changed = old.runtime != config.runtime or (
            old.proxy.backend_port != config.proxy.backend_port
        )
        proxy_changed = old.proxy != config.proxy
        if self._state is State.READY and runtime_changed:
            log.info("runtime settings changed: restarting both groups")
            if proxy_changed:
                self._drop_proxy_listener()
            await self.restart(device_profile=config.runtime.device_profile)
        elif self._state is State.READY and proxy_changed:
            log.info("proxy settings changed: restarting the proxy alone")
            await self._stop_child(self._proxy)
            self._drop_proxy_listener()
            if config.proxy.enabled:
                self._proxy_launch = prepare_proxy(config)
                async with asyncio.timeout(config.runtime.startup_timeout):
                    await self._start_proxy()
            self._emit(Updated())
        else:
            log.info("configuration reloaded; no child settings changed")
        status = f"STATUS={DESCRIPTIONS[self._state]}: configuration reloaded"
        self._notifier.notify("READY=1", status)

    # ---- leases ------------------------------------------------------------

    def acquire(self, holder: str, pid: int, reason: str) -> str:
        lease = Lease(id=uuid.uuid4().hex, holder=holder, pid=pid, reason=reason, since=time.time())
        self._leases[lease.id] = lease
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        log.info("lease %s acquired by %s (pid %d): %s", lease.id, holder, pid, reason)
        self._emit(Updated())
        return lease.id

    def release(self, lease_id: str) -> None:
        try:
            lease = self._leases.pop(lease_id)
        except KeyError:
            raise NoSuchLease(f"no lease {lease_id!r} is held") from None
        log.info("lease %s released by %s", lease.id, lease.holder)
        self._after_release()

    def release_holder(self, holder: str) -> int:
        gone = [lid for lid, lease in self._leases.items() if lease.holder == holder]
        for lid in gone:
            del self._leases[lid]
        if gone:
            log.info("%d lease(s) of %s ended: it left the bus", len(gone), holder)
            self._after_release()
        return len(gone)

    def _after_release(self) -> None:
        self._emit(Updated())
        if self._leases or not self._config.stop_when_idle or self._idle_timer is not None:
            return
        grace = self._config.idle_grace
        log.info("last lease ended; stopping in %.0f s unless a new one is taken", grace)
        self._idle_timer = asyncio.get_running_loop().call_later(
            grace, self.request_stop, f"idle for {grace:g} s after the last lease ended"
        )

    # ---- lifecycle ---------------------------------------------------------

    def _refuse_when_ending(self) -> None:
        if self._state is State.FAILED:
            assert self._failure is not None
            raise type(self._failure)(str(self._failure))
        if self._state is State.STOPPING or (self._exit is not None and self._exit.done()):
            raise Busy("the daemon is stopping; start it again once it has exited")

    def _new_policy(self) -> RestartPolicy:
        r = self._config.restart
        return RestartPolicy(r.max_restarts, r.window, r.backoff_initial, r.backoff_max)

    def _exit_future(self) -> asyncio.Future[int]:
        if self._exit is None:
            self._exit = asyncio.get_running_loop().create_future()
        return self._exit

    def _check_profile(self, wanted: str | None) -> None:
        if wanted and wanted != self._profile:
            raise ProfileMismatch(
                f"the runtime runs with device profile {self._profile!r}, "
                f"not {wanted!r}; restart it to switch"
            )

    def _begin(self, profile: str, reason: str) -> None:
        self._profile = profile
        if self._ready is None or self._ready.done():
            self._ready = asyncio.get_running_loop().create_future()
            # Mark the exception retrieved: callers may all have timed out.
            self._ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._set_state(State.STARTING, reason)
        self._life = asyncio.create_task(self._run(), name="cxrd-lifecycle")

    async def _wait_ready(self, timeout: float | None) -> None:
        ready = self._ready
        assert ready is not None
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(ready)
        except TimeoutError:
            raise Timeout(
                f"not ready within {timeout:g} s (state: {self._state}); the start goes on"
            ) from None

    async def _run(self) -> None:
        try:
            await self._bring_up()
            await self._supervise()
        except CxrdError as err:
            await self._fail(err)
        except Exception as exc:
            log.exception("internal error")
            await self._fail(StartFailed(f"internal error: {exc!r}"))

    async def _bring_up(self) -> None:
        cfg = self._config
        self._runtime_launch = prepare_runtime(cfg, device_profile=self._profile)
        if cfg.proxy.enabled and self._proxy_launch is None:
            self._proxy_launch = prepare_proxy(cfg)
        starts: list[Coroutine[Any, Any, None]] = [self._start_runtime()]
        if self._proxy_launch is not None:
            starts.append(self._start_proxy())
        extender = asyncio.create_task(self._extend_start_timeout())
        try:
            async with asyncio.timeout(cfg.runtime.startup_timeout):
                await _all_or_first_error(starts)
        except TimeoutError:
            raise self._startup_timeout() from None
        finally:
            extender.cancel()
        rundir.clear_last_error(cfg.run_dir)
        self._last_error = ""
        self._set_state(State.READY, self._ready_words())
        assert self._ready is not None
        if not self._ready.done():
            self._ready.set_result(None)

    def _ready_words(self) -> str:
        proxy = self._proxy_launch
        where = f"; headsets connect to {proxy.url}" if proxy is not None else ""
        return f"{self._config.runtime.backend} runtime ready (profile {self._profile}){where}"

    async def _extend_start_timeout(self) -> None:
        while True:
            self._notifier.notify(f"EXTEND_TIMEOUT_USEC={int(EXTEND_BY * 1e6)}")
            await asyncio.sleep(EXTEND_EVERY)

    def _startup_timeout(self) -> CxrdError:
        cfg = self._config
        sentinel = cfg.run_dir / C.SENTINEL_FILE
        tail = self._runtime_diagnosis()
        if self._runtime.pid and not sentinel.exists():
            what = f"the runtime (pid {self._runtime.pid}) did not create {sentinel}"
        elif self._runtime.pid:
            what = "the proxy did not report that it listens"
        else:
            what = "the runtime did not come up"
        return Timeout(
            f"{what} within {cfg.runtime.startup_timeout:g} s (runtime.startup_timeout)",
            detail=tail,
        )

    async def _start_runtime(self) -> None:
        launch = self._runtime_launch
        assert launch is not None
        run_dir = self._config.run_dir  # made, 0700, by prepare_runtime()
        holder = rundir.live_runtime_pid(run_dir)
        if holder is not None:
            who = f" (pid {holder})" if holder else ""
            raise AlreadyServing(
                f"a CloudXR runtime not started by this cxrd{who} already serves "
                f"{run_dir / C.IPC_SOCKET}"
            )
        removed = rundir.remove_stale(run_dir)
        if removed:
            log.info("removed stale %s from %s", ", ".join(removed), run_dir)
        write_env_file(run_dir / C.ENV_FILE, launch.environment)
        try:
            self._stderr_offset = launch.stderr_log.stat().st_size
        except FileNotFoundError:
            self._stderr_offset = 0
        self._server_log = ""
        child = await self._launcher.spawn(launch.spec)
        self._runtime.handle = child
        self._emit(Updated())
        await self._race(self._readiness(run_dir / C.SENTINEL_FILE), self._runtime)
        server = newest_log(launch.logs_dir, C.SERVER_LOG_GLOB, since=child.started_at)
        self._server_log = str(server) if server else ""

    async def _start_proxy(self) -> None:
        launch = self._proxy_launch
        assert launch is not None
        read_end, write_end = os.pipe()
        spec = launch.spec(write_end)
        self._proxy_stderr = spec.stderr
        try:
            child = await self._launcher.spawn(spec)
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        self._proxy.handle = child
        self._emit(Updated())
        await self._race(read_ready_line(read_end), self._proxy)

    async def _race(self, ready: Awaitable[None], record: _ChildRecord) -> None:
        """Wait for ``ready``; if the child exits first, fail with its diagnosis."""
        assert record.handle is not None
        ready_task = asyncio.ensure_future(ready)
        exit_task = asyncio.ensure_future(record.handle.wait())
        try:
            await asyncio.wait({ready_task, exit_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (ready_task, exit_task):
                task.cancel()
            await asyncio.gather(ready_task, exit_task, return_exceptions=True)
        if not exit_task.cancelled() and exit_task.exception() is None:
            record.last_exit = describe_exit(exit_task.result())
            tail = record.diagnose()
            line = headline(tail)
            raise StartFailed(
                f"the {record.name} {as_verb(record.last_exit)} before it was ready"
                + (f": {line}" if line else ""),
                detail=tail,
            )
        ready_task.result()

    async def _supervise(self) -> None:
        while True:
            waits: dict[asyncio.Future[int], _ChildRecord] = {}
            for record in (self._runtime, self._proxy):
                if record.handle is not None:
                    waits[asyncio.ensure_future(record.handle.wait())] = record
            try:
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in waits:
                    task.cancel()
            await self._recover(waits[done.pop()])

    async def _recover(self, record: _ChildRecord) -> None:
        """A child died after ready: restart it alone, with backoff, or give up."""
        assert record.handle is not None
        record.last_exit = describe_exit(record.handle.returncode)
        tail = record.diagnose()
        cause = f"the {record.name} {as_verb(record.last_exit)}"
        r = self._config.restart
        while True:
            line = headline(tail)
            delay = record.policy.record_crash(self._clock())
            if delay is None:
                raise GaveUp(
                    f"{cause} and crashed more than {r.max_restarts} times within "
                    f"{r.window:g} s; giving up" + (f" (last: {line})" if line else ""),
                    detail=tail,
                )
            record.restarts += 1
            self._last_error = cause + (f": {line}" if line else "")
            self._set_state(
                State.RESTARTING,
                f"{cause}; restarting it in {delay:.1f} s "
                f"(crash {record.policy.recent_crashes} of at most {r.max_restarts}"
                f" in {r.window:g} s)",
            )
            await asyncio.sleep(delay)
            try:
                async with asyncio.timeout(self._config.runtime.startup_timeout):
                    await record.start()
            except StartFailed as err:
                cause, tail = str(err), err.detail
                continue
            except TimeoutError:
                await self._stop_child(record)
                cause = f"the {record.name} did not become ready again within the startup timeout"
                tail = record.diagnose()
                continue
            break
        self._set_state(State.READY, f"{record.name} restarted; " + self._ready_words())

    async def _stop_child(self, record: _ChildRecord) -> None:
        handle = record.handle
        if handle is None:
            return
        code = await handle.stop(self._config.runtime.stop_timeout)
        if not record.last_exit:
            record.last_exit = describe_exit(code)
        log.info("%s (pid %d) stopped: %s", record.name, handle.pid, describe_exit(code))
        self._emit(Updated())

    async def _stop_children(self) -> None:
        await asyncio.gather(
            self._stop_child(self._runtime),
            self._stop_child(self._proxy),
        )

    async def _bring_down(self, reason: str, *, final: bool) -> None:
        self._set_state(State.STOPPING, reason)
        if final:
            self._notifier.notify("STOPPING=1")
        life = self._life
        if life is not None and not life.done():
            life.cancel()
            await asyncio.wait({life})
        await self._stop_children()
        self._clear_run_files()

    async def _stop(self, reason: str) -> None:
        try:
            await self._bring_down(reason, final=True)
        finally:
            self._drop_proxy_listener()
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(StartFailed("stopped by request while starting"))
            self._set_state(State.STOPPED, "both groups stopped")
            self._exit_future().set_result(0)

    def _clear_run_files(self) -> None:
        """Remove what our stopped runtime left: cloudxr.env and the stale files.

        Nothing when we never started one, or when a live runtime (not ours:
        ours is stopped) answers there: those files are its.
        """
        run_dir = self._config.run_dir
        if self._runtime.handle is None or rundir.live_runtime_pid(run_dir) is not None:
            return
        with contextlib.suppress(FileNotFoundError):
            (run_dir / C.ENV_FILE).unlink()
        rundir.remove_stale(run_dir)

    def _drop_proxy_listener(self) -> None:
        if self._proxy_launch is not None:
            self._proxy_launch.close()
            self._proxy_launch = None

    async def _fail(self, err: CxrdError) -> None:
        """The end of the road: record why, stop everything, tell every waiter."""
        run_dir = self._config.run_dir
        self._failure = err
        self._last_error = str(err)
        try:
            with contextlib.suppress(OSError):
                rundir.write_last_error(run_dir, err.name, str(err), err.detail)
            if err.detail:
                log.error("%s\n%s", err, err.detail)
            self._set_state(State.FAILED, str(err))
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(err)
            await self._stop_children()
        finally:
            self._drop_proxy_listener()
            self._clear_run_files()
            if not self._exit_future().done():
                self._exit_future().set_result(err.exit_code)

    # ---- diagnosis ---------------------------------------------------------

    def _proxy_diagnosis(self) -> str:
        return log_section(self._proxy_stderr, max_lines=10) if self._proxy_stderr else ""

    def _runtime_diagnosis(self) -> str:
        launch = self._runtime_launch
        if launch is None:
            return ""
        started = self._runtime.handle.started_at if self._runtime.handle else 0.0
        server = newest_log(launch.logs_dir, C.SERVER_LOG_GLOB, since=started)
        sections = [
            log_section(launch.stderr_log, start=self._stderr_offset),
            log_section(server, max_lines=10) if server else "",
        ]
        return "\n".join(s for s in sections if s)


async def _all_or_first_error(coros: list[Coroutine[Any, Any, None]]) -> None:
    """Run concurrently; the first error cancels the rest and is raised as itself."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        _done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
