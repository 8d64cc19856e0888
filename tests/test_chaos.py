"""The chaos soak (bench/chaos.py) as a CI gate: a short run on the test's private bus.

The driver lives in the bench; this test gives it the fixture's bus and a tmp
dir and fails on whatever the soak counts as a failure (an unanswered call, an
answer the API does not allow, an orphan, a non-zero exit, fd/RSS growth).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

from fixtures_dbus import PrivateBus
from support import TIMEOUT

SECONDS = 15.0
SEED = int(os.environ.get("CXRD_CHAOS_SEED", "8"))
BENCH = Path(__file__).resolve().parent.parent / "bench"


def _chaos() -> ModuleType:
    # As under `python bench/chaos.py`, its folder is where `import benchlib` looks;
    # appended, so that nothing in bench/ shadows a module the tests import.
    if str(BENCH) not in sys.path:
        sys.path.append(str(BENCH))
    spec = importlib.util.spec_from_file_location("cxrd_bench_chaos", BENCH / "chaos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


chaos = _chaos()


def test_plan_is_a_function_of_the_seed() -> None:
    first = chaos.plan(SEED, SECONDS, 8.0)
    assert first == chaos.plan(SEED, SECONDS, 8.0)
    assert first != chaos.plan(SEED + 1, SECONDS, 8.0)
    kinds = {op.kind for op in chaos.plan(SEED, 120.0, 8.0)}
    assert kinds == set(chaos.WEIGHTS)  # a long enough plan uses every kind


def test_soak_answers_every_call_and_leaves_nothing_behind(
    private_bus: PrivateBus, tmp_path: Path
) -> None:
    report = chaos.soak(
        private_bus.address,
        tmp_path,
        seconds=SECONDS,
        seed=SEED,
        call_timeout=TIMEOUT / 2,
        start_timeout=TIMEOUT * 2,
    )
    log = (tmp_path / "cxrd.stderr").read_text(errors="replace").splitlines()[-30:]
    assert report["operations_fired"] > 0
    assert not report["failures"], json.dumps(report, indent=2) + "\n" + "\n".join(log)
