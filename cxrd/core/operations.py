"""Operations: the first start, Restart and Reload, one at a time, validated before acting.

At most one operation is in flight; the others wait in order (two queued
reloads become one, of the newest files). Each is prepared first, in a worker
that checks everything it will need (profile, backend, env, certificate,
port); only then does it stop anything, so a bad request leaves the running
children exactly as they were.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import replace

from cxrd.config import Config
from cxrd.core import commands as M
from cxrd.core.children import After, Child
from cxrd.core.choice import Choice
from cxrd.core.commands import Kind, Operation
from cxrd.core.faults import named_failure, quietly
from cxrd.core.ports import Clock, Host, Launcher, Notifier, Readiness
from cxrd.core.runner import Runner
from cxrd.core.states import DESCRIPTIONS, ChildState, Phase, State
from cxrd.errors import Busy, CxrdError, InvalidConfig

log = logging.getLogger(__name__)


class Operations(Runner):
    def __init__(
        self,
        config: Config,
        runtime: Child,
        proxy: Child,
        launcher: Launcher,
        readiness: Readiness,
        host: Host,
        clock: Clock,
        notifier: Notifier,
    ) -> None:
        super().__init__(config, runtime, proxy, launcher, readiness, host, clock)
        self._notifier = notifier
        self._state = State.STOPPED
        self._op: Operation | None = None
        self._queue: deque[Operation] = deque()
        self._start_waiters: list[M.Reply] = []
        self._status_line = ""  # the last STATUS= sent
        # systemd has READY=1 and no STOPPING=1 since: a reload may say RELOADING=1, then READY=1.
        self._told_ready = False
        self._ever_leased = False  # a lease was granted once: the idle timer may run

    # to be provided by the supervisor
    def _arm_idle(self, why: str) -> None:
        raise NotImplementedError

    def _disarm_idle(self) -> None:
        raise NotImplementedError

    def _refusal(self) -> CxrdError | None:
        if self._failure is not None:
            return type(self._failure)(str(self._failure))
        if self._stop_latched:
            return Busy("the daemon is stopping; start it again once it has exited")
        return None

    def _tell(self, *lines: str) -> None:
        """sd_notify: the one way out; READY=1 never after a failure or STOPPING=1."""
        if "READY=1" in lines:
            if self._failure is not None or self._stop_latched:
                lines = tuple(line for line in lines if line != "READY=1")
            else:
                self._told_ready = True
        if "STOPPING=1" in lines or self._failure is not None:
            self._told_ready = False
        if lines:
            self._notifier.notify(*lines)

    def _on_reload(self, msg: M.ReloadRequest) -> None:
        if (refused := self._refusal()) is not None:
            self._reload_answered(msg.reply, refused)
            return
        waiting = next((op for op in self._queue if op.kind is Kind.RELOAD), None)
        if waiting is not None:
            # Not begun yet: one reload of the newest files answers both.
            waiting.read = msg.read
            waiting.replies.append(msg.reply)
            return
        choice, by = self._target()
        self._enqueue(Operation(Kind.RELOAD, choice, [msg.reply], read=msg.read, by=by))

    def _reload_answered(self, reply: M.Reply, outcome: str | CxrdError) -> None:
        if isinstance(outcome, CxrdError):
            log.error("reload refused, nothing was changed: %s", outcome)
            words = f"reload refused: {outcome}"
        else:
            log.info("reload: %s", outcome)
            words = f"configuration reloaded: {outcome}"
        line = f"STATUS={DESCRIPTIONS[self._state]}; {words}"
        # Only a reload that began told systemd RELOADING=1; only that one ends it.
        self._tell(*(("READY=1",) if self._told_ready else ()), line)
        # This line says what happened; the same turn's smaller news does not replace it.
        self._status_line, self._reason = line, ""
        answer(reply, outcome)

    def _target(self) -> tuple[Choice, str]:
        """What the runtime runs with over the config once everything queued is done, and
        at whose request."""
        last = self._queue[-1] if self._queue else self._op
        if last is not None:
            return last.choice, last.by
        return self._choice, self._chosen_by

    def _enqueue(self, op: Operation) -> None:
        self._queue.append(op)
        self._next_operation()

    def _next_operation(self) -> None:
        if self._op is not None or not self._queue or self._stop_latched or self._failure:
            return
        op = self._op = self._queue.popleft()
        log.info("%s: preparing (%s)", op.kind.value, _described(op.choice))
        if op.kind is Kind.RELOAD and self._told_ready:
            # The reload begins now, not when it was queued behind the first start.
            self._tell("RELOADING=1", "STATUS=Reloading the configuration")
        op.prep = asyncio.create_task(self._prepare(op), name=f"cxrd-prepare-{op.kind.value}")

    async def _prepare(self, op: Operation) -> None:
        """Validate everything the operation needs before anything running is touched."""
        try:
            config = self._config
            if op.read is not None:
                config = op.read()
                if config.install_path != self._config.install_path:
                    raise InvalidConfig(
                        f"{config.source}: install_dir: cannot change while running "
                        f"({self._config.install_path} -> {config.install_path}); "
                        "restart the service instead"
                    )
                op.choice = op.choice.keeping(self._config, config)
                op.by = op.by if not op.choice.empty else ""
                runtime, proxy, changed = M.reload_changes(self._config, config)
                op.restart_runtime, op.restart_proxy = runtime, proxy
                op.summary = f"changed {', '.join(changed)}" if changed else "no setting changed"
                if proxy and config.proxy.enabled:
                    op.proxy = await self._host.prepare_proxy(config, keep=self._proxy_launch)
            op.config = config
            running = op.choice.applied(config)
            op.runtime = self._host.prepare_runtime(running, running.runtime.device_profile)
        except Exception as exc:
            self._post(M.Prepared(op, named_failure(f"cannot prepare the {op.kind.value}", exc)))
            return
        except asyncio.CancelledError:
            self._discard_proxy(op)
            raise
        self._post(M.Prepared(op))

    def _discard_proxy(self, op: Operation) -> None:
        current = self._proxy_launch
        if op.proxy is not None and (current is None or op.proxy.listener is not current.listener):
            op.proxy.close()
        op.proxy = None

    def _on_prepared(self, msg: M.Prepared) -> None:
        op = msg.op
        if op is not self._op:
            self._discard_proxy(op)  # cancelled by a stop or a failure meanwhile
            return
        if msg.error is not None:
            self._discard_proxy(op)
            if op.kind is Kind.LAUNCH:
                self._fail(msg.error)
            else:
                self._finish_operation(msg.error)
            return
        assert op.config is not None and op.runtime is not None
        if op.kind is Kind.RELOAD:
            self._adopt(op.config)
        if op.is_run:
            self._runtime_launch = op.runtime
            self._choice, self._chosen_by = op.choice, op.by
        if op.kind is Kind.LAUNCH:
            self._begin_run("start requested")
        elif op.kind is Kind.RESTART:
            self._begin_run("restart requested", stop=(self._runtime, self._proxy))
        elif op.restart_runtime:
            stop = (self._runtime, self._proxy) if op.restart_proxy else (self._runtime,)
            self._swap_proxy_launch(op)
            self._begin_run(f"reload: {op.summary}", stop=stop)
        elif op.restart_proxy:
            op.proxy_restarting = True
            self._swap_proxy_launch(op)
            self._stop_child(self._proxy, After.START if self._config.proxy.enabled else After.STAY)
            self._settle_proxy_reload()
        else:
            self._finish_operation(op.summary)

    def _adopt(self, config: Config) -> None:
        old = self._config
        self._config = replace(config, install_dir=old.install_dir)
        r = config.restart
        for child in (self._runtime, self._proxy):
            child.policy.reconfigure(r.max_restarts, r.window, r.backoff_initial, r.backoff_max)
        if not config.stop_when_idle:
            self._disarm_idle()
        elif self._ever_leased:
            # Idle means that a lease existed and none is left; a daemon nobody has
            # leased yet waits for its first lease, whatever a reload changed.
            self._arm_idle("the last lease ended before stop_when_idle was reloaded")

    def _swap_proxy_launch(self, op: Operation) -> None:
        """The prepared proxy replaces the old one once the old process is gone."""
        self._pending_proxy = op.proxy
        op.proxy = None
        self._proxy_off = not self._config.proxy.enabled

    def _settle_proxy_reload(self) -> None:
        """A proxy-only reload is done once the proxy has tried its new settings."""
        op = self._op
        if op is None or not op.proxy_restarting:
            return
        px = self._proxy
        settled = px.state in (ChildState.RUNNING, ChildState.BACKOFF, ChildState.FATAL) or (
            px.state is ChildState.STOPPED and px.then is After.STAY
        )
        if settled:
            words = op.summary
            if px.state is not ChildState.RUNNING and self._config.proxy.enabled:
                words += f"; the proxy did not come up ({px.state}: {self._last_error})"
            self._finish_operation(words)

    def _finish_operation(self, outcome: str | CxrdError) -> None:
        op = self._op
        if op is None:
            return
        self._op = None
        for reply in op.replies:
            if op.kind is Kind.RELOAD:
                self._reload_answered(reply, outcome)
            else:
                answer(reply, outcome)
        self._next_operation()
        self._answer_start_waiters()

    def _answer_start_waiters(self) -> None:
        if self._state is not State.READY or self._phase is not Phase.NONE:
            return
        if any(op.is_run for op in (self._op, *self._queue) if op is not None):
            return
        waiters, self._start_waiters = self._start_waiters, []
        for reply in waiters:
            answer(reply, "ready")

    def _check_run_complete(self) -> None:
        """A run is done once each of its children runs (or, the proxy, gave up)."""
        if self._phase is Phase.STARTING and all(
            c.state is ChildState.RUNNING or (c is self._proxy and c.state is ChildState.FATAL)
            for c in (self._runtime, self._proxy)
            if c.in_run
        ):
            self._was_ready = True
            self._run_done()

    def _begin_run(self, reason: str, stop: tuple[Child, ...] = ()) -> None:
        self._reason = reason
        self._launched = True
        self._phase = Phase.STOPPING
        for child in stop:
            child.then = After.START
        for child in stop:
            self._stop_child(child, After.START)
        if not stop:
            for child in self._enabled():
                child.then = After.START
        self._maybe_start_phase()

    def _maybe_start_phase(self) -> None:
        children = (self._runtime, self._proxy)
        if self._phase is not Phase.STOPPING or any(
            c.state is ChildState.STOPPING
            or (c.then is After.START and c.state is not ChildState.STOPPED)
            for c in children
        ):
            return
        self._phase = Phase.STARTING
        self._reason = self._reason or "starting again"
        for child in children:
            if child.then is After.START:
                child.then = After.STAY
                if child in self._enabled():
                    self._start_child(child, in_run=True, why="start")

    def _run_done(self) -> None:
        """Every child of the run is running: ready."""
        self._phase = Phase.NONE
        for child in (self._runtime, self._proxy):
            child.in_run = False
        run_dir = self._config.run_dir
        quietly("cannot clear the last error", lambda: self._host.clear_failure(run_dir), None)
        self._last_error = ""
        self._reason = self._ready_words()
        op = self._op
        if op is not None and op.is_run:
            self._publish()  # READY first, then the replies
            self._finish_operation(op.summary if op.kind is Kind.RELOAD else "ready")

    def _ready_words(self) -> str:
        proxy = self._proxy_launch if self._config.proxy.enabled else None
        where = f"; headsets connect to {proxy.url}" if proxy is not None else ""
        profile = self._running_config.runtime.device_profile
        return f"{self._config.runtime.backend} runtime ready (profile {profile}){where}"

    def _abandon_operations(self, err: CxrdError) -> None:
        self._disarm_idle()
        ops = [op for op in (self._op, *self._queue) if op is not None]
        self._op = None
        self._queue.clear()
        for op in ops:
            if op.prep is not None:
                op.prep.cancel()
            self._discard_proxy(op)
            if op.kind is Kind.RELOAD and op.replies:
                # Not refused: overtaken. The failure's own STATUS= line stays the last word.
                log.warning("reload not done: the daemon failed first")
            for reply in op.replies:
                answer(reply, err)


def answer(reply: M.Reply, outcome: str | CxrdError) -> None:
    if reply.done():
        return
    if isinstance(outcome, CxrdError):
        reply.set_exception(outcome)
    else:
        reply.set_result(outcome)


def _described(choice: Choice) -> str:
    settings = choice.as_settings()
    if not settings:
        return "as configured"
    return ", ".join(f"{key}={value}" for key, value in settings.items())
