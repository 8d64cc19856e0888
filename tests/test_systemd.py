"""cxrd as `cloudxr.service` under a real `systemd --user`, with the sim runtime.

Each test installs the unit with `cxrctl install` into a private manager (see
fixtures_systemd), writes `$XDG_CONFIG_HOME/cxrd/cxrd.toml` for the sim on free
ports, and drives the unit the way a user would: systemctl, busctl, cxrctl.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from fixtures_systemd import UserManager
from support import TIMEOUT, free_port, wait_until

from cxrd import constants as C
from cxrd import errors

pytestmark = pytest.mark.slow  # left out of the floors run (scripts/test.sh)

CXRCTL = str(Path(sys.executable).parent / "cxrctl")
BUSCTL_DAEMON = ("io.github.cxrd.Daemon1", "/io/github/cxrd/Daemon1", "io.github.cxrd.Daemon1")


@dataclass
class Cloudxr:
    """The installed unit and what the test knows about its config."""

    manager: UserManager
    install_dir: Path
    proxy_port: int
    backend_port: int
    stderr_log: Path

    @property
    def sentinel(self) -> Path:
        return self.install_dir / C.RUN_DIR / C.SENTINEL_FILE

    def configure(self, *, sim: str = "", runtime: str = "", restart: str = "") -> None:
        path = self.manager.config_home / "cxrd" / "cxrd.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            f'install_dir = "{self.install_dir}"\n'
            f'[runtime]\nbackend = "sim"\n{runtime}\n'
            f"[runtime.sim]\n{sim}\n"
            f"[proxy]\nport = {self.proxy_port}\nbackend_port = {self.backend_port}\n"
            f"[restart]\n{restart}\n"
        )

    def show(self, *props: str) -> dict[str, str]:
        return self.manager.show(C.UNIT_NAME, *props)

    def prop(self, name: str) -> int:
        out = self.manager.busctl("get-property", *BUSCTL_DAEMON, name).stdout.split()
        return int(out[1])

    def unit_pids(self) -> set[int]:
        return self.manager.cgroup_pids(self.show("ControlGroup")["ControlGroup"])

    def cxrctl(self, *args: str, check: bool = True) -> str:
        return self.manager.run(CXRCTL, *args, check=check, timeout=TIMEOUT * 3).stdout

    def diagnosis(self) -> str:
        status = self.manager.systemctl("status", C.UNIT_NAME, check=False).stdout
        log = self.stderr_log.read_text() if self.stderr_log.exists() else "(no log)"
        return f"{status}\n--- cxrd stderr ---\n{log[-4000:]}"


@pytest.fixture
def cloudxr(systemd_user: UserManager) -> Cloudxr:
    unit = Cloudxr(
        manager=systemd_user,
        install_dir=systemd_user.root / "cloudxr",
        proxy_port=free_port(),
        backend_port=free_port(),
        stderr_log=systemd_user.root / "cxrd.stderr",
    )
    systemd_user.run(CXRCTL, "install")
    # This machine has no journald: keep cxrd's log where a failing test can show it.
    systemd_user.write_dropin(
        C.UNIT_NAME, "test-log", f"[Service]\nStandardError=append:{unit.stderr_log}\n"
    )
    systemd_user.systemctl("daemon-reload")
    unit.configure()
    return unit


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0) until its parent reaps it.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return True


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_start_blocks_until_ready_and_stop_leaves_no_process(cloudxr: Cloudxr) -> None:
    delay = 1.0
    cloudxr.configure(sim=f"startup_delay = {delay}")
    began = time.monotonic()
    cloudxr.manager.systemctl("start", C.UNIT_NAME, timeout=TIMEOUT * 3)
    took = time.monotonic() - began
    # Returned only once the runtime's sentinel existed and the proxy listened.
    assert cloudxr.sentinel.exists(), cloudxr.diagnosis()
    assert listening(cloudxr.proxy_port)
    assert took >= delay
    props = cloudxr.show("ActiveState", "SubState", "MainPID", "StatusText", "WatchdogUSec")
    assert (props["ActiveState"], props["SubState"]) == ("active", "running")
    assert "ready" in props["StatusText"].lower(), props
    assert props["WatchdogUSec"] == "20s"
    main_pid = int(props["MainPID"])
    cmdline = Path(f"/proc/{main_pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[1:3] == [b"-m", b"cxrd"], "MainPID is cxrd itself"
    runtime_pid, proxy_pid = cloudxr.prop("RuntimePid"), cloudxr.prop("ProxyPid")
    pids = cloudxr.unit_pids()
    assert {main_pid, runtime_pid, proxy_pid} <= pids

    cloudxr.manager.systemctl("stop", C.UNIT_NAME, timeout=TIMEOUT * 3)
    after = cloudxr.show("ActiveState", "Result", "ExecMainStatus", "ControlGroup")
    assert after["ActiveState"] == "inactive", cloudxr.diagnosis()
    assert (after["Result"], after["ExecMainStatus"]) == ("success", "0")
    assert all(gone(pid) for pid in pids), [p for p in pids if not gone(p)]
    assert not cloudxr.sentinel.exists()
    assert not listening(cloudxr.proxy_port)


def test_never_ready_fails_the_start_in_time_with_the_reason(cloudxr: Cloudxr) -> None:
    timeout = 2.0
    cloudxr.configure(sim="never_ready = true", runtime=f"startup_timeout = {timeout}")
    began = time.monotonic()
    result = cloudxr.manager.systemctl("start", C.UNIT_NAME, check=False, timeout=TIMEOUT * 3)
    took = time.monotonic() - began
    assert result.returncode != 0
    assert timeout <= took < timeout + TIMEOUT, took
    props = cloudxr.show("ActiveState", "ExecMainStatus", "NRestarts", "StatusText")
    assert props["ActiveState"] == "failed", cloudxr.diagnosis()
    assert props["ExecMainStatus"] == str(errors.Timeout.exit_code)
    assert props["NRestarts"] == "0", "systemd must not retry what cannot succeed"
    assert C.SENTINEL_FILE in props["StatusText"] or "ready" in props["StatusText"], props
    # `systemctl --user status` shows the same reason to a person.
    status = cloudxr.manager.systemctl("status", C.UNIT_NAME, check=False).stdout
    assert props["StatusText"][:40] in status
    assert cloudxr.unit_pids() == set()


def test_crash_loop_ends_in_give_up_code_without_systemd_restarting(cloudxr: Cloudxr) -> None:
    cloudxr.configure(
        sim="crash_after = 0.3",
        restart="max_restarts = 2\nwindow = 60.0\nbackoff_initial = 0.1\nbackoff_max = 0.2",
    )
    # Were systemd to restart a give-up, it would do so at once with this drop-in.
    cloudxr.manager.write_dropin(C.UNIT_NAME, "test-restart", "[Service]\nRestartSec=0.1s\n")
    cloudxr.manager.systemctl("daemon-reload")
    cloudxr.manager.systemctl("start", C.UNIT_NAME, timeout=TIMEOUT * 3)
    wait_until(
        lambda: cloudxr.show("ActiveState")["ActiveState"] == "failed",
        "cxrd to give up",
        timeout=TIMEOUT * 2,
    )
    props = cloudxr.show("ExecMainStatus", "NRestarts", "StatusText", "Result")
    assert props["ExecMainStatus"] == str(errors.GaveUp.exit_code), cloudxr.diagnosis()
    assert props["NRestarts"] == "0"
    assert props["Result"] == "exit-code"
    assert (cloudxr.install_dir / C.RUN_DIR / C.LAST_ERROR_FILE).exists()
    # And it stays down: no restart is scheduled.
    time.sleep(1)  # ten times RestartSec
    assert cloudxr.show("ActiveState", "NRestarts") == {"ActiveState": "failed", "NRestarts": "0"}


def test_bare_busctl_call_activates_the_service(cloudxr: Cloudxr) -> None:
    assert cloudxr.show("ActiveState")["ActiveState"] == "inactive"
    cloudxr.manager.busctl("call", *BUSCTL_DAEMON, "Start", "a{sv}", "0", timeout=TIMEOUT * 3)
    # Start() returned ready: the sentinel exists and systemd has the unit running.
    assert cloudxr.sentinel.exists()
    props = cloudxr.show("ActiveState", "MainPID")
    assert props["ActiveState"] == "active"
    assert cloudxr.prop("RuntimePid") in cloudxr.unit_pids()


def test_cxrctl_start_activates_the_service_and_reports_ready(cloudxr: Cloudxr) -> None:
    down = cloudxr.manager.run(CXRCTL, "status", check=False)
    assert down.returncode == 3, down
    assert cloudxr.show("ActiveState")["ActiveState"] == "inactive", "status must not start it"
    cloudxr.cxrctl("start")
    assert cloudxr.show("ActiveState")["ActiveState"] == "active"
    assert cloudxr.sentinel.exists()
    up = cloudxr.manager.run(CXRCTL, "status", check=False)
    assert up.returncode == 0, up
    assert "ready" in up.stdout.lower()


def test_watchdog_kills_and_restarts_a_wedged_daemon(cloudxr: Cloudxr) -> None:
    cloudxr.manager.write_dropin(
        C.UNIT_NAME,
        "test-watchdog",
        "[Service]\nWatchdogSec=3s\nRestartSec=0.2s\nEnvironment=CXRD_TEST_HOOKS=1\n",
    )
    cloudxr.manager.systemctl("daemon-reload")
    cloudxr.manager.systemctl("start", C.UNIT_NAME, timeout=TIMEOUT * 3)
    first = int(cloudxr.show("MainPID")["MainPID"])
    old_runtime = cloudxr.prop("RuntimePid")
    os.kill(first, signal.SIGUSR2)  # the test hook: the event loop blocks for an hour

    def restarted() -> bool:
        props = cloudxr.show("MainPID", "ActiveState", "NRestarts")
        return props["NRestarts"] == "1" and props["ActiveState"] == "active"

    wait_until(restarted, "systemd to kill and restart the wedged cxrd", timeout=TIMEOUT * 3)
    assert int(cloudxr.show("MainPID")["MainPID"]) != first
    assert gone(first) and gone(old_runtime), "KillMode=mixed took the old runtime along"
    assert cloudxr.prop("RuntimePid") != old_runtime
    assert cloudxr.sentinel.exists()


def test_reload_rereads_config_and_keeps_the_unchanged_runtime(cloudxr: Cloudxr) -> None:
    cloudxr.manager.systemctl("start", C.UNIT_NAME, timeout=TIMEOUT * 3)
    main_pid = cloudxr.show("MainPID")["MainPID"]
    runtime_pid, proxy_pid = cloudxr.prop("RuntimePid"), cloudxr.prop("ProxyPid")
    old_port, cloudxr.proxy_port = cloudxr.proxy_port, free_port()
    cloudxr.configure()  # only the proxy's port differs

    cloudxr.manager.systemctl("reload", C.UNIT_NAME, timeout=TIMEOUT * 3)

    # systemd 252 returns once SIGHUP is sent; the unit is "reloading" (RELOADING=1)
    # until cxrd has applied the file and says READY=1 again.
    def reloaded() -> bool:
        props = cloudxr.show("ActiveState", "StatusText")
        return props["ActiveState"] == "active" and "reloaded" in props["StatusText"]

    wait_until(reloaded, "cxrd to finish reloading", timeout=TIMEOUT)
    assert listening(cloudxr.proxy_port)
    assert not listening(old_port)
    assert cloudxr.prop("RuntimePid") == runtime_pid, "the runtime's settings did not change"
    assert cloudxr.prop("ProxyPid") != proxy_pid
    assert cloudxr.show("MainPID")["MainPID"] == main_pid


def test_a_sighup_during_a_first_start_that_fails_leaves_the_start_failing(
    cloudxr: Cloudxr,
) -> None:
    # The reload waits behind the start; the start fails: systemd must never hear READY=1.
    cloudxr.configure(sim="startup_delay = 1.5\nexit_before_ready = 3")
    start = subprocess.Popen(
        ["systemctl", "--user", "start", C.UNIT_NAME],
        env=cloudxr.manager.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: cloudxr.show("StatusText")["StatusText"].startswith("Starting"),
            "cxrd to be starting",
        )
        cloudxr.manager.systemctl("kill", "--kill-who=main", "--signal=HUP", C.UNIT_NAME)
        assert start.wait(timeout=TIMEOUT * 3) != 0, "systemctl start reported success"
    finally:
        if start.poll() is None:
            start.kill()
            start.wait()
    props = cloudxr.show("ActiveState", "ExecMainStatus", "NRestarts")
    assert props["ActiveState"] == "failed", cloudxr.diagnosis()
    assert props["ExecMainStatus"] == str(errors.StartFailed.exit_code)
    assert props["NRestarts"] == "0"
