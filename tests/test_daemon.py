"""The daemon as a user runs it: a real cxrd process, the sim runtime, a real NOTIFY_SOCKET."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures_daemon import DaemonEnv, NotifySocket, group_members, pid_alive
from fixtures_dbus import BusDaemon
from support import TIMEOUT, exported_env_reader, wait_until

from cxrd import errors
from cxrd.client import CloudXRClient


def ready(msg: dict[str, str]) -> bool:
    return msg.get("READY") == "1"


def started_pids(env: DaemonEnv, what: str) -> list[int]:
    return [int(p) for p in re.findall(rf"started {what}: pid (\d+)", env.daemon_log())]


def exit_code(proc: subprocess.Popen[bytes]) -> int:
    return proc.wait(timeout=TIMEOUT)


def last_error(env: DaemonEnv) -> dict[str, str]:
    return json.loads((env.run_dir / "cxrd.last_error").read_text())


def test_ready_only_after_a_fresh_sentinel(daemon_env: DaemonEnv, notify: NotifySocket) -> None:
    # A dead runtime's leftovers, including a sentinel that must not count.
    daemon_env.run_dir.mkdir(parents=True, mode=0o700)
    for name in ("runtime_started", "ipc_cloudxr", "monado.pid", "cloudxr.pid"):
        (daemon_env.run_dir / name).write_text("stale")
    daemon_env.write_config(sim="startup_delay = 1.0")
    began = time.monotonic()
    daemon_env.start()
    msg = notify.wait_for(ready)
    sentinel = daemon_env.run_dir / "runtime_started"
    assert float(msg["_t"]) - began >= 0.9, "READY came before the sim's 1 s startup delay"
    assert sentinel.read_text() != "stale"
    assert not (daemon_env.run_dir / "monado.pid").exists()
    assert "ready" in msg["STATUS"] and "sim runtime" in msg["STATUS"]
    assert "https://127.0.0.1:" in msg["STATUS"], "STATUS tells where headsets connect"
    assert [s.split(":")[0] for s in notify.statuses()][:2] == [
        "Starting the CloudXR runtime and the WSS proxy",
        "CloudXR runtime ready",
    ]


def test_clean_stop_leaves_nothing(daemon_env: DaemonEnv, notify: NotifySocket) -> None:
    daemon_env.write_config(sim="spawn_grandchild = true")
    proc = daemon_env.start()
    notify.wait_for(ready)
    env_file = daemon_env.run_dir / "cloudxr.env"
    assert env_file.exists()
    grandchild = int(
        wait_until(lambda: _read(daemon_env.run_dir / "sim_grandchild.pid"), what="grandchild")
    )
    (runtime,) = started_pids(daemon_env, "runtime")
    (proxy,) = started_pids(daemon_env, "proxy")
    proc.send_signal(signal.SIGTERM)
    assert exit_code(proc) == 0
    notify.wait_for(lambda m: m.get("STOPPING") == "1")
    notify.wait_for(lambda m: m.get("STATUS", "").startswith("Stopped"))
    for pid in (runtime, proxy, grandchild):
        wait_until(lambda pid=pid: not pid_alive(pid), what=f"pid {pid} to be gone")
    assert not group_members(runtime)
    assert not env_file.exists(), "cloudxr.env is removed on a clean stop"
    assert not (daemon_env.run_dir / "ipc_cloudxr").exists()
    assert not (daemon_env.run_dir / "cxrd.last_error").exists()


def test_sigkilled_daemon_leaves_no_child_after_2s(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    daemon_env.write_config(sim="spawn_grandchild = true")
    proc = daemon_env.start()
    notify.wait_for(ready)
    grandchild = int(
        wait_until(lambda: _read(daemon_env.run_dir / "sim_grandchild.pid"), what="grandchild")
    )
    pids = [*started_pids(daemon_env, "runtime"), *started_pids(daemon_env, "proxy"), grandchild]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)
    wait_until(
        lambda: not any(pid_alive(p) for p in pids), timeout=2.0, what=f"{pids} dead within 2 s"
    )


def test_runtime_ignoring_sigterm_is_killed_after_stop_timeout(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    daemon_env.write_config(sim="ignore_sigterm = true")
    proc = daemon_env.start()
    notify.wait_for(ready)
    (runtime,) = started_pids(daemon_env, "runtime")
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert exit_code(proc) == 0
    took = time.monotonic() - began
    assert 2.0 <= took < 2.0 + TIMEOUT / 2, f"stop took {took:.1f} s with stop_timeout 2 s"
    assert not pid_alive(runtime)
    assert "ignored SIGTERM" in daemon_env.daemon_log()


def test_exit_before_ready_fails_the_start_with_the_reason(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    daemon_env.write_config(sim="exit_before_ready = 3")
    proc = daemon_env.start()
    assert exit_code(proc) == errors.StartFailed.exit_code
    status = notify.statuses()[-1]
    assert status.startswith("Failed: the runtime exited with code 3 before it was ready")
    record = last_error(daemon_env)
    assert record["what"] == "StartFailed"
    assert "exited with code 3" in record["error"]
    assert record["stderr_tail"], "the stderr tail explains the failure"
    assert not any(notify_ready for notify_ready in map(ready, notify.messages))


def test_never_ready_times_out_with_a_diagnosis(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    daemon_env.write_config(sim="never_ready = true", runtime="startup_timeout = 1.5")
    began = time.monotonic()
    proc = daemon_env.start()
    assert exit_code(proc) == errors.Timeout.exit_code
    assert time.monotonic() - began < 1.5 + 2.0 + TIMEOUT / 2
    status = notify.statuses()[-1]
    assert "did not create" in status and "runtime_started" in status
    assert "runtime.startup_timeout" in status
    assert any("EXTEND_TIMEOUT_USEC" in m for m in notify.messages)
    assert last_error(daemon_env)["what"] == "Timeout"
    (runtime,) = started_pids(daemon_env, "runtime")
    assert not pid_alive(runtime)


def test_runtime_crash_restarts_with_backoff_then_gives_up(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    daemon_env.write_config(sim="crash_after = 0.3", restart="max_restarts = 2\nwindow = 60.0")
    proc = daemon_env.start()
    assert exit_code(proc) == errors.GaveUp.exit_code
    statuses = notify.statuses()
    restarting = [s for s in statuses if s.startswith("Restarting")]
    assert len(restarting) == 2, statuses
    assert "the runtime was killed by SIGSEGV" in restarting[0]
    assert "restarting it in 0.1 s" in restarting[0]
    assert "restarting it in 0.2 s" in restarting[1], "backoff doubles"
    assert sum(ready(m) for m in notify.messages) == 3, "ready again after each restart"
    assert "giving up" in statuses[-1]
    assert len(set(started_pids(daemon_env, "runtime"))) == 3
    assert len(started_pids(daemon_env, "proxy")) == 1, "the proxy is not restarted"
    assert last_error(daemon_env)["what"] == "GaveUp"


def test_stderr_flood_does_not_block_the_start(daemon_env: DaemonEnv, notify: NotifySocket) -> None:
    daemon_env.write_config(sim="flood_stderr = 5000000")
    daemon_env.start()
    notify.wait_for(ready)
    assert (daemon_env.logs_dir / "runtime_stderr.log").stat().st_size >= 5_000_000


def test_cloudxr_env_is_what_isaacteleop_reads(daemon_env: DaemonEnv, notify: NotifySocket) -> None:
    read_exported_env = exported_env_reader()
    daemon_env.start()
    notify.wait_for(ready)
    env_file = daemon_env.run_dir / "cloudxr.env"
    env = read_exported_env(env_file)
    install = str(daemon_env.install_dir)
    assert env["NV_DEVICE_PROFILE"] == "Quest3"
    assert env["NV_CXR_RUNTIME_DIR"] == f"{install}/run"
    assert env["XR_RUNTIME_JSON"] == f"{install}/openxr_cloudxr.json"
    assert env["NV_CXR_OUTPUT_DIR"] == f"{install}/logs"
    assert env["XRT_NO_STDIN"] == "true"
    assert env["CXR_INSTALL_DIR"] == install
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(daemon_env.run_dir.stat().st_mode) == 0o700


def test_a_second_daemon_on_the_same_install_dir_is_refused(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    first = daemon_env.start()
    notify.wait_for(ready)
    second = daemon_env.start()
    assert exit_code(second) == errors.AlreadyServing.exit_code
    assert f"another cxrd (pid {first.pid}) already serves" in daemon_env.daemon_log()
    assert first.poll() is None, "the first daemon is untouched"
    assert (daemon_env.run_dir / "cloudxr.env").exists()


def test_a_live_runtime_not_ours_is_refused_naming_its_pid(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    daemon_env.run_dir.mkdir(parents=True, mode=0o700)
    theirs = daemon_env.run_dir / "cloudxr.env"
    theirs.write_text("export NV_DEVICE_PROFILE=AppleVisionPro\n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as foreign:
        foreign.bind(str(daemon_env.run_dir / "ipc_cloudxr"))
        foreign.listen()
        proc = daemon_env.start()
        assert exit_code(proc) == errors.AlreadyServing.exit_code
    status = notify.statuses()[-1]
    assert f"not started by this cxrd (pid {os.getpid()})" in status
    assert (daemon_env.run_dir / "ipc_cloudxr").exists(), "a live runtime's socket is left alone"
    assert theirs.read_text() == "export NV_DEVICE_PROFILE=AppleVisionPro\n", "and its env file"


def test_proxy_crash_restarts_the_proxy_alone(daemon_env: DaemonEnv, notify: NotifySocket) -> None:
    daemon_env.start()
    notify.wait_for(ready)
    (runtime,) = started_pids(daemon_env, "runtime")
    (proxy,) = started_pids(daemon_env, "proxy")
    os.kill(proxy, signal.SIGKILL)
    notify.wait_for(lambda m: "the proxy was killed by SIGKILL" in m.get("STATUS", ""))
    notify.wait_for(lambda m: "the proxy is back after a restart" in m.get("STATUS", ""))
    # The runtime was never touched: the daemon stayed ready throughout.
    assert all(s.startswith("CloudXR runtime ready") for s in notify.statuses()[2:])
    assert started_pids(daemon_env, "runtime") == [runtime]
    new_proxy = started_pids(daemon_env, "proxy")[-1]
    assert new_proxy != proxy and pid_alive(new_proxy)
    with socket.create_connection(("127.0.0.1", daemon_env.proxy_port), timeout=TIMEOUT):
        pass


def test_a_taken_proxy_port_is_a_start_error_naming_it(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", daemon_env.proxy_port))
        squatter.listen()
        proc = daemon_env.start()
        assert exit_code(proc) == errors.StartFailed.exit_code
    status = notify.statuses()[-1]
    assert f"port {daemon_env.proxy_port}" in status
    assert f"pid {os.getpid()}" in status


def test_sighup_restarts_only_what_changed(daemon_env: DaemonEnv, notify: NotifySocket) -> None:
    proc = daemon_env.start()
    notify.wait_for(ready)
    count = len(notify.messages)
    proc.send_signal(signal.SIGHUP)
    notify.wait_for(lambda m: m.get("RELOADING") == "1")
    notify.wait_for(lambda m: ready(m) and "reloaded" in m.get("STATUS", ""))
    assert len(started_pids(daemon_env, "runtime")) == 1, "unchanged runtime kept"
    assert len(notify.messages) > count
    daemon_env.write_config(runtime='device_profile = "AppleVisionPro"')
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: len(started_pids(daemon_env, "runtime")) == 2, what="runtime restart")
    notify.wait_for(lambda m: ready(m) and "AppleVisionPro" in m.get("STATUS", ""))
    env_text = (daemon_env.run_dir / "cloudxr.env").read_text()
    assert "export NV_DEVICE_PROFILE=AppleVisionPro" in env_text


def test_watchdog_pings_from_the_event_loop(daemon_env: DaemonEnv, notify: NotifySocket) -> None:
    daemon_env.start(env={"WATCHDOG_USEC": "200000"})
    notify.wait_for(ready)
    first = notify.wait_for(lambda m: m.get("WATCHDOG") == "1")
    notify.wait_for(lambda m: m.get("WATCHDOG") == "1" and m["_t"] != first["_t"])


def test_invalid_config_exits_naming_the_key(daemon_env: DaemonEnv, notify: NotifySocket) -> None:
    daemon_env.config_path.write_text("[runtime]\nstartup_timeout = 'soon'\n")
    proc = daemon_env.start()
    assert exit_code(proc) == errors.InvalidConfig.exit_code
    status = notify.statuses()[-1]
    assert "runtime.startup_timeout" in status and str(daemon_env.config_path) in status


def test_journal_stream_gets_syslog_priorities(daemon_env: DaemonEnv, tmp_path: Path) -> None:
    daemon_env.config_path.write_text("[runtime]\nbogus = 1\n")
    log = tmp_path / "journal"
    with open(log, "wb") as out:
        st = os.fstat(out.fileno())
        proc = subprocess.run(
            [sys.executable, "-m", "cxrd", "--config", str(daemon_env.config_path)],
            env={**daemon_env.env, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
            stderr=out,
            timeout=TIMEOUT,
        )
    assert proc.returncode == errors.InvalidConfig.exit_code
    lines = log.read_text().splitlines()
    assert any(line.startswith("<3>") and "runtime.bogus" in line for line in lines), lines
    assert all(re.match(r"<\d>", line) for line in lines)
    assert not re.search(r"\d\d:\d\d:\d\d", lines[0]), "journald adds timestamps itself"


def test_real_isaacteleop_runtime_reports_the_missing_driver_library(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    pytest.importorskip("isaacteleop.cloudxr.runtime")
    daemon_env.run_dir.mkdir(parents=True, mode=0o700)
    (daemon_env.run_dir / "eula_accepted").write_text("accepted")
    daemon_env.write_config(backend="isaacteleop", runtime="startup_timeout = 60.0")
    began = time.monotonic()
    proc = daemon_env.start()
    assert exit_code(proc) == errors.StartFailed.exit_code
    assert time.monotonic() - began < 60
    status = notify.statuses()[-1]
    assert re.search(r"lib(vulkan|cuda)\.so\.1: cannot open shared object file", status), status
    record = last_error(daemon_env)
    assert re.search(r"lib(vulkan|cuda)\.so\.1", record["error"] + record["stderr_tail"])
    (runtime,) = started_pids(daemon_env, "runtime")
    assert not group_members(runtime)


def test_isaacteleop_without_the_eula_says_how_to_accept(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    pytest.importorskip("isaacteleop.cloudxr.runtime")
    daemon_env.write_config(backend="isaacteleop")
    proc = daemon_env.start()
    assert exit_code(proc) == errors.EulaNotAccepted.exit_code
    assert "cxrctl accept-eula" in notify.statuses()[-1]
    assert started_pids(daemon_env, "runtime") == []


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def test_losing_the_session_bus_stops_the_daemon_cleanly(ready_daemon: BusDaemon) -> None:
    proc = ready_daemon.proc
    ready_daemon.bus.proc.terminate()
    assert proc.wait(timeout=TIMEOUT) == 0
    assert "the session bus connection was lost" in ready_daemon.denv.daemon_log()


def test_a_reload_that_would_fail_later_is_refused_and_keeps_the_children(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    proc = daemon_env.start()
    notify.wait_for(ready)
    before = (started_pids(daemon_env, "runtime"), started_pids(daemon_env, "proxy"))
    daemon_env.write_config(runtime='env = { NOTE = "two\\nlines" }')
    proc.send_signal(signal.SIGHUP)
    refused = notify.wait_for(lambda m: ready(m) and "reload refused" in m.get("STATUS", ""))
    assert "runtime.env.NOTE" in refused["STATUS"] and "line break" in refused["STATUS"]
    assert (started_pids(daemon_env, "runtime"), started_pids(daemon_env, "proxy")) == before
    assert all(pid_alive(pid) for pids in before for pid in pids)
    assert proc.poll() is None, "a refused reload never ends the daemon"


def test_sigterm_during_a_restart_wins_and_exits_0_in_time(bus_daemon: BusDaemon) -> None:
    # A runtime that ignores SIGTERM holds the restart in its stopping phase.
    bus_daemon.configure(ignore_sigterm=True, stop_timeout=1.0)
    bus_daemon.start()
    with CloudXRClient(bus_daemon.address) as client:
        runtime = client.status().runtime.pid
        restart = subprocess.Popen(
            [sys.executable, "-m", "cxrd.cli", "restart"],
            env=bus_daemon.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: client.status().state == "restarting", what="the restart's stop")
    began = time.monotonic()
    bus_daemon.proc.send_signal(signal.SIGTERM)
    assert bus_daemon.proc.wait(timeout=TIMEOUT) == 0
    assert time.monotonic() - began < 1.0 + 1.0 + 0.5  # stop_timeout plus a second (+ slack)
    assert restart.wait(timeout=TIMEOUT) != 0, "the interrupted restart was not reported ready"
    assert group_members(runtime) == [], "the runtime group is gone"
    assert started_pids(bus_daemon.denv, "runtime") == [runtime], "nothing started after"
