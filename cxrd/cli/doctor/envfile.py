"""``run/cloudxr.env`` on disk against the environment the daemon says it wrote there."""

from __future__ import annotations

from pathlib import Path

from cxrd.cli.doctor.bus import BusFacts
from cxrd.cli.doctor.check import Check
from cxrd.system.envfile import read_env_file
from cxrd.system.envguard import differences

_NAME = "env file"
_REWRITER = (
    "a program rewrote it (isaacteleop's CloudXRLauncher does before it finds the runtime "
    "running): let it use cxrd.launcher.CloudXRLauncher or CloudXRClient().lease()"
)


def check_env_file(bus: BusFacts) -> Check:
    snap = bus.status
    if snap is None:
        why = "no session bus to ask" if bus.error is not None else "cxrd is not on the bus"
        return Check(_NAME, "ok", f"{why}: nothing to compare")
    event = f"; it was {snap.env_file_event}" if snap.env_file_event else ""
    if not snap.environment:
        if event:
            return Check(_NAME, "warn", f"the runtime is not running{event}", _REWRITER)
        return Check(_NAME, "ok", "the runtime is not running: cxrd wrote none")
    path = Path(snap.env_file)
    fix = "cxrctl restart (writes it again); cxrctl logs --daemon says why it was not restored"
    try:
        on_disk = read_env_file(path)
    except FileNotFoundError:
        return Check(_NAME, "fail", f"{path} is missing while the runtime runs{event}", fix)
    except (OSError, ValueError) as exc:
        return Check(_NAME, "fail", f"cannot read {path}: {exc}{event}", fix)
    if differ := differences(snap.environment, on_disk):
        return Check(_NAME, "fail", f"{path} disagrees with the daemon ({differ}){event}", fix)
    if event:
        return Check(_NAME, "warn", f"{path} matches the daemon's environment{event}", _REWRITER)
    return Check(_NAME, "ok", f"{path} matches the daemon's environment")
