"""cxrd as a container's first process: PID 1 of a fresh PID and mount namespace.

``unshare --pid --fork --mount-proc`` (as root), no bus, no systemd: what a
container runtime without ``--init`` gives. The sim leaves orphans (a
grandchild whose parent exits at once, and on a crash the grandchild of
``spawn_grandchild``); as PID 1, cxrd must reap them without ever taking the
exit status of its own children. Pids below are the host's: the test looks
at the namespace from outside, by its ``/proc/<pid>/ns/pid``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_daemon import DaemonEnv
from prometheus_client.parser import text_string_to_metric_families
from support import TIMEOUT, free_port, wait_until
from test_health import answer, first_answer, get

STOP_TIMEOUT = 2.0  # the fixture config's runtime.stop_timeout


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=30
    )
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(
    not _can_unshare(), reason="needs root and unshare --pid --mount-proc"
)


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a host pid; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def pid_ns(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return ""


def members(ns: str) -> dict[int, tuple[str, str]]:
    """host pid -> (state, command line) of every process in the PID namespace ``ns``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or pid_ns(int(entry.name)) != ns:
            continue
        stat = _stat(int(entry.name))
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        if stat is not None:
            found[int(entry.name)] = (stat[0], cmdline)
    return found


def child_of(ns: str, parent: int, needle: str) -> int:
    """The host pid of ``parent``'s live child in ``ns`` whose command line has ``needle``."""
    (pid,) = [
        p
        for p, (state, cmd) in members(ns).items()
        if needle in cmd and state != "Z" and (_stat(p) or ("", 0))[1] == parent
    ]
    return pid


def zombies(ns: str) -> dict[int, tuple[str, str]]:
    return {pid: m for pid, m in members(ns).items() if m[0] == "Z"}


def wait_ready(port: int) -> None:
    first_answer(port, "/readyz")
    wait_until(lambda: answer(port, "/readyz")[0] == 200, "ready", timeout=3 * TIMEOUT)


def metric(port: int, name: str) -> float:
    status, _, body = get(port, "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return sample.value
    raise AssertionError(f"no {name} in /metrics")


class Namespace:
    """``unshare`` running cxrd (or an init running cxrd) as the namespace's first process."""

    def __init__(self, env: DaemonEnv, init: tuple[str, ...] = ()) -> None:
        self.env = env
        argv = [
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            *init,
            sys.executable,
            "-m",
            "cxrd",
            "--config",
            str(env.config_path),
            "--bus",
            "none",
        ]
        with open(env.tmp / "cxrd.stderr", "ab") as stderr:
            self.unshare = subprocess.Popen(
                argv,
                env=env.env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        self.started = time.monotonic()
        me = self.unshare.pid
        self.first = wait_until(
            lambda: next((p for p in _children(me) if pid_ns(p) != pid_ns(me)), None),
            "the namespace's first process",
            interval=0.005,
        )
        self.ns = pid_ns(self.first)

    def child(self, needle: str) -> int:
        return child_of(self.ns, self.first, needle)

    def close(self) -> None:
        if self.unshare.poll() is None:
            os.killpg(self.unshare.pid, signal.SIGKILL)
            self.unshare.wait(timeout=TIMEOUT)


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) and stat[1] == pid:
            out.append(int(entry.name))
    return out


@pytest.fixture
def pid1_env(daemon_env: DaemonEnv) -> Iterator[tuple[DaemonEnv, int]]:
    port = free_port()
    daemon_env.write_config(
        f'[health]\nlisten = "127.0.0.1:{port}"\n',
        sim="startup_delay = 1.0\norphan_grandchild = true\nspawn_grandchild = true",
    )
    yield daemon_env, port


def test_as_pid_1_it_reaps_orphans_restarts_and_stops_leaving_an_empty_namespace(
    pid1_env: tuple[DaemonEnv, int],
) -> None:
    env, port = pid1_env
    ns = Namespace(env)
    try:
        figures = _run_the_namespace(ns, env, port)
    finally:
        ns.close()
    # The figures a closing note reports: `pytest -s` shows them.
    print(json.dumps({"pid1_figures": figures}))


def _run_the_namespace(ns: Namespace, env: DaemonEnv, port: int) -> dict[str, float]:
    assert _stat(ns.first) is not None
    status, body = first_answer(port, "/readyz")
    assert status == 503 and body["state"] == "starting"
    wait_ready(port)
    to_ready = time.monotonic() - ns.started
    assert "running as PID 1: reaping orphaned processes" in env.daemon_log()

    # The sim's orphan died re-parented to PID 1: reaped, no zombie left.
    orphan = int((env.run_dir / "sim_orphan.pid").read_text())
    assert orphan > 1  # a pid of the namespace
    wait_until(lambda: metric(port, "cxrd_orphans_reaped_total") >= 1, "the orphan reaped")
    wait_until(lambda: not zombies(ns.ns), "no zombie in the namespace")

    restarts = metric(port, "cxrd_runtime_restarts_total")
    runtime = ns.child("-m cxrd.sim")
    os.kill(runtime, signal.SIGKILL)
    status, body = wait_until(lambda: (got := answer(port, "/readyz"))[0] == 503 and got, "503")
    assert body["state"] == "restarting" and "SIGKILL" in str(body["reason"])
    wait_until(lambda: answer(port, "/readyz")[0] == 200, "ready again", timeout=3 * TIMEOUT)
    assert metric(port, "cxrd_runtime_restarts_total") == restarts + 1
    log = env.daemon_log()
    # cxrd's own child's status stayed cxrd's: the reaper did not take it.
    assert "the runtime was killed by SIGKILL" in log
    assert "Unknown child process" not in log
    # The killed sim's grandchild and the new sim's orphan, reaped in turn.
    wait_until(lambda: metric(port, "cxrd_orphans_reaped_total") >= 3, "the later orphans")
    wait_until(lambda: not zombies(ns.ns), "no zombie after the crash")
    reaped = metric(port, "cxrd_orphans_reaped_total")

    began = time.monotonic()
    os.kill(ns.first, signal.SIGTERM)
    assert ns.unshare.wait(timeout=TIMEOUT) == 0
    to_stop = time.monotonic() - began
    assert to_stop < STOP_TIMEOUT + 1.0, f"stopped in {to_stop:.2f} s"
    assert not members(ns.ns), "the namespace is empty"
    assert "proxy (pid" in env.daemon_log() and "stopped: exited with code 0" in env.daemon_log()
    return {
        "seconds_to_ready": round(to_ready, 3),
        "seconds_to_stop": round(to_stop, 3),
        "orphans_reaped": reaped,
    }


def test_a_process_that_ignores_sigterm_is_killed_and_the_exit_code_is_cxrds(
    daemon_env: DaemonEnv,
) -> None:
    port = free_port()
    daemon_env.write_config(
        f'[health]\nlisten = "127.0.0.1:{port}"\n',
        sim="ignore_sigterm = true\nspawn_grandchild = true",
    )
    ns = Namespace(daemon_env)
    try:
        wait_ready(port)
        began = time.monotonic()
        os.kill(ns.first, signal.SIGINT)
        assert ns.unshare.wait(timeout=3 * TIMEOUT) == 0
        # SIGTERM ignored for stop_timeout, then SIGKILL: still within a second more.
        assert time.monotonic() - began < STOP_TIMEOUT + 1.0
        assert not members(ns.ns)
        assert "SIGINT received" in daemon_env.daemon_log()
    finally:
        ns.close()


@pytest.mark.skipif(shutil.which("tini") is None, reason="tini is not installed")
def test_under_tini_cxrd_runs_stops_and_tini_reaps(pid1_env: tuple[DaemonEnv, int]) -> None:
    env, port = pid1_env
    tini = shutil.which("tini")
    assert tini is not None
    ns = Namespace(env, init=(tini, "--"))
    try:
        wait_ready(port)
        assert "running as PID 1" not in env.daemon_log(), "tini is PID 1, not cxrd"
        wait_until(lambda: not zombies(ns.ns), "tini reaped the orphan")
        began = time.monotonic()
        os.kill(ns.first, signal.SIGTERM)  # tini forwards it to cxrd
        assert ns.unshare.wait(timeout=TIMEOUT) == 0
        assert time.monotonic() - began < STOP_TIMEOUT + 1.0
        assert not members(ns.ns)
    finally:
        ns.close()
