"""Fixtures: a real ``cxrd`` daemon process, a real NOTIFY_SOCKET, a sim config."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support import TIMEOUT, free_port


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET; records every message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[dict[str, str]] = []
        self.raw: list[str] = []
        self._cond = threading.Condition()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._closed = False
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            text = data.decode()
            fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
            # The moment it arrived, for ordering checks against files.
            fields["_t"] = repr(time.monotonic())
            with self._cond:
                self.raw.append(text)
                self.messages.append(fields)
                self._cond.notify_all()

    def wait_for(
        self, predicate: Callable[[dict[str, str]], bool], timeout: float = TIMEOUT
    ) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for msg in self.messages[seen:]:
                    if predicate(msg):
                        return msg
                seen = len(self.messages)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no matching sd_notify message within {timeout} s; got {self.raw}"
                    )
                self._cond.wait(left)

    def statuses(self) -> list[str]:
        with self._cond:
            return [m["STATUS"] for m in self.messages if "STATUS" in m]

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=TIMEOUT)
        self._sock.close()


@dataclass
class DaemonEnv:
    """Where one test's daemon lives: install dir, config, ports, environment."""

    tmp: Path
    install_dir: Path
    config_path: Path
    proxy_port: int
    backend_port: int
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return self.install_dir / "run"

    @property
    def logs_dir(self) -> Path:
        return self.install_dir / "logs"

    def write_config(
        self,
        text: str = "",
        *,
        sim: str = "",
        runtime: str = "",
        restart: str = "",
        backend: str = "sim",
        proxy: bool = True,
    ) -> None:
        """A config on this test's dirs and ports; the strings add keys to their tables."""
        if "startup_delay" not in sim:
            sim = f"startup_delay = 0.1\n{sim}"
        sim_table = f"\n[runtime.sim]\n{sim}\n" if backend == "sim" else ""
        self.config_path.write_text(
            f'install_dir = "{self.install_dir}"\n'
            + text
            + "\n[runtime]\n"
            + f'backend = "{backend}"\nstop_timeout = 2.0\n{runtime}\n'
            + sim_table
            + f"\n[proxy]\nenabled = {'true' if proxy else 'false'}\n"
            + f'host = "127.0.0.1"\nport = {self.proxy_port}\nbackend_port = {self.backend_port}\n'
            + f"\n[restart]\nbackoff_initial = 0.1\nbackoff_max = 0.5\n{restart}\n"
        )

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.tmp / "cxrd.stderr", "ab") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cxrd", "--config", str(self.config_path), *args],
                env={**self.env, **(env or {})},
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def daemon_log(self) -> str:
        return (self.tmp / "cxrd.stderr").read_text(errors="replace")

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


@pytest.fixture
def daemon_env(tmp_path: Path, notify: NotifySocket) -> Iterator[DaemonEnv]:
    """A private install dir, a sim config, NOTIFY_SOCKET; no session bus."""
    runtime_dir = tmp_path / "xdg-runtime"
    runtime_dir.mkdir(mode=0o700)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DBUS_SESSION_BUS_ADDRESS", "JOURNAL_STREAM", "WATCHDOG_USEC")
        and not k.startswith("CXRD_SIM_")
    }
    env.update(
        NOTIFY_SOCKET=str(notify.path),
        XDG_RUNTIME_DIR=str(runtime_dir),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        PYTHONUNBUFFERED="1",
    )
    denv = DaemonEnv(
        tmp=tmp_path,
        install_dir=tmp_path / "cloudxr",
        config_path=tmp_path / "cxrd.toml",
        proxy_port=free_port(),
        backend_port=free_port(),
        env=env,
    )
    denv.write_config()
    yield denv
    denv.cleanup()


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members
