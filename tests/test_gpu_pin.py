"""The GPU is never silent (issue 15, item 4): cxrd's own NV_CXR_GPU_INDEX_CUDA is runtime.gpu.

Shown by Status(), written to cloudxr.env and given to the runtime; a file or
flag that says otherwise wins; the Vulkan index is refused, naming it.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest
from fixtures_daemon import DaemonEnv
from fixtures_dbus import BusDaemon
from support import TIMEOUT

from cxrd.client import CloudXRClient
from cxrd.config import load_config
from cxrd.errors import InvalidConfig
from cxrd.runtimes import prepare_runtime
from cxrd.system.envfile import read_env_file


def _config(tmp_path: Path, text: str, environ: dict[str, str]) -> int | None:
    path = tmp_path / "cxrd.toml"
    path.write_text(f'install_dir = "{tmp_path}/cxr"\n[runtime]\nbackend = "sim"\n{text}')
    return load_config(path, environ=environ).runtime.gpu


def test_the_daemons_own_cuda_index_is_runtime_gpu_unless_a_file_sets_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert _config(tmp_path, "", {"NV_CXR_GPU_INDEX_CUDA": "1"}) == 1
    assert _config(tmp_path, "", {}) is None
    with caplog.at_level(logging.WARNING):
        assert _config(tmp_path, "gpu = 0\n", {"NV_CXR_GPU_INDEX_CUDA": "1"}) == 0
    assert "NV_CXR_GPU_INDEX_CUDA=1 is overridden by runtime.gpu = 0" in caplog.text
    with pytest.raises(InvalidConfig, match=r"environment: NV_CXR_GPU_INDEX_CUDA: expected"):
        _config(tmp_path, "", {"NV_CXR_GPU_INDEX_CUDA": "first"})
    with pytest.raises(InvalidConfig, match=r"environment: NV_CXR_GPU_INDEX_VULKAN='1'"):
        _config(tmp_path, "", {"NV_CXR_GPU_INDEX_VULKAN": "1"})


def test_the_runtime_never_inherits_a_gpu_index_the_settings_do_not_show(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "cxrd.toml"
    path.write_text(f'install_dir = "{tmp_path}/cxr"\n[runtime]\nbackend = "sim"\ngpu = 0\n')
    monkeypatch.setenv("NV_CXR_GPU_INDEX_CUDA", "1")
    monkeypatch.setenv("NV_CXR_GPU_INDEX_VULKAN", "1")
    launch = prepare_runtime(load_config(path))  # as cxrctl reads it: no environ
    assert launch.spec.env["NV_CXR_GPU_INDEX_CUDA"] == "0"
    assert "NV_CXR_GPU_INDEX_VULKAN" not in launch.spec.env


def test_a_daemon_started_with_a_cuda_index_shows_it_and_gives_it_to_the_runtime(
    bus_daemon: BusDaemon,
) -> None:
    bus_daemon.denv.env["NV_CXR_GPU_INDEX_CUDA"] = "1"  # e.g. systemctl --user set-environment
    bus_daemon.start()
    with CloudXRClient(bus_daemon.address) as client:
        snap = client.status()
    assert snap.gpu == 1
    assert read_env_file(bus_daemon.denv.run_dir / "cloudxr.env")["NV_CXR_GPU_INDEX_CUDA"] == "1"
    raw = Path(f"/proc/{snap.runtime.pid}/environ").read_bytes().split(b"\0")
    assert b"NV_CXR_GPU_INDEX_CUDA=1" in raw
    shown = subprocess.run(
        [bus_daemon.argv()[0], "-m", "cxrd.cli", "status"],
        env=bus_daemon.env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    ).stdout
    assert "GPU: CUDA 1" in shown, shown


def test_a_daemon_started_with_a_vulkan_index_refuses_to_start_naming_it(
    daemon_env: DaemonEnv,
) -> None:
    daemon_env.write_config()
    proc = daemon_env.start(env={"NV_CXR_GPU_INDEX_VULKAN": "1"})
    assert proc.wait(timeout=TIMEOUT) == InvalidConfig.exit_code
    assert "NV_CXR_GPU_INDEX_VULKAN" in daemon_env.daemon_log()
