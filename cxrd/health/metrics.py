"""The daemon's Prometheus metrics, read from a snapshot at each scrape.

A collector, not metric objects updated as things happen: the supervisor's
snapshot is the one truth, and a scrape reads it whole, so the numbers never
disagree with ``/readyz`` or ``cxrctl status``. A registry of its own (not
prometheus_client's global one) holds it and the process collector.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from cxrd.core.snapshot import Snapshot
from cxrd.core.states import ChildState, State
from cxrd.health.report import readiness

CONTENT_TYPE = CONTENT_TYPE_LATEST


class DaemonCollector(Collector):
    """``cxrd_*`` metrics from the supervisor's snapshot and the health server's counts."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        last_reason: Callable[[], str],
        state_changes: Mapping[State, int],
        reaped: Callable[[], int] | None,
    ) -> None:
        self._snapshot = snapshot
        self._last_reason = last_reason
        self._changes = state_changes
        self._reaped = reaped

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield InfoMetricFamily(
            "cxrd",
            "cxrd's version, runtime backend and device profile",
            value={
                "version": snap.version,
                "backend": snap.backend,
                "device_profile": snap.device_profile,
            },
        )
        state = GaugeMetricFamily("cxrd_state", "1 for the current state", labels=["state"])
        for each in State:
            state.add_metric([str(each)], 1.0 if each is snap.state else 0.0)
        yield state
        changes = CounterMetricFamily(
            "cxrd_state_changes", "Changes into each state since cxrd started", labels=["state"]
        )
        for each in State:
            changes.add_metric([str(each)], float(self._changes.get(each, 0)))
        yield changes
        ready, _ = readiness(snap, self._last_reason())
        running = str(ChildState.RUNNING)
        since = time.time() - snap.ready_since if snap.ready_since else 0.0
        gauges = (
            ("cxrd_ready", "1 while /readyz answers 200", float(ready)),
            ("cxrd_runtime_up", "1 while the runtime is ready", snap.runtime.state == running),
            ("cxrd_proxy_up", "1 while the WSS proxy listens", snap.proxy.state == running),
            ("cxrd_ready_seconds", "Seconds since the daemon became ready; 0 while not", since),
            (
                "cxrd_last_start_seconds",
                "Seconds from starting (or restarting) to ready, the latest time",
                snap.last_start_seconds,
            ),
            ("cxrd_uptime_seconds", "Seconds since cxrd started", snap.uptime),
            ("cxrd_leases", "Leases held by clients", len(snap.leases)),
        )
        for name, text, value in gauges:
            yield GaugeMetricFamily(name, text, value=float(value))
        counters = [
            ("cxrd_runtime_restarts", "Runtime crashes restarted", snap.runtime.restarts),
            ("cxrd_proxy_restarts", "Proxy crashes restarted", snap.proxy.restarts),
        ]
        if self._reaped is not None:
            counters.append(
                ("cxrd_orphans_reaped", "Orphaned processes reaped as PID 1", self._reaped())
            )
        for name, text, count in counters:
            yield CounterMetricFamily(name, text, value=float(count))


def registry_for(collector: DaemonCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format (``CONTENT_TYPE``)."""
    return generate_latest(registry)
