"""Which GPUs there are, and whether each instance's ``runtime.gpu`` is one of them, alone.

``nvidia-smi -L`` where it is installed (its ``GPU <index>:`` lines are CUDA
indices in PCI bus order, as NV_CXR_GPU_INDEX_CUDA counts with
``CUDA_DEVICE_ORDER=PCI_BUS_ID``), else the driver's
``/proc/driver/nvidia/gpus/<bus id>/information``, sorted by bus id.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from cxrd import instances
from cxrd.cli.doctor.check import TIMEOUT, Check
from cxrd.config import Config, load_config
from cxrd.errors import CxrdError
from cxrd.instances import Instance

PROC_GPUS = Path("/proc/driver/nvidia/gpus")
_SMI_LINE = re.compile(r"^GPU (\d+): (.*)$")
_DRIVER_FIX = "install and load the NVIDIA driver (nvidia-smi -L should list the GPUs)"


def list_gpus() -> list[str]:
    """One description per GPU, by CUDA index; [] when none is found."""
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            result = subprocess.run(
                [smi, "-L"],
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired):
            result = None
        if result is not None and result.returncode == 0:
            found = [m for m in map(_SMI_LINE.match, result.stdout.splitlines()) if m]
            return [m.group(2).strip() for m in sorted(found, key=lambda m: int(m.group(1)))]
    return _proc_gpus()


def _proc_gpus() -> list[str]:
    try:
        dirs = sorted(PROC_GPUS.iterdir())
    except OSError:
        return []
    gpus = []
    for bus_dir in dirs:
        model = "NVIDIA GPU"
        try:
            for line in (bus_dir / "information").read_text().splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "Model":
                    model = value.strip()
        except OSError:
            pass
        gpus.append(f"{model} (bus {bus_dir.name})")
    return gpus


def check_gpus(config: Config) -> Check:
    """The GPUs, ``runtime.gpu`` among them, and no other instance pinned to the same one."""
    gpus = list_gpus()
    listing = "; ".join(f"{index}: {text}" for index, text in enumerate(gpus)) or "none found"
    me = Instance(config.instance).label
    gpu = config.runtime.gpu
    if gpu is not None and gpu >= len(gpus):
        return Check(
            "GPUs",
            "fail" if config.runtime.backend == "isaacteleop" else "warn",
            f"instance {me!r}: runtime.gpu = {gpu}, but there are {len(gpus)} GPU(s) ({listing})",
            f"set runtime.gpu in {config.source} to one of 0..{len(gpus) - 1}"
            if gpus
            else _DRIVER_FIX,
        )
    sharing = sorted(
        other.label for other, theirs in _other_gpus(config) if gpu is not None and theirs == gpu
    )
    if sharing:
        return Check(
            "GPUs",
            "warn",
            f"instance {me!r} and {', '.join(map(repr, sharing))} all use GPU {gpu} ({listing})",
            "give each instance its own runtime.gpu",
        )
    pinned = f"instance {me!r} uses GPU {gpu}" if gpu is not None else "runtime.gpu is not set"
    if not gpus:
        return Check("GPUs", "warn", f"{pinned}; GPUs: {listing}", _DRIVER_FIX)
    return Check("GPUs", "ok", f"{pinned}; GPUs: {listing}")


def _other_gpus(config: Config) -> list[tuple[Instance, int | None]]:
    found = []
    for other in instances.configured():
        if other.name == config.instance:
            continue
        try:
            found.append((other, load_config(instance=other.name).runtime.gpu))
        except CxrdError:
            continue
    return found
