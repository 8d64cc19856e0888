"""`cxrctl doctor`'s checks against real states of a machine: bus, systemd, ports, files."""

from __future__ import annotations

import dataclasses
import datetime as dt
import glob
import ipaddress
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fixtures_systemd import UserManager
from support import free_port

from cxrd import constants as C
from cxrd.cli.doctor import Check, run_checks
from cxrd.cli.doctor.bus import BusFacts
from cxrd.cli.doctor.envfile import check_env_file
from cxrd.cli.doctor.runtime import find_shared_library
from cxrd.cli.doctor.systemd import unit_exec_argv
from cxrd.cli.install import install
from cxrd.config import Config, ProxyConfig, RuntimeConfig
from cxrd.core.states import State
from cxrd.dbus.wire import snapshot_from_wire
from cxrd.system import eula
from cxrd.system.addresses import headset_hosts, ipv4_addresses
from cxrd.system.envfile import write_env_file


def make_config(tmp_path: Path, backend: str = "sim", **proxy: object) -> Config:
    return Config(
        install_dir=str(tmp_path / "cloudxr"),
        runtime=RuntimeConfig(backend=backend, signaling_port=free_port()),
        proxy=dataclasses.replace(
            ProxyConfig(port=free_port()),
            **proxy,  # type: ignore[arg-type]
        ),
    )


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {check.name: check for check in checks}


@pytest.fixture
def user_env(systemd_user: UserManager, monkeypatch: pytest.MonkeyPatch) -> UserManager:
    """This process talks to the private manager and bus, as a user's login session would."""
    for key in ("HOME", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "XDG_DATA_HOME"):
        monkeypatch.setenv(key, systemd_user.env[key])
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", systemd_user.bus_address)
    return systemd_user


@pytest.fixture
def no_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shell with no login session: no bus, no user manager."""
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "no-runtime-dir"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))


def test_every_problem_comes_with_a_fix(tmp_path: Path, no_session: None) -> None:
    checks = run_checks(make_config(tmp_path, backend="isaacteleop"))
    assert [c.name for c in checks][:3] == ["session bus", "user manager", "unit"]
    for check in checks:
        assert check.level in ("ok", "warn", "fail")
        assert check.message
        if check.level != "ok":
            assert check.fix, check


def test_without_a_session_the_bus_fails_and_says_how_to_get_one(
    tmp_path: Path, no_session: None
) -> None:
    checks = by_name(run_checks(make_config(tmp_path)))
    assert checks["session bus"].level == "fail"
    assert "DBUS_SESSION_BUS_ADDRESS" in checks["session bus"].fix
    assert checks["user manager"].level == "warn"
    assert checks["unit"].level == "fail"
    assert checks["unit"].fix == "cxrctl install"


def test_installed_unit_for_this_python_is_ok_and_doctor_starts_nothing(
    user_env: UserManager, tmp_path: Path
) -> None:
    before = by_name(run_checks(make_config(tmp_path)))
    assert before["session bus"].level == "ok"
    assert "cxrd not running" in before["session bus"].message
    assert before["user manager"].level == "ok"
    assert before["unit"].level == "fail"
    assert before["D-Bus activation"].level == "warn"

    install()
    after = by_name(run_checks(make_config(tmp_path)))
    assert after["unit"].level == "ok", after["unit"]
    assert "runs this cxrd" in after["unit"].message
    assert after["D-Bus activation"].level == "ok"
    # Asking about the daemon must not D-Bus-activate it.
    assert user_env.show(C.UNIT_NAME, "ActiveState")["ActiveState"] == "inactive"


def test_unit_for_another_python_or_changed_on_disk_is_a_warning(
    user_env: UserManager, tmp_path: Path
) -> None:
    paths = install(exec_argv=["/opt/other-env/bin/python", "-m", "cxrd"])
    unit = by_name(run_checks(make_config(tmp_path)))["unit"]
    assert unit.level == "warn"
    assert "/opt/other-env/bin/python" in unit.message and sys.executable in unit.message
    assert "cxrctl install" in unit.fix

    # A running unit whose file changed since systemd loaded it. (An inactive one is
    # reloaded from disk on every query.) The stand-in reports ready and waits.
    standin = tmp_path / "standin.py"
    standin.write_text("import signal, sdnotify\nsdnotify.SystemdNotifier().notify('READY=1')\n"
                       "signal.pause()\n")  # fmt: skip
    install(exec_argv=[sys.executable, str(standin)])
    user_env.systemctl("start", C.UNIT_NAME)
    unit_path = paths[0]
    unit_path.write_text(unit_path.read_text() + "\n# edited\n")
    stale = by_name(run_checks(make_config(tmp_path)))["unit"]
    assert stale.level == "warn"
    assert stale.fix == "systemctl --user daemon-reload"


def test_a_taken_port_names_its_holder(tmp_path: Path, no_session: None) -> None:
    config = make_config(tmp_path)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", config.proxy.port))
        squatter.listen()
        taken = by_name(run_checks(config))["proxy port"]
    assert taken.level == "fail"
    assert f"pid {os.getpid()}" in taken.message
    assert "proxy.port" in taken.fix
    assert by_name(run_checks(config))["proxy port"].level == "ok"


def _write_pair(
    certs: Path,
    *,
    not_after: dt.datetime,
    other_key: bool = False,
    sans: list[str] | None = None,
) -> None:
    """A pair in ``certs``; its SANs name ``sans`` (default: what `cxrctl url` prints)."""
    certs.mkdir(parents=True, exist_ok=True)
    named = headset_hosts("0.0.0.0") if sans is None else sans
    general = [
        x509.IPAddress(ipaddress.ip_address(h)) if h[0].isdigit() else x509.DNSName(h)
        for h in named
    ]
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(min(now, not_after) - dt.timedelta(days=1))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(general), critical=False)
        .sign(key, hashes.SHA256())
    )
    written = ec.generate_private_key(ec.SECP256R1()) if other_key else key
    (certs / C.CERT_FILE).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = certs / C.KEY_FILE
    key_path.write_bytes(
        written.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)


@pytest.mark.parametrize(
    ("days", "other_key", "level", "words"),
    [
        (400, False, "ok", "valid until"),
        (10, False, "warn", "expires in 10 days"),
        (-2, False, "fail", "expired"),
        (400, True, "fail", "does not belong"),
    ],
)
def test_certificate_expiry_and_mismatch(
    tmp_path: Path, no_session: None, days: int, other_key: bool, level: str, words: str
) -> None:
    config = make_config(tmp_path)
    assert by_name(run_checks(config))["certificate"].level == "ok"  # none yet: generated later
    not_after = dt.datetime.now(dt.UTC) + dt.timedelta(days=days, hours=1)
    _write_pair(config.certs_dir, not_after=not_after, other_key=other_key)
    check = by_name(run_checks(config))["certificate"]
    assert check.level == level, check
    assert words in check.message
    if level != "ok":
        assert str(config.certs_dir / C.CERT_FILE) in check.fix


@pytest.mark.skipif(not ipv4_addresses(), reason="this host has no address but loopback")
def test_certificate_missing_a_current_address_warns_with_the_renewal(
    tmp_path: Path, no_session: None
) -> None:
    config = make_config(tmp_path)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=200)
    _write_pair(config.certs_dir, not_after=later, sans=["localhost", "127.0.0.1"])
    check = by_name(run_checks(config))["certificate"]
    assert check.level == "warn" and ipv4_addresses()[0] in check.message
    assert check.fix.startswith("cxrctl cert renew")


def test_run_dir_open_to_others_fails_with_chmod(tmp_path: Path, no_session: None) -> None:
    config = make_config(tmp_path)
    config.run_dir.mkdir(parents=True, mode=0o755)
    config.run_dir.chmod(0o755)
    check = by_name(run_checks(config))["run dir"]
    assert check.level == "fail" and "0755" in check.message
    subprocess.run(check.fix, shell=True, check=True)  # the fix, as a person would paste it
    assert by_name(run_checks(config))["run dir"].level == "ok"


def test_eula_matters_only_for_the_real_runtime(tmp_path: Path, no_session: None) -> None:
    assert by_name(run_checks(make_config(tmp_path, "sim")))["EULA"].level == "ok"
    real = make_config(tmp_path, "isaacteleop")
    check = by_name(run_checks(real))["EULA"]
    assert check.level == "fail" and check.fix == "cxrctl accept-eula"
    eula.accept(real.install_path)
    assert by_name(run_checks(real))["EULA"].level == "ok"


def test_driver_libraries_are_looked_up_like_the_dynamic_linker(
    tmp_path: Path, no_session: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    libc = find_shared_library("libc.so.6")
    assert libc is not None and os.path.exists(libc)  # from ld.so.cache
    missing = [lib for lib in ("libcuda.so.1", "libvulkan.so.1") if not find_shared_library(lib)]
    real = by_name(run_checks(make_config(tmp_path, "isaacteleop")))["NVIDIA libraries"]
    sim = by_name(run_checks(make_config(tmp_path, "sim")))["NVIDIA libraries"]
    if missing:
        assert real.level == "fail" and sim.level == "warn"
        assert missing[0] in real.message
    libs = tmp_path / "driver"
    libs.mkdir()
    for lib in ("libcuda.so.1", "libvulkan.so.1"):
        (libs / lib).touch()
    monkeypatch.setenv("LD_LIBRARY_PATH", str(libs))
    found = by_name(run_checks(make_config(tmp_path, "isaacteleop")))["NVIDIA libraries"]
    assert found.level == "ok"


def test_gpu_presence_matches_the_device_nodes(tmp_path: Path, no_session: None) -> None:
    check = by_name(run_checks(make_config(tmp_path, "isaacteleop")))["GPU"]
    if glob.glob("/dev/nvidia[0-9]*"):
        assert check.level == "ok" and "/dev/nvidia" in check.message
    else:
        assert check.level == "fail" and "driver" in check.fix


def test_runtime_package_check_follows_the_backend(tmp_path: Path, no_session: None) -> None:
    missing = dataclasses.replace(
        make_config(tmp_path, "command"),
        runtime=RuntimeConfig(backend="command", command=("no-such-runtime-binary",)),
    )
    check = by_name(run_checks(missing))["runtime package"]
    assert check.level == "fail" and "no-such-runtime-binary" in check.message
    assert by_name(run_checks(make_config(tmp_path, "sim")))["runtime package"].level == "ok"


def test_unit_exec_argv_reads_systemd_quoting() -> None:
    text = '[Service]\nExecStart="/my envs/100%%/bin/python" -m cxrd --x $$HOME\n'
    assert unit_exec_argv(text) == ["/my envs/100%/bin/python", "-m", "cxrd", "--x", "$HOME"]


def test_a_missing_web_client_warns_with_the_fetch_command(
    tmp_path: Path, no_session: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TELEOP_WEB_CLIENT_STATIC_DIR", raising=False)
    config = make_config(tmp_path)
    check = by_name(run_checks(config))["web client"]
    assert check.level == "warn" and str(config.client_path) in check.message
    assert check.fix.startswith("cxrctl client fetch")
    config.client_path.mkdir(parents=True)
    (config.client_path / "index.html").write_text("<title>client</title>")
    assert by_name(run_checks(config))["web client"].level == "ok"


def test_env_file_on_disk_is_compared_with_the_daemons_environment(tmp_path: Path) -> None:
    path = tmp_path / "run" / C.ENV_FILE
    path.parent.mkdir()
    env = {"NV_DEVICE_PROFILE": "Quest3", "NV_CXR_SERVER_PORT": "49100"}
    snap = dataclasses.replace(
        snapshot_from_wire({}), environment=env, env_file=str(path), state=State.READY
    )
    assert check_env_file(BusFacts()).level == "ok"  # no daemon: nothing to compare
    missing = check_env_file(BusFacts(status=snap))
    assert missing.level == "fail" and "missing" in missing.message and missing.fix
    write_env_file(path, env)
    assert check_env_file(BusFacts(status=snap)).level == "ok"
    write_env_file(path, {**env, "NV_DEVICE_PROFILE": "auto-webrtc", "CXR_X": "1"})
    differs = check_env_file(BusFacts(status=snap))
    assert differs.level == "fail"
    assert "(NV_DEVICE_PROFILE differed; added: CXR_X)" in differs.message
    write_env_file(path, env)
    event = "rewritten by another program at 14:02:11, restored"
    restored = check_env_file(BusFacts(status=dataclasses.replace(snap, env_file_event=event)))
    assert restored.level == "warn" and event in restored.message
    assert "CloudXRLauncher" in restored.fix
