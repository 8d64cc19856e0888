"""Isaac Lab 3.0's own CloudXR start and stop, run as a program by tests/test_isaaclab.py.

Runs ``TeleopSessionLifecycle._ensure_cloudxr_runtime()`` and then ``stop()``
from the ``isaaclab_teleop`` of the Isaac Lab 3.0.0 wheel, against the real
``isaacteleop`` on ``PYTHONPATH`` (setup.sh puts both under ``.cache/``), with
``HOME`` wherever the test points it (Isaac Lab uses ``~/.cloudxr``).

Only what Isaac Lab needs from outside the two is stubbed, before it is
imported: Kit (``carb``, ``omni.kit``, ``isaacsim.kit.xr``), the same modules
Isaac Lab's own ``test_cloudxr_lifecycle.py`` stubs (which stubs isaacteleop
too; here it is real), as a Kit would answer with no app running: empty
settings, no event dispatcher; ``torch`` (only ``torch.device`` is used on this
path); and ``isaaclab.utils`` (``configclass``, a dataclass whose every field
has a default, and ``lazy_export``, a no-op).

Prints one JSON line after the ensure (what happened, the environment Isaac Lab
then has) and, once the file ``--wait-for`` names exists (or at once without
it), calls ``stop()`` and prints a second. Exit 0 either way: the lines say it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.metadata
import inspect
import json
import logging
import os
import sys
import time
import types
from collections.abc import Callable
from typing import Any

# What a user of Isaac Lab would look at afterwards.
ENV_KEYS = (
    "XR_RUNTIME_JSON",
    "NV_CXR_RUNTIME_DIR",
    "NV_CXR_SERVER_PORT",
    "NV_CXR_MEDIA_PORT",
    "NV_DEVICE_PROFILE",
    "NV_CXR_GPU_INDEX_CUDA",
    "ISAACLAB_CXR_SKIP_AUTOLAUNCH",
)


def _module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    if "." in name:
        parent, child = name.rsplit(".", 1)
        setattr(sys.modules[parent], child, module)
    return module


class _Settings:
    """carb.settings of a Kit with nothing set (no multi-GPU renderer pin)."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def get(self, path: str) -> Any:
        return self.values.get(path)

    def set(self, path: str, value: Any) -> None:
        self.values[path] = value

    def subscribe_to_node_change_events(self, path: str, callback: Callable[..., Any]) -> object:
        return object()


class _Device:
    """torch.device, as far as Isaac Lab reads it: ``.type`` and ``.index``."""

    def __init__(self, spec: str) -> None:
        kind, _, index = spec.partition(":")
        self.type = kind
        self.index = int(index) if index else None


def _configclass(cls: type) -> type:
    """Isaac Lab's configclass, as far as the cfg needs it: every field gets a default."""
    for name, hint in inspect.get_annotations(cls).items():
        if isinstance(hint, str) and hint.startswith(("ClassVar", "typing.ClassVar")):
            continue
        value = cls.__dict__.get(name, dataclasses.MISSING)
        if not isinstance(value, dataclasses.Field):
            value = dataclasses.field(default_factory=lambda v=value: copy.deepcopy(v))
        setattr(cls, name, value)
    return dataclasses.dataclass(cls)


def install_stubs() -> None:
    settings = _Settings()
    _module("carb")
    _module("carb.settings", get_settings=lambda: settings)
    _module("carb.eventdispatcher", get_eventdispatcher=lambda: None)
    _module("omni")
    _module("omni.kit")
    _module("omni.kit.app", GLOBAL_EVENT_PRE_SHUTDOWN="pre_shutdown")
    for name in ("isaacsim", "isaacsim.kit", "isaacsim.kit.xr", "isaacsim.kit.xr.teleop"):
        _module(name)
    _module("isaacsim.kit.xr.teleop.bridge")  # no subscribe_required_extensions: Isaac Lab logs it
    _module("torch", device=_Device, Tensor=type("Tensor", (), {}))
    _module("isaaclab")
    _module("isaaclab.utils", configclass=_configclass)
    _module("isaaclab.utils.module", lazy_export=lambda **_: (None, None, []))


def _error(exc: BaseException | None) -> dict[str, str] | None:
    if exc is None:
        return None
    return {"type": type(exc).__name__, "message": str(exc)}


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-file", required=True, help="Isaac Lab's CloudXR profile file")
    parser.add_argument("--wait-for", help="call stop() once this file exists")
    parser.add_argument("--timeout", type=float, default=30.0, help="at most this long for it")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    install_stubs()
    from isaaclab_teleop.isaac_teleop_cfg import IsaacTeleopCfg
    from isaaclab_teleop.session_lifecycle import TeleopSessionLifecycle

    cfg = IsaacTeleopCfg(pipeline_builder=lambda: None, control_channel_uuid=None)
    lifecycle = TeleopSessionLifecycle(cfg, cloudxr_env_file=args.env_file)
    before = {key: os.environ.get(key) for key in ENV_KEYS}
    error: BaseException | None = None
    try:
        lifecycle._ensure_cloudxr_runtime()
    except Exception as exc:
        error = exc
    launcher = lifecycle._cloudxr_launcher
    emit(
        phase="ensure",
        isaacteleop=importlib.metadata.version("isaacteleop"),
        error=_error(error),
        launched=launcher is not None,
        launcher=None if launcher is None else type(launcher).__module__,
        owns_runtime=getattr(launcher, "owns_runtime", None),
        before=before,
        environ={key: os.environ.get(key) for key in ENV_KEYS},
    )

    if args.wait_for:
        deadline = time.monotonic() + args.timeout
        while not os.path.exists(args.wait_for) and time.monotonic() < deadline:
            time.sleep(0.02)
    error = None
    try:
        lifecycle.stop()
    except Exception as exc:
        error = exc
    emit(phase="stop", error=_error(error), retained=lifecycle._cloudxr_launcher is not None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
