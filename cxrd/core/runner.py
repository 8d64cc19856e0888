"""The mechanics under the supervisor: the queue, and each child's start, stop and exit.

:class:`Runner.run` is the one task that decides. Workers (a child's start,
the stop of a process group, the watch on its exit, a backoff timer) post
what happened, and the handler for that report decides what follows. The
start worker is in ``cxrd.core.starting``. A report about an earlier process
of a child carries an old ``gen`` and is dropped.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from cxrd import constants as C
from cxrd.config import Config
from cxrd.core import commands as M
from cxrd.core.children import After, Child
from cxrd.core.choice import Choice
from cxrd.core.faults import quietly
from cxrd.core.model import RuntimeLaunch, SessionEvent, as_verb, describe_exit, headline
from cxrd.core.ports import ChildHandle, Clock, Host, Launcher, ProxyLaunch, Readiness
from cxrd.core.starting import Starting
from cxrd.core.states import ChildState, Phase
from cxrd.errors import Busy, CxrdError, GaveUp, StartFailed, Timeout

log = logging.getLogger(__name__)

_PRIORITY = {After.CRASH: 0, After.START: 1, After.STAY: 2}  # a stop beats a restart
# A stop or a failure ends the daemon at most this long after runtime.stop_timeout.
DEADLINE_AFTER_STOP_TIMEOUT = 1.0


def _too_late(msg: M.Message) -> None:
    """A request that arrives once the daemon is ending: answered, never lost."""
    reply = getattr(msg, "reply", None)
    if reply is not None and not reply.done():
        reply.set_exception(Busy("the daemon has stopped; start it again"))


class Runner(Starting):
    """Child mechanics; :class:`~cxrd.core.supervisor.Supervisor` adds requests on top."""

    def __init__(
        self,
        config: Config,
        runtime: Child,
        proxy: Child,
        launcher: Launcher,
        readiness: Readiness,
        host: Host,
        clock: Clock,
    ) -> None:
        self._config = config
        self._runtime = runtime
        self._proxy = proxy
        self._launcher = launcher
        self._readiness = readiness
        self._host = host
        self._clock = clock
        self._inbox: asyncio.Queue[M.Message] = asyncio.Queue()
        self._exit: asyncio.Future[int] | None = None
        self._stop_latched = False
        self._failure: CxrdError | None = None
        self._launched = False  # the first start has begun
        self._was_ready = False  # once ready, a child that fails is recovered, never fatal
        self._phase = Phase.NONE
        self._choice = Choice()  # what a client chose over the config for the runtime
        self._chosen_by = ""
        self._runtime_launch: RuntimeLaunch | None = None
        self._proxy_launch: ProxyLaunch | None = None
        self._pending_proxy: ProxyLaunch | None = None  # a reload's, once the old proxy is gone
        self._proxy_off = False  # a reload disabled the proxy
        self._spawned_runtime = False
        self._stderr_offset = 0
        self._server_log = ""
        self._last_error = ""
        self._reason = ""  # why the next published change happens
        self._deadline: asyncio.TimerHandle | None = None  # once stopping: the latest exit

    # to be provided by the supervisor
    def _handle_request(self, msg: M.Message) -> None:
        raise NotImplementedError

    def _fail(self, err: CxrdError) -> None:
        raise NotImplementedError

    def _publish(self) -> None:
        raise NotImplementedError

    def _run_done(self) -> None:
        raise NotImplementedError

    def _settle_proxy_reload(self) -> None:
        raise NotImplementedError

    def _check_run_complete(self) -> None:
        raise NotImplementedError

    def _maybe_start_phase(self) -> None:
        raise NotImplementedError

    def _on_session(self, event: SessionEvent) -> None:
        raise NotImplementedError

    def _drop_headsets(self, why: str) -> None:
        raise NotImplementedError

    @property
    def _running_config(self) -> Config:
        """The config as the runtime runs it: with what a client chose over it."""
        return self._choice.applied(self._config)

    # ---- the loop ------------------------------------------------------------

    def _post(self, msg: M.Message) -> None:
        if self._exit is not None and self._exit.done():
            _too_late(msg)  # the loop has ended: nobody would ever handle it
            return
        self._inbox.put_nowait(msg)

    def _exit_future(self) -> asyncio.Future[int]:
        if self._exit is None:
            self._exit = asyncio.get_running_loop().create_future()
        return self._exit

    async def wait_stopped(self) -> int:
        """Resolve when the daemon should exit; the exit code (0 after a clean stop)."""
        return await asyncio.shield(self._exit_future())

    async def run(self) -> int:
        """Handle messages one at a time until everything has stopped; the exit code."""
        done = self._exit_future()
        try:
            while not done.done():
                msg = await self._inbox.get()
                try:
                    self._handle(msg)
                    self._publish()
                except Exception as exc:
                    log.exception("internal error while handling %s", type(msg).__name__)
                    try:
                        self._fail(CxrdError(f"internal error: {exc!r}"))
                        self._stop_everything()  # even when a failure or a stop came first
                        self._publish()
                    except Exception:
                        log.exception("internal error while ending")
        finally:
            while not self._inbox.empty():
                _too_late(self._inbox.get_nowait())
            for child in (self._runtime, self._proxy):
                child.cancel_backoff()
                for task in list(child.tasks):
                    task.cancel()
                await asyncio.gather(*child.tasks, return_exceptions=True)
        return done.result()

    def _handle(self, msg: M.Message) -> None:
        child = getattr(msg, "child", None)
        if isinstance(msg, M.Deadline):
            self._on_deadline()
            return
        if child is None:
            self._handle_request(msg)
            return
        assert isinstance(child, Child)
        if msg.gen != child.gen:  # type: ignore[union-attr]
            return  # about an earlier process of this child
        if isinstance(msg, M.Spawned):
            self._on_spawned(child, msg.handle)
        elif isinstance(msg, M.SpawnFailed):
            self._on_spawn_failed(child, msg.error)
        elif isinstance(msg, M.Ready):
            self._on_ready(child)
        elif isinstance(msg, M.TimedOut):
            self._on_timed_out(child, msg.error)
        elif isinstance(msg, M.Exited):
            self._on_exited(child, msg.code, msg.lost)
        elif isinstance(msg, M.BackoffOver) and child.state is ChildState.BACKOFF:
            child.backoff = None
            self._start_child(child, in_run=child.in_run, why="backoff over")
        elif isinstance(msg, M.Session) and child.state is ChildState.RUNNING:
            self._on_session(msg.event)
        if child is self._proxy:
            if child.state is not ChildState.RUNNING:
                self._drop_headsets(f"the proxy is {child.state}")
            self._settle_proxy_reload()

    # ---- starting --------------------------------------------------------------

    def _enabled(self) -> tuple[Child, ...]:
        return (self._runtime, self._proxy) if self._config.proxy.enabled else (self._runtime,)

    def _start_child(self, child: Child, *, in_run: bool, why: str) -> None:
        if self._stop_latched or self._failure is not None:
            return  # a stop is latched: nothing starts after it
        child.gen += 1
        child.then = After.STAY
        child.in_run = in_run
        child.handle = None
        child.set(ChildState.STARTING, why)
        child.worker = asyncio.create_task(self._start_worker(child, child.gen))
        child.worker.add_done_callback(functools.partial(self._worker_ended, child, child.gen))
        child.own(child.worker)

    def _on_spawned(self, child: Child, handle: ChildHandle) -> None:
        child.handle = handle
        child.own(asyncio.create_task(self._watch(child, child.gen, handle)))
        if child.state is ChildState.STOPPING:
            child.cancel_worker()
            self._signal_stop(child)

    def _on_spawn_failed(self, child: Child, error: CxrdError | None) -> None:
        child.worker = None
        if child.state is ChildState.STOPPING:
            child.set(ChildState.STOPPED, "stopped before it was spawned")
            self._after_stopped(child)
            return
        if child.state is not ChildState.STARTING:
            return
        if error is None:
            error = StartFailed(f"the {child.name}'s start ended before it spawned anything")
        child.set(ChildState.EXITED, str(error))
        self._died(child, error, ready_once=False)

    def _on_ready(self, child: Child) -> None:
        child.worker = None
        if child.state is not ChildState.STARTING:
            return
        child.set(ChildState.RUNNING, "ready")
        if child is self._runtime and (launch := self._runtime_launch) is not None:
            since = child.started_at
            find = lambda: self._host.server_log(launch, since)  # noqa: E731
            self._server_log = quietly("cannot find the runtime's server log", find, "")
        if not child.in_run:
            self._reason = f"the {child.name} is back after a restart"
        self._check_run_complete()

    def _on_timed_out(self, child: Child, error: CxrdError | None) -> None:
        child.worker = None
        if child.state is not ChildState.STARTING:
            return
        if child.in_run and not self._was_ready:
            self._fail(error or self._startup_timeout(child))
            return
        if error is not None:
            child.crash_cause = str(error)
        self._stop_child(child, After.CRASH)

    def _startup_timeout(self, child: Child) -> CxrdError:
        limit = f"within {self._config.runtime.startup_timeout:g} s (runtime.startup_timeout)"
        if child is self._runtime:
            sentinel = self._config.run_dir / C.SENTINEL_FILE
            what = f"the runtime (pid {child.pid}) did not create {sentinel}"
        else:
            what = "the proxy did not report that it listens"
        return Timeout(f"{what} {limit}", detail=self._diagnosis(child))

    # ---- exits -----------------------------------------------------------------

    def _on_exited(self, child: Child, code: int | None, lost: str = "") -> None:
        words = lost or describe_exit(code)
        if child.state is ChildState.STOPPING:
            pid = child.handle.pid if child.handle is not None else 0
            log.info("%s (pid %d) stopped: %s", child.name, pid, words)
            if child.then is After.CRASH:
                limit = self._config.runtime.startup_timeout
                child.last_exit = words
                child.set(ChildState.EXITED, "did not become ready in time")
                cause = child.crash_cause or (
                    f"the {child.name} did not become ready again within {limit:g} s"
                )
                child.crash_cause = ""
                self._crashed(child, cause, self._diagnosis(child))
            else:
                child.last_exit = child.last_exit or words
                child.set(ChildState.STOPPED, words)
                self._after_stopped(child)
            return
        if child.state not in (ChildState.STARTING, ChildState.RUNNING):
            return
        child.cancel_worker()
        child.last_exit = words
        detail = self._diagnosis(child)
        line = headline(detail)
        before = " before it was ready" if child.state is ChildState.STARTING else ""
        child.set(ChildState.EXITED, words)
        text = f"the {child.name} {as_verb(words)}{before}" + (f": {line}" if line else "")
        self._died(child, StartFailed(text, detail=detail), ready_once=not before)

    def _died(self, child: Child, err: CxrdError, *, ready_once: bool) -> None:
        """A child ended without being asked: the first start failed, or a crash to recover.

        Only a child that never got ready fails the first start; one that was
        ready and then died is a crash, whatever the other child is doing.
        """
        if child.in_run and not self._was_ready and not ready_once:
            self._fail(err)
        else:
            self._crashed(child, str(err), err.detail)

    def _crashed(self, child: Child, cause: str, detail: str) -> None:
        line = headline(detail)
        r = self._config.restart
        delay = child.policy.record_crash(self._clock())
        if delay is None:
            child.set(ChildState.FATAL, "crashed too often")
            text = (
                f"{cause} and crashed more than {r.max_restarts} times within {r.window:g} s;"
                " giving up" + (f" (last: {line})" if line and line not in cause else "")
            )
            if child is self._runtime:
                self._fail(GaveUp(text, detail=detail))
            else:
                self._last_error = f"{text}; the runtime keeps running without it"
                self._reason = self._last_error
                log.error("%s\n%s", self._last_error, detail)
                self._check_run_complete()
            return
        child.restarts += 1
        self._last_error = cause if not line or line in cause else f"{cause}: {line}"
        self._reason = (
            f"{cause}; restarting it in {delay:.1f} s (crash {child.policy.recent_crashes} "
            f"of at most {r.max_restarts} in {r.window:g} s)"
        )
        child.set(ChildState.BACKOFF, f"restarting in {delay:.1f} s")
        loop = asyncio.get_running_loop()
        child.backoff = loop.call_later(delay, self._post, M.BackoffOver(child, child.gen))

    def _diagnosis(self, child: Child) -> str:
        host, since, offset = self._host, child.started_at, self._stderr_offset
        doing = f"cannot read the {child.name}'s logs"
        if child is self._runtime:
            launch = self._runtime_launch
            if launch is None:
                return ""
            return quietly(doing, lambda: host.runtime_diagnosis(launch, since, offset), "")
        proxy = self._proxy_launch
        return quietly(doing, lambda: host.proxy_diagnosis(proxy), "") if proxy else ""

    # ---- stopping --------------------------------------------------------------

    def _stop_child(self, child: Child, then: After) -> None:
        child.cancel_backoff()
        state = child.state
        if state is ChildState.STOPPING:
            if _PRIORITY[then] > _PRIORITY[child.then]:
                child.then = then
            return
        child.then = then
        if state in (ChildState.STARTING, ChildState.RUNNING):
            child.set(ChildState.STOPPING, f"stop ({then.value} after)")
            child.cancel_worker()  # never while spawning: its Spawned report comes instead
            if child.handle is not None:
                self._signal_stop(child)
            elif child.worker is None and not child.spawning:
                # No process and no worker to report one: nothing to wait for.
                child.set(ChildState.STOPPED, "nothing was spawned")
                self._after_stopped(child)
            return
        if state is not ChildState.STOPPED:
            child.set(ChildState.STOPPED, "nothing to stop")
        self._after_stopped(child)

    def _signal_stop(self, child: Child) -> None:
        handle = child.handle
        assert handle is not None
        child.own(asyncio.create_task(self._stop_group(child.name, handle)))

    async def _stop_group(self, name: str, handle: ChildHandle) -> None:
        try:
            await handle.stop(self._config.runtime.stop_timeout)
        except Exception:
            log.exception("could not stop the %s (pid %d)", name, handle.pid)

    def _after_stopped(self, child: Child) -> None:
        if child is self._proxy and (self._pending_proxy is not None or self._proxy_off):
            self._replace_proxy_launch(self._pending_proxy)
            self._pending_proxy, self._proxy_off = None, False
        if self._stop_latched or self._failure is not None:
            self._check_finished()
        elif self._phase is Phase.STOPPING:
            self._maybe_start_phase()
        elif child.then is After.START:
            self._start_child(child, in_run=False, why="restart with new settings")

    def _replace_proxy_launch(self, new: ProxyLaunch | None) -> None:
        old = self._proxy_launch
        if old is not None and (new is None or new.listener is not old.listener):
            old.close()
        self._proxy_launch = new

    def _stop_everything(self) -> None:
        self._phase = Phase.NONE
        if self._deadline is None:
            # The children get stop_timeout, then SIGKILL; past a second more, cxrd ends anyway.
            limit = self._config.runtime.stop_timeout + DEADLINE_AFTER_STOP_TIMEOUT
            loop = asyncio.get_running_loop()
            self._deadline = loop.call_later(limit, self._post, M.Deadline())
        for child in (self._runtime, self._proxy):
            self._stop_child(child, After.STAY)
        self._check_finished()

    def _on_deadline(self) -> None:
        done = self._exit_future()
        if done.done():
            return
        left = ", ".join(
            f"the {c.name} {c.state}" + (f" (pid {c.pid})" if c.pid else "")
            for c in (self._runtime, self._proxy)
            if c.state is not ChildState.STOPPED
        )
        limit = self._config.runtime.stop_timeout + DEADLINE_AFTER_STOP_TIMEOUT
        log.error("not stopped within %g s (%s); exiting anyway", limit, left)
        for child in (self._runtime, self._proxy):
            child.cancel_backoff()
            child.cancel_worker()
        self._reason = str(self._failure) if self._failure is not None else f"exiting with {left}"
        done.set_result(self._failure.exit_code if self._failure is not None else 0)

    def _everything_stopped(self) -> bool:
        return all(c.state is ChildState.STOPPED for c in (self._runtime, self._proxy))

    def _check_finished(self) -> None:
        done = self._exit_future()
        if done.done() or not self._everything_stopped():
            return
        self._replace_proxy_launch(None)
        if self._pending_proxy is not None:
            self._pending_proxy.close()
            self._pending_proxy = None
        if self._spawned_runtime:
            run_dir = self._config.run_dir
            clear = lambda: self._host.clear_run_files(run_dir)  # noqa: E731
            quietly(f"cannot clear {run_dir}", clear, None)
        if self._deadline is not None:
            self._deadline.cancel()
        if self._failure is not None:
            self._reason = str(self._failure)
        else:
            self._reason = self._reason or "both groups stopped"
        done.set_result(self._failure.exit_code if self._failure is not None else 0)
