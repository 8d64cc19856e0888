"""Without a bus: the health endpoints, --bus modes, cxrctl status through --health, the EULA.

Real cxrd processes with the sim runtime; HTTP over loopback with the standard
library's client; /metrics read with prometheus_client's own parser.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from fixtures_daemon import DaemonEnv, NotifySocket, group_members, pid_alive
from fixtures_dbus import BusDaemon
from prometheus_client.parser import text_string_to_metric_families
from support import TIMEOUT, free_port, wait_until

from cxrd import errors
from cxrd.client import CloudXRClient


def ready(msg: dict[str, str]) -> bool:
    return msg.get("READY") == "1"


def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request(method, path)
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        conn.close()


def answer(port: int, path: str) -> tuple[int, dict[str, object]]:
    status, _, body = get(port, path)
    return status, json.loads(body)


def first_answer(port: int, path: str) -> tuple[int, dict[str, object]]:
    """The first answer once the server listens (the daemon was just started)."""

    def attempt() -> tuple[int, dict[str, object]] | None:
        try:
            return answer(port, path)
        except ConnectionRefusedError:
            return None

    return wait_until(attempt, f"{path} to answer", interval=0.01)


def metrics(port: int) -> dict[str, float]:
    status, headers, body = get(port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    values = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def started_pids(env: DaemonEnv, what: str) -> list[int]:
    return [int(p) for p in re.findall(rf"started {what}: pid (\d+)", env.daemon_log())]


def healthy_env(daemon_env: DaemonEnv, sim: str = "") -> int:
    port = free_port()
    daemon_env.write_config(f'[health]\nlisten = "127.0.0.1:{port}"\n', sim=sim)
    return port


def cxrctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cxrd.cli", *args],
        env={**env, "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


# --- the endpoints ------------------------------------------------------------------


def test_readyz_goes_503_then_200_and_livez_answers_throughout(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    port = healthy_env(daemon_env, sim="startup_delay = 1.5")
    daemon_env.start("--bus", "none")
    status, body = first_answer(port, "/readyz")
    assert status == 503 and body["ready"] is False
    assert body["state"] == "starting" and body["reason"]
    live_status, live = answer(port, "/livez")
    assert live_status == 200 and live["alive"] is True and live["state"] == "starting"
    notify.wait_for(ready)
    status, body = answer(port, "/readyz")
    assert status == 200 and body["ready"] is True and body["state"] == "ready"
    runtime = body["runtime"]
    assert isinstance(runtime, dict) and runtime["state"] == "running" and runtime["pid"]
    assert body["last_start_seconds"] >= 1.4  # type: ignore[operator]
    # What a network may not see: files, environment, lease holders.
    for private in ("environment", "install_dir", "env_file", "logs", "leases"):
        assert private not in body
    status, headers, empty = get(port, "/readyz", "HEAD")
    assert status == 200 and empty == b"" and int(headers["content-length"]) > 0
    seen = metrics(port)
    assert seen["cxrd_ready"] == 1.0 and seen["cxrd_state{state=ready}"] == 1.0
    assert seen["cxrd_runtime_restarts_total"] == 0.0
    assert seen["cxrd_last_start_seconds"] >= 1.4
    assert "process_resident_memory_bytes" in seen


def test_only_get_and_head_and_nothing_of_the_request_comes_back(daemon_env: DaemonEnv) -> None:
    port = healthy_env(daemon_env)
    daemon_env.start("--bus", "none")
    first_answer(port, "/livez")
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        status, headers, _ = get(port, "/readyz", method)
        assert status == 405 and headers["allow"] == "GET, HEAD", method
    marker = "/<script>alert(1)</script>"
    status, _, body = get(port, marker)
    assert status == 404 and b"script" not in body
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        assert sock.recv(64).startswith(b"HTTP/1.1 431 ")
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(b"HELLO\r\n\r\n")
        assert sock.recv(64).startswith(b"HTTP/1.1 400 ")
    # A client that never finishes its request holds up nobody else.
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as idle:
        idle.sendall(b"GET /livez HTTP/1.1\r\n")
        assert get(port, "/livez")[0] == 200


def test_livez_answers_under_a_flood_of_idle_and_half_sent_connections(
    daemon_env: DaemonEnv,
) -> None:
    port = healthy_env(daemon_env)
    daemon_env.start("--bus", "none")
    first_answer(port, "/livez")
    flood: list[socket.socket] = []
    try:
        for n in range(200):  # far more than the pool's places (and than 32, the old limit)
            sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            if n % 2:
                sock.sendall(b"GET /livez HTTP/1.1\r\n")  # a head never finished
            flood.append(sock)
        for _ in range(5):  # each probe's request is served though every place is taken
            status, body = answer(port, "/livez")
            assert status == 200 and body["alive"] is True

        # The flood holds no more than the pool: the rest were dropped, oldest first.
        def held() -> int:
            return sum(not _closed_by_peer(sock) for sock in flood)

        assert wait_until(lambda: held() <= 16, "the oldest idle connections to be dropped")
    finally:
        for sock in flood:
            sock.close()


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def test_readyz_is_503_naming_the_proxy_while_it_restarts(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    port = healthy_env(daemon_env)
    config = daemon_env.config_path.read_text()
    # A restart slow enough to be seen between two polls.
    daemon_env.config_path.write_text(
        config.replace("backoff_initial = 0.1", "backoff_initial = 1.0")
    )
    daemon_env.start("--bus", "none")
    notify.wait_for(ready)
    (proxy,) = started_pids(daemon_env, "proxy")
    os.kill(proxy, signal.SIGKILL)
    _, body = wait_until(lambda: (got := answer(port, "/readyz"))[0] == 503 and got, "503")
    assert body["state"] == "ready" and "proxy" in str(body["reason"])
    assert metrics(port)["cxrd_proxy_up"] == 0.0
    wait_until(lambda: answer(port, "/readyz")[0] == 200, "readyz 200 again")
    assert metrics(port)["cxrd_proxy_restarts_total"] == 1.0


def test_a_taken_health_port_is_a_start_error_naming_health_listen(
    daemon_env: DaemonEnv,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon_env.write_config(f'[health]\nlisten = "127.0.0.1:{port}"\n')
        proc = daemon_env.start("--bus", "none")
        assert proc.wait(timeout=TIMEOUT) == errors.StartFailed.exit_code
    assert (
        f"health.listen 127.0.0.1:{port}: port {port} on 127.0.0.1 is taken by pid {os.getpid()}"
        in daemon_env.daemon_log()
    )
    assert not started_pids(daemon_env, "runtime"), "refused before anything started"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('bus = "system"', "bus: 'system' is not one of auto, session, none"),
        ('[health]\nlisten = "9000"', "health.listen: '9000': expected host:port"),
        ('[health]\nlisten = "::1:9000"', "health.listen: '::1:9000': write an IPv6"),
        ('[health]\nlisten = "127.0.0.1:0"', "is not a TCP port"),
    ],
)
def test_bad_bus_or_health_settings_name_the_key(
    daemon_env: DaemonEnv, line: str, expected: str
) -> None:
    daemon_env.write_config(line + "\n")
    proc = daemon_env.start()
    assert proc.wait(timeout=TIMEOUT) == errors.InvalidConfig.exit_code
    assert expected in daemon_env.daemon_log()
    assert not started_pids(daemon_env, "runtime")


# --- --bus ----------------------------------------------------------------------------


def test_bus_auto_without_a_bus_runs_and_says_so_once(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    proc = daemon_env.start("--bus", "auto")
    notify.wait_for(ready)
    assert daemon_env.daemon_log().count("running without D-Bus (bus = auto)") == 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=TIMEOUT) == 0


def test_bus_session_without_a_bus_fails_with_a_named_error(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    proc = daemon_env.start("--bus", "session")
    assert proc.wait(timeout=TIMEOUT) == errors.StartFailed.exit_code
    assert "bus = session: there is no session bus" in notify.statuses()[-1]
    record = json.loads((daemon_env.run_dir / "cxrd.last_error").read_text())
    assert record["error"].startswith("bus = session: there is no session bus")
    for pid in started_pids(daemon_env, "runtime"):
        assert not pid_alive(pid) and not group_members(pid)


def test_bus_session_with_a_bus_serves_dbus_and_health(bus_daemon: BusDaemon) -> None:
    port = free_port()
    bus_daemon.configure(top=f'bus = "session"\n[health]\nlisten = "127.0.0.1:{port}"\n')
    bus_daemon.start()
    with CloudXRClient(bus_daemon.address) as client:
        assert str(client.status().state) == "ready"
    assert answer(port, "/readyz")[0] == 200


# --- cxrctl status without a bus --------------------------------------------------------


def test_cxrctl_status_through_health_of_a_busless_daemon(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    port = healthy_env(daemon_env)
    daemon_env.start("--bus", "none")
    notify.wait_for(ready)
    given = cxrctl(daemon_env.env, "status", "--health", f"http://127.0.0.1:{port}")
    assert given.returncode == 0, given.stderr
    assert "ready" in given.stdout
    assert f"Via: health endpoint http://127.0.0.1:{port}/readyz" in given.stdout
    # From the config's health.listen, as JSON.
    shown = cxrctl(daemon_env.env, "--config", str(daemon_env.config_path), "status", "--json")
    data = json.loads(shown.stdout)
    assert shown.returncode == 0 and data["source"] == "health" and data["state"] == "ready"
    assert data["install_dir"] == str(daemon_env.install_dir)


def test_cxrctl_status_falls_back_to_the_run_dir_and_says_so(daemon_env: DaemonEnv) -> None:
    port = free_port()  # nobody listens there
    shown = cxrctl(
        daemon_env.env,
        "--install-dir",
        str(daemon_env.install_dir),
        "status",
        "--health",
        f"127.0.0.1:{port}",
    )
    assert shown.returncode == 3
    assert f"Via: the run dir's files in {daemon_env.run_dir}" in shown.stdout
    assert "did not answer" in shown.stdout
    bad = cxrctl(daemon_env.env, "status", "--health", "ftp://example")
    assert bad.returncode == errors.InvalidArgs.exit_code and "--health" in bad.stderr


# --- the EULA without a terminal ---------------------------------------------------------


def test_accept_eula_from_the_environment_writes_the_marker_and_logs_it(
    daemon_env: DaemonEnv,
) -> None:
    pytest.importorskip("isaacteleop.cloudxr.runtime")
    daemon_env.write_config(backend="isaacteleop", proxy=False)
    proc = daemon_env.start("--bus", "none", env={"CXRD_ACCEPT_EULA": "1"})
    # Past the EULA check: the runtime is spawned (and fails here, with no GPU).
    wait_until(lambda: started_pids(daemon_env, "runtime"), "the runtime to be started")
    marker = daemon_env.run_dir / "eula_accepted"
    assert marker.read_text() == "accepted\n"
    assert f"accepted by CXRD_ACCEPT_EULA=1: wrote {marker}" in daemon_env.daemon_log()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=3 * TIMEOUT) != errors.EulaNotAccepted.exit_code


def test_accept_eula_with_a_bad_value_names_the_variable(daemon_env: DaemonEnv) -> None:
    proc = daemon_env.start(env={"CXRD_ACCEPT_EULA": "maybe"})
    assert proc.wait(timeout=TIMEOUT) == errors.InvalidConfig.exit_code
    assert "CXRD_ACCEPT_EULA='maybe'" in daemon_env.daemon_log()
    assert not (daemon_env.run_dir / "eula_accepted").exists()


def test_ready_since_is_reported_while_ready(daemon_env: DaemonEnv, notify: NotifySocket) -> None:
    port = healthy_env(daemon_env)
    before = time.time()
    daemon_env.start("--bus", "none")
    notify.wait_for(ready)
    _, body = answer(port, "/readyz")
    assert before <= float(body["ready_since"]) <= time.time()  # type: ignore[arg-type]
    assert 0 < metrics(port)["cxrd_ready_seconds"] < TIMEOUT
