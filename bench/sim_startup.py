"""How fast ``python -m cxrd.sim`` comes up and goes down, with no injected delay.

Over N runs (startup_delay 0), prints JSON:

- ``spawn_to_sentinel_ms``: from ``Popen`` to ``runtime_started`` appearing
  (seen with inotify), median and max: the sim's own share of a daemon's
  start-to-ready time;
- ``sigterm_to_exit_ms``: from SIGTERM to the process being reaped;
- ``bare_python_ms``: ``python -c pass``, spawn to exit, for scale.

Usage: python bench/sim_startup.py [--runs 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import free_port

from cxrd.system.readiness import wait_for_file


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 1),
        "max": round(max(values), 1),
        "min": round(min(values), 1),
    }


async def one_run(tmp: Path) -> tuple[float, float]:
    install = tmp / "cloudxr"
    run_dir = install / "run"
    run_dir.mkdir(parents=True, mode=0o700)
    env = dict(os.environ)
    env.update(
        XR_RUNTIME_JSON=str(install / "openxr_cloudxr.json"),
        NV_CXR_RUNTIME_DIR=str(run_dir),
        NV_CXR_OUTPUT_DIR=str(install / "logs"),
        CXR_INSTALL_DIR=str(install),
        CXRD_SIM_STARTUP_DELAY="0",
        NV_CXR_SERVER_PORT=str(free_port()),
    )
    sentinel = wait_for_file(run_dir / "runtime_started")
    waiter = asyncio.ensure_future(sentinel)
    await asyncio.sleep(0)  # let the watch go in place before the spawn
    with open(tmp / "stderr.log", "ab") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "cxrd.sim"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    try:
        async with asyncio.timeout(30):
            await waiter
        ready = time.perf_counter()
        stop = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
        stopped = time.perf_counter()
        if code != 0:
            raise RuntimeError(f"sim exited {code}: {(tmp / 'stderr.log').read_text()}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return (ready - start) * 1000, (stopped - stop) * 1000


def bare_python() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    starts, stops, bare = [], [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="cxrd-sim-bench-") as tmp:
            up, down = asyncio.run(one_run(Path(tmp)))
        starts.append(up)
        stops.append(down)
        bare.append(bare_python())
    print(
        json.dumps(
            {
                "runs": args.runs,
                "spawn_to_sentinel_ms": summary(starts),
                "sigterm_to_exit_ms": summary(stops),
                "bare_python_ms": summary(bare),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
