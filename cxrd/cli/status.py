"""``cxrctl status`` and ``cxrctl env``: what the daemon says, for a person or a shell.

``cxrctl status`` answers like ``systemctl is-active``:

  0  ready
  1  on the way (starting, restarting, stopping)
  3  not running (the last failure, if any, is shown)
  4  failed (the daemon gave up and is about to exit)

It asks the daemon on D-Bus. A daemon that is not on the bus (``bus =
none``, or no session bus) is asked through its health endpoint instead
(``--health URL``, else ``health.listen`` of the config); with neither, the
run dir's files say what they can: a cxrd holding the install lock is
running in a state they cannot tell (exit 1). The output says which it used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from cxrd import constants as C
from cxrd.cli.common import Out, config_from_args, instance_from_args, with_client
from cxrd.cli.urls import describe_agent
from cxrd.client import AsyncCloudXRClient
from cxrd.config import Config, parse_listen
from cxrd.core.snapshot import Snapshot
from cxrd.core.states import State
from cxrd.dbus.wire import snapshot_from_wire
from cxrd.errors import CxrdError, InvalidArgs, NotRunning
from cxrd.instances import Instance
from cxrd.system.rundir import live_runtime_pid, lock_holder, read_last_error

EXIT_READY = 0
EXIT_TRANSITION = 1
EXIT_NOT_RUNNING = 3
EXIT_FAILED = 4
_STATUS_EXIT = {
    State.READY: EXIT_READY,
    State.STARTING: EXIT_TRANSITION,
    State.RESTARTING: EXIT_TRANSITION,
    State.STOPPING: EXIT_TRANSITION,
    State.STOPPED: EXIT_NOT_RUNNING,
    State.FAILED: EXIT_FAILED,
}

_STATE_COLOR = {
    State.READY: "32",
    State.STARTING: "33",
    State.RESTARTING: "33",
    State.STOPPING: "33",
    State.STOPPED: "90",
    State.FAILED: "31",
}


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] if days else []
    if hours or days:
        parts.append(f"{hours}h")
    if minutes or hours or days:
        parts.append(f"{minutes}min")
    parts.append(f"{secs}s")
    return " ".join(parts)


HEALTH_TIMEOUT = 5.0  # seconds for the health endpoint to answer
_MAX_BODY = 1 << 20


def cmd_status(args: argparse.Namespace) -> int:
    async def ask(client: AsyncCloudXRClient) -> int:
        snap = await client.status()
        _print_status(snap, args.json, "dbus")
        return _STATUS_EXIT.get(snap.state, EXIT_TRANSITION)

    try:
        return with_client(args, ask)
    except NotRunning as err:
        return _status_without_bus(args, str(err))


def _status_without_bus(args: argparse.Namespace, why: str) -> int:
    """The daemon is not on the bus: its health endpoint, else the run dir's files."""
    config: Config | None = None
    note = ""
    try:
        config = config_from_args(args)
    except CxrdError as err:
        note = f"(cannot read the config: {err})"
    url = args.health
    if url is None and config is not None and config.health.listen:
        url = config.health.listen
    if url is not None:
        url = readyz_url(url)
        try:
            body = fetch_health(url)
        except OSError as exc:
            why = f"{why}; the health endpoint {url} did not answer ({_reason(exc)})"
        else:
            snap = snapshot_from_wire(body)
            if config is not None:
                env_file = str(config.run_dir / C.ENV_FILE)
                snap = dataclasses.replace(
                    snap, install_dir=str(config.install_path), env_file=env_file
                )
            _print_status(snap, args.json, "health", url, str(body.get("reason", "")))
            return _STATUS_EXIT.get(snap.state, EXIT_TRANSITION)
    holder = lock_holder(config.run_dir) if config is not None else None
    if config is not None and holder is not None:
        _print_unknown(args, why, config, holder)
        return EXIT_TRANSITION
    _print_down(args, why, config, note)
    return EXIT_NOT_RUNNING


def readyz_url(given: str) -> str:
    """``http://host:port[/readyz]`` or ``host:port`` (a wildcard host means this machine)."""
    text = given.strip()
    if "://" not in text:
        try:
            host, port = parse_listen(text)
        except ValueError as exc:
            raise InvalidArgs(f"--health {exc}") from None
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        text = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    elif not text.startswith(("http://", "https://")):
        raise InvalidArgs(f"--health {given!r}: expected http://host:port or host:port")
    base = text.rstrip("/")
    return base if base.endswith("/readyz") else base + "/readyz"


def fetch_health(url: str) -> dict[str, Any]:
    """``/readyz``'s JSON body; a 503 is an answer too. OSError when nothing answers."""
    # No proxy from the environment: the endpoint is the daemon's own.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=HEALTH_TIMEOUT) as reply:
            data = reply.read(_MAX_BODY)
    except urllib.error.HTTPError as err:
        if err.code != 503:
            raise OSError(f"HTTP {err.code} {err.reason}") from None
        data = err.read(_MAX_BODY)
    try:
        body = json.loads(data)
    except ValueError:
        raise OSError("the answer is not JSON") from None
    if not isinstance(body, dict) or "state" not in body:
        raise OSError("the answer is not a cxrd health report")
    return body


def _reason(exc: OSError) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return str(exc.reason)
    return str(exc)


def _print_status(
    snap: Snapshot, as_json: bool, source: str, url: str = "", reason: str = ""
) -> None:
    out = Out(sys.stdout)
    if as_json:
        data = {**_snapshot_json(snap), "source": source}
        if source == "health":
            data.update(health_url=url, reason=reason)
        out.line(json.dumps(data, indent=2, sort_keys=True))
        return
    dot = out.paint("●", _STATE_COLOR.get(snap.state, "0"))
    state = out.paint(str(snap.state), "1;" + _STATE_COLOR.get(snap.state, "0"))
    backend = (
        "sim: a simulated runtime, not NVIDIA CloudXR"
        if snap.backend == "sim"
        else (f"{snap.backend} runtime")
    )
    out.line(f"{dot} cxrd {snap.version} — {state} ({backend})")
    rows: list[tuple[str, str]] = [("Instance", Instance(snap.instance).label)]
    if source == "health":
        rows.append(("Via", f"health endpoint {url} (the daemon is not on D-Bus)"))
        if reason:
            rows.append(("Why", reason))
    if snap.runtime.pid:
        up = time.time() - snap.runtime.started_at if snap.runtime.started_at else 0.0
        rows.append(("Runtime", f"pid {snap.runtime.pid}, up {_duration(up)}"))
    else:
        rows.append(("Runtime", _child_down(snap.runtime.state)))
    rows.append(("Restarts", str(snap.runtime.restarts)))
    if snap.last_start_seconds:
        rows.append(("Last start", f"ready in {snap.last_start_seconds:.2f} s"))
    if snap.runtime.last_exit:
        rows.append(("Last exit", snap.runtime.last_exit))
    if snap.proxy.url or snap.proxy.pid:
        pid = f"pid {snap.proxy.pid}" if snap.proxy.pid else _child_down(snap.proxy.state)
        rows.append(("Proxy", f"port {snap.proxy.port or '-'} ({pid})"))
        if snap.proxy.restarts:
            rows.append(("Proxy restarts", str(snap.proxy.restarts)))
        rows.append(("Web client", snap.proxy.url or "-"))
        if snap.proxy.certificate:
            rows.append(("Certificate", out.paint(snap.proxy.certificate, "33")))
        rows.extend(_headset_rows(snap))
    rows.append(("Profile", snap.device_profile))
    rows.append(("GPU", gpu_text(snap.gpu)))
    if snap.requested:  # what a client's Start chose over the config
        chosen = ", ".join(f"{key}={value}" for key, value in snap.requested.items())
        rows.append(("Requested", f"{chosen} by {snap.requested_by or '?'}"))
    if snap.signaling_port:
        rows.append(("Ports", f"signaling {snap.signaling_port}/tcp, media {snap.media_port}/udp"))
    rows.append(("Env file", snap.env_file))
    if snap.env_file_event:  # another program changed it and cxrd put it back
        rows.append(("", out.paint(snap.env_file_event, "33")))
    rows.append(("Install dir", snap.install_dir))
    rows.append(("Daemon up", _duration(snap.uptime)))
    for lease in snap.leases:
        who = f"{lease.holder} pid {lease.pid or '?'}"
        rows.append(("Lease", f"{lease.id} {who} {lease.reason!r}".rstrip()))
    if snap.last_error:
        rows.append(("Last error", out.paint(snap.last_error, "31")))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        out.line(f"  {label.rjust(width)}: {value}")


def _child_down(state: str) -> str:
    """Words for a child with no process: why it has none."""
    return {
        "backoff": "restarting after a crash",
        "fatal": "down: crashed too often, gave up",
        "starting": "starting",
        "stopping": "stopping",
    }.get(state, "not running")


def gpu_text(gpu: int) -> str:
    """``runtime.gpu`` for a person: the CUDA index, or that it is not pinned."""
    return f"CUDA {gpu}" if gpu >= 0 else "not pinned (the driver's default)"


def _headset_rows(snap: Snapshot) -> list[tuple[str, str]]:
    """ "Headsets: 1 — 192.168.1.23 Quest browser, 3min 2s", one row per headset."""
    if not snap.headsets:
        return [("Headsets", "0 (web clients through the proxy)")]
    now = time.time()
    rows = []
    for n, h in enumerate(snap.headsets):
        what = f"{h.address} {describe_agent(h.user_agent)}, {_duration(now - h.since)}"
        rows.append(
            (
                "Headsets" if n == 0 else "",
                f"{len(snap.headsets)} — {what}" if n == 0 else f"  {what}",
            )
        )
    return rows


def _snapshot_json(snap: Snapshot) -> dict[str, Any]:
    """The snapshot as it is, field by field (``state`` is a str enum, so JSON shows its value)."""
    return {"running": True, **dataclasses.asdict(snap)}


def _runtime_pid(config: Config) -> int | None:
    try:
        return live_runtime_pid(config.run_dir)
    except CxrdError:
        return None


def _print_unknown(args: argparse.Namespace, why: str, config: Config, holder: int) -> None:
    """A cxrd holds the install lock, and neither the bus nor a health endpoint answered."""
    out = Out(sys.stdout)
    live = _runtime_pid(config)
    lock = config.run_dir / C.LOCK_FILE
    if args.json:
        data = {
            "running": True,
            "state": "unknown",
            "detail": why,
            "daemon_pid": holder,
            "source": "run_dir",
            "runtime_live": live is not None,
            "runtime_pid": live or None,
        }
        out.line(json.dumps(data, indent=2, sort_keys=True))
        return
    label = instance_from_args(args).label
    state = out.paint("running", "1")
    out.line(
        f"{out.paint('●', '33')} cxrd ({label}) — {state} (state unknown without the bus: {why})"
    )
    out.line(f"  Daemon: pid {holder} holds {lock}")
    socket = config.run_dir / C.IPC_SOCKET
    if live is None:
        out.line(f"  Runtime: none answers on {socket}")
    else:
        out.line(f"  Runtime: answers on {socket} ({f'pid {live}' if live else 'pid unknown'})")
    out.line(
        f"  Via: the run dir's files in {config.run_dir}; for its state, set health.listen "
        "or pass --health URL"
    )


def _print_down(args: argparse.Namespace, why: str, config: Config | None, note: str) -> None:
    out = Out(sys.stdout)
    last: dict[str, object] | None = None
    live: int | None = None
    if config is not None:
        last = read_last_error(config.run_dir)
        live = _runtime_pid(config)
    if args.json:
        data = {
            "running": False,
            "state": "inactive",
            "detail": why,
            "last_error": last,
            "source": "run_dir",
            "runtime_live": live is not None,
        }
        out.line(json.dumps(data, indent=2, sort_keys=True))
        return
    label = instance_from_args(args).label
    out.line(f"{out.paint('○', '90')} cxrd ({label}) — {out.paint('inactive', '1')} (not running)")
    if config is not None:
        out.line(f"  Via: the run dir's files in {config.run_dir} ({why})")
        if live is not None:
            pid = f"pid {live}" if live else "pid unknown"
            out.line(
                f"  A runtime answers on {config.run_dir / C.IPC_SOCKET} ({pid}), but no cxrd "
                "could be asked: set health.listen, or pass --health URL"
            )
    if last is not None:
        out.line(
            f"  Last failure ({last.get('when', '?')}): {out.paint(str(last.get('error')), '31')}"
        )
        tail = str(last.get("stderr_tail") or "").rstrip()
        if tail:
            out.line("  Runtime stderr (tail):")
            for line in tail.splitlines()[-10:]:
                out.line(f"    {line}")
    if note:
        out.line(f"  {note}")


def cmd_env(args: argparse.Namespace) -> int:
    async def env(client: AsyncCloudXRClient) -> int:
        values = await client.environment()
        if not values:
            raise NotRunning("the runtime is not running, so it has no environment")
        Out(sys.stdout).line(format_env(values, args.shell))
        return 0

    return with_client(args, env)


def format_env(env: dict[str, str], shell: str) -> str:
    """Text that a shell evaluates into the runtime's environment."""
    if shell == "json":
        return json.dumps(env, indent=2, sort_keys=True)
    if shell == "fish":
        return "\n".join(
            f"set -gx {key} {_fish_quote(value)};" for key, value in sorted(env.items())
        )
    return "\n".join(f"export {key}={shlex.quote(value)}" for key, value in sorted(env.items()))


def _fish_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
