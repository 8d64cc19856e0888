"""Files only the user can touch: ``certs/``, ``logs/`` and what cxrd writes there.

Issue 17, items 8 and 11.

The other user is real: what they plant, they plant as uid ``nobody`` through
``setpriv`` (the suite runs as root, as CI does), in a "shared lab path" they
own, outside pytest's private temp dir so that they can reach it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_daemon import DaemonEnv, NotifySocket
from support import TIMEOUT, free_port, mode, wait_until

from cxrd import constants as C
from cxrd.config import Config, LogsConfig, ProxyConfig
from cxrd.errors import InvalidConfig, StartFailed
from cxrd.proxy.certs import ensure_certificate
from cxrd.proxy.launch import prepare_proxy
from cxrd.system.logfiles import ensure_logs_dir, rotating_handler

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="planting as another uid needs root")

NOBODY = 65534
AS_NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
PRECIOUS = "the user's own notes\n"


def as_nobody(script: str, cwd: Path) -> None:
    subprocess.run([*AS_NOBODY, "sh", "-ec", script], cwd=cwd, check=True, timeout=TIMEOUT)


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def lab() -> Iterator[tuple[Path, Path]]:
    """(a directory owned by nobody, a file of ours that a link there may point to)."""
    base = Path(tempfile.mkdtemp(prefix="cxrd-shared-"))
    try:
        base.chmod(0o755)
        shared = base / "lab"
        shared.mkdir()
        os.chown(shared, NOBODY, NOBODY)
        victim = base / "notes.txt"
        victim.write_text(PRECIOUS)
        victim.chmod(0o600)
        yield shared, victim
    finally:
        shutil.rmtree(base)


def plant(shared: Path, victim: Path) -> Path:
    """As nobody: cloudxr/logs with links to ``victim``, cloudxr/certs with a pair of theirs."""
    as_nobody(
        f"mkdir -p cloudxr/logs cloudxr/certs\n"
        f"for name in wss.log wss.stderr.log runtime_stderr.log; do\n"
        f"  ln -s {victim} cloudxr/logs/$name\n"
        f"done\n"
        f"openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=localhost "
        f"-keyout cloudxr/certs/{C.KEY_FILE} -out cloudxr/certs/{C.CERT_FILE} 2>/dev/null\n"
        f"chmod 644 cloudxr/certs/{C.KEY_FILE}\n",
        shared,
    )
    return shared / "cloudxr"


def test_a_fresh_install_dir_is_private_whatever_the_umask(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    install = daemon_env.install_dir
    with umask(0):
        daemon_env.start()
    notify.wait_for(lambda msg: msg.get("READY") == "1")
    logs = install / "logs"
    wait_until(lambda: (logs / "wss.log").exists(), "the proxy to write wss.log")
    for directory in (install, install / "run", install / "certs", logs):
        assert mode(directory) == 0o700, directory
    assert mode(install / "certs" / C.KEY_FILE) == 0o600
    for name in ("wss.log", "wss.stderr.log", "runtime_stderr.log"):
        assert mode(logs / name) == 0o600, name


def test_logs_and_certs_planted_by_another_user_are_refused_by_name(
    daemon_env: DaemonEnv, lab: tuple[Path, Path]
) -> None:
    shared, victim = lab
    install = plant(shared, victim)
    key = (install / "certs" / C.KEY_FILE).read_bytes()
    daemon_env.install_dir = install
    daemon_env.write_config()
    daemon = daemon_env.start()
    assert daemon.wait(TIMEOUT * 2) != 0
    log = daemon_env.daemon_log()
    theirs = "belongs to user nobody (uid 65534), not to user root (uid 0)"
    assert f"{install / 'logs'} {theirs}: remove it" in log, log
    assert victim.read_text() == PRECIOUS  # no line of cxrd's went through the links

    config = Config(install_dir=str(install), proxy=ProxyConfig(port=free_port()))
    with pytest.raises(InvalidConfig) as refused:
        prepare_proxy(config)
    assert f"{install / 'certs'} {theirs}: remove it" in str(refused.value)
    renew = subprocess.run(
        [sys.executable, "-m", "cxrd.cli", "--config", str(daemon_env.config_path),
         "cert", "renew"],
        env=daemon_env.env, capture_output=True, text=True, timeout=TIMEOUT * 2,
    )  # fmt: skip
    assert renew.returncode == InvalidConfig.exit_code
    assert f"{install / 'certs'} {theirs}" in renew.stderr
    assert (install / "certs" / C.KEY_FILE).read_bytes() == key  # theirs, untouched
    with pytest.raises(InvalidConfig) as refused:
        ensure_logs_dir(install / "logs")
    assert f"{install / 'logs'} {theirs}: remove it" in str(refused.value)
    assert victim.read_text() == PRECIOUS
    assert sorted(p.name for p in install.iterdir()) == ["certs", "logs", "run"]


def test_a_key_in_certs_that_is_not_ours_or_others_can_read_is_refused(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    cert, key = ensure_certificate(certs)
    pem = key.read_bytes()
    key.chmod(0o640)
    with pytest.raises(StartFailed) as refused:
        ensure_certificate(certs)
    assert f"{key}: other users can read or change this private key (mode 0640)" in str(
        refused.value
    )
    assert f"chmod 600 {key}" in str(refused.value)
    key.chmod(0o600)
    os.chown(key, NOBODY, NOBODY)
    with pytest.raises(StartFailed) as refused:
        ensure_certificate(certs)
    assert f"{key} belongs to user nobody (uid 65534), not to user root" in str(refused.value)
    os.chown(key, 0, 0)
    key.rename(tmp_path / "elsewhere.key")
    key.symlink_to(tmp_path / "elsewhere.key")
    with pytest.raises(StartFailed) as refused:
        ensure_certificate(certs)
    assert f"{key} is a symbolic link" in str(refused.value)
    assert (tmp_path / "elsewhere.key").read_bytes() == pem
    key.unlink()
    (tmp_path / "elsewhere.key").rename(key)
    assert ensure_certificate(certs) == (cert, key)  # ours again: used


def test_the_proxy_refuses_a_link_at_its_log_and_appends_nothing(tmp_path: Path) -> None:
    victim = tmp_path / "notes.txt"
    victim.write_text(PRECIOUS)
    logs = tmp_path / "logs"
    ensure_logs_dir(logs)
    (logs / "wss.log").symlink_to(victim)
    cert, key = ensure_certificate(tmp_path / "certs")
    proxy = subprocess.run(
        [sys.executable, "-m", "cxrd.proxy", "--host", "127.0.0.1", "--port", str(free_port()),
         "--backend-port", str(free_port()), "--cert", str(cert), "--key", str(key),
         "--log", str(logs / "wss.log")],
        capture_output=True, text=True, timeout=TIMEOUT * 2,
    )  # fmt: skip
    assert proxy.returncode == InvalidConfig.exit_code, proxy.stderr
    assert f"cxrd.proxy: {logs / 'wss.log'} is a symbolic link" in proxy.stderr
    assert "Traceback" not in proxy.stderr
    assert victim.read_text() == PRECIOUS


def test_loose_modes_of_ours_are_put_right_and_a_log_of_another_user_refused(
    tmp_path: Path,
) -> None:
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o755)
    logs = existing / "logs"
    logs.mkdir(mode=0o755)
    (logs / "wss.log").write_text("earlier\n")
    (logs / "wss.log").chmod(0o644)
    with umask(0):
        ensure_logs_dir(logs)
        handler = rotating_handler(logs / "wss.log", LogsConfig())
        handler.close()
        ensure_logs_dir(tmp_path / "new" / "logs")
    assert (mode(logs), mode(logs / "wss.log")) == (0o700, 0o600)
    assert mode(existing) == 0o755  # the user's install dir: theirs to set
    assert mode(tmp_path / "new") == 0o700 and mode(tmp_path / "new" / "logs") == 0o700
    os.chown(logs / "wss.log", NOBODY, NOBODY)
    with pytest.raises(InvalidConfig) as refused:
        rotating_handler(logs / "wss.log", LogsConfig())
    assert f"{logs / 'wss.log'} belongs to user nobody (uid 65534)" in str(refused.value)
    assert (logs / "wss.log").read_text() == "earlier\n"


def test_an_install_dir_made_by_cxrctl_is_0700_whatever_the_umask(tmp_path: Path) -> None:
    build = tmp_path / "build"
    build.mkdir()
    (build / "index.html").write_text("client")
    (build / "bundle.js").write_text("client()")
    for command in (("accept-eula", "--yes"), ("client", "fetch", "--from", str(build))):
        install = tmp_path / command[0] / "cloudxr"
        config = tmp_path / command[0] / "cxrd.toml"
        install.parent.mkdir()
        config.write_text(f'install_dir = "{install}"\n')
        with umask(0):
            done = subprocess.run(
                [sys.executable, "-m", "cxrd.cli", "--config", str(config), *command],
                capture_output=True, text=True, timeout=TIMEOUT * 2,
                env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "NO_COLOR": "1"},
            )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert mode(install) == 0o700, command
