"""cxrd.toml, isaacteleop env files and command-line overrides, validated as one.

Precedence, lowest first: built-in defaults, the TOML file, ``--env-file``
(isaacteleop's ``KEY=value`` format), command-line flags. Every problem is a
:class:`~cxrd.errors.InvalidConfig` naming the file and the key; nothing is
half-applied.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrd import constants as C
from cxrd import tables
from cxrd.config_proxy import ProxyConfig as ProxyConfig  # re-exported: part of the schema
from cxrd.config_proxy import checked_proxy
from cxrd.core.model import ENV_NAME, check_env_value
from cxrd.errors import InvalidArgs, InvalidConfig
from cxrd.instances import Instance

BACKENDS = ("isaacteleop", "sim", "command")
# runtime.env / --env-file keys read as settings (isaacteleop env files set them).
_ENV_SETTINGS = {
    C.SERVER_PORT_ENV: "signaling_port",
    C.MEDIA_PORT_ENV: "media_port",
    C.GPU_CUDA_ENV: "gpu",
}
log = logging.getLogger(__name__)
BUS_MODES = ("auto", "session", "none")


@dataclass(frozen=True)
class SimConfig:
    """Faults the ``sim`` backend injects (DESIGN §3); all off by default."""

    startup_delay: float = 0.2
    exit_before_ready: int | None = None
    never_ready: bool = False
    crash_after: float | None = None
    ignore_sigterm: bool = False
    spawn_grandchild: bool = False
    orphan_grandchild: bool = False  # a grandchild whose parent exits: re-parented, then dies
    flood_stderr: int = 0


@dataclass(frozen=True)
class RuntimeConfig:
    backend: str = "isaacteleop"
    command: tuple[str, ...] = ()
    startup_timeout: float = 30.0
    stop_timeout: float = 10.0
    device_profile: str = C.DEFAULT_DEVICE_PROFILE
    # The one place of the runtime's ports: NV_CXR_SERVER_PORT (the proxy forwards
    # there too) and NV_CXR_MEDIA_PORT (UDP).
    signaling_port: int = C.DEFAULT_BACKEND_PORT
    media_port: int = C.DEFAULT_MEDIA_PORT
    gpu: int | None = None  # CUDA device index: NV_CXR_GPU_INDEX_CUDA
    env: Mapping[str, str] = field(default_factory=dict)
    sim: SimConfig = field(default_factory=SimConfig)


@dataclass(frozen=True)
class RestartConfig:
    max_restarts: int = 5
    window: float = 60.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0


@dataclass(frozen=True)
class HealthConfig:
    listen: str = ""  # "host:port" for /livez, /readyz, /metrics; "" serves none

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) to listen on; None when the endpoints are off."""
        return parse_listen(self.listen) if self.listen else None


@dataclass(frozen=True)
class LogsConfig:
    """Bounds on the log files in ``<install>/logs`` (``cxrd.system.logfiles``)."""

    max_bytes: int = (
        10 * 1024 * 1024
    )  # runtime_stderr.log, wss.log, wss.stderr.log: rotated past it
    keep: int = 5  # rotated files kept of each (name.1 newest), and cxr_server.*.log files kept


@dataclass(frozen=True)
class Config:
    install_dir: str = C.DEFAULT_INSTALL_DIR
    bus: str = "auto"  # "auto": the session bus if reachable; "session": required; "none"
    stop_when_idle: bool = False
    idle_grace: float = 30.0
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    restart: RestartConfig = field(default_factory=RestartConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    logs: LogsConfig = field(default_factory=LogsConfig)
    source: str = field(default="(defaults)", compare=False)
    instance: str = field(default="", compare=False)  # "" is the unnamed instance

    @property
    def install_path(self) -> Path:
        return Path(os.path.expanduser(self.install_dir)).absolute()

    @property
    def run_dir(self) -> Path:
        return self.install_path / C.RUN_DIR

    @property
    def logs_dir(self) -> Path:
        return self.install_path / C.LOGS_DIR

    @property
    def certs_dir(self) -> Path:
        return self.install_path / C.CERTS_DIR

    @property
    def client_path(self) -> Path:
        """Where the web client lives, as isaacteleop looks for it."""
        if self.proxy.client_dir is not None:
            return Path(self.proxy.client_dir).expanduser().absolute()
        from_env = os.environ.get(C.CLIENT_DIR_ENV)
        if from_env:
            return Path(from_env).expanduser().absolute()
        return self.install_path / C.CLIENT_DIR


def check_device_profile(profile: str) -> None:
    """A profile is one word; the runtime sees it verbatim. InvalidArgs if not."""
    if not profile or not profile.isprintable() or any(ch.isspace() for ch in profile):
        raise InvalidArgs(f"device_profile {profile!r}: expected one word such as Quest3")


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) as (host, port); ValueError saying what is wrong."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r}: expected host:port, e.g. 127.0.0.1:8080 or [::1]:8080")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:8080")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: {port_text!r} is not a TCP port (1-65535)")
    return host, int(port_text)


def same_profile(a: str, b: str) -> bool:
    """Whether the runtime takes two profile names as one: it compares them with
    strcasecmp (ASCII case folded, nothing else), so ``quest3`` is ``Quest3``."""
    return a.encode().lower() == b.encode().lower()


def load_config(
    path: Path | None = None,
    *,
    instance: str = "",
    env_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the effective config of ``instance`` ("" is the unnamed one).

    ``path`` None means the instance's default path, which may be absent; a
    given path must exist. ``overrides`` maps dotted keys
    (``"runtime.backend"``) to values. ``environ`` is the daemon's own
    environment: its GPU pin is read as ``runtime.gpu`` (see :func:`_gpu_from_environ`).
    """
    try:
        inst = Instance.of(instance)
    except InvalidArgs as exc:
        raise InvalidConfig(f"--instance: {exc}") from None
    explicit = path is not None
    path = path if path is not None else inst.config_path
    data: dict[str, Any] = {}
    source = "(defaults)"
    if explicit or path.exists():
        source = str(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InvalidConfig(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidConfig(f"{path}: cannot read config file: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise InvalidConfig(f"{path}: not valid TOML: {exc}") from None
    config = tables.build(Config, {"install_dir": inst.default_install_dir, **data}, source, "")
    config = _fold_backend_port(config, _names_signaling(data.get("runtime")), source)
    _check_env(config.runtime.env, source, "runtime.env", allow_profile=False)
    config = _lift_env_settings(config, dict(config.runtime.env), source, "runtime.env.", data)
    if env_file is not None:
        config = _apply_env_file(config, env_file)
    if overrides:
        config = _apply_overrides(config, overrides)
    if environ is not None:
        config = _gpu_from_environ(config, environ)
    config = dataclasses.replace(config, source=source, instance=inst.name)
    config = dataclasses.replace(config, proxy=checked_proxy(config.proxy, source))
    _check_semantics(config)
    return config


def parse_env_file(path: Path) -> dict[str, str]:
    """Read isaacteleop's ``KEY=value`` override format (comments, blanks, ``$VAR``, ``~``)."""
    try:
        text = path.expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidConfig(f"{path}: cannot read env file: {exc.strerror or exc}") from None
    result: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        key = key.strip()
        if not sep or not ENV_NAME.match(key):
            raise InvalidConfig(f"{path}:{number}: expected KEY=value, got {raw!r}")
        result[key] = os.path.expanduser(os.path.expandvars(value.strip()))
    return result


def _apply_env_file(config: Config, path: Path) -> Config:
    values = parse_env_file(path)
    profile = values.pop(C.DEVICE_PROFILE_ENV, None)
    _check_env(values, str(path), "", allow_profile=False)
    runtime = dataclasses.replace(
        config.runtime,
        env={**config.runtime.env, **values},
        device_profile=profile if profile is not None else config.runtime.device_profile,
    )
    # The file is above the TOML: its NV_CXR_SERVER_PORT wins over runtime.signaling_port.
    config = dataclasses.replace(config, runtime=runtime)
    return _lift_env_settings(config, values, str(path), "", None)


def _gpu_from_environ(config: Config, environ: Mapping[str, str]) -> Config:
    """NV_CXR_GPU_INDEX_CUDA in cxrd's own environment (``systemctl --user
    set-environment``, ``docker run -e``) is ``runtime.gpu`` where no file or
    flag sets it, so Status() shows the GPU the runtime really gets. The
    Vulkan index is refused: cxrd pins by CUDA index and would not show it.
    """
    vulkan = environ.get(C.GPU_VULKAN_ENV)
    if vulkan is not None:
        raise InvalidConfig(
            f"environment: {C.GPU_VULKAN_ENV}={vulkan!r}: cxrd pins the runtime's GPU by "
            f"CUDA index; unset it and set runtime.gpu (or {C.GPU_CUDA_ENV}) instead"
        )
    raw = environ.get(C.GPU_CUDA_ENV)
    if raw is None:
        return config
    try:
        gpu = int(raw.strip())
    except ValueError:
        raise InvalidConfig(
            f"environment: {C.GPU_CUDA_ENV}: expected a CUDA device index, got {raw!r}"
        ) from None
    if config.runtime.gpu is None:
        return dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, gpu=gpu))
    if config.runtime.gpu != gpu:
        log.warning(
            "environment: %s=%d is overridden by runtime.gpu = %d",
            C.GPU_CUDA_ENV,
            gpu,
            config.runtime.gpu,
        )
    return config


def _names_signaling(section: Any) -> bool:
    return isinstance(section, Mapping) and "signaling_port" in section


def _fold_backend_port(config: Config, explicit_signaling: bool, source: str) -> Config:
    """``proxy.backend_port``, the old spelling of ``runtime.signaling_port``: warn or refuse."""
    alias = config.proxy.backend_port
    if alias is None:
        return config
    signaling = config.runtime.signaling_port
    if explicit_signaling and alias != signaling:
        raise InvalidConfig(
            f"{source}: proxy.backend_port: {alias} disagrees with runtime.signaling_port "
            f"{signaling}; the proxy always forwards to the runtime's signaling port, so "
            "remove proxy.backend_port"
        )
    log.warning(
        "%s: proxy.backend_port is deprecated; set runtime.signaling_port = %d instead",
        source,
        alias,
    )
    return dataclasses.replace(
        config,
        runtime=dataclasses.replace(config.runtime, signaling_port=alias),
        proxy=dataclasses.replace(config.proxy, backend_port=None),
    )


def _lift_env_settings(
    config: Config,
    env: Mapping[str, str],
    source: str,
    where: str,
    data: Mapping[str, Any] | None,
) -> Config:
    """NV_CXR_SERVER_PORT, NV_CXR_MEDIA_PORT and NV_CXR_GPU_INDEX_CUDA of ``env`` as settings.

    They leave ``runtime.env``: cxrd sets them from the settings, so the
    runtime and the proxy cannot disagree. ``data`` (the TOML) given: a key
    set both ways to different values is refused.
    """
    runtime_table = (data or {}).get("runtime")
    lifted: dict[str, Any] = {}
    for key, setting in _ENV_SETTINGS.items():
        raw = env.get(key)
        if raw is None:
            continue
        try:
            value = int(raw.strip())
        except ValueError:
            raise InvalidConfig(
                f"{source}: {where}{key}: expected a whole number, got {raw!r}"
            ) from None
        given = runtime_table.get(setting) if isinstance(runtime_table, Mapping) else None
        if given is not None and given != value:
            raise InvalidConfig(
                f"{source}: {where}{key}: {value} disagrees with runtime.{setting} "
                f"{given!r}; set runtime.{setting} only"
            )
        lifted[setting] = value
    if not lifted:
        return config
    remaining = {k: v for k, v in config.runtime.env.items() if k not in _ENV_SETTINGS}
    runtime = dataclasses.replace(config.runtime, env=remaining, **lifted)
    return dataclasses.replace(config, runtime=runtime)


def _check_env(env: Mapping[str, str], source: str, where: str, *, allow_profile: bool) -> None:
    prefix = f"{where}." if where else ""
    for key in env:
        if not ENV_NAME.match(key):
            raise InvalidConfig(f"{source}: {prefix}{key}: not a valid environment variable name")
        if key in C.RESERVED_ENV_KEYS:
            raise InvalidConfig(
                f"{source}: {prefix}{key}: reserved, cxrd computes it from install_dir"
            )
        if key == C.DEVICE_PROFILE_ENV and not allow_profile:
            raise InvalidConfig(f"{source}: {prefix}{key}: set runtime.device_profile instead")


def _apply_overrides(config: Config, overrides: Mapping[str, Any]) -> Config:
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    merged = tables.merge(tables.as_plain(config), nested)
    built = tables.build(Config, merged, "command line", "")
    return _fold_backend_port(built, _names_signaling(nested.get("runtime")), "command line")


def _check_semantics(config: Config) -> None:
    src = config.source
    rt = config.runtime
    if rt.backend not in BACKENDS:
        raise InvalidConfig(
            f"{src}: runtime.backend: {rt.backend!r} is not one of {', '.join(BACKENDS)}"
        )
    if rt.backend == "command" and not rt.command:
        raise InvalidConfig(f"{src}: runtime.command: required when runtime.backend = 'command'")
    try:
        check_device_profile(rt.device_profile)
    except InvalidArgs as exc:
        raise InvalidConfig(f"{src}: runtime.{exc}") from None
    for name, text in rt.env.items():
        try:
            check_env_value(name, text)
        except ValueError as exc:
            raise InvalidConfig(f"{src}: runtime.env.{exc}") from None
    _check_sim(rt.sim, src)
    positive = {
        "runtime.startup_timeout": rt.startup_timeout,
        "runtime.stop_timeout": rt.stop_timeout,
        "restart.window": config.restart.window,
        "restart.backoff_initial": config.restart.backoff_initial,
        "restart.backoff_max": config.restart.backoff_max,
        "idle_grace": config.idle_grace,
        "logs.max_bytes": config.logs.max_bytes,
        "logs.keep": config.logs.keep,
    }
    for key, value in positive.items():
        if value <= 0:
            raise InvalidConfig(f"{src}: {key}: must be greater than 0, got {value}")
    if config.restart.max_restarts < 0:
        raise InvalidConfig(f"{src}: restart.max_restarts: must be 0 or more")
    ports = {
        "proxy.port": (config.proxy.port, "TCP"),
        "runtime.signaling_port": (rt.signaling_port, "TCP"),
        "runtime.media_port": (rt.media_port, "UDP"),
    }
    for key, (port, kind) in ports.items():
        if not 0 < port < 65536:
            raise InvalidConfig(f"{src}: {key}: {port} is not a {kind} port (1-65535)")
    if config.proxy.enabled and config.proxy.port == rt.signaling_port:
        raise InvalidConfig(
            f"{src}: proxy.port: {config.proxy.port} is also runtime.signaling_port; "
            "the proxy forwards there, so they must differ"
        )
    if rt.gpu is not None:
        if rt.gpu < 0:
            raise InvalidConfig(f"{src}: runtime.gpu: a CUDA device index is 0 or more")
        if C.GPU_VULKAN_ENV in rt.env:
            raise InvalidConfig(
                f"{src}: runtime.env.{C.GPU_VULKAN_ENV}: the runtime takes either it or "
                f"{C.GPU_CUDA_ENV} (runtime.gpu), never both; remove one"
            )
    socket_path = os.fsencode(config.run_dir / C.IPC_SOCKET)
    if len(socket_path) > C.MAX_SOCKET_PATH:
        longest = C.MAX_SOCKET_PATH - (len(socket_path) - len(os.fsencode(config.install_path)))
        raise InvalidConfig(
            f"{src}: install_dir: {config.install_path} is too long: the runtime's socket "
            f"{C.RUN_DIR}/{C.IPC_SOCKET} inside it would be {len(socket_path)} bytes, more "
            f"than a Unix socket path may be ({C.MAX_SOCKET_PATH}); use an install_dir of at "
            f"most {longest} bytes"
        )
    if config.bus not in BUS_MODES:
        raise InvalidConfig(f"{src}: bus: {config.bus!r} is not one of {', '.join(BUS_MODES)}")
    try:
        _ = config.health.address
    except ValueError as exc:
        raise InvalidConfig(f"{src}: health.listen: {exc}") from None


def _check_sim(sim: SimConfig, src: str) -> None:
    where = f"{src}: runtime.sim"
    if not math.isfinite(sim.startup_delay) or sim.startup_delay < 0:
        raise InvalidConfig(f"{where}.startup_delay: must be 0 or more, got {sim.startup_delay}")
    if sim.exit_before_ready is not None and not 0 <= sim.exit_before_ready <= 255:
        raise InvalidConfig(
            f"{where}.exit_before_ready: an exit code is 0 to 255, got {sim.exit_before_ready}"
        )
    if sim.crash_after is not None and (not math.isfinite(sim.crash_after) or sim.crash_after <= 0):
        raise InvalidConfig(f"{where}.crash_after: must be greater than 0, got {sim.crash_after}")
    if sim.flood_stderr < 0:
        raise InvalidConfig(f"{where}.flood_stderr: must be 0 or more, got {sim.flood_stderr}")
