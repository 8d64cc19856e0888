"""Isaac Lab 3.0's own CloudXR code (and the real isaacteleop it pins) against a real cxrd.

``tests/isaaclab_session.py`` runs ``TeleopSessionLifecycle._ensure_cloudxr_runtime()``
and ``stop()`` out of the Isaac Lab 3.0.0 wheel, as a program with ``HOME`` in
this test's tmp dir, so Isaac Lab's ``~/.cloudxr`` is the install dir cxrd (sim
runtime, private bus) serves. Both come from ``.cache/``, which
``scripts/setup.sh`` fills; nothing is fetched here.

cxrd runs with the profile Isaac Lab asks for (``cloudxrjs-cloudxr.env``), as a
user would start it for Isaac Lab, so no request here has a reason to restart
the runtime.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fixtures_dbus import BusDaemon
from support import TIMEOUT, wait_until

from cxrd.client import CloudXRClient
from cxrd.core.snapshot import Snapshot

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
ISAACLAB = CACHE / "isaaclab-3.0.0"
PROFILE = ISAACLAB / "isaaclab_teleop" / "cloudxrjs-cloudxr.env"
SCRIPT = Path(__file__).resolve().parent / "isaaclab_session.py"

VERSIONS = ("1.4.145", "1.5.175")

# Isaac Lab's variables, never inherited from whoever runs the tests.
_SCRUB = ("ISAACLAB_CXR_", "NV_CXR_", "NV_DEVICE_PROFILE", "XR_RUNTIME_JSON", "CXR_", "PYTHONPATH")


def teleop_dir(version: str) -> Path:
    return CACHE / f"isaacteleop-{version}"


def needs(version: str) -> pytest.MarkDecorator:
    """Skip where setup.sh has not fetched Isaac Lab and isaacteleop ``version``; never in CI,
    whose setup.sh run fetches them."""
    missing = [p for p in (teleop_dir(version) / "isaacteleop", PROFILE) if not p.exists()]
    return pytest.mark.skipif(
        bool(missing) and not os.environ.get("CI"),
        reason=f"{', '.join(str(p.relative_to(ROOT)) for p in missing)} missing: "
        f"scripts/setup.sh fetches Isaac Lab 3.0.0 and isaacteleop {version} into .cache/",
    )


@dataclass
class IsaacLab:
    """cxrd serving ``<home>/.cloudxr``, the install dir Isaac Lab uses with HOME=home."""

    daemon: BusDaemon
    home: Path

    @property
    def run_dir(self) -> Path:
        return self.daemon.denv.run_dir

    @property
    def env_file(self) -> Path:
        return self.run_dir / "cloudxr.env"

    def status(self) -> Snapshot:
        with CloudXRClient(self.daemon.address) as client:
            return client.status()

    def cxrctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cxrd.cli", *args],
            env={**self.daemon.env, "HOME": str(self.home)},
            capture_output=True,
            text=True,
            timeout=4 * TIMEOUT,
            stdin=subprocess.DEVNULL,
        )


@pytest.fixture
def isaaclab(bus_daemon: BusDaemon, tmp_path: Path) -> IsaacLab:
    home = tmp_path / "home"
    home.mkdir()
    denv = bus_daemon.denv
    denv.install_dir = home / ".cloudxr"
    denv.env["HOME"] = str(home)
    # As BusDaemon.configure writes it, plus Isaac Lab's profile in [runtime].
    denv.config_path.write_text(
        f'install_dir = "{denv.install_dir}"\n'
        '[runtime]\nbackend = "sim"\nstartup_timeout = 10.0\nstop_timeout = 2.0\n'
        'device_profile = "auto-webrtc"\n'
        'env = { NV_CXR_ENABLE_PUSH_DEVICES = "0", NV_ENABLE_POSE_WAIT = "0" }\n'
        "[runtime.sim]\nstartup_delay = 0.1\n"
        f'[proxy]\nhost = "127.0.0.1"\nport = {denv.proxy_port}\n'
        f"backend_port = {denv.backend_port}\n"
        "[restart]\nbackoff_initial = 0.1\nbackoff_max = 0.5\n"
    )
    lab = IsaacLab(bus_daemon, home)
    # The user accepted the EULA once (isaacteleop 1.4 checks the marker before anything else).
    accepted = lab.cxrctl("accept-eula", "--yes", "--install-dir", str(denv.install_dir))
    assert accepted.returncode == 0, accepted.stderr
    bus_daemon.start()
    return lab


class Session:
    """isaaclab_session.py running; its JSON lines as they come."""

    def __init__(self, lab: IsaacLab, version: str, *, under_run: bool) -> None:
        self.go = lab.home / "go"  # stop() once this exists
        env = {k: v for k, v in lab.daemon.env.items() if not k.startswith(_SCRUB)} | {
            "HOME": str(lab.home)
        }
        # PYTHONPATH on the session alone (env(1)), so cxrctl itself runs as installed.
        path = os.pathsep.join((str(teleop_dir(version)), str(ISAACLAB)))
        argv = [
            "/usr/bin/env",
            f"PYTHONPATH={path}",
            sys.executable,
            str(SCRIPT),
            f"--env-file={PROFILE}",
            f"--wait-for={self.go}",
            f"--timeout={4 * TIMEOUT}",
        ]
        if under_run:
            argv = [sys.executable, "-m", "cxrd.cli", "run", f"--env-file={PROFILE}", "--", *argv]
        self.stderr_path = lab.home / "session.stderr"
        with self.stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                start_new_session=True,
            )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def line(self, phase: str) -> dict[str, Any]:
        """The next JSON line, which must be ``phase``'s."""
        try:
            text = self._lines.get(timeout=4 * TIMEOUT)
        except queue.Empty:
            raise AssertionError(
                f"no {phase} line within {4 * TIMEOUT:g} s\n{self.stderr()}"
            ) from None
        if text is None:
            raise AssertionError(
                f"exit {self.proc.wait()} before the {phase} line\n{self.stderr()}"
            )
        data: dict[str, Any] = json.loads(text)
        assert data["phase"] == phase, data
        return data

    def stop(self) -> dict[str, Any]:
        """Let Isaac Lab call stop(); its line, once the program (and cxrctl run) exited 0."""
        self.go.touch()
        done = self.line("stop")
        assert self.proc.wait(timeout=4 * TIMEOUT) == 0, self.stderr()
        return done

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def session(isaaclab: IsaacLab) -> Iterator[list[Session]]:
    started: list[Session] = []
    yield started
    for one in started:
        one.kill()


def start(lab: IsaacLab, sessions: list[Session], version: str, *, under_run: bool) -> Session:
    one = Session(lab, version, under_run=under_run)
    sessions.append(one)
    return one


def assert_cxrds_environment(environ: dict[str, str | None], snap: Snapshot) -> None:
    """What Isaac Lab's process now points OpenXR at is cxrd's runtime."""
    for key in ("XR_RUNTIME_JSON", "NV_CXR_RUNTIME_DIR", "NV_CXR_SERVER_PORT", "NV_DEVICE_PROFILE"):
        assert environ[key] == snap.environment.get(key), key
    assert environ["NV_CXR_SERVER_PORT"] == str(snap.signaling_port)


@pytest.mark.parametrize("version", [pytest.param(v, marks=needs(v)) for v in VERSIONS])
def test_isaaclab_under_cxrctl_run_uses_cxrds_runtime_and_holds_a_lease(
    isaaclab: IsaacLab, session: list[Session], version: str
) -> None:
    before = isaaclab.status()
    env_bytes = isaaclab.env_file.read_bytes()
    one = start(isaaclab, session, version, under_run=True)

    ensured = one.line("ensure")
    assert ensured["isaacteleop"] == version
    assert ensured["error"] is None, ensured
    assert not ensured["launched"]  # skipped: ISAACLAB_CXR_SKIP_AUTOLAUNCH=1
    assert ensured["before"]["ISAACLAB_CXR_SKIP_AUTOLAUNCH"] == "1"
    assert_cxrds_environment(ensured["environ"], before)
    during = isaaclab.status()
    assert [lease.pid for lease in during.leases] == [one.proc.pid], during.leases

    assert one.stop() == {"phase": "stop", "error": None, "retained": False}
    after = wait_until(lambda: (s := isaaclab.status()).leases == () and s, "the lease to end")
    assert after.runtime.pid == before.runtime.pid
    assert isaaclab.env_file.read_bytes() == env_bytes
    assert not after.env_file_event


@needs("1.4.145")
def test_isaaclab_on_isaacteleop_1_4_rewrites_the_env_file_fails_and_cxrd_restores_it(
    isaaclab: IsaacLab, session: list[Session]
) -> None:
    before = isaaclab.status()
    env_bytes = isaaclab.env_file.read_bytes()
    one = start(isaaclab, session, "1.4.145", under_run=False)

    # What Isaac Lab sees: its launcher refuses, after rewriting the file.
    ensured = one.line("ensure")
    assert ensured["error"] == {
        "type": "RuntimeError",
        "message": f"A CloudXR runtime is already serving {isaaclab.run_dir}. "
        "Stop it before starting a new one.",
    }
    assert not ensured["launched"]
    # Its EnvConfig set os.environ from the file it wrote: the right paths, but no
    # NV_CXR_SERVER_PORT (1.4 knows only its defaults; cxrd's port here is not one).
    environ = ensured["environ"]
    assert environ["XR_RUNTIME_JSON"] == before.environment["XR_RUNTIME_JSON"]
    assert environ["NV_CXR_SERVER_PORT"] is None
    assert environ["NV_CXR_GPU_INDEX_CUDA"] == "0"  # Isaac Lab pinned its render GPU
    assert one.stop() == {"phase": "stop", "error": None, "retained": False}

    # What cxrd does about it: puts the file back and says so.
    def restored() -> Snapshot | None:
        snap = isaaclab.status()
        return snap if snap.env_file_event else None

    event = wait_until(restored, "cxrd to report the rewrite").env_file_event
    assert "rewritten by another program at " in event and event.endswith(", restored"), event
    wait_until(lambda: isaaclab.env_file.read_bytes() == env_bytes, "cloudxr.env restored")
    shown = isaaclab.cxrctl("status")
    assert event in shown.stdout, shown.stdout
    assert isaaclab.status().runtime.pid == before.runtime.pid


@needs("1.5.175")
def test_isaaclab_on_isaacteleop_1_5_attaches_to_cxrds_runtime(
    isaaclab: IsaacLab, session: list[Session]
) -> None:
    before = isaaclab.status()
    env_bytes = isaaclab.env_file.read_bytes()
    one = start(isaaclab, session, "1.5.175", under_run=False)

    ensured = one.line("ensure")
    assert ensured["error"] is None, ensured
    assert ensured["launched"] and ensured["owns_runtime"] is False
    assert_cxrds_environment(ensured["environ"], before)
    assert isaaclab.status().leases == ()  # isaacteleop knows nothing of cxrd
    # The one line a user sees (1.5.175 also warns that "the requested Quest3 is
    # ignored": Isaac Lab gives it the profile in env_config, not device_profile).
    assert f"Attached to the CloudXR runtime serving {isaaclab.run_dir}" in one.stderr()
    assert one.stop() == {"phase": "stop", "error": None, "retained": False}

    after = isaaclab.status()
    assert after.runtime.pid == before.runtime.pid
    assert isaaclab.env_file.read_bytes() == env_bytes
    assert not after.env_file_event
