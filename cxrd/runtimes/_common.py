"""What every backend shares: the runtime's environment and the launch record."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from cxrd import constants as C
from cxrd.config import Config
from cxrd.core.model import ChildSpec, RuntimeLaunch, check_env_value
from cxrd.errors import InvalidConfig
from cxrd.system.logfiles import ensure_logs_dir
from cxrd.system.rundir import ensure_run_dir


def computed_env(install: Path) -> dict[str, str]:
    """The six keys isaacteleop's EnvConfig always derives from the install dir."""
    return {
        "XR_RUNTIME_JSON": str(install / "openxr_cloudxr.json"),
        "NV_CXR_RUNTIME_DIR": str(install / C.RUN_DIR),
        "NV_CXR_OUTPUT_DIR": str(install / C.LOGS_DIR),
        "XRT_NO_STDIN": "true",
        "CXR_INSTALL_DIR": str(install),
        "CXR_HOST_VOLUME_PATH": str(install),
    }


def runtime_environment(config: Config, device_profile: str) -> dict[str, str]:
    """Defaults, the profile, ``runtime.env``, the ports and GPU, then the computed keys."""
    env = dict(C.DEFAULT_RUNTIME_ENV)
    env[C.DEVICE_PROFILE_ENV] = device_profile
    for key, value in config.runtime.env.items():
        try:
            check_env_value(key, value)
        except ValueError as exc:
            raise InvalidConfig(f"{config.source}: runtime.env.{exc}") from None
        env[key] = value
    defaults = {
        C.SERVER_PORT_ENV: str(C.DEFAULT_BACKEND_PORT),
        C.MEDIA_PORT_ENV: str(C.DEFAULT_MEDIA_PORT),
    }
    for key, value in pinned_env(config).items():
        if defaults.get(key) != value:  # the runtime's own defaults: as isaacteleop, unset
            env[key] = value
    computed = computed_env(config.install_path)
    for key, value in computed.items():
        try:
            check_env_value(key, value)
        except ValueError as exc:
            raise InvalidConfig(f"{config.source}: install_dir: {exc}") from None
    env.update(computed)
    return env


def pinned_env(config: Config) -> dict[str, str]:
    """The ports and GPU the runtime gets from the settings, whatever cxrd's environment says."""
    env = {
        C.SERVER_PORT_ENV: str(config.runtime.signaling_port),
        C.MEDIA_PORT_ENV: str(config.runtime.media_port),
    }
    if config.runtime.gpu is not None:
        env[C.GPU_CUDA_ENV] = str(config.runtime.gpu)
    return env


def ensure_dirs(config: Config) -> None:
    """Create the run dir and the logs dir: each a real directory of ours, 0700."""
    try:
        ensure_run_dir(config.run_dir)
        ensure_logs_dir(config.logs_dir)
    except OSError as exc:
        raise InvalidConfig(
            f"{config.source}: install_dir: cannot create {exc.filename}: {exc.strerror}"
        ) from None


_GPU_KEYS = (C.GPU_CUDA_ENV, C.GPU_VULKAN_ENV)


def child_env(environment: Mapping[str, str], extras: Mapping[str, str]) -> dict[str, str]:
    """The child's whole environment: the daemon's, the runtime's, then backend extras.

    The GPU index comes from the settings only (load_config read the daemon's
    own as runtime.gpu), never from the daemon's environment unseen.
    """
    inherited = {k: v for k, v in os.environ.items() if k not in _GPU_KEYS}
    return {**inherited, **environment, **extras}


def build_launch(
    backend: str,
    config: Config,
    argv: tuple[str, ...],
    environment: Mapping[str, str],
    extras: Mapping[str, str],
    *,
    writes_own_stderr: bool = False,
) -> RuntimeLaunch:
    """``writes_own_stderr``: the runtime opens ``runtime_stderr.log`` itself (no relay)."""
    stderr_log = config.logs_dir / C.RUNTIME_STDERR_LOG
    spec = ChildSpec(
        name="runtime",
        argv=argv,
        env=child_env(environment, {**pinned_env(config), **extras}),
        stderr=stderr_log,
        stderr_limits=None if writes_own_stderr else config.logs,
    )
    return RuntimeLaunch(
        backend=backend,
        spec=spec,
        environment=dict(environment),
        stderr_log=stderr_log,
        logs_dir=config.logs_dir,
    )
