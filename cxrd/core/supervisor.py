"""The supervisor: two child lifecycles, one command queue, the public state derived.

Plain asyncio. It knows nothing of D-Bus, sd_notify or signals: the daemon
passes in the ports (``cxrd.core.ports``), and D-Bus, signal handlers and
tests call the same methods and subscribe to the same events.

Every request and every report of its workers is a message on one queue;
:meth:`Supervisor.run` handles them one at a time, each to its end, and never
waits inside a handler. What takes time (spawning, waiting for readiness,
stopping, preparing a restart or a reload) runs in worker tasks that report
back through the queue. The outcomes when requests meet are in the README
("What happens when requests overlap").
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

from cxrd import __version__
from cxrd import constants as C
from cxrd.config import Config
from cxrd.core import commands as M
from cxrd.core.children import Child
from cxrd.core.choice import Choice, describe_mismatch, mismatch_error
from cxrd.core.commands import Kind, Operation
from cxrd.core.faults import quietly
from cxrd.core.model import CLOSE_ABNORMAL, Opened, SessionEvent
from cxrd.core.operations import Operations, answer
from cxrd.core.policy import RestartPolicy
from cxrd.core.ports import Clock, Host, Launcher, Notifier, Readiness
from cxrd.core.snapshot import (
    Event,
    Headset,
    HeadsetConnected,
    HeadsetDisconnected,
    Lease,
    ProxyStatus,
    RuntimeStatus,
    Snapshot,
    Updated,
)
from cxrd.core.states import (
    DESCRIPTIONS,
    ChildState,
    State,
    StateChanged,
    check_transition,
    public_state,
)
from cxrd.errors import (
    Busy,
    CxrdError,
    NoSuchLease,
    StartFailed,
    Timeout,
)

log = logging.getLogger(__name__)


class Supervisor(Operations):
    def __init__(
        self,
        config: Config,
        *,
        launcher: Launcher,
        notifier: Notifier,
        readiness: Readiness,
        host: Host,
        clock: Clock = time.monotonic,
    ) -> None:
        runtime = Child("runtime", _policy(config))
        proxy = Child("proxy", _policy(config))
        super().__init__(config, runtime, proxy, launcher, readiness, host, clock, notifier)
        self._born = clock()
        self._listeners: list[Callable[[Event], None]] = []
        self._leases: dict[str, Lease] = {}
        self._headsets: dict[str, Headset] = {}  # what the running proxy reported
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_token = 0
        self._idle_why = ""  # what armed the idle timer, for the log of the stop
        self._claimed = False  # a client has used the runtime: its profile is no longer free
        self._extender: asyncio.TimerHandle | None = None
        self._coming_up_at: float | None = None  # clock() on entering starting/restarting
        self._ready_since = 0.0
        self._last_start_seconds = 0.0

    # ---- observation -------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    def subscribe(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def snapshot(self) -> Snapshot:
        rt, px = self._runtime, self._proxy
        launch, proxy = self._runtime_launch, self._proxy_launch
        logs = {}
        if launch is not None:
            logs["runtime"] = str(launch.stderr_log)
        if self._server_log:
            logs["server"] = self._server_log
        if proxy is not None:
            logs["proxy"] = str(proxy.log_path)
        published = launch is not None and rt.state is not ChildState.STOPPED
        running = self._running_config
        return Snapshot(
            state=self._state,
            backend=self._config.runtime.backend,
            runtime=RuntimeStatus(
                pid=rt.pid,
                started_at=rt.started_at,
                restarts=rt.restarts,
                last_exit=rt.last_exit,
                state=str(rt.state),
            ),
            proxy=ProxyStatus(
                pid=px.pid,
                port=proxy.port if proxy is not None else 0,
                url=proxy.urls[0] if proxy is not None and proxy.urls else "",
                headset_urls=proxy.urls if proxy is not None else (),
                certificate=proxy.cert_note if proxy is not None else "",
                restarts=px.restarts,
                last_exit=px.last_exit,
                state=str(px.state),
            ),
            device_profile=running.runtime.device_profile,
            environment=dict(launch.environment) if launch is not None and published else {},
            env_file=str(self._config.run_dir / C.ENV_FILE),
            logs=logs,
            install_dir=str(self._config.install_path),
            uptime=self._clock() - self._born,
            last_error=self._last_error,
            version=__version__,
            interface_version=C.INTERFACE_VERSION,
            leases=tuple(self._leases.values()),
            instance=self._config.instance,
            gpu=running.runtime.gpu if running.runtime.gpu is not None else -1,
            signaling_port=self._config.runtime.signaling_port,
            media_port=self._config.runtime.media_port,
            ready_since=self._ready_since,
            last_start_seconds=self._last_start_seconds,
            headsets=tuple(self._headsets.values()),
            env_file_event=quietly(
                "cannot read the env file's history", self._host.env_file_event, ""
            ),
            requested=self._choice.as_settings(),
            requested_by=self._chosen_by,
        )

    def refresh(self) -> None:
        """Something a port keeps (the env file's last restore) changed: tell the listeners."""
        self._emit(Updated())

    def _emit(self, event: Event) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("a state listener failed")

    # ---- requests ------------------------------------------------------------

    async def start(
        self, *, timeout: float | None = None, choice: Choice | None = None, by: str = ""
    ) -> None:
        """Return once ready; the first call starts. See the README's overlap table.

        ``choice`` (profile, env, GPU) is given to a runtime nobody uses yet
        (restarting it if need be); one in use that runs otherwise refuses it.
        """
        request = M.StartRequest(choice or Choice(), self._reply(), by_client=True, by=by)
        await self._ask(request, timeout)

    async def launch(self) -> None:
        """The daemon's own start at launch: a client's later Start may pick the settings."""
        await self._ask(M.StartRequest(Choice(), self._reply(), by_client=False), None)

    async def restart(
        self, *, timeout: float | None = None, choice: Choice | None = None, by: str = ""
    ) -> None:
        """Validate, then stop both groups and start them again; return once ready.

        ``choice`` changes the keys it names; the runtime keeps the rest.
        """
        await self._ask(M.RestartRequest(choice or Choice(), self._reply(), by=by), timeout)

    async def reload(self, read: Callable[[], Config]) -> str:
        """Re-read the config with ``read``; restart only what changed. Returns what it did."""
        reply = self._reply()
        self._post(M.ReloadRequest(read, reply))
        return await asyncio.shield(reply)

    def request_stop(self, reason: str = "stop requested") -> None:
        """Latch a stop and return at once. Idempotent; nothing starts after it.

        Honoured after a failure too: whatever is still stopping is stopped
        again, and the daemon exits with the failure's code.
        """
        if self._stop_latched:
            return
        self._stop_latched = True
        self._post(M.StopRequest(reason))

    def fail(self, err: CxrdError) -> None:
        """End with ``err`` (the daemon cannot go on, e.g. its bus name is taken)."""
        if self._stop_latched or self._failure is not None:
            return
        self._post(M.StopRequest(str(err), err))

    async def stop(self) -> None:
        self.request_stop()
        await self.wait_stopped()

    def _reply(self) -> M.Reply:
        reply: M.Reply = asyncio.get_running_loop().create_future()
        # Callers may all have timed out: mark the exception retrieved.
        reply.add_done_callback(lambda f: f.cancelled() or f.exception())
        return reply

    async def _ask(self, request: M.StartRequest | M.RestartRequest, timeout: float | None) -> None:
        self._post(request)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(request.reply)
        except TimeoutError:
            raise Timeout(
                f"not ready within {timeout:g} s (state: {self._state}); the start goes on"
            ) from None

    # ---- leases ------------------------------------------------------------

    def acquire(self, holder: str, pid: int, reason: str) -> str:
        """A lease for ``holder``; Busy once the daemon is on its way out.

        A lease alone does not claim the runtime's settings: the holder's
        Start does, so a client that leases first and then starts with a
        profile gets it from a daemon it has just activated.
        """
        if (refused := self._refusal()) is not None:
            raise refused
        lease = Lease(id=uuid.uuid4().hex, holder=holder, pid=pid, reason=reason, since=time.time())
        self._leases[lease.id] = lease
        self._ever_leased = True
        self._disarm_idle()
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
        self._arm_idle("the last lease ended")

    def _arm_idle(self, why: str) -> None:
        """Stop after idle_grace with no lease: armed only once a lease has been held."""
        if self._leases or not self._config.stop_when_idle or self._idle_timer is not None:
            return
        grace = self._config.idle_grace
        log.info("%s; stopping in %.0f s unless a new lease is taken", why, grace)
        self._idle_why = why
        token = self._idle_token
        self._idle_timer = asyncio.get_running_loop().call_later(
            grace, self._post, M.IdleCheck(token)
        )

    def _disarm_idle(self) -> None:
        self._idle_token += 1
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    # ---- headsets: the sessions the proxy relays -------------------------------

    def _on_session(self, event: SessionEvent) -> None:
        if isinstance(event, Opened):
            h = event.headset
            self._headsets[h.id] = h
            log.info("headset %s connected from %s (%s)", h.id, h.address, h.user_agent)
            self._emit(HeadsetConnected(h))
        elif (gone := self._headsets.pop(event.id, None)) is not None:
            log.info(
                "headset %s (%s) disconnected after %.0f s, close code %d",
                gone.id, gone.address, event.seconds, event.code,
            )  # fmt: skip
            self._emit(HeadsetDisconnected(gone, event.seconds, event.code))

    def _drop_headsets(self, why: str) -> None:
        """The proxy no longer runs: its sessions went with it."""
        now = time.time()
        for h in list(self._headsets.values()):
            del self._headsets[h.id]
            log.info("headset %s (%s) disconnected: %s", h.id, h.address, why)
            self._emit(HeadsetDisconnected(h, max(now - h.since, 0.0), CLOSE_ABNORMAL))

    # ---- the handlers: run one at a time by Runner.run ------------------------

    def _handle_request(self, msg: M.Message) -> None:
        if isinstance(msg, M.StartRequest):
            self._on_start(msg)
        elif isinstance(msg, M.RestartRequest):
            self._on_restart(msg)
        elif isinstance(msg, M.ReloadRequest):
            self._on_reload(msg)
        elif isinstance(msg, M.StopRequest) and msg.error is not None:
            self._fail(msg.error)
        elif isinstance(msg, M.StopRequest):
            self._on_stop(msg.reason)
        elif isinstance(msg, M.IdleCheck):
            if msg.token == self._idle_token and not self._leases and self._config.stop_when_idle:
                self._idle_timer = None
                grace = self._config.idle_grace
                self.request_stop(f"idle for {grace:g} s: {self._idle_why}")
        elif isinstance(msg, M.Prepared):
            self._on_prepared(msg)

    def _refused(self, reply: M.Reply, choice: Choice) -> bool:
        """Answer a request that cannot be served (ending, failed, malformed settings)."""
        refused = self._refusal()
        if refused is None:
            try:
                choice.check()
            except CxrdError as err:
                refused = err
        if refused is not None:
            answer(reply, refused)
        return refused is not None

    def _on_start(self, msg: M.StartRequest) -> None:
        if self._refused(msg.reply, msg.choice):
            return
        target, target_by = self._target()
        differs = msg.choice.differences(target.applied(self._config))
        wanted = msg.choice.over(target)
        if not self._launched and self._op is None:
            self._enqueue(Operation(Kind.LAUNCH, wanted, by=msg.by if differs else target_by))
        elif (
            differs
            and self._op is not None
            and self._op.kind is Kind.LAUNCH
            and self._op.runtime is None
            and not self._claimed
        ):
            # The first start is not prepared yet: retarget it.
            self._op.choice, self._op.by = wanted, msg.by
        elif differs:
            if self._claimed:
                what = "the runtime is in use with other settings"
                answer(msg.reply, mismatch_error(differs, what))
                return
            # Nobody has used this runtime yet (the daemon started it on its own,
            # e.g. activated by this very call): give it what is asked for.
            log.info("the first client asks for %s: restarting into it", describe_mismatch(differs))
            self._claimed = True
            self._enqueue(Operation(Kind.RESTART, wanted, [msg.reply], by=msg.by))
            return
        self._claimed = self._claimed or msg.by_client
        self._start_waiters.append(msg.reply)
        self._answer_start_waiters()

    def _on_restart(self, msg: M.RestartRequest) -> None:
        if self._refused(msg.reply, msg.choice):
            return
        self._claimed = True
        target, target_by = self._target()
        by = msg.by if not msg.choice.empty else target_by
        self._enqueue(Operation(Kind.RESTART, msg.choice.over(target), [msg.reply], by=by))

    # ---- the end -------------------------------------------------------------

    def _on_stop(self, reason: str) -> None:
        self._tell("STOPPING=1")
        if self._failure is not None:
            log.info("%s while failed: stopping what is left", reason)
            self._stop_everything()
            return
        self._reason = reason
        log.info("stopping: %s", reason)
        self._abandon_operations(Busy("the daemon is stopping; start it again once it has exited"))
        for reply in self._start_waiters:
            answer(reply, StartFailed(f"stopped before it was ready ({reason})"))
        self._start_waiters = []
        self._stop_everything()

    def _fail(self, err: CxrdError) -> None:
        """The end of the road: record why, stop everything, tell every waiter."""
        if self._failure is not None or self._stop_latched:
            return
        self._failure = err
        self._last_error = str(err)
        self._reason = str(err)
        run_dir = self._config.run_dir
        record = lambda: self._host.record_failure(run_dir, err)  # noqa: E731
        quietly(f"cannot record the failure in {run_dir}", record, None)
        if err.detail:
            log.error("%s\n%s", err, err.detail)
        else:
            log.error("%s", err)
        self._abandon_operations(err)
        for reply in self._start_waiters:
            answer(reply, err)
        self._start_waiters = []
        self._stop_everything()

    # ---- publishing ------------------------------------------------------------

    def _publish(self) -> None:
        new = public_state(
            failed=self._failure is not None,
            stop_latched=self._stop_latched,
            everything_stopped=self._everything_stopped(),
            phase=self._phase,
            launched=self._launched,
            was_ready=self._was_ready,
            runtime=self._runtime.state,
        )
        old = self._state
        reason, self._reason = self._reason, ""
        if new is not old:
            reason = reason or f"runtime {self._runtime.state}, proxy {self._proxy.state}"
            check_transition(old, new)
            self._state = new
            log.info("%s -> %s: %s", old, new, reason)
            self._time_readiness(old, new)
            self._extend_while_starting()
        line = f"STATUS={DESCRIPTIONS[new]}" + (f": {reason}" if reason else "")
        if new is State.READY and self._proxy.state not in (ChildState.RUNNING, ChildState.STOPPED):
            line += f" (the proxy is {self._proxy.state}: {self._last_error})"
        lines = [line] if (reason or new is not old) and line != self._status_line else []
        if new is State.READY and old is not State.READY:
            lines.append("READY=1")
        if lines:
            self._status_line = line
            self._tell(*lines)
        if new is not old:
            self._emit(StateChanged(new, old, reason))
            self._answer_start_waiters()
        self._emit(Updated())

    def _time_readiness(self, old: State, new: State) -> None:
        coming_up = (State.STARTING, State.RESTARTING)
        if new in coming_up and old not in coming_up:
            self._coming_up_at = self._clock()
        elif new is State.READY:
            self._ready_since = time.time()
            if self._coming_up_at is not None:
                self._last_start_seconds = self._clock() - self._coming_up_at
                self._coming_up_at = None
        if old is State.READY:
            self._ready_since = 0.0
        if new not in (*coming_up, State.READY):
            self._coming_up_at = None

    def _extend_while_starting(self) -> None:
        """While starting, keep pushing systemd's start timeout ahead."""
        if self._extender is not None:
            self._extender.cancel()
            self._extender = None
        if self._state is State.STARTING:
            self._tell(f"EXTEND_TIMEOUT_USEC={int(EXTEND_BY * 1e6)}")
            loop = asyncio.get_running_loop()
            self._extender = loop.call_later(EXTEND_EVERY, self._extend_while_starting)


# While a slow runtime comes up, keep pushing systemd's start timeout this far ahead.
EXTEND_EVERY = 5.0
EXTEND_BY = 15.0


def _policy(config: Config) -> RestartPolicy:
    r = config.restart
    return RestartPolicy(r.max_restarts, r.window, r.backoff_initial, r.backoff_max)
