"""Instance names and files, ports and GPU from one place, and the checks between instances."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from support import free_port

from cxrd import constants as C
from cxrd import daemon
from cxrd.cli.doctor.gpus import check_gpus, list_gpus
from cxrd.cli.install import install, render_activation, render_template_unit
from cxrd.config import load_config
from cxrd.errors import InvalidArgs, InvalidConfig, StartFailed
from cxrd.instances import Instance, for_install_dir
from cxrd.launcher import serving_instance
from cxrd.proxy.launch import prepare_proxy
from cxrd.runtimes import prepare_runtime
from cxrd.system.siblings import check_ports

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.delenv("CXRD_INSTANCE", raising=False)
    (tmp_path / "config" / "cxrd").mkdir(parents=True)
    return tmp_path


def write(home: Path, name: str, text: str) -> Path:
    path = home / "config" / "cxrd" / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("bad", ["Left", "1gpu", "a-b", "x" * 33, "cxrd", ""])
def test_a_bad_instance_name_is_refused_naming_it(bad: str, home: Path) -> None:
    if bad:
        with pytest.raises(InvalidArgs, match=f"instance name {bad!r}"):
            Instance.of(bad)
        assert daemon.main(["--instance", bad]) == InvalidConfig.exit_code
    result = subprocess.run(
        [sys.executable, "-m", "cxrd.cli", "-i", bad or "B", "status"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == InvalidArgs.exit_code
    assert "instance name" in result.stderr


def test_the_unnamed_instance_keeps_every_old_name_and_a_named_one_has_its_own(
    home: Path,
) -> None:
    plain, left = Instance.of(None), Instance.of("left")
    assert (plain.unit, plain.bus_name, plain.default_install_dir) == (
        "cloudxr.service",
        "io.github.cxrd.Daemon1",
        "~/.cloudxr",
    )
    assert plain.config_path == home / "config" / "cxrd" / "cxrd.toml"
    assert (left.unit, left.bus_name, left.default_install_dir) == (
        "cloudxr@left.service",
        "io.github.cxrd.Daemon1.left",
        "~/.cloudxr-left",
    )
    write(home, "left", '[runtime]\nbackend = "sim"\n')
    config = load_config(instance="left")
    assert config.install_path == home / ".cloudxr-left"
    assert config.runtime.backend == "sim" and config.instance == "left"
    assert load_config().install_path == home / ".cloudxr"


def test_signaling_port_feeds_runtime_and_proxy_and_gpu_pins_cuda(home: Path) -> None:
    signaling, media = free_port(), free_port()
    write(
        home,
        "left",
        f'[runtime]\nbackend = "sim"\nsignaling_port = {signaling}\nmedia_port = {media}\n'
        f'gpu = 1\n[proxy]\nhost = "127.0.0.1"\nport = {free_port()}\n',
    )
    config = load_config(instance="left")
    env = prepare_runtime(config).environment
    assert env[C.SERVER_PORT_ENV] == str(signaling)
    assert env[C.MEDIA_PORT_ENV] == str(media)
    assert env[C.GPU_CUDA_ENV] == "1" and C.GPU_VULKAN_ENV not in env
    proxy = prepare_proxy(config)
    try:
        argv = proxy.spec(0).argv
        assert argv[argv.index("--backend-port") + 1] == str(signaling)
    finally:
        proxy.close()


def test_backend_port_is_a_deprecated_alias_and_refused_when_it_disagrees(
    home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(home, "cxrd", "[proxy]\nbackend_port = 49222\n")
    with caplog.at_level(logging.WARNING):
        assert load_config(path).runtime.signaling_port == 49222
    assert "proxy.backend_port is deprecated" in caplog.text
    path.write_text("[runtime]\nsignaling_port = 49333\n[proxy]\nbackend_port = 49222\n")
    with pytest.raises(InvalidConfig, match=r"proxy\.backend_port: 49222 disagrees"):
        load_config(path)


def test_isaacteleop_env_files_set_the_ports_and_vulkan_excludes_gpu(home: Path) -> None:
    env_file = home / "teleop.env"
    env_file.write_text("NV_CXR_SERVER_PORT=49555\nNV_CXR_GPU_INDEX_CUDA=2\n")
    config = load_config(env_file=env_file)
    assert (config.runtime.signaling_port, config.runtime.gpu) == (49555, 2)
    assert C.SERVER_PORT_ENV not in config.runtime.env
    path = write(home, "cxrd", "[runtime]\ngpu = 0\n[runtime.env]\nNV_CXR_GPU_INDEX_VULKAN = '1'\n")
    with pytest.raises(InvalidConfig, match=r"NV_CXR_GPU_INDEX_VULKAN: .* never both"):
        load_config(path)
    path.write_text("[runtime.env]\nNV_CXR_SERVER_PORT = 'many'\n")
    with pytest.raises(InvalidConfig, match=r"runtime\.env\.NV_CXR_SERVER_PORT: expected a whole"):
        load_config(path)


def test_a_port_another_instance_is_configured_with_is_refused_naming_it(home: Path) -> None:
    taken = free_port()
    write(home, "left", f"[runtime]\nsignaling_port = {taken}\n")
    write(
        home,
        "right",
        f"[proxy]\nport = {taken}\n[runtime]\nsignaling_port = {free_port()}\n"
        f"media_port = {free_port()}\n",
    )
    with pytest.raises(
        StartFailed, match=f"proxy port {taken} is the signaling port of instance 'left'"
    ):
        check_ports(load_config(instance="right"))
    with pytest.raises(
        StartFailed, match=f"signaling port {taken} is the proxy port of instance 'right'"
    ):
        check_ports(load_config(instance="left"))  # the clash is both ways
    write(
        home,
        "bench",
        f"[runtime]\nsignaling_port = {free_port()}\n[proxy]\nport = {free_port()}\n",
    )
    with pytest.raises(StartFailed, match="media port 47998 is the media port of instance 'left'"):
        check_ports(load_config(instance="bench"))  # both on the default media port 47998


def test_install_writes_the_template_and_one_activation_file_per_instance(home: Path) -> None:
    written = install(
        instances=[Instance.of("left")], exec_argv=["/x/python", "-m", "cxrd"], reload=False
    )
    names = {p.name for p in written}
    assert {"cloudxr.service", "cloudxr@.service", "io.github.cxrd.Daemon1.left.service"} <= names
    install(instances=[Instance.of("right")], exec_argv=["/x/python", "-m", "cxrd"], reload=False)
    services = home / "data" / "dbus-1" / "services"
    left = (services / "io.github.cxrd.Daemon1.left.service").read_text()
    assert "Name=io.github.cxrd.Daemon1.left\n" in left
    assert "SystemdService=cloudxr@left.service\n" in left
    assert "Exec=/x/python -m cxrd --instance left\n" in left
    assert render_activation(["/usr/bin/cxrd"]) == (REPO / "dbus" / C.DBUS_SERVICE_FILE).read_text()
    unit = render_template_unit(["/x/python", "-m", "cxrd"])
    assert "\nExecStart=/x/python -m cxrd --bus session --instance %i\n" in unit
    assert "\nBusName=io.github.cxrd.Daemon1.%i\n" in unit
    shipped = (REPO / "systemd" / C.UNIT_TEMPLATE).read_text()
    assert shipped == (REPO / "cxrd" / "data" / C.UNIT_TEMPLATE).read_text()


def test_the_launcher_attaches_to_the_instance_serving_its_install_dir(home: Path) -> None:
    assert serving_instance(home / ".cloudxr-left") == Instance("left")
    assert serving_instance(home / ".cloudxr") == Instance()
    write(home, "bench", f'install_dir = "{home / "data-dir"}"\n')
    assert serving_instance(home / "data-dir") == Instance("bench")
    assert for_install_dir(home / "elsewhere") == Instance()


def test_doctor_lists_gpus_from_nvidia_smi_and_flags_a_missing_or_shared_gpu(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = home / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    smi.write_text(
        '#!/bin/sh\n[ "$1" = -L ] || exit 9\n'
        "echo 'GPU 0: NVIDIA RTX 6000 Ada Generation (UUID: GPU-aaaa)'\n"
        "echo 'GPU 1: NVIDIA L40S (UUID: GPU-bbbb)'\n"
    )
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:/usr/bin:/bin")
    assert list_gpus() == [
        "NVIDIA RTX 6000 Ada Generation (UUID: GPU-aaaa)",
        "NVIDIA L40S (UUID: GPU-bbbb)",
    ]
    write(home, "left", "[runtime]\ngpu = 1\n")
    write(home, "right", "[runtime]\ngpu = 1\n")
    write(home, "bench", "[runtime]\ngpu = 2\n")
    ok = check_gpus(load_config())
    assert ok.level == "ok" and "1: NVIDIA L40S" in ok.message
    shared = check_gpus(load_config(instance="left"))
    assert shared.level == "warn" and "'right'" in shared.message and shared.fix
    missing = check_gpus(load_config(instance="bench"))
    assert missing.level == "fail" and "runtime.gpu = 2" in missing.message
    assert "0..1" in missing.fix
