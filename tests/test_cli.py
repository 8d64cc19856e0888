"""cxrctl as a person runs it: a real process, a real daemon, a real bus (and a pty for colour)."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures_dbus import BusDaemon
from support import TIMEOUT, wait_until

from cxrd.client import CloudXRClient
from cxrd.errors import EulaNotAccepted, StartFailed, Timeout


def cxrctl(
    daemon: BusDaemon, *args: str, env: dict[str, str] | None = None, stdin: int | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {**daemon.env, **(env or {})}
    full_env.pop("NO_COLOR", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "cxrd.cli", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=4 * TIMEOUT,
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
    )


def in_pty(
    daemon: BusDaemon, *args: str, env: dict[str, str] | None = None, answer: bytes = b""
) -> tuple[int, str]:
    """Run cxrctl on a terminal; type ``answer`` at its first prompt; return (code, screen)."""
    full_env = {**daemon.env, "TERM": "xterm", **(env or {})}
    if env is None or "NO_COLOR" not in env:
        full_env.pop("NO_COLOR", None)
    main, sub = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cxrd.cli", *args],
        env=full_env,
        stdin=sub,
        stdout=sub,
        stderr=sub,
        close_fds=True,
    )
    os.close(sub)
    chunks = []
    deadline = time.monotonic() + 4 * TIMEOUT
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.1)
            if ready:
                try:
                    data = os.read(main, 65536)
                except OSError:
                    break
                if not data:
                    break
                chunks.append(data)
                if answer and b"? [y/N]" in b"".join(chunks):
                    os.write(main, answer)
                    answer = b""
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main)
    return code, b"".join(chunks).decode(errors="replace")


def test_status_of_a_ready_daemon_exits_0_and_says_so(ready_daemon: BusDaemon) -> None:
    shown = cxrctl(ready_daemon, "status")
    assert shown.returncode == 0, shown.stderr
    assert "ready" in shown.stdout and "\033[" not in shown.stdout  # no colour into a pipe
    assert "simulated runtime, not NVIDIA CloudXR" in shown.stdout
    port = ready_daemon.denv.proxy_port
    assert f"https://127.0.0.1:{port}/client/?serverIP=127.0.0.1&port={port}" in shown.stdout
    data = json.loads(cxrctl(ready_daemon, "status", "--json").stdout)
    assert data["running"] is True and data["state"] == "ready"
    assert data["runtime"]["pid"] > 0 and data["device_profile"] == "Quest3"


def test_status_with_the_daemon_down_exits_3_and_shows_the_last_failure(
    bus_daemon: BusDaemon,
) -> None:
    bus_daemon.configure(startup_delay=0.3, exit_before_ready=9)
    bus_daemon.enable_activation()
    assert bus_daemon.spawn().wait(timeout=3 * TIMEOUT) == StartFailed.exit_code
    install = str(bus_daemon.denv.install_dir)
    shown = cxrctl(bus_daemon, "status", "--install-dir", install)
    assert shown.returncode == 3, shown
    assert "inactive" in shown.stdout
    assert "9" in shown.stdout and "Last failure" in shown.stdout
    data = json.loads(cxrctl(bus_daemon, "--install-dir", install, "status", "--json").stdout)
    assert data["running"] is False and "9" in data["last_error"]["error"]
    # status never started it, although it is activatable.
    assert bus_daemon.daemon_pids() == []


def test_start_activates_waits_and_reports_plainly_into_a_pipe(bus_daemon: BusDaemon) -> None:
    bus_daemon.configure(startup_delay=0.5)
    bus_daemon.enable_activation()
    started = cxrctl(bus_daemon, "start")
    assert started.returncode == 0, started.stderr
    assert "ready in" in started.stdout and "\033[" not in started.stdout + started.stderr
    assert started.stderr == ""
    assert cxrctl(bus_daemon, "status").returncode == 0


def test_start_on_a_terminal_shows_progress_and_colour(bus_daemon: BusDaemon) -> None:
    bus_daemon.configure(startup_delay=1.0)
    bus_daemon.enable_activation()
    code, drawn = in_pty(bus_daemon, "start")
    assert code == 0, drawn
    assert "Starting CloudXR… 0." in drawn  # the elapsed-time line, redrawn
    assert "\033[32m" in drawn  # green dot
    code, drawn = in_pty(bus_daemon, "status", env={"NO_COLOR": "1"})
    assert code == 0 and "ready" in drawn and "\033[32m" not in drawn


def test_start_timeout_exits_11_with_error_and_hint_on_stderr(bus_daemon: BusDaemon) -> None:
    bus_daemon.configure(startup_delay=3.0)
    bus_daemon.enable_activation()
    started = cxrctl(bus_daemon, "start", "--timeout", "0.3")
    assert started.returncode == Timeout.exit_code
    assert started.stdout == ""
    assert "error:" in started.stderr and "hint:" in started.stderr
    assert "Traceback" not in started.stderr


def test_start_no_block_then_wait(bus_daemon: BusDaemon) -> None:
    bus_daemon.configure(startup_delay=0.5)
    bus_daemon.enable_activation()
    requested = cxrctl(bus_daemon, "start", "--no-block")
    assert requested.returncode == 0, requested.stderr
    waited = cxrctl(bus_daemon, "wait", "--timeout", str(TIMEOUT))
    assert waited.returncode == 0, waited.stderr
    assert "ready" in waited.stdout


def test_wait_with_nothing_starting_times_out(bus_daemon: BusDaemon) -> None:
    waited = cxrctl(bus_daemon, "wait", "--timeout", "0.5")
    assert waited.returncode == Timeout.exit_code, waited


def test_env_evaluates_in_sh_and_speaks_fish_and_json(ready_daemon: BusDaemon) -> None:
    script = f'eval "$({sys.executable} -m cxrd.cli env)" && printf %s "$NV_CXR_RUNTIME_DIR"'
    evaluated = subprocess.run(
        ["sh", "-c", script], env=ready_daemon.env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert evaluated.stdout == str(ready_daemon.denv.run_dir)
    fish = cxrctl(ready_daemon, "env", "--shell", "fish").stdout.splitlines()
    assert fish and all(line.startswith("set -gx ") and line.endswith(";") for line in fish)
    data = json.loads(cxrctl(ready_daemon, "env", "--shell", "json").stdout)
    assert data["NV_DEVICE_PROFILE"] == "Quest3"


def test_restart_with_a_profile_then_stop_twice(ready_daemon: BusDaemon) -> None:
    restarted = cxrctl(ready_daemon, "restart", "--profile", "AppleVisionPro")
    assert restarted.returncode == 0, restarted.stderr
    data = json.loads(cxrctl(ready_daemon, "status", "--json").stdout)
    assert data["device_profile"] == "AppleVisionPro"
    stopped = cxrctl(ready_daemon, "stop")
    assert stopped.returncode == 0 and stopped.stdout.strip() == "stopped"
    assert ready_daemon.proc.wait(timeout=TIMEOUT) == 0
    again = cxrctl(ready_daemon, "stop")
    assert again.returncode == 0 and again.stdout.strip() == "not running"
    assert cxrctl(ready_daemon, "status").returncode == 3
    assert cxrctl(ready_daemon, "env").returncode == 3


def test_logs_show_the_runtime_and_proxy_files_even_when_down(ready_daemon: BusDaemon) -> None:
    up = cxrctl(ready_daemon, "logs", "--runtime", "-n", "20")
    assert up.returncode == 0, up.stderr
    assert "SIMULATED" in up.stdout
    cxrctl(ready_daemon, "stop")
    down = cxrctl(
        ready_daemon,
        "logs",
        "--proxy",
        "-n",
        "5",
        "--install-dir",
        str(ready_daemon.denv.install_dir),
    )
    assert down.returncode == 0, down.stderr
    assert "listening" in down.stdout or "stopped" in down.stdout


def test_accept_eula_needs_yes_without_a_terminal(bus_daemon: BusDaemon) -> None:
    install = str(bus_daemon.denv.install_dir)
    refused = cxrctl(bus_daemon, "accept-eula", "--install-dir", install)
    assert refused.returncode == EulaNotAccepted.exit_code
    assert "--yes" in refused.stderr
    marker = Path(install) / "run" / "eula_accepted"
    assert not marker.exists()
    accepted = cxrctl(bus_daemon, "accept-eula", "--yes", "--install-dir", install)
    assert accepted.returncode == 0 and marker.is_file()
    again = cxrctl(bus_daemon, "accept-eula", "--install-dir", install)
    assert again.returncode == 0 and "already" in again.stdout


def test_accept_eula_asks_on_a_terminal(bus_daemon: BusDaemon) -> None:
    install = str(bus_daemon.denv.install_dir)
    marker = Path(install) / "run" / "eula_accepted"
    code, drawn = in_pty(bus_daemon, "accept-eula", "--install-dir", install, answer=b"n\n")
    assert "CLOUDXR_LICENSE" in drawn and "Accept the NVIDIA CloudXR EULA?" in drawn
    assert code == EulaNotAccepted.exit_code and not marker.exists()
    code, drawn = in_pty(bus_daemon, "accept-eula", "--install-dir", install, answer=b"y\n")
    assert code == 0 and marker.is_file(), drawn


def test_doctor_prints_a_verdict_per_check_and_fails_on_fail(bus_daemon: BusDaemon) -> None:
    doctor = cxrctl(bus_daemon, "doctor", "--install-dir", str(bus_daemon.denv.install_dir))
    verdicts = [
        line.split()[0] for line in doctor.stdout.splitlines() if line and not line.startswith(" ")
    ]
    assert verdicts and set(verdicts) <= {"ok", "warn", "fail"}, doctor.stdout
    assert doctor.returncode == (1 if "fail" in verdicts else 0), doctor


@pytest.mark.parametrize("where", [["--user"], []])
def test_install_then_uninstall_for_this_user(
    bus_daemon: BusDaemon, tmp_path: Path, where: list[str]
) -> None:
    env = {
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "HOME": str(tmp_path),
    }
    installed = cxrctl(bus_daemon, "install", *where, env=env)
    assert installed.returncode == 0, installed.stderr
    unit = tmp_path / "config" / "systemd" / "user" / "cloudxr.service"
    assert unit.is_file() and f"wrote {unit}" in installed.stdout
    removed = cxrctl(bus_daemon, "uninstall", *where, env=env)
    assert removed.returncode == 0, removed.stderr
    assert not unit.exists() and f"removed {unit}" in removed.stdout


def test_status_says_when_the_proxy_gave_up_while_the_runtime_serves_on(
    bus_daemon: BusDaemon,
) -> None:
    bus_daemon.configure()
    config = bus_daemon.denv.config_path
    config.write_text(config.read_text().replace("[restart]\n", "[restart]\nmax_restarts = 1\n"))
    bus_daemon.start()
    with CloudXRClient(bus_daemon.address) as client:
        runtime = client.status().runtime.pid
        for _ in range(2):  # one restart allowed: the second crash gives up
            wait_until(lambda: client.status().proxy.pid != 0, what="a proxy")
            killed = client.status().proxy.pid
            os.kill(killed, signal.SIGKILL)
            wait_until(lambda k=killed: client.status().proxy.pid != k, what="the proxy to go")
        wait_until(lambda: client.status().proxy.state == "fatal", what="the proxy to give up")
    result = cxrctl(bus_daemon, "status")
    assert result.returncode == 0, result.stdout  # ready: the runtime serves on
    assert "down: crashed too often, gave up" in result.stdout
    assert f"pid {runtime}" in result.stdout
    assert "the runtime keeps running without it" in result.stdout
