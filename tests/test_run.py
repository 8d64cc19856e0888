"""``cxrctl run -- COMMAND``: real cxrctl, real COMMAND, real daemon on a real private bus."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_daemon import pid_alive
from fixtures_dbus import BusDaemon
from support import TIMEOUT, wait_until

from cxrd.client import CloudXRClient
from cxrd.constants import STAND_ASIDE
from cxrd.core.snapshot import Lease, Snapshot
from cxrd.errors import NotRunning

# COMMAND for the tests: records each signal it gets and its environment, then
# waits for its stdin to close (exit 0), or exits 3 on SIGTERM.
CHILD = r"""
import json, os, signal, sys
out = sys.argv[1]
def record(word):
    with open(out + ".log", "a") as f:
        f.write(word + "\n")
def on(signo, frame):
    record(signal.Signals(signo).name)
    if signo == signal.SIGTERM:
        sys.exit(3)
for signo in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
              signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(signo, on)
with open(out + ".tmp", "w") as f:
    json.dump(dict(os.environ), f)
os.replace(out + ".tmp", out + ".env")
record("READY")
while sys.stdin.buffer.read1(1):
    pass
"""


@pytest.fixture
def child(tmp_path: Path) -> Iterator[Child]:
    made = Child(tmp_path)
    yield made
    made.cleanup()


class Child:
    """One ``cxrctl run -- python child.py`` and what its COMMAND recorded."""

    def __init__(self, tmp: Path) -> None:
        self.script = tmp / "child.py"
        self.script.write_text(CHILD)
        self.out = tmp / "child"
        self.procs: list[subprocess.Popen[Any]] = []

    def argv(self) -> list[str]:
        return [sys.executable, str(self.script), str(self.out)]

    def start(self, env: dict[str, str], *options: str, **kw: object) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cxrd.cli", "run", *options, "--", *self.argv()],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **kw,  # type: ignore[call-overload]
        )
        self.procs.append(proc)
        return proc

    def log(self) -> list[str]:
        try:
            return (self.out.parent / "child.log").read_text().split()
        except FileNotFoundError:
            return []

    def wait_ready(self, proc: subprocess.Popen[str]) -> None:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"cxrctl run ended early: {proc.communicate()}")
            return "READY" in self.log()

        wait_until(ready, "COMMAND to start", timeout=3 * TIMEOUT)

    def env(self) -> dict[str, str]:
        data: dict[str, str] = json.loads((self.out.parent / "child.env").read_text())
        return data

    def finish(self, proc: subprocess.Popen[str]) -> tuple[int, str]:
        """Close COMMAND's stdin (it exits 0); cxrctl's status and stderr."""
        _, err = proc.communicate(timeout=TIMEOUT)
        return proc.returncode, err

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=TIMEOUT)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


def cxrctl_run(
    env: dict[str, str], *args: str, timeout: float = 4 * TIMEOUT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cxrd.cli", "run", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def status(daemon: BusDaemon) -> Snapshot:
    with CloudXRClient(daemon.address) as client:
        return client.status()


def run_leases(daemon: BusDaemon) -> list[Lease]:
    try:
        leases = status(daemon).leases
    except NotRunning:
        return []
    return [lease for lease in leases if lease.reason.startswith("cxrctl run: ")]


def activatable(daemon: BusDaemon, **settings: object) -> BusDaemon:
    daemon.configure(**settings)  # type: ignore[arg-type]
    daemon.enable_activation()
    return daemon


# --- exit statuses --------------------------------------------------------------


def test_run_exits_with_the_commands_status(bus_daemon: BusDaemon) -> None:
    activatable(bus_daemon)
    assert cxrctl_run(bus_daemon.env, "--", "sh", "-c", "exit 7").returncode == 7
    assert cxrctl_run(bus_daemon.env, "sh", "-c", "exit 0").returncode == 0  # `--` optional
    killed = cxrctl_run(bus_daemon.env, "--", "sh", "-c", "kill -TERM $$")
    assert killed.returncode == 128 + signal.SIGTERM, killed.stderr


def test_a_missing_or_unrunnable_command_exits_127_or_126_and_starts_nothing(
    bus_daemon: BusDaemon, tmp_path: Path
) -> None:
    activatable(bus_daemon)
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    missing = cxrctl_run(bus_daemon.env, "--", "no-such-command-cxrd-test", "-x")
    assert missing.returncode == 127, missing.stderr
    assert "no-such-command-cxrd-test" in missing.stderr
    assert cxrctl_run(bus_daemon.env, "--", str(tmp_path / "absent")).returncode == 127
    refused = cxrctl_run(bus_daemon.env, "--", str(script))
    assert refused.returncode == 126, refused.stderr
    assert cxrctl_run(bus_daemon.env, "--", str(tmp_path)).returncode == 126  # a directory
    assert bus_daemon.daemon_pids() == []  # a typo cost nothing


def test_no_daemon_to_activate_exits_125_naming_the_error(bus_daemon: BusDaemon) -> None:
    ran = cxrctl_run(bus_daemon.env, "--", "true")
    assert ran.returncode == 125, ran
    assert "cxrctl: error: NotRunning:" in ran.stderr and "hint:" in ran.stderr


def test_a_start_that_fails_exits_125_naming_the_error(bus_daemon: BusDaemon) -> None:
    activatable(bus_daemon, startup_delay=0.2, exit_before_ready=9)
    ran = cxrctl_run(bus_daemon.env, "--", "true")
    assert ran.returncode == 125, ran
    assert "StartFailed" in ran.stderr and "hint:" in ran.stderr


# --- the lease and the environment ----------------------------------------------


def test_activation_from_nothing_gives_command_the_runtime_environment(
    bus_daemon: BusDaemon, child: Child
) -> None:
    activatable(bus_daemon)
    proc = child.start({**bus_daemon.env, "ISAACLAB_CXR_SKIP_AUTOLAUNCH": "0"})
    child.wait_ready(proc)
    snap = status(bus_daemon)
    env = child.env()
    assert snap.environment and "XR_RUNTIME_JSON" in snap.environment
    assert {k: env.get(k) for k in snap.environment} == dict(snap.environment)
    assert env["ISAACLAB_CXR_SKIP_AUTOLAUNCH"] == "1" == STAND_ASIDE["ISAACLAB_CXR_SKIP_AUTOLAUNCH"]
    assert env["DBUS_SESSION_BUS_ADDRESS"] == bus_daemon.address  # the rest of ours kept
    assert child.finish(proc) == (0, "")


def test_lease_lives_as_long_as_the_command_and_a_sigkilled_cxrctl_lets_go(
    bus_daemon: BusDaemon, child: Child
) -> None:
    activatable(bus_daemon)
    proc = child.start(bus_daemon.env)
    child.wait_ready(proc)
    (lease,) = run_leases(bus_daemon)
    assert lease.pid == proc.pid and child.script.name in lease.reason
    assert child.finish(proc) == (0, "")
    assert run_leases(bus_daemon) == []  # released before cxrctl exited

    proc = child.start(bus_daemon.env)
    wait_until(lambda: run_leases(bus_daemon), "the second lease", timeout=3 * TIMEOUT)
    grandchild = int(wait_until(lambda: _child_of(proc.pid), "COMMAND's pid"))
    proc.kill()
    proc.wait(timeout=TIMEOUT)
    wait_until(lambda: run_leases(bus_daemon) == [], "the lease of a SIGKILLed cxrctl to end")
    assert pid_alive(grandchild)  # COMMAND goes on, as under systemd-run --scope
    proc.stdin.close()  # type: ignore[union-attr]
    wait_until(lambda: not pid_alive(grandchild), "COMMAND to end with its stdin")


def _child_of(pid: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                return int(entry.name)
    return None


def test_stop_when_idle_waits_for_the_command_then_stops(
    bus_daemon: BusDaemon, child: Child
) -> None:
    activatable(bus_daemon, top="stop_when_idle = true\nidle_grace = 1.0")
    proc = child.start(bus_daemon.env)
    child.wait_ready(proc)
    time.sleep(1.5)  # longer than idle_grace: the lease keeps it up
    assert status(bus_daemon).state == "ready"
    assert child.finish(proc) == (0, "")
    wait_until(lambda: bus_daemon.daemon_pids() == [], "the idle daemon to stop")


def test_env_file_and_gpu_reach_the_runtime(
    bus_daemon: BusDaemon, child: Child, tmp_path: Path
) -> None:
    activatable(bus_daemon)
    env_file = tmp_path / "cloudxrjs-cloudxr.env"  # as Isaac Lab ships it
    env_file.write_text(
        "NV_DEVICE_PROFILE=auto-webrtc\nNV_CXR_ENABLE_PUSH_DEVICES=0\nNV_ENABLE_POSE_WAIT=0\n"
    )
    proc = child.start(bus_daemon.env, "--env-file", str(env_file), "--gpu", "1")
    child.wait_ready(proc)
    snap = status(bus_daemon)
    raw = Path(f"/proc/{snap.runtime.pid}/environ").read_bytes().split(b"\0")
    runtime = dict(item.decode().split("=", 1) for item in raw if b"=" in item)
    wanted = {
        "NV_DEVICE_PROFILE": "auto-webrtc",
        "NV_CXR_ENABLE_PUSH_DEVICES": "0",
        "NV_ENABLE_POSE_WAIT": "0",
        "NV_CXR_GPU_INDEX_CUDA": "1",
    }
    assert {k: runtime.get(k) for k in wanted} == wanted
    assert {k: child.env().get(k) for k in wanted} == wanted
    shown = subprocess.run(
        [sys.executable, "-m", "cxrd.cli", "status"],
        env=bus_daemon.env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    ).stdout
    requested = next(line for line in shown.splitlines() if "Requested:" in line)
    assert "device_profile=auto-webrtc, gpu=1, NV_CXR_ENABLE_PUSH_DEVICES=0" in requested
    assert "cxrctl run" in requested or "cxrd.cli run" in requested, requested
    assert snap.requested_by.startswith(":"), "the unique name of the Start's caller"
    assert child.finish(proc) == (0, "")


def test_a_differing_request_on_a_runtime_in_use_exits_125_and_changes_nothing(
    bus_daemon: BusDaemon, child: Child, tmp_path: Path
) -> None:
    activatable(bus_daemon)
    proc = child.start(bus_daemon.env, "--profile", "Quest3")
    child.wait_ready(proc)
    pid = status(bus_daemon).runtime.pid
    other = cxrctl_run(bus_daemon.env, "--profile", "AppleVisionPro", "--", "true")
    assert other.returncode == 125, other
    assert "ProfileMismatch" in other.stderr and "device_profile" in other.stderr
    env_file = tmp_path / "other.env"
    env_file.write_text("NV_ENABLE_POSE_WAIT=0\n")
    other = cxrctl_run(bus_daemon.env, "--env-file", str(env_file), "--gpu", "2", "--", "true")
    assert other.returncode == 125, other
    assert "ConfigMismatch" in other.stderr and "NV_ENABLE_POSE_WAIT" in other.stderr
    assert "gpu" in other.stderr
    assert status(bus_daemon).runtime.pid == pid
    assert [lease.pid for lease in run_leases(bus_daemon)] == [proc.pid]
    assert child.finish(proc) == (0, "")


# --- signals --------------------------------------------------------------------


def test_signals_sent_to_cxrctl_reach_the_command(bus_daemon: BusDaemon, child: Child) -> None:
    activatable(bus_daemon)
    proc = child.start(bus_daemon.env)
    child.wait_ready(proc)
    for signo in (signal.SIGUSR1, signal.SIGINT, signal.SIGHUP):
        proc.send_signal(signo)
        wait_until(lambda s=signo: signal.Signals(s).name in child.log(), f"COMMAND to get {signo}")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=TIMEOUT) == 3  # COMMAND's status, after its SIGTERM handler
    assert child.log() == ["READY", "SIGUSR1", "SIGINT", "SIGHUP", "SIGTERM"]
    assert run_leases(bus_daemon) == []


def test_a_signal_while_waiting_for_ready_ends_cxrctl_and_its_lease(bus_daemon: BusDaemon) -> None:
    activatable(bus_daemon, startup_delay=3.0)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cxrd.cli", "run", "--", "true"],
        env=bus_daemon.env,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(lambda: run_leases(bus_daemon), "the lease", timeout=3 * TIMEOUT)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert (proc.returncode, err) == (128 + signal.SIGTERM, "")
    assert run_leases(bus_daemon) == []


def test_ctrl_c_on_a_terminal_reaches_the_command_once(bus_daemon: BusDaemon, child: Child) -> None:
    activatable(bus_daemon)
    main, sub = pty.openpty()

    def controlling_terminal() -> None:  # the pty becomes the session's terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cxrd.cli", "run", "--", *child.argv()],
            env=bus_daemon.env,
            stdin=sub,
            stdout=sub,
            stderr=sub,
            start_new_session=True,
            preexec_fn=controlling_terminal,
        )
        child.procs.append(proc)
        wait_until(lambda: "READY" in child.log(), "COMMAND to start", timeout=3 * TIMEOUT)
        os.write(main, b"\x03")  # ^C: the terminal signals its whole foreground group
        wait_until(lambda: "SIGINT" in child.log(), "COMMAND to get ^C")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 3
    finally:
        os.close(sub)
        os.close(main)
    assert child.log() == ["READY", "SIGINT", "SIGTERM"]


# --- without a session bus ------------------------------------------------------


def test_without_a_bus_command_gets_the_runtime_in_the_install_dir_without_a_lease(
    bus_daemon: BusDaemon, child: Child
) -> None:
    bus_daemon.configure(top='bus = "none"')
    config = ["--config", str(bus_daemon.denv.config_path)]
    # Asked before the daemon is there: it waits for the runtime to serve the run dir.
    proc = child.start(bus_daemon.env, *config)  # a bus address, but the config says none
    bus_daemon.spawn()
    child.wait_ready(proc)
    env_file = bus_daemon.denv.run_dir / "cloudxr.env"
    published = dict(
        line.removeprefix("export ").split("=", 1) for line in env_file.read_text().splitlines()
    )
    env = child.env()
    assert env["XR_RUNTIME_JSON"] == published["XR_RUNTIME_JSON"]
    assert env["NV_DEVICE_PROFILE"] == "Quest3" and env["ISAACLAB_CXR_SKIP_AUTOLAUNCH"] == "1"
    code, err = child.finish(proc)
    assert code == 0
    notice = f"cxrctl run: no session bus; using the runtime in {bus_daemon.denv.install_dir}"
    assert err.splitlines().count(f"{notice} without a lease") == 1, err

    no_bus = {k: v for k, v in bus_daemon.denv.env.items() if k != "DBUS_SESSION_BUS_ADDRESS"}
    ran = cxrctl_run(no_bus, *config, "--", "sh", "-c", 'test "$XR_RUNTIME_JSON" && exit 5')
    assert (ran.returncode, ran.stderr.count("no session bus")) == (5, 1), ran
    refused = cxrctl_run(no_bus, *config, "--profile", "AppleVisionPro", "--", "true")
    assert refused.returncode == 125 and "ProfileMismatch" in refused.stderr, refused


def test_without_a_bus_or_a_runtime_exits_125_after_the_timeout(bus_daemon: BusDaemon) -> None:
    no_bus = {k: v for k, v in bus_daemon.denv.env.items() if k != "DBUS_SESSION_BUS_ADDRESS"}
    config = ["--config", str(bus_daemon.denv.config_path)]
    ran = cxrctl_run(no_bus, *config, "--timeout", "0.5", "--", "true")
    assert ran.returncode == 125, ran
    assert "Timeout" in ran.stderr and str(bus_daemon.denv.run_dir) in ran.stderr
