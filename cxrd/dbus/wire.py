"""The wire form of a :class:`~cxrd.core.snapshot.Snapshot`, both ways. Pure: no I/O.

The daemon's adapter turns a snapshot into ``Status()``'s ``a{sv}`` and into
property values; the client turns ``a{sv}`` back into a snapshot. Keys are
only ever added, and the reader ignores keys it does not know and fills
missing ones with defaults, so an older client reads a newer daemon.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from dbus_fast import Variant

from cxrd.core.choice import Choice
from cxrd.core.snapshot import Headset, Lease, ProxyStatus, RuntimeStatus, Snapshot
from cxrd.core.states import State
from cxrd.errors import InvalidArgs

LEASE_SIGNATURE = "(ssusd)"
LEASES_SIGNATURE = "a" + LEASE_SIGNATURE
HEADSETS_SIGNATURE = "a(ssssd)"  # id, address, user agent, path, since

# Property name -> D-Bus signature, in the order of the introspection XML.
PROPERTY_SIGNATURES: dict[str, str] = {
    "State": "s",
    "RuntimePid": "u",
    "ProxyPid": "u",
    "ProxyUrl": "s",
    "DeviceProfile": "s",
    "Environment": "a{ss}",
    "EnvFile": "s",
    "LastError": "s",
    "Restarts": "u",
    "Leases": LEASES_SIGNATURE,
    "Headsets": HEADSETS_SIGNATURE,
    "HeadsetUrls": "as",
    "Version": "s",
    "InterfaceVersion": "u",
}

# Start()/Restart() options: key -> signature.
START_OPTIONS: dict[str, str] = {"timeout": "d", "device_profile": "s", "env": "a{ss}", "gpu": "i"}

_U32_MAX = 2**32 - 1


def _u32(value: int) -> int:
    return min(max(int(value), 0), _U32_MAX)


def lease_to_wire(lease: Lease) -> list[Any]:
    return [lease.id, lease.holder, _u32(lease.pid), lease.reason, float(lease.since)]


def lease_from_wire(value: Any) -> Lease:
    lease_id, holder, pid, reason, since = value
    return Lease(id=lease_id, holder=holder, pid=int(pid), reason=reason, since=float(since))


def headset_to_wire(h: Headset) -> list[Any]:
    return [h.id, h.address, h.user_agent, h.path, float(h.since)]


def headset_from_wire(value: Any) -> Headset:
    hid, address, user_agent, path, since = value
    return Headset(id=hid, address=address, user_agent=user_agent, path=path, since=float(since))


def property_values(snap: Snapshot) -> dict[str, Any]:
    """Every property's value (plain Python, typed as PROPERTY_SIGNATURES says)."""
    return {
        "State": str(snap.state),
        "RuntimePid": _u32(snap.runtime.pid),
        "ProxyPid": _u32(snap.proxy.pid),
        "ProxyUrl": snap.proxy.url,
        "DeviceProfile": snap.device_profile,
        "Environment": dict(snap.environment),
        "EnvFile": snap.env_file,
        "LastError": snap.last_error,
        "Restarts": _u32(snap.runtime.restarts),
        "Leases": [lease_to_wire(lease) for lease in snap.leases],
        "Headsets": [headset_to_wire(h) for h in snap.headsets],
        "HeadsetUrls": list(snap.proxy.headset_urls),
        "Version": snap.version,
        "InterfaceVersion": _u32(snap.interface_version),
    }


def snapshot_to_wire(snap: Snapshot) -> dict[str, Variant]:
    """``Status()``'s reply."""
    runtime = {
        "pid": Variant("u", _u32(snap.runtime.pid)),
        "started_at": Variant("d", float(snap.runtime.started_at)),
        "restarts": Variant("u", _u32(snap.runtime.restarts)),
        "last_exit": Variant("s", snap.runtime.last_exit),
        "state": Variant("s", snap.runtime.state),
    }
    proxy = {
        "pid": Variant("u", _u32(snap.proxy.pid)),
        "port": Variant("u", _u32(snap.proxy.port)),
        "url": Variant("s", snap.proxy.url),
        "headset_urls": Variant("as", list(snap.proxy.headset_urls)),
        "certificate": Variant("s", snap.proxy.certificate),
        "restarts": Variant("u", _u32(snap.proxy.restarts)),
        "last_exit": Variant("s", snap.proxy.last_exit),
        "state": Variant("s", snap.proxy.state),
    }
    return {
        "state": Variant("s", str(snap.state)),
        "backend": Variant("s", snap.backend),
        "runtime": Variant("a{sv}", runtime),
        "proxy": Variant("a{sv}", proxy),
        "device_profile": Variant("s", snap.device_profile),
        "environment": Variant("a{ss}", dict(snap.environment)),
        "env_file": Variant("s", snap.env_file),
        "logs": Variant("a{ss}", dict(snap.logs)),
        "install_dir": Variant("s", snap.install_dir),
        "uptime": Variant("d", float(snap.uptime)),
        "last_error": Variant("s", snap.last_error),
        "version": Variant("s", snap.version),
        "interface_version": Variant("u", _u32(snap.interface_version)),
        "leases": Variant(LEASES_SIGNATURE, [lease_to_wire(lease) for lease in snap.leases]),
        "instance": Variant("s", snap.instance),
        "gpu": Variant("i", int(snap.gpu)),
        "signaling_port": Variant("u", _u32(snap.signaling_port)),
        "media_port": Variant("u", _u32(snap.media_port)),
        "ready_since": Variant("d", float(snap.ready_since)),
        "last_start_seconds": Variant("d", float(snap.last_start_seconds)),
        "headsets": Variant(HEADSETS_SIGNATURE, [headset_to_wire(h) for h in snap.headsets]),
        "requested": Variant("a{ss}", dict(snap.requested)),
        "requested_by": Variant("s", snap.requested_by),
        "env_file_event": Variant("s", snap.env_file_event),
    }


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Variant) else value


def _get(data: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    value = _plain(data.get(key, default))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value if isinstance(value, kind) else default


def state_from_wire(text: str) -> State:
    """A state name from the daemon; one this client does not know reads as failed."""
    try:
        return State(text)
    except ValueError:
        return State.FAILED


def snapshot_from_wire(data: Mapping[str, Any]) -> Snapshot:
    """The client's reading of ``Status()``; tolerant of added and missing keys."""
    runtime = _get(data, "runtime", dict, {})
    proxy = _get(data, "proxy", dict, {})
    return Snapshot(
        state=state_from_wire(_get(data, "state", str, "stopped")),
        backend=_get(data, "backend", str, ""),
        runtime=RuntimeStatus(
            pid=_get(runtime, "pid", int, 0),
            started_at=_get(runtime, "started_at", float, 0.0),
            restarts=_get(runtime, "restarts", int, 0),
            last_exit=_get(runtime, "last_exit", str, ""),
            state=_get(runtime, "state", str, ""),
        ),
        proxy=ProxyStatus(
            pid=_get(proxy, "pid", int, 0),
            port=_get(proxy, "port", int, 0),
            url=_get(proxy, "url", str, ""),
            headset_urls=tuple(_get(proxy, "headset_urls", list, [])),
            certificate=_get(proxy, "certificate", str, ""),
            restarts=_get(proxy, "restarts", int, 0),
            last_exit=_get(proxy, "last_exit", str, ""),
            state=_get(proxy, "state", str, ""),
        ),
        device_profile=_get(data, "device_profile", str, ""),
        environment=dict(_get(data, "environment", dict, {})),
        env_file=_get(data, "env_file", str, ""),
        logs=dict(_get(data, "logs", dict, {})),
        install_dir=_get(data, "install_dir", str, ""),
        uptime=_get(data, "uptime", float, 0.0),
        last_error=_get(data, "last_error", str, ""),
        version=_get(data, "version", str, ""),
        interface_version=_get(data, "interface_version", int, 0),
        leases=tuple(lease_from_wire(item) for item in _get(data, "leases", list, [])),
        instance=_get(data, "instance", str, ""),
        gpu=_get(data, "gpu", int, -1),
        signaling_port=_get(data, "signaling_port", int, 0),
        media_port=_get(data, "media_port", int, 0),
        ready_since=_get(data, "ready_since", float, 0.0),
        last_start_seconds=_get(data, "last_start_seconds", float, 0.0),
        headsets=tuple(headset_from_wire(item) for item in _get(data, "headsets", list, [])),
        requested=dict(_get(data, "requested", dict, {})),
        requested_by=_get(data, "requested_by", str, ""),
        env_file_event=_get(data, "env_file_event", str, ""),
    )


def parse_start_options(options: Mapping[str, Any]) -> tuple[float | None, Choice]:
    """Check ``Start``/``Restart`` options; return (timeout, what the runtime should run with).

    Unknown keys and wrong variant types are :class:`InvalidArgs` naming
    every offender, so a caller fixes them all at once.
    """
    problems: list[str] = []
    for key in sorted(options):
        value = options[key]
        expected = START_OPTIONS.get(key)
        if expected is None:
            problems.append(f"unknown option {key!r} (known: {', '.join(sorted(START_OPTIONS))})")
            continue
        signature = value.signature if isinstance(value, Variant) else "?"
        if signature != expected:
            problems.append(f"option {key!r} must have type {expected!r}, got {signature!r}")
    if problems:
        raise InvalidArgs("; ".join(problems))
    timeout: float | None = None
    profile: str | None = None
    if "timeout" in options:
        timeout = float(options["timeout"].value)
        if not math.isfinite(timeout) or timeout <= 0:
            raise InvalidArgs(
                f"option 'timeout' must be a positive number of seconds, got {timeout}"
            )
    if "device_profile" in options:
        profile = str(options["device_profile"].value)
        if not profile:
            raise InvalidArgs("option 'device_profile' must not be empty")
    env = {str(k): str(v) for k, v in options["env"].value.items()} if "env" in options else {}
    gpu = int(options["gpu"].value) if "gpu" in options else None
    # What the values may be (reserved keys, ...) the supervisor checks, for every caller.
    return timeout, Choice(profile=profile, env=env, gpu=gpu)


def start_options(timeout: float | None, choice: Choice | None = None) -> dict[str, Variant]:
    """The client's side of :func:`parse_start_options`."""
    options: dict[str, Variant] = {}
    if timeout is not None:
        options["timeout"] = Variant("d", float(timeout))
    if choice is not None and choice.profile is not None:
        options["device_profile"] = Variant("s", choice.profile)
    if choice is not None and choice.env:
        options["env"] = Variant("a{ss}", dict(choice.env))
    if choice is not None and choice.gpu is not None:
        options["gpu"] = Variant("i", int(choice.gpu))
    return options
