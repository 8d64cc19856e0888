"""The ``command`` backend: any argv from ``runtime.command``, same environment and contract.

The program is expected to behave like the runtime: create ``runtime_started``
in ``$NV_CXR_RUNTIME_DIR`` when ready, serve ``ipc_cloudxr`` there, and exit
on SIGTERM. ``argv[0]`` is resolved now (``~`` expanded, a bare name looked up
on the child's ``PATH``), so a typo is a named error instead of a failed start.
"""

from __future__ import annotations

import os
import shutil

from cxrd.config import Config
from cxrd.core.model import RuntimeLaunch
from cxrd.errors import InvalidConfig, RuntimeUnavailable
from cxrd.runtimes._common import (
    build_launch,
    child_env,
    ensure_dirs,
    runtime_environment,
)


def resolve_program(program: str, path: str | None) -> str:
    """Absolute path of an executable ``program``; raises :class:`RuntimeUnavailable`."""
    expanded = os.path.expanduser(program)
    if os.sep in expanded:
        found = os.path.abspath(expanded)
        if not os.path.isfile(found):
            raise RuntimeUnavailable(f"runtime.command: {program!r} does not exist")
        if not os.access(found, os.X_OK):
            raise RuntimeUnavailable(f"runtime.command: {program!r} is not executable")
        return found
    located = shutil.which(expanded, path=path)
    if located is None:
        raise RuntimeUnavailable(
            f"runtime.command: {program!r} is not an executable on PATH ({path or '(empty)'})"
        )
    return os.path.abspath(located)


def prepare(config: Config, device_profile: str) -> RuntimeLaunch:
    environment = runtime_environment(config, device_profile)
    command = config.runtime.command
    if not command or not command[0]:
        raise InvalidConfig(f"{config.source}: runtime.command: empty; give the runtime's argv")
    program = resolve_program(command[0], child_env(environment, {}).get("PATH", os.defpath))
    ensure_dirs(config)
    return build_launch("command", config, (program, *command[1:]), environment, {})
