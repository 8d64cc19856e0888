"""The real CloudXR runtime, as the ``isaacteleop`` wheel ships and runs it.

isaacteleop's service runs ``<module>.runtime.run()`` in a fresh interpreter
(its own session, so the GPU context never mixes with the host app's), with
the bundled OpenSSL pair in ``LD_PRELOAD`` (two OpenSSL builds in one process
crash when a client connects). ``run()`` itself copies the OpenXR json and
library into the install dir, removes stale run-dir files, sends stdout to
/dev/null and stderr to ``logs/runtime_stderr.log``, and loads the native
library. We do the same spawn, and find the package without importing it (its
``__init__`` pulls in the whole teleop stack).

From 1.6 the wheel is ``isaaccapture`` (keeping ``isaacteleop`` imports for a
while): its runtime is found first, and isaacteleop's after it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from cxrd.config import Config
from cxrd.core.model import RuntimeLaunch
from cxrd.errors import EulaNotAccepted, RuntimeUnavailable
from cxrd.runtimes._common import build_launch, ensure_dirs, runtime_environment
from cxrd.system import eula

# Where the runtime may live, newest name first.
PACKAGES: Final = ("isaaccapture", "isaacteleop")
STABLE: Final = "cloudxr"
EXPERIMENTAL: Final = "cloudxr_exp"
EXP_ENV: Final = "ISAAC_TELEOP_CLOUDXR_EXP"
RUNTIME_LIB: Final = "libcloudxr.so"
# Order as isaacteleop preloads them: libcrypto first, libssl (which needs it) second.
BUNDLED_OPENSSL: Final = ("libcrypto_nvst.so.3", "libssl_nvst.so.3")
INSTALL_HINT: Final = "pip install 'cxrd[cloudxr]'"

_TRUE = frozenset({"1", "true", "yes", "on"})
# What run() counts as NV_CXR_FILE_LOGGING off (anything else, or unset, is on).
_FILE_LOGGING_OFF = frozenset({"", "false", "off", "no", "n", "f", "0"})


def is_jetson_orin() -> bool:
    """Jetson Orin (Tegra T234), where isaacteleop picks the experimental runtime."""
    try:
        text = Path("/etc/nv_boot_control.conf").read_text(encoding="utf-8", errors="ignore")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "TEGRA_CHIPID" and value.strip() == "0x23":
            return True
    try:
        compatible = Path("/proc/device-tree/compatible").read_bytes()
    except OSError:
        return False
    return b"tegra234" in compatible


def wants_experimental(env: Mapping[str, str]) -> bool:
    """``ISAAC_TELEOP_CLOUDXR_EXP`` decides when set; otherwise Jetson Orin does."""
    raw = env.get(EXP_ENV, "").strip().lower()
    if not raw:
        return is_jetson_orin()
    return raw in _TRUE


def _package_roots(package: str) -> list[str] | None:
    """The directories of ``package``, or None when it is not installed."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    return None if spec is None else list(spec.submodule_search_locations or ())


def find_native_dir(subpackage: str, packages: tuple[str, ...] = PACKAGES) -> tuple[str, Path]:
    """The first of ``packages`` shipping ``<subpackage>/native/libcloudxr.so``, and that dir.

    Raises :class:`RuntimeUnavailable` naming this interpreter and what to install.
    """
    searched: list[str] = []
    found: list[str] = []
    for package in packages:
        roots = _package_roots(package)
        if roots is None:
            continue
        found.append(package)
        for root in roots:
            native = Path(root) / subpackage / "native"
            if (native / RUNTIME_LIB).is_file():
                return package, native
            searched.append(str(native))
    if not found:
        names = " or ".join(repr(package) for package in packages)
        raise RuntimeUnavailable(
            f"the CloudXR runtime is not installed: no Python package {names} found "
            f"by {sys.executable}. Install it into that environment: {INSTALL_HINT} "
            '(or set runtime.backend = "sim" to try cxrd without a GPU)'
        )
    where = ", ".join(searched) or "(no package directory)"
    hint = f" or set {EXP_ENV}=0 for the stable one" if subpackage == EXPERIMENTAL else ""
    raise RuntimeUnavailable(
        f"the CloudXR runtime is missing: no {' or '.join(found)} ships {subpackage}/native/"
        f"{RUNTIME_LIB} (searched {where}). Reinstall it for {sys.executable}: "
        f"{INSTALL_HINT}{hint}"
    )


def find_runtime(env: Mapping[str, str]) -> tuple[str, Path]:
    """The module isaacteleop would run under ``env`` (``<package>.<sub>``), and its native dir."""
    subpackage = EXPERIMENTAL if wants_experimental(env) else STABLE
    package, native = find_native_dir(subpackage)
    return f"{package}.{subpackage}", native


def worker_argv(module: str) -> tuple[str, ...]:
    """A fresh interpreter that runs ``<module>.runtime.run()``.

    ``-P`` keeps the current directory off ``sys.path``, as isaacteleop does by
    dropping empty entries, so a stray file cannot shadow the package.
    """
    if not sys.executable:
        raise RuntimeUnavailable("cannot tell which Python runs cxrd (sys.executable is empty)")
    return (sys.executable, "-P", "-c", f"from {module}.runtime import run; run()")


def preload(native: Path, existing: str) -> str | None:
    """``LD_PRELOAD`` with the bundled OpenSSL first, or None when it is not bundled."""
    libs = [native / name for name in BUNDLED_OPENSSL]
    if not all(lib.is_file() for lib in libs):
        return None
    ours = " ".join(str(lib) for lib in libs)
    return f"{ours} {existing}" if existing else ours


def prepare(config: Config, device_profile: str) -> RuntimeLaunch:
    environment = runtime_environment(config, device_profile)
    seen = {**os.environ, **environment}
    module, native = find_runtime(seen)
    install = config.install_path
    if not eula.is_accepted(install):
        raise EulaNotAccepted(
            f"the NVIDIA CloudXR EULA has not been accepted for {install} "
            f"(no {eula.marker_path(install)}). Read {eula.EULA_URL}, "
            "then run `cxrctl accept-eula`"
        )
    ensure_dirs(config)
    extras: dict[str, str] = {}
    ld_preload = preload(native, seen.get("LD_PRELOAD", ""))
    if ld_preload is not None:
        extras["LD_PRELOAD"] = ld_preload
    argv = worker_argv(module)
    return build_launch(
        "isaacteleop",
        config,
        argv,
        environment,
        extras,
        writes_own_stderr=writes_own_stderr(seen),
    )


def writes_own_stderr(env: Mapping[str, str]) -> bool:
    """Whether ``run()`` moves its stderr to ``logs/runtime_stderr.log`` itself."""
    return env.get("NV_CXR_FILE_LOGGING", "yes").lower() not in _FILE_LOGGING_OFF
