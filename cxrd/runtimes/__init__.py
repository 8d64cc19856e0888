"""Runtime backends: turn the config into one :class:`RuntimeLaunch`.

``isaacteleop`` is the real CloudXR runtime, ``sim`` the simulator
(``python -m cxrd.sim``), ``command`` any program that honours the same
contract. Every backend gives the runtime the environment isaacteleop's
``EnvConfig`` would: the ``NV_CXR_*`` defaults, ``NV_DEVICE_PROFILE``,
``runtime.env``, and six keys computed from the install dir. Preparing writes
nothing but the run dir (0700 when new) and the logs dir.
"""

from __future__ import annotations

from cxrd.config import Config, check_device_profile
from cxrd.core.model import RuntimeLaunch
from cxrd.errors import InvalidConfig

__all__ = ["RuntimeLaunch", "prepare_runtime"]


def prepare_runtime(config: Config, *, device_profile: str | None = None) -> RuntimeLaunch:
    """Check the backend can run and say how to start it.

    ``device_profile`` (the D-Bus ``Start`` option) overrides
    ``runtime.device_profile``; a malformed one raises
    :class:`~cxrd.errors.InvalidArgs`. Raises
    :class:`~cxrd.errors.RuntimeUnavailable` (what to install),
    :class:`~cxrd.errors.EulaNotAccepted` (run ``cxrctl accept-eula``) and
    :class:`~cxrd.errors.InvalidConfig`.
    """
    profile = config.runtime.device_profile if device_profile is None else device_profile
    check_device_profile(profile)
    backend = config.runtime.backend
    # Backends are imported on use: each pulls in only what it needs.
    if backend == "isaacteleop":
        from cxrd.runtimes import isaacteleop

        return isaacteleop.prepare(config, profile)
    if backend == "sim":
        from cxrd.runtimes import sim

        return sim.prepare(config, profile)
    if backend == "command":
        from cxrd.runtimes import command

        return command.prepare(config, profile)
    raise InvalidConfig(f"{config.source}: runtime.backend: unknown backend {backend!r}")
