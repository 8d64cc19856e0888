"""The chaos soak's daemon: its private files and ports, its config with each reload's edit.

Each valid and invalid reload of the plan (``chaos_plan``) is one edit of this
config file: ``Layout.write_config(edit)`` writes the file as it is after it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import free_port

STARTUP_DELAY = 0.1
STARTUP_TIMEOUT = 10.0
STOP_TIMEOUT = 2.0


@dataclass
class Layout:
    """The daemon's private files and ports."""

    workdir: Path
    proxy_port: int = field(default_factory=free_port)
    backend_port: int = field(default_factory=free_port)

    @property
    def install_dir(self) -> Path:
        return self.workdir / "cloudxr"

    @property
    def config(self) -> Path:
        return self.workdir / "cxrd.toml"

    @property
    def log(self) -> Path:
        return self.workdir / "cxrd.stderr"

    def write_config(self, edit: str = "") -> None:
        """The soak's config, with one edit (a reload's change) applied."""
        max_connections: object = 64
        env = {"CHAOS": "1"}
        profile, delay = "Quest3", STARTUP_DELAY
        key, _, value = edit.partition("=")
        if key == "max_connections":
            max_connections = int(value)
        elif key == "env":
            env["CHAOS_GENERATION"] = value
        elif key == "max_connections_type":
            max_connections = "many"
        elif key == "max_connections_zero":
            max_connections = 0
        elif key == "reserved_env":
            env["XR_RUNTIME_JSON"] = "/tmp/elsewhere.json"
        elif key == "env_newline":
            env["CHAOS_GENERATION"] = "two\nlines"
        elif key == "profile_space":
            profile = "Quest 3"
        elif key == "sim_negative":
            delay = -1.0
        elif key:
            raise ValueError(f"unknown config edit {edit!r}")
        env_toml = ", ".join(f"{k} = {json.dumps(v)}" for k, v in env.items())
        self.config.write_text(
            f"install_dir = {json.dumps(str(self.install_dir))}\n"
            "[runtime]\n"
            'backend = "sim"\n'
            f"startup_timeout = {STARTUP_TIMEOUT}\nstop_timeout = {STOP_TIMEOUT}\n"
            f"device_profile = {json.dumps(profile)}\n"
            f"env = {{ {env_toml} }}\n"
            f"[runtime.sim]\nstartup_delay = {delay}\n"
            '[proxy]\nhost = "127.0.0.1"\n'
            f"port = {self.proxy_port}\nbackend_port = {self.backend_port}\n"
            f"max_connections = {json.dumps(max_connections)}\n"
            # Kills are the point here, not giving up: the restart budget is large.
            "[restart]\nmax_restarts = 100000\nwindow = 60.0\n"
            "backoff_initial = 0.05\nbackoff_max = 0.2\n"
        )

    def env(self, address: str) -> dict[str, str]:
        drop = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "LISTEN_FDS")
        env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("CXRD_")}
        runtime_dir = self.workdir / "xdg-runtime"
        runtime_dir.mkdir(mode=0o700, exist_ok=True)
        env.update(
            DBUS_SESSION_BUS_ADDRESS=address,
            XDG_RUNTIME_DIR=str(runtime_dir),
            XDG_CONFIG_HOME=str(self.workdir / "config"),
            PYTHONUNBUFFERED="1",
        )
        return env
