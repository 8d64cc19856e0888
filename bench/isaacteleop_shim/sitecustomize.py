"""Make isaacteleop's CloudXR service run cxrd's sim in place of the NVIDIA runtime.

Put this directory first on ``PYTHONPATH`` of ``python -m
isaacteleop.cloudxr.service``: Python imports ``sitecustomize`` at start-up,
in the service and in the runtime worker it spawns alike. It changes exactly
the two functions of ``isaacteleop.cloudxr.runtime`` that need NVIDIA's native
library, as that module is imported, and nothing else of isaacteleop:

- ``run()``, which the worker calls (``from isaacteleop.cloudxr.runtime import
  run; run()``), runs ``python -m cxrd.sim`` in that same interpreter, so the
  worker's pid, process group and parent-death signal stay isaacteleop's own;
- ``runtime_version()``, which the service's summary calls (it ``dlopen``s
  ``libcloudxr.so``, which needs a GPU driver), names the stand-in.

The sim reads the environment isaacteleop's ``EnvConfig`` gives the worker
(``XR_RUNTIME_JSON``, ``NV_CXR_RUNTIME_DIR``, ``CXR_INSTALL_DIR``) and its own
``CXRD_SIM_*`` knobs, and writes ``run/runtime_started`` after its startup
delay, as it does under cxrd. Used by ``bench/readiness.py --side-by-side``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import runpy
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

_TARGETS = frozenset({"isaacteleop.cloudxr.runtime", "isaacteleop.cloudxr_exp.runtime"})
STAND_IN_VERSION = "cxrd.sim (stand-in)"


def run_stand_in() -> None:
    """``run()`` of the worker: the sim takes this interpreter over until it exits."""
    sys.argv = ["cxrd.sim"]
    runpy.run_module("cxrd.sim", run_name="__main__", alter_sys=True)


def stand_in_version() -> str:
    return STAND_IN_VERSION


class _Patching(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        module.run = run_stand_in  # type: ignore[attr-defined]
        module.runtime_version = stand_in_version  # type: ignore[attr-defined]


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _TARGETS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _Patching(spec.loader)
        return spec


sys.meta_path.insert(0, _Finder())
