"""Fixtures: a real private ``dbus-daemon`` and a real ``cxrd`` serving on it.

The bus has its own config: a service dir tests can put activation files in,
and a policy that lets any local user connect (so a test can call as
``nobody`` and see cxrd itself refuse). Its socket lives in a world-traversable
temp dir for the same reason.
"""

from __future__ import annotations

import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fixtures_daemon import DaemonEnv
from support import TIMEOUT

from cxrd.client import CloudXRClient
from cxrd.constants import BUS_NAME

_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:dir={socket_dir}</listen>
  <auth>EXTERNAL</auth>
  <servicedir>{service_dir}</servicedir>
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
  <limit name="service_start_timeout">{start_timeout_ms}</limit>
  <limit name="max_replies_per_connection">50000</limit>
  <limit name="max_match_rules_per_connection">50000</limit>
  <limit name="max_incoming_bytes">1000000000</limit>
  <limit name="max_outgoing_bytes">1000000000</limit>
</busconfig>
"""


@dataclass
class PrivateBus:
    address: str
    service_dir: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["DBUS_SESSION_BUS_ADDRESS"] = self.address
        return env

    def add_activation(self, argv: list[str], *, stderr: Path) -> Path:
        """Let the bus start ``argv`` on demand for cxrd's name, its stderr to a file."""
        command = " ".join(shlex.quote(arg) for arg in argv)
        shell = f"exec {command} 2>>{shlex.quote(str(stderr))}"
        path = self.service_dir / f"{BUS_NAME}.service"
        path.write_text(
            f"[D-BUS Service]\nName={BUS_NAME}\nExec=/bin/sh -c {_dbus_exec_quote(shell)}\n"
        )
        # The bus rescans its service dirs on ReloadConfig; ask and wait for it.
        subprocess.run(
            [
                "busctl",
                f"--address={self.address}",
                "call",
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "ReloadConfig",
            ],
            check=True,
            capture_output=True,
            timeout=TIMEOUT,
        )
        return path


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _dbus_exec_quote(text: str) -> str:
    # dbus's Exec= parser follows shell quoting; single quotes cannot hold a quote.
    return "'" + text.replace("'", "'\\''") + "'"


def _read_address(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + TIMEOUT
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise AssertionError(f"dbus-daemon printed no address (exit {proc.poll()})")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError("dbus-daemon closed its stdout without an address")
            data += chunk
    return data.decode().splitlines()[0].strip()


@pytest.fixture
def private_bus(tmp_path: Path) -> Iterator[PrivateBus]:
    if shutil.which("dbus-daemon") is None:
        pytest.fail("dbus-daemon is not installed (apt-get install dbus-daemon)")
    socket_dir = Path(tempfile.mkdtemp(prefix="cxrd-bus-"))
    socket_dir.chmod(0o755)  # a test's `nobody` must reach the socket
    service_dir = tmp_path / "dbus-services"
    service_dir.mkdir()
    config = tmp_path / "bus.conf"
    config.write_text(
        _BUS_CONFIG.format(
            socket_dir=socket_dir,
            service_dir=service_dir,
            start_timeout_ms=int(TIMEOUT * 3 * 1000),
        )
    )
    log = tmp_path / "dbus-daemon.log"
    with log.open("ab") as err:
        proc = subprocess.Popen(
            ["dbus-daemon", f"--config-file={config}", "--print-address", "--nofork"],
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,
        )
    try:
        bus = PrivateBus(_read_address(proc), service_dir, proc, log)
        yield bus
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        shutil.rmtree(socket_dir, ignore_errors=True)


@dataclass
class BusDaemon:
    """One test's cxrd on its private bus, with the paths to look at."""

    bus: PrivateBus
    denv: DaemonEnv
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.bus.address

    @property
    def env(self) -> dict[str, str]:
        return self.bus.env(self.denv.env)

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.procs[-1]

    def configure(
        self,
        *,
        startup_delay: float = 0.1,
        startup_timeout: float = 10.0,
        stop_timeout: float = 2.0,
        backend: str = "sim",
        top: str = "",
        **sim: object,
    ) -> None:
        """Rewrite this test's config: sim faults by their config keys."""
        faults = "".join(f"{key} = {_toml(value)}\n" for key, value in sim.items())
        d = self.denv
        d.config_path.write_text(
            f'install_dir = "{d.install_dir}"\n{top}\n'
            f'[runtime]\nbackend = "{backend}"\nstartup_timeout = {startup_timeout}\n'
            f"stop_timeout = {stop_timeout}\n"
            f"[runtime.sim]\nstartup_delay = {startup_delay}\n{faults}"
            f'[proxy]\nhost = "127.0.0.1"\nport = {d.proxy_port}\n'
            f"backend_port = {d.backend_port}\n"
            "[restart]\nbackoff_initial = 0.1\nbackoff_max = 0.5\n"
        )

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "cxrd", "--config", str(self.denv.config_path)]

    def spawn(self) -> subprocess.Popen[bytes]:
        """Run cxrd on the bus; it takes the name and starts the runtime by itself."""
        with (self.denv.tmp / "cxrd.stderr").open("ab") as stderr:
            proc = subprocess.Popen(
                self.argv(),
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def start(self) -> subprocess.Popen[bytes]:
        """Run cxrd and return once it is ready."""
        proc = self.spawn()
        self.wait_ready()
        return proc

    def wait_ready(self) -> None:
        with CloudXRClient(self.address) as client:
            try:
                client.wait_ready(TIMEOUT)
            except Exception as exc:
                raise AssertionError(f"cxrd not ready: {exc}\n{self.denv.daemon_log()}") from exc

    def enable_activation(self) -> None:
        """The bus starts this test's cxrd on the first call that asks for it."""
        self.bus.add_activation(
            ["/usr/bin/env", *(f"{k}={v}" for k, v in self._child_env().items()), *self.argv()],
            stderr=self.denv.tmp / "cxrd.stderr",
        )

    def _child_env(self) -> dict[str, str]:
        keep = ("XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "PYTHONUNBUFFERED", "PATH", "HOME")
        return {k: self.denv.env[k] for k in keep if k in self.denv.env}

    def daemon_pids(self) -> list[int]:
        """Every live cxrd process of this test's config (spawned or activated)."""
        found = []
        needle = str(self.denv.config_path).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if b"cxrd" in cmdline and needle in cmdline and b"/usr/bin/env" not in cmdline[0]:
                found.append(int(entry.name))
        return found

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # Activated daemons are not our children: find them by their config.
        for pid in self.daemon_pids():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + TIMEOUT
        while self.daemon_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in self.daemon_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue


@pytest.fixture
def bus_daemon(private_bus: PrivateBus, daemon_env: DaemonEnv) -> Iterator[BusDaemon]:
    """cxrd (sim runtime, private dirs and ports) on a private bus; not started yet."""
    daemon = BusDaemon(private_bus, daemon_env)
    try:
        yield daemon
    finally:
        daemon.cleanup()


@pytest.fixture
def ready_daemon(bus_daemon: BusDaemon) -> BusDaemon:
    """As ``bus_daemon``, started and ready."""
    bus_daemon.start()
    return bus_daemon
