"""``cxrctl status`` with neither a bus nor a health endpoint: what the run dir can tell."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from fixtures_daemon import DaemonEnv, NotifySocket
from support import TIMEOUT, wait_until


def status(daemon_env: DaemonEnv, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**daemon_env.env, "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "cxrd.cli", "--config", str(daemon_env.config_path), "status",
         *args],
        env=env, capture_output=True, text=True, timeout=4 * TIMEOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_a_busless_cxrd_holding_the_lock_is_running_in_an_unknown_state(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    proc = daemon_env.start("--bus", "none")
    notify.wait_for(lambda m: m.get("READY") == "1")
    shown = status(daemon_env)
    assert shown.returncode == 1, shown.stdout + shown.stderr
    first = shown.stdout.splitlines()[0]
    assert "— running (state unknown without the bus: " in first, shown.stdout
    assert f"Daemon: pid {proc.pid} holds {daemon_env.run_dir / 'cxrd.lock'}" in shown.stdout
    assert "Runtime: answers on" in shown.stdout and "inactive" not in shown.stdout
    as_json = status(daemon_env, "--json")
    data = json.loads(as_json.stdout)
    assert as_json.returncode == 1
    assert data["running"] is True and data["state"] == "unknown"
    assert data["daemon_pid"] == proc.pid and data["runtime_live"] is True

    # SIGKILLed: nothing holds the lock, nothing answers, no leftover says otherwise.
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)
    wait_until(
        lambda: not (daemon_env.run_dir / "cloudxr.env").exists(), what="the guard's cleanup"
    )
    gone = status(daemon_env)
    assert gone.returncode == 3, gone.stdout
    assert "inactive (not running)" in gone.stdout and "A runtime answers" not in gone.stdout
