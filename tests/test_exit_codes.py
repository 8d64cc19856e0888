"""Every code the daemon can end with is documented; the unit never retries one it must not."""

from __future__ import annotations

import re
from pathlib import Path

from cxrd import errors

ROOT = Path(__file__).resolve().parent.parent
# What can end the daemon (the supervisor's _fail and the composition root).
DAEMON_EXITS = (
    errors.StartFailed,
    errors.Timeout,
    errors.RuntimeUnavailable,
    errors.EulaNotAccepted,
    errors.AlreadyServing,
    errors.InvalidConfig,
    errors.GaveUp,
)


def test_every_daemon_exit_code_is_in_restart_prevent_exit_status() -> None:
    for unit in (ROOT / "systemd" / "cloudxr.service", ROOT / "cxrd" / "data" / "cloudxr.service"):
        (line,) = re.findall(r"^RestartPreventExitStatus=(.*)$", unit.read_text(), re.M)
        listed = {int(code) for code in line.split()}
        assert {e.exit_code for e in DAEMON_EXITS} == listed, unit
        assert errors.CxrdError.exit_code not in listed, "an internal error may be retried"


def test_every_daemon_exit_code_is_in_the_readme_table() -> None:
    table = (ROOT / "README.md").read_text().split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    for error in (errors.CxrdError, *DAEMON_EXITS):
        assert f"| {error.exit_code} | `{error.name}`" in table, error.name
