"""The program both session figures of ``bench/run_overhead.py`` time, run by path.

Not imported: the bench runs it as ``python bench/run_overhead_session.py MODE
ENV_FILE PATH...`` (under ``cxrctl run``, with the env sourced, or on
isaacteleop 1.4's launcher). ``minimal`` only checks that the runtime is
usable; ``isaaclab`` prepends the PATHs to ``sys.path`` (``tests/`` for its
Kit stubs, isaacteleop and Isaac Lab from ``.cache/``), runs Isaac Lab's
``TeleopSessionLifecycle._ensure_cloudxr_runtime()`` with ENV_FILE, then the
check. It prints one JSON line of ``time.monotonic()`` stamps
(CLOCK_MONOTONIC, the same clock in every process here, so the bench subtracts
its own spawn time); the first is taken before any other import, so that
``main`` is when this interpreter started running the script. Standard
library only, apart from what the PATHs bring.
"""

# The first stamp comes before the other imports, on purpose.
# ruff: noqa: E402
import time

T = {"main": time.monotonic()}

import json
import os
import socket
import sys


def usable():
    """The runtime as OpenXR would find it: its manifest's path, then its IPC socket."""
    manifest = os.environ["XR_RUNTIME_JSON"]
    if not os.path.isabs(manifest):
        raise RuntimeError(f"XR_RUNTIME_JSON={manifest!r}")
    if os.path.exists(manifest):  # the real runtime writes it; the sim does not
        with open(manifest) as f:
            json.load(f)
    ipc = os.path.join(os.environ["NV_CXR_RUNTIME_DIR"], "ipc_cloudxr")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        sock.connect(ipc)


def isaaclab(env_file, paths):
    sys.path[:0] = paths
    from isaaclab_session import install_stubs  # tests/: Kit, torch, isaaclab.utils

    install_stubs()
    from isaaclab_teleop.isaac_teleop_cfg import IsaacTeleopCfg
    from isaaclab_teleop.session_lifecycle import TeleopSessionLifecycle

    if os.environ.get("ISAACLAB_CXR_SKIP_AUTOLAUNCH") != "1":
        import isaacteleop.cloudxr as cloudxr  # what the ensure would import itself

        class Timed(cloudxr.CloudXRLauncher):
            def __init__(self, *args, **kwargs):
                T["construct0"] = time.monotonic()
                super().__init__(*args, **kwargs)
                T["construct1"] = time.monotonic()

            def stop(self):
                T["stop0"] = time.monotonic()
                super().stop()
                T["stop1"] = time.monotonic()

        cloudxr.CloudXRLauncher = Timed
    T["imported"] = time.monotonic()
    cfg = IsaacTeleopCfg(pipeline_builder=lambda: None, control_channel_uuid=None)
    lifecycle = TeleopSessionLifecycle(cfg, cloudxr_env_file=env_file)
    lifecycle._ensure_cloudxr_runtime()
    T["ensured"] = time.monotonic()
    usable()
    T["usable"] = time.monotonic()
    T["launched"] = lifecycle._cloudxr_launcher is not None
    lifecycle.stop()


def main():
    mode, env_file, *paths = sys.argv[1:]
    if mode == "minimal":
        usable()
        T["usable"] = time.monotonic()
    else:
        isaaclab(env_file, paths)
    T["done"] = time.monotonic()
    print(json.dumps(T), flush=True)


if __name__ == "__main__":
    main()
