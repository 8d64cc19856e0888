"""The warm cxrd that ``bench/run_overhead.py`` measures ``cxrctl`` against.

``warm_cxrd(delay)`` starts a private ``dbus-daemon`` and ``python -m cxrd`` on
it with the sim runtime (a ``delay`` s startup delay), free loopback ports and
a throwaway ``HOME``/``XDG_CONFIG_HOME`` in a temp dir (never ``~/.cloudxr``),
and yields once ``cxrctl wait`` says the runtime is ready. ``Stand.env`` is
the environment every command of the bench runs in: the caller's, less what
``SCRUB`` names, so no knob of whoever runs the bench leaks into a figure.
Apart from ``run_overhead.py`` only to keep that file short; nothing else uses it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from benchlib import free_port, private_bus

CXRCTL = Path(sys.executable).parent / "cxrctl"
WAIT = 60.0  # seconds: the bound on every wait here

# Never inherited from whoever runs the bench: Isaac Lab's, the runtime's and the sim's knobs.
SCRUB = (
    "ISAACLAB_CXR_",
    "NV_CXR_",
    "NV_DEVICE_PROFILE",
    "XR_RUNTIME_JSON",
    "CXR_",
    "CXRD_",
    "PYTHONPATH",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "JOURNAL_STREAM",
    "DBUS_SESSION_BUS_ADDRESS",
    "PROXY_PORT",
    "LD_PRELOAD",
)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUB)}
    env.update(extra)
    return env


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=WAIT)


class Stand:
    """A warm cxrd (sim runtime) on a private bus, and the environment cxrctl runs in."""

    def __init__(self, tmp: Path, address: str, delay: float) -> None:
        self.tmp = tmp
        self.home = tmp / "home"
        config_home = tmp / "config"
        (config_home / "cxrd").mkdir(parents=True)
        self.home.mkdir()
        self.config = config_home / "cxrd" / "cxrd.toml"
        # As tests/test_isaaclab.py runs it: the profile Isaac Lab asks for, so
        # nothing here gives the runtime a reason to restart.
        self.config.write_text(
            f'install_dir = "{self.home / ".cloudxr"}"\n'
            '[runtime]\nbackend = "sim"\nstartup_timeout = 30.0\nstop_timeout = 5.0\n'
            f'device_profile = "auto-webrtc"\nsignaling_port = {free_port()}\n'
            'env = { NV_CXR_ENABLE_PUSH_DEVICES = "0", NV_ENABLE_POSE_WAIT = "0" }\n'
            f"[runtime.sim]\nstartup_delay = {delay!r}\n"
            f'[proxy]\nhost = "127.0.0.1"\nport = {free_port()}\n'
        )
        self.env = clean_env(
            DBUS_SESSION_BUS_ADDRESS=address,
            HOME=str(self.home),
            XDG_CONFIG_HOME=str(config_home),
        )
        self.log = tmp / "cxrd.log"
        with self.log.open("ab") as log:
            self.daemon = subprocess.Popen(
                [sys.executable, "-m", "cxrd", "--config", str(self.config)],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        try:
            self.cxrctl("wait", "--timeout", str(delay + 30))
        except BaseException:
            self.close()
            raise

    def cxrctl(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return self.check([str(CXRCTL), *args])

    def check(
        self, argv: list[str], env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        done = subprocess.run(
            argv,
            env=self.env if env is None else env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=WAIT,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode(errors='replace')}"
                f"\n--- cxrd ---\n{self.log.read_text(errors='replace')[-3000:]}"
            )
        return done

    def timed(self, argv: list[str]) -> float:
        """Milliseconds from spawn to exit (exit 0 required)."""
        began = time.perf_counter()
        self.check(argv)
        return (time.perf_counter() - began) * 1e3

    def runtime_pid(self) -> int:
        snap = json.loads(self.cxrctl("status", "--json").stdout)
        return int(snap["runtime"]["pid"])

    def close(self) -> None:
        stop_process(self.daemon)


@contextmanager
def warm_cxrd(delay: float) -> Iterator[Stand]:
    with (
        tempfile.TemporaryDirectory(prefix="cxrd-bench-run-") as name,
        private_bus(Path(name)) as address,
    ):
        stand = Stand(Path(name), address, delay)
        try:
            yield stand
        finally:
            stand.close()
