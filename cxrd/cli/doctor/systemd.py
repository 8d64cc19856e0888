"""The systemd side: the user manager, the unit it loaded, lingering.

The unit check also says whether the unit runs this cxrd (this Python's).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from cxrd import constants as C
from cxrd.cli.doctor.check import TIMEOUT, Check, Level


def _systemctl(*args: str) -> subprocess.CompletedProcess[str] | None:
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        return None
    try:
        return subprocess.run(
            [systemctl, "--user", "--no-pager", *args],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return None


def check_user_manager() -> Check:
    fix = "log in through PAM with systemd (libpam-systemd), or run `cxrd` in the foreground"
    result = _systemctl("is-system-running")
    if result is None:
        return Check("user manager", "warn", "systemctl not found or not answering", fix)
    state = result.stdout.strip()
    if state in ("running", "degraded", "starting", "initializing"):
        level: Level = "ok" if state != "degraded" else "warn"
        fixing = "" if level == "ok" else "systemctl --user --failed shows which unit failed"
        return Check("user manager", level, f"systemd --user is {state}", fixing)
    reason = (result.stderr.strip().splitlines() or [state or "no answer"])[-1]
    return Check("user manager", "warn", f"no systemd user manager: {reason}", fix)


def check_unit(unit: str = C.UNIT_NAME) -> Check:
    result = _systemctl(
        "show", unit, "--property=LoadState,FragmentPath,NeedDaemonReload,ActiveState"
    )
    if result is None or result.returncode != 0:
        path = _find_unit_file(C.UNIT_TEMPLATE if "@" in unit else C.UNIT_NAME)
        if path is None:
            return Check("unit", "fail", f"{unit} is not installed", "cxrctl install")
        return _unit_currency(path, "(user manager not reachable)")
    props = dict(line.partition("=")[::2] for line in result.stdout.splitlines())
    if props.get("LoadState") != "loaded":
        return Check(
            "unit",
            "fail",
            f"{unit} is {props.get('LoadState') or 'unknown'}",
            "cxrctl install (then it loads at once)",
        )
    if props.get("NeedDaemonReload") == "yes":
        return Check(
            "unit",
            "warn",
            f"{props['FragmentPath']} changed on disk since it was loaded",
            "systemctl --user daemon-reload",
        )
    return _unit_currency(Path(props["FragmentPath"]), props.get("ActiveState", ""))


def _find_unit_file(name: str) -> Path | None:
    """Where ``cxrctl install`` (for this user, /usr/local or /usr) or an admin put the unit."""
    from cxrd.cli.install import Layout

    for path in (
        Layout.for_prefix(None).unit.with_name(name),
        Path("/etc/systemd/user") / name,
        Layout.for_prefix(Path("/usr/local")).unit.with_name(name),
        Layout.for_prefix(Path("/usr")).unit.with_name(name),
    ):
        if path.is_file():
            return path
    return None


def _unit_currency(path: Path, active: str) -> Check:
    argv = unit_exec_argv(path.read_text(encoding="utf-8"))
    if argv and runs_this_interpreter(argv):
        return Check("unit", "ok", f"{path} ({active}) runs this cxrd")
    shown = " ".join(argv) if argv else "no ExecStart="
    return Check(
        "unit",
        "warn",
        f"{path} runs `{shown}`, not the cxrd of {sys.executable}",
        "cxrctl install (writes a unit for this Python), or run cxrctl from that installation",
    )


def unit_exec_argv(text: str) -> list[str]:
    """The last ``ExecStart=`` of a unit file as argv (specifier and ``$$`` escapes undone)."""
    value = ""
    for line in text.splitlines():
        if line.startswith("ExecStart="):
            value = line.removeprefix("ExecStart=").lstrip("-@:+!")
    try:
        words = shlex.split(value)
    except ValueError:
        return []
    return [
        w.replace("%%", "%") if i == 0 else w.replace("%%", "%").replace("$$", "$")
        for i, w in enumerate(words)
    ]


def runs_this_interpreter(argv: Sequence[str]) -> bool:
    """``<this python> -m cxrd``, or a ``cxrd`` script whose ``#!`` is this python."""
    me = os.path.abspath(sys.executable)
    if list(argv[1:3]) == ["-m", "cxrd"]:
        return os.path.abspath(argv[0]) == me
    script = Path(argv[0])
    try:
        # /usr/bin/cxrd is a link to the venv's script; the script names its python.
        with open(script.resolve(), "rb") as handle:
            first = handle.readline(512).decode("utf-8", "replace").strip()
    except OSError:
        return False
    return first.startswith("#!") and os.path.abspath(first[2:].split()[0]) == me


def check_lingering() -> Check:
    user = pwd.getpwuid(os.getuid()).pw_name
    fix = f"loginctl enable-linger {user}"
    if Path("/var/lib/systemd/linger", user).exists():
        return Check("lingering", "ok", f"{user}'s services keep running without a login")
    loginctl = shutil.which("loginctl")
    if loginctl is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            result = subprocess.run(
                [loginctl, "show-user", user, "--property=Linger", "--value"],
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
                check=False,
            )
            if result.stdout.strip() == "yes":
                return Check("lingering", "ok", f"{user}'s services keep running without a login")
    return Check(
        "lingering",
        "warn",
        "cxrd stops when your last session ends; a headless machine needs lingering",
        fix,
    )
