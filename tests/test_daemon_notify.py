"""What systemd hears from a real cxrd when SIGHUP meets start, failure and stop.

Read from a real NOTIFY_SOCKET: READY=1 only after a start that succeeded or
at the end of a reload that began while ready; RELOADING=1 only when the
reload begins; neither after a failure or STOPPING=1. And a SIGTERM in the
daemon's first moments is handled, not fatal.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from fixtures_daemon import DaemonEnv, NotifySocket
from support import TIMEOUT, wait_until

from cxrd import errors

TOLD = ("READY", "RELOADING", "STOPPING")


def told(notify: NotifySocket) -> list[str]:
    """READY=1, RELOADING=1 and STOPPING=1, in the order they came."""
    return [key for m in list(notify.messages) for key in TOLD if m.get(key) == "1"]


def starting(notify: NotifySocket) -> None:
    notify.wait_for(lambda m: m.get("STATUS", "").startswith("Starting"))


def code(proc: subprocess.Popen[bytes]) -> int:
    return proc.wait(timeout=TIMEOUT)


def test_sighup_during_a_first_start_that_fails_says_neither_ready_nor_reloading(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    daemon_env.write_config(sim="startup_delay = 1.0\nexit_before_ready = 3")
    proc = daemon_env.start()
    starting(notify)
    proc.send_signal(signal.SIGHUP)
    assert code(proc) == errors.StartFailed.exit_code
    assert told(notify) == [], notify.raw
    assert "exited with code 3" in notify.statuses()[-1]


def test_sighup_during_a_first_start_is_reloading_only_after_ready(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    daemon_env.write_config(sim="startup_delay = 1.0")
    proc = daemon_env.start()
    starting(notify)
    proc.send_signal(signal.SIGHUP)
    notify.wait_for(lambda m: m.get("READY") == "1" and "reloaded" in m.get("STATUS", ""))
    assert told(notify) == ["READY", "RELOADING", "READY"], notify.raw
    proc.send_signal(signal.SIGTERM)
    assert code(proc) == 0


def test_sighup_after_stopping_says_neither_ready_nor_reloading(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    # A runtime that ignores SIGTERM keeps the stop going for stop_timeout (2 s).
    daemon_env.write_config(sim="ignore_sigterm = true")
    proc = daemon_env.start()
    notify.wait_for(lambda m: m.get("READY") == "1")
    proc.send_signal(signal.SIGTERM)
    notify.wait_for(lambda m: m.get("STOPPING") == "1")
    proc.send_signal(signal.SIGHUP)
    assert code(proc) == 0
    assert told(notify) == ["READY", "STOPPING"], notify.raw


def test_sigterm_during_a_begun_reload_ends_it_without_ready(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    daemon_env.write_config(sim="startup_delay = 1.0")
    proc = daemon_env.start()
    notify.wait_for(lambda m: m.get("READY") == "1")
    daemon_env.write_config(sim="startup_delay = 1.0", runtime='env = { CHANGED = "1" }')
    proc.send_signal(signal.SIGHUP)  # restarts the runtime: 1 s before it is ready again
    notify.wait_for(lambda m: m.get("RELOADING") == "1")
    proc.send_signal(signal.SIGTERM)
    assert code(proc) == 0
    assert told(notify) == ["READY", "RELOADING", "STOPPING"], notify.raw


def _holding(pid: int) -> bool:
    """cxrd holds exactly SIGTERM, SIGINT and SIGHUP (a fork blocks every signal for a moment)."""
    held = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    if b"cxrd" not in Path(f"/proc/{pid}/cmdline").read_bytes():
        return False
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return int(line.split()[1], 16) == sum(1 << (sig - 1) for sig in held)
    return False


def test_a_sigterm_before_the_event_loop_runs_is_handled_not_fatal(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    proc = daemon_env.start()
    # Held from cxrd's first line while the daemon's modules import (a good part of a second).
    wait_until(lambda: _holding(proc.pid), "cxrd to hold its signals", interval=0.001)
    proc.send_signal(signal.SIGTERM)
    assert code(proc) == 0, "killed by the default action instead of stopping"
    assert "SIGTERM received" in daemon_env.daemon_log()
    assert "started runtime" not in daemon_env.daemon_log(), "nothing starts after the stop"
