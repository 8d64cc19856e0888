"""`cxrctl install` / `uninstall`: files where systemd and the bus look, and nothing else."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_systemd import UserManager
from support import TIMEOUT

from cxrd import constants as C
from cxrd import errors
from cxrd.cli.install import InstallConflict, install, render_unit, uninstall

REPO = Path(__file__).resolve().parent.parent


def run_install(env: dict[str, str], *args: str, check: bool = True) -> dict[str, object]:
    """Run install/uninstall in a fresh interpreter with this environment, as `cxrctl` would."""
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from cxrd.cli import install as i\n"
        "verb, prefix, *argv = sys.argv[1:]\n"
        "kw = {'exec_argv': argv} if argv and verb == 'install' else {}\n"
        "fn = i.install if verb == 'install' else i.uninstall\n"
        "out = fn(Path(prefix) if prefix else None, **kw)\n"
        "print(json.dumps({'paths': [str(p) for p in out], 'notes': out.notes}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout)) if result.returncode == 0 else {"stderr": result.stderr}


def activatable_names(manager: UserManager) -> str:
    return manager.busctl(
        "call",
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "ListActivatableNames",
    ).stdout


def test_checked_in_files_are_the_packaged_templates() -> None:
    # systemd/ and dbus/ hold what the Debian package ships; `cxrctl install` renders
    # the same text from inside the Python package, so the two cannot drift.
    for repo_path, name in (
        ("systemd/cloudxr.service", C.UNIT_NAME),
        ("dbus/io.github.cxrd.Daemon1.service", C.DBUS_SERVICE_FILE),
    ):
        assert (REPO / repo_path).read_text() == (REPO / "cxrd" / "data" / name).read_text()


def test_user_install_is_loaded_by_systemd_and_activatable_on_the_bus(
    systemd_user: UserManager,
) -> None:
    out = run_install(systemd_user.env, "install", "")
    unit = systemd_user.config_home / "systemd" / "user" / C.UNIT_NAME
    activation = systemd_user.data_home / "dbus-1" / "services" / C.DBUS_SERVICE_FILE
    assert str(unit) in out["paths"] and str(activation) in out["paths"]
    assert out["notes"] == [], "manager and bus were reachable: nothing to tell"

    props = systemd_user.show(
        C.UNIT_NAME,
        "LoadState",
        "FragmentPath",
        "NeedDaemonReload",
        "ExecStart",
        "Type",
        "BusName",
        "NotifyAccess",
        "KillMode",
        "Restart",
        "RestartPreventExitStatus",
    )
    assert props["LoadState"] == "loaded"
    assert props["FragmentPath"] == str(unit)
    assert props["NeedDaemonReload"] == "no"
    # ExecStart runs this very interpreter: the venv/conda/pip install that ran install.
    assert f"argv[]={sys.executable} -m cxrd " in props["ExecStart"]
    assert props["Type"] == "notify"
    assert props["BusName"] == C.BUS_NAME
    assert props["NotifyAccess"] == "main"
    assert props["KillMode"] == "mixed"
    assert props["Restart"] == "on-failure"
    prevented = set(props["RestartPreventExitStatus"].split())
    for error in (
        errors.GaveUp,
        errors.EulaNotAccepted,
        errors.RuntimeUnavailable,
        errors.InvalidConfig,
    ):
        assert str(error.exit_code) in prevented, error
    assert C.BUS_NAME in activatable_names(systemd_user)
    assert f"Exec={sys.executable} -m cxrd" in activation.read_text()


def test_uninstall_removes_exactly_what_install_wrote(systemd_user: UserManager) -> None:
    unit_dir = systemd_user.config_home / "systemd" / "user"
    unit_dir.mkdir(parents=True)
    neighbour = unit_dir / "someone-else.service"
    neighbour.write_text("[Service]\nExecStart=/bin/true\n")
    before = {p for p in systemd_user.home.rglob("*") if p.is_file()}

    written = run_install(systemd_user.env, "install", "")["paths"]
    # unit, template unit, activation, manifest, and bash, zsh, fish completions for
    # cxrctl and cxrd
    assert isinstance(written, list) and len(written) == 10
    removed = run_install(systemd_user.env, "uninstall", "")
    assert sorted(removed["paths"]) == sorted(written)  # type: ignore[arg-type]
    after = {p for p in systemd_user.home.rglob("*") if p.is_file()}
    assert after == before
    assert neighbour.exists()
    assert systemd_user.show(C.UNIT_NAME, "LoadState")["LoadState"] == "not-found"
    assert C.BUS_NAME not in activatable_names(systemd_user)


def test_reinstall_for_another_interpreter_replaces_its_own_files(tmp_path: Path) -> None:
    first = install(tmp_path, exec_argv=["/opt/a/bin/python", "-m", "cxrd"], reload=False)
    second = install(tmp_path, exec_argv=["/opt/b/bin/python", "-m", "cxrd"], reload=False)
    assert list(first) == list(second)
    unit = tmp_path / "lib" / "systemd" / "user" / C.UNIT_NAME
    assert "ExecStart=/opt/b/bin/python -m cxrd" in unit.read_text()
    assert {p.name for p in uninstall(tmp_path, reload=False)} == {p.name for p in first}
    assert not unit.exists()


def test_install_refuses_to_overwrite_a_unit_it_did_not_write(tmp_path: Path) -> None:
    unit = tmp_path / "lib" / "systemd" / "user" / C.UNIT_NAME
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\nExecStart=/usr/local/bin/my-own-cxrd\n")
    with pytest.raises(InstallConflict, match=str(unit)):
        install(tmp_path, reload=False)
    assert "my-own-cxrd" in unit.read_text()
    assert not (tmp_path / "share" / "dbus-1").exists(), "nothing written on refusal"
    install(tmp_path, reload=False, force=True)
    assert "-m cxrd" in unit.read_text()


def test_uninstall_keeps_a_file_the_user_edited(tmp_path: Path) -> None:
    install(tmp_path, reload=False)
    unit = tmp_path / "lib" / "systemd" / "user" / C.UNIT_NAME
    unit.write_text(unit.read_text() + "\n# my change\n")
    result = uninstall(tmp_path, reload=False)
    assert unit.exists()
    assert unit not in result
    assert any(str(unit) in note for note in result.notes)


def test_install_without_a_user_manager_writes_files_and_says_so(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DBUS_SESSION_BUS_ADDRESS",)}
    env["XDG_RUNTIME_DIR"] = str(tmp_path / "no-such-runtime-dir")
    out = run_install(env, "install", str(tmp_path / "prefix"))
    assert (tmp_path / "prefix" / "lib" / "systemd" / "user" / C.UNIT_NAME).exists()
    assert (tmp_path / "prefix" / "share" / "dbus-1" / "services" / C.DBUS_SERVICE_FILE).exists()
    notes = " ".join(out["notes"])  # type: ignore[arg-type]
    assert "daemon-reload" in notes and "session bus" in notes


def test_odd_interpreter_paths_survive_systemd_quoting(systemd_user: UserManager) -> None:
    # Spaces, '%' (a specifier) and '$' (variable expansion) in a conda/venv path.
    odd = systemd_user.root / "my envs" / "100%" / "$HOME" / "python"
    odd.parent.mkdir(parents=True)
    record = systemd_user.root / "argv"
    # A stand-in interpreter that records how it was called and reports ready as the main pid.
    odd.write_text(f'#!/bin/sh\nprintf "%s|" "$0" "$@" > "{record}"\nexec systemd-notify --ready\n')
    odd.chmod(0o755)
    run_install(systemd_user.env, "install", "", str(odd), "-m", "cxrd", "--config", "$HOME/%h")
    systemd_user.systemctl("start", C.UNIT_NAME)
    assert record.read_text() == f"{odd}|-m|cxrd|--config|$HOME/%h|--bus|session|"


def test_render_unit_changes_only_exec_start() -> None:
    packaged = (REPO / "cxrd" / "data" / C.UNIT_NAME).read_text().splitlines()
    rendered = render_unit(["/x/python", "-m", "cxrd"]).splitlines()
    changed = [(a, b) for a, b in zip(packaged, rendered, strict=True) if a != b]
    assert changed == [
        ("ExecStart=/usr/bin/cxrd --bus session", "ExecStart=/x/python -m cxrd --bus session")
    ]
