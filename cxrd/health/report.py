"""Readiness and the JSON bodies of ``/livez`` and ``/readyz``. Pure: no I/O.

The bodies carry how the daemon is (state, children, timings, the last
error), never where its files are, its environment or who holds leases: the
endpoints may face a network. Their keys are the snapshot's own, so
``cxrctl status --health`` reads them back with the snapshot's tolerant reader.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Final

from cxrd.core.snapshot import Snapshot
from cxrd.core.states import ChildState, State

#: Snapshot fields a health body carries.
PUBLIC_FIELDS: Final = (
    "state",
    "backend",
    "runtime",
    "proxy",
    "device_profile",
    "uptime",
    "last_error",
    "version",
    "interface_version",
    "ready_since",
    "last_start_seconds",
)

# A ready daemon's proxy either listens or is disabled (then it stays stopped).
_PROXY_OK: Final = frozenset({str(ChildState.RUNNING), str(ChildState.STOPPED)})


def readiness(snap: Snapshot, last_reason: str) -> tuple[bool, str]:
    """(ready, why not): ready means the runtime is ready and the proxy listens or is off.

    ``last_reason`` is the reason of the latest state change, which says why
    the daemon is where it is ("the runtime was killed by SIGKILL; restarting").
    """
    if snap.state is State.READY:
        if snap.proxy.state in _PROXY_OK:
            return True, ""
        why = f"the runtime is ready but the proxy is {snap.proxy.state}"
        return False, why + (f": {snap.last_error}" if snap.last_error else "")
    if snap.state is State.STOPPED and not last_reason:
        return False, "not started yet"
    return False, last_reason or f"runtime {snap.runtime.state}, proxy {snap.proxy.state}"


def ready_body(snap: Snapshot, last_reason: str) -> dict[str, Any]:
    """``/readyz``'s body, 200 or 503: ``ready``, ``reason`` and the public snapshot."""
    ready, reason = readiness(snap, last_reason)
    plain = dataclasses.asdict(snap)
    public = {key: plain[key] for key in PUBLIC_FIELDS}
    public["state"] = str(snap.state)
    return {"ready": ready, "reason": reason, **public}


def live_body(snap: Snapshot) -> dict[str, Any]:
    """``/livez``'s body: the loop answered; what state it is in."""
    return {"alive": True, "state": str(snap.state), "version": snap.version}
