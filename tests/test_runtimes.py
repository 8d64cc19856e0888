"""Runtime backends: the environment isaacteleop would give, and real launches of each."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import TIMEOUT, free_port
from websockets.asyncio.client import connect

import cxrd
from cxrd import constants as C
from cxrd.config import Config, load_config
from cxrd.errors import EulaNotAccepted, InvalidArgs, InvalidConfig, RuntimeUnavailable
from cxrd.runtimes import RuntimeLaunch, prepare_runtime
from cxrd.sim import faults as F
from cxrd.system import eula
from cxrd.system.envfile import read_env_file
from cxrd.system.readiness import wait_for_file

HAS_ISAACTELEOP = importlib.util.find_spec("isaacteleop") is not None
needs_isaacteleop = pytest.mark.skipif(not HAS_ISAACTELEOP, reason="isaacteleop not installed")


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    empty = tmp_path / "cxrd.toml"
    empty.touch()
    values = {"install_dir": str(tmp_path / "cloudxr"), **overrides}
    return load_config(empty, overrides=values)


@contextlib.contextmanager
def spawned(launch: RuntimeLaunch) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``launch.spec`` the way the daemon does: own session, stderr appended to a file."""
    spec = launch.spec
    with open(spec.stderr, "ab") as err:
        proc = subprocess.Popen(
            spec.argv,
            env=dict(spec.env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)


def clean_env() -> dict[str, str]:
    """This environment without anything that would configure a CloudXR runtime."""
    prefixes = ("NV_", "XR", "CXR", "ISAAC_TELEOP", "LD_PRELOAD")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


# --- the environment every backend gives --------------------------------------------------


@needs_isaacteleop
def test_environment_is_exactly_what_isaacteleop_env_config_resolves(tmp_path: Path) -> None:
    install = tmp_path / "cloudxr"
    code = (
        "import sys\n"
        "from isaacteleop.cloudxr.env_config import EnvConfig\n"
        "defaults = {'NV_DEVICE_PROFILE': 'Quest3'}\n"
        "cfg = EnvConfig.from_args(sys.argv[1], launcher_defaults=defaults)\n"
        "print(cfg.env_filepath())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(install)],
        env=clean_env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=TIMEOUT * 3,
    ).stdout
    theirs = read_env_file(Path(out.strip().splitlines()[-1]))

    launch = prepare_runtime(make_config(tmp_path, **{"runtime.backend": "sim"}))

    assert dict(launch.environment) == theirs


def test_environment_layers_profile_user_env_and_computed_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NV_CXR_OUTPUT_DIR", "/somewhere/else")
    monkeypatch.setenv("CXRD_TEST_DAEMON_ONLY", "kept")
    config = make_config(
        tmp_path,
        **{
            "runtime.backend": "sim",
            "runtime.device_profile": "Quest3",
            "runtime.env": {"NV_CXR_ENABLE_PUSH_DEVICES": "false", "MY_FLAG": "it's on"},
        },
    )
    launch = prepare_runtime(config, device_profile="auto-webrtc")
    env = launch.environment
    install = config.install_path
    assert env["NV_DEVICE_PROFILE"] == "auto-webrtc", "Start()'s profile beats the config's"
    assert env["NV_CXR_ENABLE_PUSH_DEVICES"] == "false"
    assert env["NV_CXR_ENABLE_TENSOR_DATA"] == "true"
    assert env["MY_FLAG"] == "it's on"
    assert env["NV_CXR_OUTPUT_DIR"] == str(install / "logs")
    assert env["XR_RUNTIME_JSON"] == str(install / "openxr_cloudxr.json")
    assert env["NV_CXR_RUNTIME_DIR"] == str(install / "run")
    assert env["CXR_INSTALL_DIR"] == env["CXR_HOST_VOLUME_PATH"] == str(install)
    assert env["XRT_NO_STDIN"] == "true"
    assert "CXRD_TEST_DAEMON_ONLY" not in env
    # The child gets the daemon's environment under the runtime's.
    assert launch.spec.env["CXRD_TEST_DAEMON_ONLY"] == "kept"
    assert launch.spec.env["NV_CXR_OUTPUT_DIR"] == str(install / "logs")
    assert prepare_runtime(config).environment["NV_DEVICE_PROFILE"] == "Quest3"


def test_prepare_makes_a_private_run_dir_and_logs_but_writes_no_env_file(tmp_path: Path) -> None:
    config = make_config(tmp_path, **{"runtime.backend": "sim"})
    launch = prepare_runtime(config)
    assert stat.S_IMODE(config.run_dir.stat().st_mode) == 0o700
    assert config.logs_dir.is_dir()
    assert not (config.run_dir / C.ENV_FILE).exists()
    assert launch.stderr_log == launch.spec.stderr == config.logs_dir / C.RUNTIME_STDERR_LOG
    assert launch.logs_dir == config.logs_dir


def test_a_line_break_in_runtime_env_is_a_config_error(tmp_path: Path) -> None:
    config_file = tmp_path / "cxrd.toml"
    config_file.write_text(
        f'install_dir = "{tmp_path}/cloudxr"\n[runtime]\nbackend = "sim"\n'
        'env = { MY_NOTE = "two\\nlines" }\n'
    )
    with pytest.raises(InvalidConfig, match=r"cxrd.toml: runtime.env.MY_NOTE: .*line break"):
        prepare_runtime(load_config(config_file))


@pytest.mark.parametrize("profile", ["", "Quest 3", "Quest3\n"])
def test_a_malformed_device_profile_option_is_invalid_args(tmp_path: Path, profile: str) -> None:
    with pytest.raises(InvalidArgs, match="device_profile"):
        prepare_runtime(make_config(tmp_path, **{"runtime.backend": "sim"}), device_profile=profile)


# --- isaacteleop ---------------------------------------------------------------------------


def missing_driver_library() -> str | None:
    """The library the real runtime fails on here, first in the order it loads them."""
    for name in ("libvulkan.so.1", "libcuda.so.1"):
        try:
            ctypes.CDLL(name)
        except OSError:
            return name
    return None


@needs_isaacteleop
def test_isaacteleop_needs_the_eula_accepted(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with pytest.raises(EulaNotAccepted, match="cxrctl accept-eula") as caught:
        prepare_runtime(config)
    assert eula.EULA_URL in str(caught.value)
    eula.accept(config.install_path)
    assert prepare_runtime(config).backend == "isaacteleop"


@needs_isaacteleop
def test_isaacteleop_runs_run_in_a_fresh_interpreter_with_bundled_openssl_preloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import isaacteleop

    monkeypatch.setenv("LD_PRELOAD", "/opt/mine.so")
    monkeypatch.setenv("ISAAC_TELEOP_CLOUDXR_EXP", "0")
    config = make_config(tmp_path)
    eula.accept(config.install_path)
    launch = prepare_runtime(config)
    native = Path(isaacteleop.__file__).parent / "cloudxr" / "native"
    assert launch.spec.argv[0] == sys.executable
    assert "isaacteleop.cloudxr.runtime import run" in launch.spec.argv[-1]
    assert launch.spec.env["LD_PRELOAD"] == (
        f"{native}/libcrypto_nvst.so.3 {native}/libssl_nvst.so.3 /opt/mine.so"
    )
    assert "LD_PRELOAD" not in launch.environment


@needs_isaacteleop
def test_isaacteleop_experimental_runtime_is_chosen_by_its_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setenv("ISAAC_TELEOP_CLOUDXR_EXP", "1")
    config = make_config(tmp_path)
    eula.accept(config.install_path)
    launch = prepare_runtime(config)
    assert "isaacteleop.cloudxr_exp.runtime import run" in launch.spec.argv[-1]
    assert "/cloudxr_exp/native/libssl_nvst.so.3" in launch.spec.env["LD_PRELOAD"]


@needs_isaacteleop
def test_isaacteleop_runtime_fails_for_real_without_a_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = missing_driver_library()
    if missing is None:
        pytest.skip("this machine has the GPU driver libraries; the runtime would start")
    for name in ("ISAAC_TELEOP_CLOUDXR_EXP", "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    config = make_config(tmp_path)
    eula.accept(config.install_path)
    launch = prepare_runtime(config)
    with spawned(launch) as proc:
        code = proc.wait(timeout=TIMEOUT * 3)
    log = launch.stderr_log.read_text()
    assert code == 1, log
    assert f"{missing}: cannot open shared object file" in log
    # run() got as far as its own setup: the OpenXR manifest sits in the install dir.
    assert (config.install_path / "openxr_cloudxr.json").is_file()
    assert not (config.run_dir / C.SENTINEL_FILE).exists()


def isaaccapture_stand_in(site: Path) -> Path:
    """A package named isaaccapture laid out like the wheel: cloudxr/runtime.py, native/.

    Its ``run()`` does what the runtime's first visible step is: it creates the
    sentinel in ``NV_CXR_RUNTIME_DIR`` (holding the ``LD_PRELOAD`` it was given).
    """
    package = site / "isaaccapture"
    native = package / "cloudxr" / "native"
    native.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "cloudxr" / "__init__.py").write_text("")
    (package / "cloudxr" / "runtime.py").write_text(
        "import os, pathlib\n"
        "def run():\n"
        "    run_dir = pathlib.Path(os.environ['NV_CXR_RUNTIME_DIR'])\n"
        f"    (run_dir / {C.SENTINEL_FILE!r}).write_text(os.environ['LD_PRELOAD'])\n"
    )
    for name in ("libcloudxr.so", "libcrypto_nvst.so.3", "libssl_nvst.so.3"):
        (native / name).write_bytes(b"")
    return native


def test_runtime_is_found_in_the_isaaccapture_namespace_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    native = isaaccapture_stand_in(site)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("ISAAC_TELEOP_CLOUDXR_EXP", "0")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    config = make_config(tmp_path)
    eula.accept(config.install_path)
    launch = prepare_runtime(config)
    assert "isaaccapture" not in sys.modules, "found, not imported (its __init__ is heavy)"
    assert launch.spec.argv[-1] == "from isaaccapture.cloudxr.runtime import run; run()"
    preload = f"{native}/libcrypto_nvst.so.3 {native}/libssl_nvst.so.3"
    assert launch.spec.env["LD_PRELOAD"] == preload
    with spawned(launch) as proc:
        assert proc.wait(timeout=TIMEOUT) == 0, launch.stderr_log.read_text()
    assert (config.run_dir / C.SENTINEL_FILE).read_text() == preload


def test_isaacteleop_missing_names_the_interpreter_and_what_to_install(tmp_path: Path) -> None:
    # -S: no site-packages, so this interpreter has cxrd (from the checkout) but not isaacteleop.
    code = (
        "import sys\n"
        "from cxrd.config import Config\n"
        "from cxrd.errors import RuntimeUnavailable\n"
        "from cxrd.runtimes import prepare_runtime\n"
        "try:\n"
        "    prepare_runtime(Config(install_dir=sys.argv[1]))\n"
        "except RuntimeUnavailable as exc:\n"
        "    print(exc)\n"
        "    sys.exit(exc.exit_code)\n"
    )
    checkout = Path(cxrd.__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-S", "-c", code, str(tmp_path / "cloudxr")],
        env={**clean_env(), "PYTHONPATH": str(checkout)},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == RuntimeUnavailable.exit_code, result.stderr
    assert sys.executable in result.stdout
    assert "pip install 'cxrd[cloudxr]'" in result.stdout
    assert "no Python package 'isaaccapture' or 'isaacteleop' found" in result.stdout


# --- sim -----------------------------------------------------------------------------------


def test_sim_faults_come_from_config_and_cxrd_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(F.NEVER_READY, "0")
    monkeypatch.setenv(F.SIGNALING_PORT, "1")
    config = make_config(
        tmp_path,
        **{
            "runtime.backend": "sim",
            "proxy.backend_port": 49555,
            "runtime.sim.startup_delay": 1.5,
            "runtime.sim.never_ready": True,
            "runtime.sim.crash_after": 3,
            "runtime.sim.exit_before_ready": 9,
        },
    )
    launch = prepare_runtime(config)
    faults = F.parse_faults(launch.spec.env)  # what the sim will make of its environment
    assert faults.startup_delay == 1.5
    assert faults.crash_after == 3.0
    assert faults.exit_before_ready == 9
    assert faults.never_ready is False, "CXRD_SIM_NEVER_READY=0 in cxrd's environment wins"
    assert faults.signaling_port == 49555, "the sim listens where the proxy forwards"
    assert launch.spec.argv == (sys.executable, "-m", "cxrd.sim")
    assert not [k for k in launch.environment if k.startswith(F.PREFIX)]


def test_sim_bad_fault_settings_are_config_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = {"runtime.backend": "sim"}
    with pytest.raises(InvalidConfig, match=r"runtime.sim.crash_after: must be greater than 0"):
        prepare_runtime(make_config(tmp_path, **sim, **{"runtime.sim.crash_after": 0}))
    with pytest.raises(InvalidConfig, match=r"runtime.sim.exit_before_ready: .* 0 to 255"):
        prepare_runtime(make_config(tmp_path, **sim, **{"runtime.sim.exit_before_ready": 300}))
    monkeypatch.setenv(F.FLOOD_STDERR, "lots")
    with pytest.raises(InvalidConfig, match=r"CXRD_SIM_FLOOD_STDERR='lots'"):
        prepare_runtime(make_config(tmp_path, **sim))


def test_sim_launch_runs_to_ready_with_the_start_profile_and_no_eula(tmp_path: Path) -> None:
    port = free_port()
    config = make_config(
        tmp_path,
        **{
            "runtime.backend": "sim",
            "proxy.backend_port": port,
            "runtime.sim.startup_delay": 0.0,
        },
    )
    launch = prepare_runtime(config, device_profile="auto-native")
    assert not eula.is_accepted(config.install_path)

    async def hello() -> dict[str, Any]:
        async with asyncio.timeout(TIMEOUT):
            await wait_for_file(config.run_dir / C.SENTINEL_FILE)
            async with connect(f"ws://127.0.0.1:{port}/x") as ws:
                return dict(json.loads(await ws.recv()))

    with spawned(launch) as proc:
        greeting = asyncio.run(hello())
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 0
    assert greeting["device_profile"] == "auto-native"
    assert "SIMULATED" in launch.stderr_log.read_text()
    assert list(launch.logs_dir.glob(C.SERVER_LOG_GLOB))


# --- command -------------------------------------------------------------------------------


def test_command_runtime_gets_the_same_environment(tmp_path: Path) -> None:
    script = (
        'printf %s "$NV_DEVICE_PROFILE" > "$NV_CXR_RUNTIME_DIR/profile"; '
        ': > "$NV_CXR_RUNTIME_DIR/runtime_started"'
    )
    config = make_config(
        tmp_path, **{"runtime.backend": "command", "runtime.command": ["sh", "-c", script]}
    )
    launch = prepare_runtime(config, device_profile="AppleVisionPro")
    assert os.path.isabs(launch.spec.argv[0]), "a bare name is resolved on PATH"
    assert launch.spec.argv[1:] == ("-c", script)
    with spawned(launch) as proc:
        assert proc.wait(timeout=TIMEOUT) == 0
    assert (config.run_dir / "profile").read_text() == "AppleVisionPro"
    assert (config.run_dir / C.SENTINEL_FILE).exists()


def test_command_that_cannot_run_is_runtime_unavailable_naming_it(tmp_path: Path) -> None:
    not_executable = tmp_path / "runtime.sh"
    not_executable.write_text("#!/bin/sh\n")
    not_executable.chmod(0o644)
    cases = {
        str(tmp_path / "absent"): "does not exist",
        "no-such-cloudxr-runtime": "not an executable on PATH",
        str(not_executable): "is not executable",
    }
    for program, why in cases.items():
        config = make_config(
            tmp_path, **{"runtime.backend": "command", "runtime.command": [program]}
        )
        with pytest.raises(RuntimeUnavailable, match=why) as caught:
            prepare_runtime(config)
        assert program in str(caught.value)
