#!/usr/bin/env python3
"""What the parent-death signal costs cxrd's event loop at each spawn.

cxrd sets ``PR_SET_PDEATHSIG`` in each child through ``preexec_fn`` (as
isaacteleop's launcher does), which makes CPython fork() instead of vfork():
the loop's thread is blocked while the kernel copies the page tables. This
spawns ``true`` from an asyncio loop ``--runs`` times each way, in a process
that has imported what cxrd imports plus ``--heap-mb`` of touched memory, and
prints the time ``create_subprocess_exec`` held the loop (ms, median and max)
and the process's RSS.

On the 2-core development VM (shared, loaded), 30 runs each, ms held (median / max):

    --heap-mb 0  (RSS 42 MiB, cxrd's):  vfork 1.4 / 46,  fork + pdeathsig  5.1 / 27
    --heap-mb 50 (RSS 92 MiB):          vfork 4.3 / 54,  fork + pdeathsig 14.5 / 235

A cxrd spawns two children per start, so the loop pays this twice a start.

    .venv/bin/python bench/spawn_cost.py [--runs 30] [--heap-mb 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Callable

import cxrd.core.supervisor
import cxrd.daemon
import cxrd.dbus.service
import cxrd.health.server  # noqa: F401  (what a running cxrd has loaded)
from cxrd.system.process import _die_with


async def held_ms(preexec: Callable[[], None] | None) -> float:
    began = time.perf_counter()
    proc = await asyncio.create_subprocess_exec("true", start_new_session=True, preexec_fn=preexec)
    held = time.perf_counter() - began
    await proc.wait()
    return held * 1000


async def measure(runs: int) -> dict[str, dict[str, float]]:
    ways = {"vfork": None, "fork_pdeathsig": _die_with(os.getpid())}
    figures = {}
    for name, preexec in ways.items():
        times = [await held_ms(preexec) for _ in range(runs)]
        figures[name] = {"median_ms": statistics.median(times), "max_ms": max(times)}
    return figures


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--heap-mb", type=int, default=0, help="touched memory on top of cxrd's")
    args = p.parse_args()
    heap = bytearray(args.heap_mb << 20)
    for i in range(0, len(heap), 4096):
        heap[i] = 1
    figures = asyncio.run(measure(args.runs))
    print(json.dumps({"rss_mib": round(rss_mib(), 1), "runs": args.runs, **figures}, indent=2))


if __name__ == "__main__":
    main()
