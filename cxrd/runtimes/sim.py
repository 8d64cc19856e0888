"""The ``sim`` backend: ``python -m cxrd.sim`` with ``[runtime.sim]`` as ``CXRD_SIM_*``.

Precedence of each fault setting, highest first: a ``CXRD_SIM_*`` variable in
cxrd's own environment, the same variable in ``runtime.env``, then
``[runtime.sim]`` in the config file. So ``CXRD_SIM_CRASH_AFTER=2 cxrd
--runtime sim`` injects a fault for one run without editing the file, and
``CXRD_SIM_NEVER_READY=0`` turns a configured fault off. The signaling port
is the runtime's own ``NV_CXR_SERVER_PORT`` (``runtime.signaling_port``), where
the proxy forwards, as the real runtime's is.
No EULA is needed; the sim is not NVIDIA software.
"""

from __future__ import annotations

import os
import sys

from cxrd.config import Config, SimConfig
from cxrd.core.model import RuntimeLaunch
from cxrd.errors import InvalidConfig, RuntimeUnavailable
from cxrd.runtimes._common import build_launch, ensure_dirs, runtime_environment
from cxrd.sim import faults as F


def fault_env(sim: SimConfig) -> dict[str, str]:
    """``[runtime.sim]`` (checked by load_config) as the variables the sim reads."""
    env = {F.STARTUP_DELAY: repr(sim.startup_delay)}
    if sim.exit_before_ready is not None:
        env[F.EXIT_BEFORE_READY] = str(sim.exit_before_ready)
    if sim.never_ready:
        env[F.NEVER_READY] = "1"
    if sim.crash_after is not None:
        env[F.CRASH_AFTER] = repr(sim.crash_after)
    if sim.ignore_sigterm:
        env[F.IGNORE_SIGTERM] = "1"
    if sim.spawn_grandchild:
        env[F.SPAWN_GRANDCHILD] = "1"
    if sim.orphan_grandchild:
        env[F.ORPHAN_GRANDCHILD] = "1"
    if sim.flood_stderr:
        env[F.FLOOD_STDERR] = str(sim.flood_stderr)
    return env


def prepare(config: Config, device_profile: str) -> RuntimeLaunch:
    environment = runtime_environment(config, device_profile)
    given = {**os.environ, **environment}
    configured = fault_env(config.runtime.sim)
    extras = {k: v for k, v in configured.items() if k not in given}
    effective = {
        k: v for k, v in {**given, **extras}.items() if k.startswith(F.PREFIX) or k in F.KNOWN
    }
    try:
        F.parse_faults(effective)
    except ValueError as exc:
        raise InvalidConfig(
            f"simulator setting {exc} (set in cxrd's environment, runtime.env "
            f"or [runtime.sim] of {config.source})"
        ) from None
    if not sys.executable:
        raise RuntimeUnavailable("cannot tell which Python runs cxrd (sys.executable is empty)")
    ensure_dirs(config)
    argv = (sys.executable, "-m", "cxrd.sim")
    return build_launch("sim", config, argv, environment, extras)
