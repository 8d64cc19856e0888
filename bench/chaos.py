"""Chaos soak: a real cxrd (sim runtime) on a private bus under random overlapping commands.

Starts a private ``dbus-daemon`` and ``python -m cxrd`` with the sim runtime, a
private install dir and free loopback ports (never 48322/49100, never
``~/.cloudxr``), then for ``--seconds`` fires operations from a plan drawn
with a seeded RNG, without waiting for one to end before the next begins:

- D-Bus ``Start`` (no options, a good ``device_profile``, a bad one such as
  ``"Quest 3"``), ``Restart`` (good and bad profiles), ``Status``, ``Acquire``
  and ``Release`` (of a held lease and of an unknown id), and a client that
  takes a lease and leaves the bus without releasing it;
- reloads: the config file rewritten with a valid change
  (``proxy.max_connections``, ``runtime.env``) or an invalid one, then SIGHUP;
- faults: SIGKILL of the runtime's and of the proxy's pid, read from Status().

The plan (kinds, arguments, firing times) is a pure function of the seed, the
duration and the rate; what the daemon does with it depends on real
scheduling. Every call has a timeout: a call with no reply within it is
*unanswered*. At the end the driver brings the daemon back to ready, releases
its leases, measures, calls ``Stop()`` and waits for the exit.

Prints one JSON object and exits 1 when any of these holds (the bounds):

- a call was unanswered;
- a call whose answer the API defines got another one: a bad profile must
  answer ``InvalidArgs``, a ``Release`` of an unknown id ``NoSuchLease``, and
  ``Status`` must succeed while the daemon runs;
- the daemon exited during the soak, or after ``Stop()`` with a code other
  than 0, or not within ``stop_timeout`` + 10 s;
- a process whose cmdline or environ names the install dir is left (orphan);
- the daemon's fd count grew by more than 16, or its RSS by more than 20 MiB,
  between the first ready and the end (both measured at ready, no lease held).

Total time is bounded: ``--seconds``, plus the longest call timeout to drain,
plus start, settle and stop; at most 10,000 operations.

    .venv/bin/python bench/chaos.py [--seconds 60] [--seed 8] [--rate 8] [--workdir DIR]
        [--without KIND ...]   # leave a kind out of the plan, to look past a first finding

``tests/test_chaos.py`` runs :func:`soak` for a few seconds as a CI gate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import cmdline, fd_count, mentions, private_bus, processes_of, rss_kib
from chaos_daemon import STOP_TIMEOUT, Layout
from chaos_plan import (
    CONNECTIONS,
    WEIGHTS,
    Op,
    plan,
    plan_digest,
    show,
)
from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from cxrd.constants import BUS_NAME, INTERFACE, OBJECT_PATH

FD_GROWTH_MAX = 16
RSS_GROWTH_MAX_KIB = 20 * 1024
MAX_IN_FLIGHT = 16


def _plain(value: Any) -> Any:
    if isinstance(value, Variant):
        return _plain(value.value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass
class Driver:
    """Fires the plan at the daemon and keeps the score."""

    layout: Layout
    daemon: subprocess.Popen[bytes]
    address: str
    call_timeout: float
    start_timeout: float
    buses: list[MessageBus] = field(default_factory=list)
    operations: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    answers: dict[str, Counter[str]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    unanswered: list[dict[str, Any]] = field(default_factory=list)
    unexpected: list[dict[str, Any]] = field(default_factory=list)
    leases: dict[int, list[str]] = field(default_factory=dict)
    states: Counter[str] = field(default_factory=Counter)
    began: float = 0.0

    async def connect(self) -> MessageBus:
        bus = MessageBus(bus_address=self.address)
        return await asyncio.wait_for(bus.connect(), self.call_timeout)

    async def call(
        self,
        bus: MessageBus,
        label: str,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
        *,
        slow: bool = False,
    ) -> tuple[str, list[Any]]:
        """One call with its timeout; the answer is "ok", an error name, or "unanswered"."""
        msg = Message(
            destination=BUS_NAME,
            path=OBJECT_PATH,
            interface=INTERFACE,
            member=member,
            signature=signature,
            body=body or [],
            flags=MessageFlag.NO_AUTOSTART,
        )
        timeout = self.start_timeout if slow else self.call_timeout
        t0 = time.monotonic()
        try:
            reply = await asyncio.wait_for(bus.call(msg), timeout)
        except TimeoutError:
            self.unanswered.append(
                {"t": round(t0 - self.began, 3), "call": label, "timeout_s": timeout}
            )
            self.answers.setdefault(label, Counter())["unanswered"] += 1
            return "unanswered", []
        self.latencies.append(time.monotonic() - t0)
        if reply is None or reply.message_type is MessageType.METHOD_RETURN:
            answer, out = "ok", list(reply.body) if reply else []
        else:
            answer, out = str(reply.error_name).rsplit(".", 1)[-1], []
            self.errors[str(reply.error_name)] += 1
        self.answers.setdefault(label, Counter())[answer] += 1
        return answer, out

    def expect(self, label: str, answer: str, wanted: str) -> None:
        # A bus error once the daemon is gone is the exit check's finding, not this one.
        if answer in (wanted, "unanswered") or self.daemon.poll() is not None:
            return
        self.unexpected.append(
            {"t": round(time.monotonic() - self.began, 3), "call": label, "answer": answer}
        )

    async def status(self, bus: MessageBus, label: str = "Status") -> dict[str, Any]:
        answer, out = await self.call(bus, label, "Status")
        self.expect(label, answer, "ok")
        return _plain(out[0]) if out else {}

    async def fire(self, op: Op) -> None:
        bus = self.buses[op.conn]
        self.operations[op.kind] += 1
        if op.kind == "status":
            await self.status(bus)
        elif op.kind in ("start", "start_bad", "restart", "restart_bad"):
            member = "Start" if op.kind.startswith("start") else "Restart"
            options = {"device_profile": Variant("s", op.arg)} if op.arg else {}
            label = f"{member}({'bad profile' if op.kind.endswith('_bad') else op.arg or ''})"
            answer, _ = await self.call(bus, label, member, "a{sv}", [options], slow=True)
            if op.kind.endswith("_bad"):
                self.expect(label, answer, "InvalidArgs")
        elif op.kind == "acquire":
            answer, out = await self.call(bus, "Acquire", "Acquire", "s", ["chaos"])
            if answer == "ok":
                self.leases.setdefault(op.conn, []).append(str(out[0]))
        elif op.kind == "release":
            held = self.leases.get(op.conn, [])
            if op.arg == "unknown" or not held:
                answer, _ = await self.call(bus, "Release(unknown)", "Release", "s", ["nope-0"])
                self.expect("Release(unknown)", answer, "NoSuchLease")
            else:
                lease = held.pop(int(op.arg) % len(held))
                await self.call(bus, "Release(held)", "Release", "s", [lease])
        elif op.kind == "leave_bus":
            # A lease holder that vanishes without Release (its connection closes).
            leaver = await self.connect()
            try:
                await self.call(leaver, "Acquire(then leave)", "Acquire", "s", ["leaver"])
            finally:
                leaver.disconnect()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(leaver.wait_for_disconnect(), self.call_timeout)
        elif op.kind in ("reload", "reload_bad"):
            self.layout.write_config(op.arg)
            self.faults[f"{op.kind}:{op.arg.partition('=')[0]}"] += 1
            self.daemon.send_signal(signal.SIGHUP)
        elif op.kind in ("kill_runtime", "kill_proxy"):
            child = op.kind.removeprefix("kill_")
            snap = await self.status(bus, f"Status(before {op.kind})")
            pid = int(snap.get(child, {}).get("pid", 0))
            # Only a process of this soak's install dir, never a pid reused by another.
            if pid > 0 and mentions(pid, str(self.layout.install_dir).encode()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    self.faults[op.kind] += 1
                    return
            self.skipped[f"{op.kind}: no {child} pid"] += 1
        else:
            raise ValueError(f"unknown operation {op.kind!r}")

    def on_message(self, msg: Message) -> None:
        if msg.message_type is MessageType.SIGNAL and msg.member == "StateChanged":
            self.states[f"{msg.body[1]}->{msg.body[0]}"] += 1


async def _wait_ready(driver: Driver, bus: MessageBus) -> str:
    answer, _ = await driver.call(bus, "Start(settle)", "Start", "a{sv}", [{}], slow=True)
    return answer


async def _drive(
    layout: Layout, daemon: subprocess.Popen[bytes], address: str, ops: list[Op], **kw: float
) -> dict[str, Any]:
    driver = Driver(layout, daemon, address, kw["call_timeout"], kw["start_timeout"])
    report: dict[str, Any] = {}
    deadline = time.monotonic() + kw["start_timeout"]
    while True:  # the daemon takes its bus name a moment after it starts
        try:
            driver.buses = [await driver.connect() for _ in range(CONNECTIONS)]
            break
        except (OSError, TimeoutError):
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise
            await asyncio.sleep(0.1)
    watcher = await driver.connect()
    try:
        await watcher.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="AddMatch",
                signature="s",
                body=[f"type='signal',interface='{INTERFACE}',member='StateChanged'"],
            )
        )
        watcher.add_message_handler(driver.on_message)
        driver.began = time.monotonic()
        while daemon.poll() is None:  # no bus name yet: ServiceUnknown
            if await _wait_ready(driver, driver.buses[0]) == "ok":
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"cxrd never became ready; see {layout.log}")
            await asyncio.sleep(0.1)
        driver.answers.clear()
        driver.errors.clear()
        driver.latencies.clear()
        if daemon.poll() is not None:
            raise RuntimeError(f"cxrd exited {daemon.returncode} before ready; see {layout.log}")
        report["fds_start"], report["rss_kib_start"] = fd_count(daemon.pid), rss_kib(daemon.pid)

        slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        tasks: list[asyncio.Task[None]] = []

        async def bounded(op: Op) -> None:
            async with slots:
                await driver.fire(op)

        driver.began = time.monotonic()
        for fired, op in enumerate(ops):
            delay = driver.began + op.at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if daemon.poll() is not None:
                report["daemon_exited_during_soak"] = {
                    "at_s": round(time.monotonic() - driver.began, 3),
                    "code": daemon.returncode,
                    "after_ops": [show(o) for o in ops[max(0, fired - 6) : fired]],
                }
                break
            tasks.append(asyncio.create_task(bounded(op)))
        # Every call is bounded by its own timeout; this only drains them.
        results = await asyncio.gather(*tasks, return_exceptions=True)
        crashed = [repr(r) for r in results if isinstance(r, BaseException)]
        report["driver_exceptions"] = crashed[:10]

        if daemon.poll() is None:
            # Back to ready with no lease, then measure against the start.
            report["settle_start"] = await _wait_ready(driver, driver.buses[0])
            for conn, held in driver.leases.items():
                for lease in held:
                    await driver.call(driver.buses[conn], "Release(held)", "Release", "s", [lease])
            driver.leases.clear()
            await asyncio.sleep(1.0)
            if daemon.poll() is None:
                report["fds_end"] = fd_count(daemon.pid)
                report["rss_kib_end"] = rss_kib(daemon.pid)
                report["stop"] = (await driver.call(driver.buses[0], "Stop", "Stop"))[0]
    finally:
        for bus in [*driver.buses, watcher]:
            bus.disconnect()
    lat = sorted(driver.latencies)
    report.update(
        operations=dict(sorted(driver.operations.items())),
        operations_fired=sum(driver.operations.values()),
        faults_injected=dict(sorted(driver.faults.items())),
        faults_skipped=dict(sorted(driver.skipped.items())),
        calls_answered=len(lat),
        calls_unanswered=len(driver.unanswered),
        unanswered=driver.unanswered[:20],
        unexpected_answers=driver.unexpected[:20],
        unexpected_count=len(driver.unexpected),
        answers={k: dict(sorted(v.items())) for k, v in sorted(driver.answers.items())},
        errors_by_name=dict(sorted(driver.errors.items())),
        latency_ms={
            "max": round(lat[-1] * 1e3, 1) if lat else None,
            "p99": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3, 1) if lat else None,
            "p50": round(lat[len(lat) // 2] * 1e3, 1) if lat else None,
        },
        state_changes=dict(sorted(driver.states.items())),
    )
    return report


def failures(report: dict[str, Any]) -> list[str]:
    """Why the soak fails, one line each; empty when it passes."""
    out = []
    if "setup_error" in report:
        out.append(f"the soak could not begin: {report['setup_error']}")
    if report.get("daemon_exited_during_soak"):
        out.append(f"daemon exited during the soak: {report['daemon_exited_during_soak']}")
    if report.get("calls_unanswered"):
        out.append(f"{report['calls_unanswered']} calls unanswered: {report['unanswered'][:3]}")
    if report.get("unexpected_count"):
        shown = report["unexpected_answers"][:3]
        out.append(f"{report['unexpected_count']} unexpected answers: {shown}")
    if report.get("driver_exceptions"):
        out.append(f"driver exceptions: {report['driver_exceptions'][:3]}")
    if report.get("daemon_exit_code") != 0:
        out.append(f"daemon exit code {report.get('daemon_exit_code')}")
    if report.get("orphans"):
        out.append(f"orphans left: {report['orphans']}")
    if "fds_end" not in report:
        out.append("no end measurement (the daemon was gone)")
    else:
        if report["fds_end"] - report["fds_start"] > FD_GROWTH_MAX:
            out.append(f"fd count grew {report['fds_start']} -> {report['fds_end']}")
        if report["rss_kib_end"] - report["rss_kib_start"] > RSS_GROWTH_MAX_KIB:
            out.append(f"RSS grew {report['rss_kib_start']} -> {report['rss_kib_end']} KiB")
    return out


def soak(
    address: str,
    workdir: Path,
    *,
    seconds: float = 60.0,
    seed: int = 8,
    rate: float = 8.0,
    call_timeout: float = 5.0,
    start_timeout: float = 20.0,
    without: Iterable[str] = (),
) -> dict[str, Any]:
    """Run cxrd on the bus at ``address`` under the seed's plan; the report, with ``failures``."""
    layout = Layout(workdir)
    layout.write_config()
    without = sorted(set(without))
    ops = plan(seed, seconds, rate, without)
    began = time.monotonic()
    with layout.log.open("ab") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "cxrd", "--config", str(layout.config)],
            env=layout.env(address),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
    report: dict[str, Any] = {"seed": seed, "seconds": seconds, "rate_per_s": rate}
    report["without"] = without
    report.update(plan_ops=len(ops), plan_digest=plan_digest(ops), daemon_pid=daemon.pid)
    try:
        try:
            report.update(
                asyncio.run(
                    _drive(
                        layout,
                        daemon,
                        address,
                        ops,
                        call_timeout=call_timeout,
                        start_timeout=start_timeout,
                    )
                )
            )
        except (RuntimeError, OSError, TimeoutError) as exc:
            report["setup_error"] = f"{type(exc).__name__}: {exc}"
        try:
            report["daemon_exit_code"] = daemon.wait(timeout=STOP_TIMEOUT + 10)
        except subprocess.TimeoutExpired:
            report["daemon_exit_code"] = f"still running {STOP_TIMEOUT + 10:g} s after Stop()"
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(timeout=10)
        # A child that outlives the daemon by a moment is still on its way out.
        deadline = time.monotonic() + 3.0
        while (left := processes_of(layout.install_dir)) and time.monotonic() < deadline:
            time.sleep(0.05)
        report["orphans"] = [{"pid": pid, "cmdline": cmdline(pid)} for pid in left]
        for pid in left:  # never leave them to the next run
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    report["wall_s"] = round(time.monotonic() - began, 1)
    report["failures"] = failures(report)
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=8)
    p.add_argument("--rate", type=float, default=8.0, help="operations per second (mean)")
    p.add_argument("--call-timeout", type=float, default=5.0, help="seconds, most calls")
    p.add_argument("--start-timeout", type=float, default=20.0, help="seconds, Start/Restart")
    p.add_argument(
        "--without",
        action="append",
        default=[],
        choices=sorted(WEIGHTS),
        help="leave this kind of operation out of the plan (repeatable), to look past a finding",
    )
    p.add_argument(
        "--workdir", type=Path, help="keep the daemon's files here (default: a temp dir)"
    )
    args = p.parse_args()
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cxrd-chaos-")))
        else:
            workdir = args.workdir.resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        address = stack.enter_context(private_bus(workdir))
        report = soak(
            address,
            workdir,
            seconds=args.seconds,
            seed=args.seed,
            rate=args.rate,
            call_timeout=args.call_timeout,
            start_timeout=args.start_timeout,
            without=args.without,
        )
        if report["failures"]:
            tail = Layout(workdir).log.read_text(errors="replace").splitlines()[-40:]
            report["daemon_log_tail"] = tail
        print(json.dumps(report, indent=2))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
