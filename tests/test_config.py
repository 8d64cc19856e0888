"""Config: defaults, the file, env files and flags; every error names file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxrd.config import load_config, parse_env_file
from cxrd.errors import InvalidConfig

ISSUE_EXAMPLE = """
install_dir = "~/.cloudxr"
[runtime]
backend = "isaacteleop"
command = ["/path/to/runtime"]
startup_timeout = 30.0
stop_timeout = 10.0
device_profile = "Quest3"
env = { NV_CXR_ENABLE_PUSH_DEVICES = "true" }
[proxy]
port = 48322
backend_port = 49100
[restart]
max_restarts = 5
window = 60.0
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cxrd.toml"
    path.write_text(text)
    return path


def test_the_documented_file_shape_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ISSUE_EXAMPLE))
    assert config.runtime.backend == "isaacteleop"
    assert config.runtime.command == ("/path/to/runtime",)
    assert config.runtime.env == {"NV_CXR_ENABLE_PUSH_DEVICES": "true"}
    assert config.proxy.port == 48322
    assert config.restart.window == 60.0
    assert config.install_path == Path("~/.cloudxr").expanduser()


def test_missing_default_file_means_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    config = load_config()
    assert config.runtime.backend == "isaacteleop"
    assert config.proxy.port == 48322
    assert config.source == "(defaults)"


def test_default_file_is_found_under_xdg_config_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "cxrd").mkdir()
    (tmp_path / "cxrd" / "cxrd.toml").write_text('[runtime]\nbackend = "sim"\n')
    assert load_config().runtime.backend == "sim"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[runtime]\nstartup_timeout = 'soon'\n", "runtime.startup_timeout: expected a number"),
        ("[runtime]\nbogus = 1\n", "runtime.bogus: unknown key"),
        ("[proxy]\nport = true\n", "proxy.port: expected an integer"),
        ("[proxy]\nport = 70000\n", "proxy.port: 70000 is not a TCP port"),
        ("[runtime]\nbackend = 'magic'\n", "runtime.backend: 'magic' is not one of"),
        ("[runtime]\nbackend = 'command'\n", "runtime.command: required"),
        ("[runtime.env]\nXR_RUNTIME_JSON = '/x'\n", "runtime.env.XR_RUNTIME_JSON: reserved"),
        ("[runtime.env]\nNV_CXR_RUNTIME_DIR = '/x'\n", "runtime.env.NV_CXR_RUNTIME_DIR: reserved"),
        ("[runtime.env]\nNV_DEVICE_PROFILE = 'x'\n", "set runtime.device_profile instead"),
        ("[runtime.env]\nA = 1\n", "runtime.env: expected a table of strings"),
        ("[restart]\nwindow = -1\n", "restart.window: must be greater than 0"),
        ("[proxy]\ncert = '/a.crt'\n", "proxy.cert, proxy.key: give both"),
        ("[proxy]\nmax_pending = 0\n", "proxy.max_pending: must be greater than 0"),
        ("[proxy]\nmax_per_address = -1\n", "proxy.max_per_address: must be greater than 0"),
        ("[proxy]\nhandshake_timeout = 0\n", "proxy.handshake_timeout: must be greater than 0"),
        ("[proxy]\nhead_timeout = nan\n", "proxy.head_timeout: must be greater than 0"),
        ("[proxy]\nallow = ['10.0.0.300']\n", "proxy.allow: '10.0.0.300' is not an address"),
        ("stop_when_idle = 'yes'\n", "stop_when_idle: expected true or false"),
        ("[runtime\n", "not valid TOML"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InvalidConfig) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert needle in str(info.value)


def test_admission_defaults_are_bounded_and_allow_entries_are_normalised(
    tmp_path: Path,
) -> None:
    defaults = load_config(write(tmp_path, "")).proxy
    assert (defaults.max_pending, defaults.max_per_address) == (64, 16)
    assert (defaults.handshake_timeout, defaults.head_timeout) == (5.0, 5.0)
    entries = "'::ffff:10.0.0.7', '::ffff:192.168.1.0/120', '10.1.0.0/16', 'fd00::/8'"
    text = f"[proxy]\nallow = [{entries}]\n"
    config = load_config(write(tmp_path, text))
    # The IPv4-mapped forms mean their IPv4 address and network; the others stay as written.
    assert config.proxy.allow == ("10.0.0.7", "192.168.1.0/24", "10.1.0.0/16", "fd00::/8")


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfig, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[runtime]\nbackend = 'isaacteleop'\n[proxy]\nport = 1000\n")
    config = load_config(path, overrides={"runtime.backend": "sim", "proxy.port": 2000})
    assert config.runtime.backend == "sim"
    assert config.proxy.port == 2000


def test_a_bad_flag_value_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfig, match=r"proxy\.port: 0 is not a TCP port"):
        load_config(write(tmp_path, ""), overrides={"proxy.port": 0})


def test_env_file_overrides_runtime_env_and_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOMEWHERE", "/data")
    env_file = tmp_path / "cloudxr.override"
    env_file.write_text(
        "# isaacteleop's override format\n\nNV_DEVICE_PROFILE=AppleVisionPro\n"
        "NV_CXR_ENABLE_TENSOR_DATA = false\nMY_PATH=$SOMEWHERE/x\n"
    )
    path = write(tmp_path, "[runtime.env]\nNV_CXR_ENABLE_TENSOR_DATA = 'true'\nKEEP = 'me'\n")
    config = load_config(path, env_file=env_file)
    assert config.runtime.device_profile == "AppleVisionPro"
    assert config.runtime.env == {
        "NV_CXR_ENABLE_TENSOR_DATA": "false",
        "KEEP": "me",
        "MY_PATH": "/data/x",
    }


def test_env_file_reserved_key_is_an_error_naming_the_file(tmp_path: Path) -> None:
    env_file = tmp_path / "bad.env"
    env_file.write_text("XRT_NO_STDIN=false\n")
    with pytest.raises(InvalidConfig, match=rf"{env_file}: XRT_NO_STDIN: reserved"):
        load_config(write(tmp_path, ""), env_file=env_file)


def test_env_file_garbage_line_names_the_line(tmp_path: Path) -> None:
    env_file = tmp_path / "bad.env"
    env_file.write_text("A=1\nthis is not an assignment\n")
    with pytest.raises(InvalidConfig, match=rf"{env_file}:2: expected KEY=value"):
        parse_env_file(env_file)


ISAAC_LAB_PROFILES = {
    # Isaac Lab's env profiles, copied: (file content, the profile and keys they set).
    "auto-webrtc": (
        "NV_DEVICE_PROFILE=auto-webrtc\nNV_CXR_ENABLE_PUSH_DEVICES=0\n",
        {"NV_CXR_ENABLE_PUSH_DEVICES": "0"},
    ),
    "auto-native": (
        "NV_DEVICE_PROFILE=auto-native\nNV_ENABLE_POSE_WAIT=0\n",
        {"NV_ENABLE_POSE_WAIT": "0"},
    ),
    "quest3": ("NV_DEVICE_PROFILE=quest3\n", {}),
}


@pytest.mark.parametrize("name", sorted(ISAAC_LAB_PROFILES))
def test_isaac_lab_env_profiles_reach_the_runtime_through_env_file(
    tmp_path: Path, name: str
) -> None:
    from cxrd.runtimes import prepare_runtime

    text, keys = ISAAC_LAB_PROFILES[name]
    env_file = tmp_path / f"{name}.env"
    env_file.write_text(text)
    config = load_config(
        write(tmp_path, f"install_dir = '{tmp_path / 'cloudxr'}'\n[runtime]\nbackend = 'sim'\n"),
        env_file=env_file,
    )
    environment = prepare_runtime(config).environment
    assert environment["NV_DEVICE_PROFILE"] == name, "verbatim: the runtime folds case itself"
    for key, value in keys.items():
        assert environment[key] == value
