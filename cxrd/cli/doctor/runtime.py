"""What the runtime needs: its package, the EULA, NVIDIA libraries and GPU, a private run dir."""

from __future__ import annotations

import contextlib
import glob
import os
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

from cxrd.cli.doctor.check import TIMEOUT, Check
from cxrd.config import Config
from cxrd.errors import CxrdError
from cxrd.system import eula

DRIVER_LIBS = ("libcuda.so.1", "libvulkan.so.1")


def check_runtime_package(config: Config) -> Check:
    backend = config.runtime.backend
    if backend == "sim":
        return Check("runtime package", "ok", "sim backend: the simulator needs no runtime")
    # What the daemon's backend sees: its own environment with runtime.env on top.
    seen = {**os.environ, **config.runtime.env}
    if backend == "command":
        from cxrd.runtimes.command import resolve_program

        try:
            found = resolve_program(config.runtime.command[0], seen.get("PATH", os.defpath))
        except CxrdError as exc:
            return Check("runtime package", "fail", str(exc), "fix runtime.command in cxrd.toml")
        return Check("runtime package", "ok", f"runtime.command runs {found}")
    from cxrd.runtimes import isaacteleop

    try:
        module, native = isaacteleop.find_runtime(seen)
    except CxrdError as exc:
        return Check("runtime package", "fail", str(exc), type(exc).hint)
    return Check("runtime package", "ok", f"{module} at {native}")


def check_eula(config: Config) -> Check:
    if config.runtime.backend != "isaacteleop":
        return Check("EULA", "ok", f"not needed by the {config.runtime.backend} backend")
    if eula.is_accepted(config.install_path):
        return Check("EULA", "ok", f"accepted ({eula.marker_path(config.install_path)})")
    return Check(
        "EULA",
        "fail",
        f"the NVIDIA CloudXR EULA is not accepted ({eula.EULA_URL})",
        "cxrctl accept-eula",
    )


def find_shared_library(soname: str) -> str | None:
    """Where the dynamic linker would find ``soname`` (LD_LIBRARY_PATH, then ld.so.cache)."""
    for directory in filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(":")):
        if os.path.exists(os.path.join(directory, soname)):
            return os.path.join(directory, soname)
    ldconfig = shutil.which("ldconfig") or next(
        (p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig") if os.path.exists(p)), None
    )
    if ldconfig is None:
        return None
    try:
        cache = subprocess.run(
            [ldconfig, "-p"], capture_output=True, text=True, timeout=TIMEOUT, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in cache.splitlines():
        name, _, rest = line.strip().partition(" ")
        if name == soname and "=>" in rest:
            return rest.split("=>", 1)[1].strip()
    return None


def check_driver_libs(config: Config) -> Check:
    missing = [lib for lib in DRIVER_LIBS if find_shared_library(lib) is None]
    if not missing:
        return Check("NVIDIA libraries", "ok", ", ".join(DRIVER_LIBS) + " found")
    needed = config.runtime.backend == "isaacteleop"
    return Check(
        "NVIDIA libraries",
        "fail" if needed else "warn",
        f"{', '.join(missing)} not found: the real CloudXR runtime cannot start"
        + ("" if needed else f" (the {config.runtime.backend} backend does not need it)"),
        "install the NVIDIA driver (libcuda.so.1) and the Vulkan loader (apt install libvulkan1)",
    )


def check_gpu(config: Config) -> Check:
    devices = sorted(d for d in glob.glob("/dev/nvidia[0-9]*") if d[len("/dev/nvidia") :].isdigit())
    if devices:
        version = ""
        with contextlib.suppress(OSError):
            first = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
            version = f"; {first.split('  ')[0].strip()}"
        return Check("GPU", "ok", f"{len(devices)} NVIDIA GPU(s): {', '.join(devices)}{version}")
    needed = config.runtime.backend == "isaacteleop"
    return Check(
        "GPU",
        "fail" if needed else "warn",
        "no /dev/nvidia0: no NVIDIA GPU, or its driver is not loaded",
        "install and load the NVIDIA driver (nvidia-smi should list the GPU)",
    )


def check_run_dir(config: Config) -> Check:
    run_dir = config.run_dir
    try:
        info = run_dir.stat()
    except FileNotFoundError:
        return Check("run dir", "ok", f"{run_dir} is created (0700) on first start")
    fix = f"chmod 700 {shlex.quote(str(run_dir))}"
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid != os.getuid():
        return Check(
            "run dir",
            "fail",
            f"{run_dir} belongs to uid {info.st_uid}, not you",
            f"chown {os.getuid()} {shlex.quote(str(run_dir))}; {fix}",
        )
    if mode != 0o700:
        return Check(
            "run dir", "fail", f"{run_dir} is {mode:04o}; others could reach the runtime", fix
        )
    return Check("run dir", "ok", f"{run_dir} is 0700 and yours")
