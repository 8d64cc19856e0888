"""``cxrctl status`` and ``cxrctl env``: what the daemon says, for a person or a shell.

``cxrctl status`` answers like ``systemctl is-active``:

  0  ready
  1  on the way (starting, restarting, stopping)
  3  not running (the last failure, if any, is shown)
  4  failed (the daemon gave up and is about to exit)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from typing import Any

from cxrd.cli.common import Out, config_from_args, instance_from_args, with_client
from cxrd.client import AsyncCloudXRClient
from cxrd.core.snapshot import Snapshot
from cxrd.core.states import State
from cxrd.errors import CxrdError, NotRunning
from cxrd.instances import Instance
from cxrd.system.rundir import read_last_error

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


def cmd_status(args: argparse.Namespace) -> int:
    async def ask(client: AsyncCloudXRClient) -> int:
        snap = await client.status()
        _print_status(snap, args.json)
        return _STATUS_EXIT.get(snap.state, EXIT_TRANSITION)

    try:
        return with_client(args, ask)
    except NotRunning as err:
        _print_down(args, str(err))
        return EXIT_NOT_RUNNING


def _print_status(snap: Snapshot, as_json: bool) -> None:
    out = Out(sys.stdout)
    if as_json:
        out.line(json.dumps(_snapshot_json(snap), indent=2, sort_keys=True))
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
    if snap.runtime.pid:
        up = time.time() - snap.runtime.started_at if snap.runtime.started_at else 0.0
        rows.append(("Runtime", f"pid {snap.runtime.pid}, up {_duration(up)}"))
    else:
        rows.append(("Runtime", _child_down(snap.runtime.state)))
    rows.append(("Restarts", str(snap.runtime.restarts)))
    if snap.runtime.last_exit:
        rows.append(("Last exit", snap.runtime.last_exit))
    if snap.proxy.url or snap.proxy.pid:
        pid = f"pid {snap.proxy.pid}" if snap.proxy.pid else _child_down(snap.proxy.state)
        rows.append(("Proxy", f"{snap.proxy.url or '-'} ({pid})"))
        if snap.proxy.restarts:
            rows.append(("Proxy restarts", str(snap.proxy.restarts)))
    rows.append(("Profile", snap.device_profile))
    rows.append(("GPU", gpu_text(snap.gpu)))
    if snap.signaling_port:
        rows.append(("Ports", f"signaling {snap.signaling_port}/tcp, media {snap.media_port}/udp"))
    rows.append(("Env file", snap.env_file))
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


def _snapshot_json(snap: Snapshot) -> dict[str, Any]:
    """The snapshot as it is, field by field (``state`` is a str enum, so JSON shows its value)."""
    return {"running": True, **dataclasses.asdict(snap)}


def _print_down(args: argparse.Namespace, why: str) -> None:
    out = Out(sys.stdout)
    last: dict[str, object] | None = None
    note = ""
    try:
        config = config_from_args(args)
    except CxrdError as err:
        note = f"(cannot read the config to find the last error: {err})"
    else:
        last = read_last_error(config.run_dir)
    if args.json:
        out.line(
            json.dumps(
                {"running": False, "state": "inactive", "detail": why, "last_error": last},
                indent=2,
                sort_keys=True,
            )
        )
        return
    label = instance_from_args(args).label
    out.line(f"{out.paint('○', '90')} cxrd ({label}) — {out.paint('inactive', '1')} (not running)")
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
