"""cxrd.launcher.CloudXRLauncher: isaacteleop's shape, backed by a real cxrd over a real bus."""

from __future__ import annotations

import argparse
import inspect
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_dbus import BusDaemon
from support import TIMEOUT

from cxrd.client import CloudXRClient
from cxrd.core.states import State
from cxrd.launcher import CloudXRLauncher, NoopContext


@pytest.fixture
def clean_environ() -> Iterator[None]:
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_constructor_and_members_match_isaacteleops_launcher() -> None:
    theirs = pytest.importorskip("isaacteleop.cloudxr.launcher").CloudXRLauncher
    ours_params = inspect.signature(CloudXRLauncher.__init__).parameters
    for name, param in inspect.signature(theirs.__init__).parameters.items():
        assert name in ours_params, f"missing constructor argument {name}"
        if name == "start_wss_proxy" and param.default is True:
            # isaacteleop 1.4: on by default. cxrd always runs the proxy and takes the
            # argument as a deprecated no-op (None: not given), as 1.5 does.
            assert ours_params[name].default is None
            continue
        assert ours_params[name].default == param.default, name
    # Every public member of the installed isaacteleop's launcher (1.4 has fewer than 1.5).
    public = {name for name in dir(theirs) if not name.startswith("_")}
    assert {"health_check", "stop", "wss_log_path", "launch_context"} <= public
    for member in public | {"__enter__", "__exit__"}:
        assert hasattr(CloudXRLauncher, member), member
    for member in ("run_dir", "env_file", "owns_runtime"):  # 1.5's, whichever is installed
        assert hasattr(CloudXRLauncher, member), member


def test_launcher_starts_cxrd_adopts_its_environment_and_lets_go(
    bus_daemon: BusDaemon, clean_environ: None
) -> None:
    bus_daemon.enable_activation()
    with CloudXRLauncher(
        install_dir=str(bus_daemon.denv.install_dir), bus_address=bus_daemon.address
    ) as launcher:
        launcher.health_check()
        assert not launcher.owns_runtime
        assert os.environ["NV_CXR_RUNTIME_DIR"] == str(launcher.run_dir)
        assert launcher.env_file.is_file()
        log = launcher.wss_log_path
        assert log is not None and log.exists()
        with CloudXRClient(bus_daemon.address) as client:
            (lease,) = client.status().leases
            assert lease.pid == os.getpid() and "CloudXRLauncher" in lease.reason
    with CloudXRClient(bus_daemon.address) as client:
        snap = client.status()
        # Attached, not owned: the runtime outlives the script; the lease is gone.
        assert snap.state is State.READY and snap.leases == ()


def test_health_check_raises_runtime_error_once_the_runtime_is_gone(
    ready_daemon: BusDaemon, clean_environ: None
) -> None:
    launcher = CloudXRLauncher(bus_address=ready_daemon.address)
    try:
        with CloudXRClient(ready_daemon.address) as client:
            client.stop(timeout=TIMEOUT)
        with pytest.raises(RuntimeError, match="stopped"):
            launcher.health_check()
    finally:
        launcher.stop()


def test_run_embedded_owns_the_runtime_and_stops_cxrd_on_exit(
    bus_daemon: BusDaemon, clean_environ: None
) -> None:
    bus_daemon.enable_activation()
    with CloudXRLauncher(run_embedded=True, bus_address=bus_daemon.address) as launcher:
        assert launcher.owns_runtime
        launcher.health_check()
    with CloudXRClient(bus_daemon.address) as client:
        assert not client.is_running()


def test_run_embedded_is_refused_beside_a_running_runtime(
    ready_daemon: BusDaemon, clean_environ: None
) -> None:
    with pytest.raises(RuntimeError, match="run_embedded"):
        CloudXRLauncher(run_embedded=True, bus_address=ready_daemon.address)


def _in_use(daemon: BusDaemon) -> int:
    """A client's Start has been answered: the runtime's settings are claimed. Its pid."""
    with CloudXRClient(daemon.address) as client:
        return client.start(timeout=TIMEOUT).runtime.pid


def test_a_profile_and_env_file_are_given_to_a_runtime_nobody_uses_yet(
    bus_daemon: BusDaemon, clean_environ: None, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    bus_daemon.enable_activation()  # the launcher's own call activates cxrd
    profile = tmp_path / "cloudxrjs-cloudxr.env"
    profile.write_text("NV_DEVICE_PROFILE=auto-webrtc\nNV_CXR_ENABLE_PUSH_DEVICES=0\n")
    with (
        caplog.at_level(logging.WARNING, logger="cxrd.launcher"),
        CloudXRLauncher(
            install_dir=str(bus_daemon.denv.install_dir),
            env_config=profile,
            bus_address=bus_daemon.address,
            timeout=TIMEOUT,
        ) as launcher,
    ):
        launcher.health_check()
        assert os.environ["NV_DEVICE_PROFILE"] == "auto-webrtc"
        assert os.environ["NV_CXR_ENABLE_PUSH_DEVICES"] == "0"
        with CloudXRClient(bus_daemon.address) as client:
            snap = client.status()
        assert [lease.reason for lease in snap.leases] == [f"CloudXRLauncher (pid {os.getpid()})"]
        assert snap.requested == {
            "device_profile": "auto-webrtc",
            "NV_CXR_ENABLE_PUSH_DEVICES": "0",
        }
    assert caplog.records == [], "nothing to warn about: the runtime runs as asked"


def test_another_profile_attaches_with_a_warning(
    ready_daemon: BusDaemon, clean_environ: None, caplog: pytest.LogCaptureFixture
) -> None:
    _in_use(ready_daemon)
    with (
        caplog.at_level(logging.WARNING, logger="cxrd.launcher"),
        CloudXRLauncher(device_profile="AppleVisionPro", bus_address=ready_daemon.address),
    ):
        assert os.environ["NV_DEVICE_PROFILE"] == "Quest3"
    assert "AppleVisionPro" in caplog.text


def test_env_config_differences_are_reported_one_line_per_key_and_attach(
    ready_daemon: BusDaemon, clean_environ: None, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    # Isaac Lab's quest3 profile, lower-case as it ships, with push devices off.
    profile = tmp_path / "quest3.env"
    profile.write_text("NV_DEVICE_PROFILE=quest3\nNV_CXR_ENABLE_PUSH_DEVICES=0\nMY_KEY=x\n")
    pid = _in_use(ready_daemon)
    with (
        caplog.at_level(logging.WARNING, logger="cxrd.launcher"),
        CloudXRLauncher(
            install_dir=str(ready_daemon.denv.install_dir),
            env_config=profile,
            bus_address=ready_daemon.address,
        ) as launcher,
    ):
        launcher.health_check()
        assert os.environ["NV_DEVICE_PROFILE"] == "Quest3"
        assert launcher._status().runtime.pid == pid, "a runtime in use is left as it is"
    lines = [r.getMessage() for r in caplog.records]
    switch = f"`cxrctl restart --env-file {profile}` switches it"
    assert lines == [
        f"{profile}: MY_KEY=x is not applied: the runtime in use has (not set); {switch}",
        f"{profile}: NV_CXR_ENABLE_PUSH_DEVICES=0 is not applied: the runtime in use has true; "
        f"{switch}",
    ], "quest3 is the running Quest3: no line for it, and no profile mismatch"


def test_failure_is_a_runtime_error_with_the_cxrd_error_as_cause(
    bus_daemon: BusDaemon, clean_environ: None
) -> None:
    # Nobody serves the name and nothing can activate it.
    with pytest.raises(RuntimeError) as caught:
        CloudXRLauncher(bus_address=bus_daemon.address, timeout=TIMEOUT)
    assert "cxrctl install" in str(caught.value)
    assert caught.value.__cause__ is not None


def test_launch_context_honours_no_launch_flag(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    CloudXRLauncher.add_launcher_arguments(parser)
    args = parser.parse_args(["--no-launch-cloudxr-runtime", "--cloudxr-device-profile", "X"])
    assert args.cloudxr_device_profile == "X"
    context = CloudXRLauncher.launch_context(args)
    assert isinstance(context, NoopContext)
    with context as entered:
        entered.health_check()
        assert entered.wss_log_path is None and not entered.owns_runtime
