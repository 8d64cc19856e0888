"""What ``cxrctl run`` costs, next to what users would otherwise pick (issue 15).

Starts a private dbus-daemon and a real cxrd on it (sim runtime with a
``--delay`` startup delay, 2 s by default, standing in for the real runtime's
seconds-long start; free ports; a throwaway ``HOME``, nothing of
``~/.cloudxr`` touched), waits until it is ready (warm), then measures, each
``--runs`` times (medians, min, max, in ms):

1. ``cxrctl_run_true``: ``cxrctl run -- true`` from spawn to exit, against
   ``true`` alone and ``cxrctl status`` (interleaved). Target: ``cxrctl run``
   within 1.2x of ``cxrctl status``. ``python -c pass`` and ``python -c
   "import cxrd.cli.main"`` run alongside, so ``split_ms`` parts each median
   into the interpreter, cxrctl's imports and the command's own work. When the
   target misses (or with ``--profile``), ``profile`` says where the time goes:
   ``python -X importtime`` (heaviest imports) and cProfile (heaviest calls
   once imported), one run of each command.

2. "Isaac Lab session start to runtime usable", two ways (interleaved):

   a. ``cxrctl_run``: ``cxrctl run -- python SESSION`` on the warm daemon,
      from the spawn of cxrctl to the moment SESSION finds the runtime usable:
      XR_RUNTIME_JSON is an absolute path (parsed where it exists; the sim
      writes no manifest) and ``<NV_CXR_RUNTIME_DIR>/ipc_cloudxr`` accepts a
      connection. Two SESSIONs: ``isaaclab`` imports Isaac Lab 3.0.0's
      ``isaaclab_teleop`` (with isaacteleop 1.4.145) from ``.cache/`` (Kit
      stubbed as ``tests/isaaclab_session.py`` does) and runs
      ``TeleopSessionLifecycle._ensure_cloudxr_runtime()`` first (which skips
      its own launcher under cxrctl run); ``minimal`` only does the check.
      For scale, ``env_sourced_isaaclab`` runs the ``isaaclab`` SESSION
      without cxrctl, its environment from one ``cxrctl env`` beforehand
      (``eval "$(cxrctl env)"``, no lease); the runtime's pid must not change
      through all of a.
   b. ``isaacteleop_1_4_launcher``: the same Isaac Lab SESSION without cxrd,
      on isaacteleop 1.4.145 from ``.cache/``, whose ``_ensure_cloudxr_runtime()``
      constructs ``isaacteleop.cloudxr.CloudXRLauncher(install_dir=~/.cloudxr,
      env_config=<Isaac Lab's profile>, accept_eula=True)`` in process
      (``ISAACLAB_CXR_ACCEPT_EULA=1``, a throwaway ``HOME``). The launcher
      spawns ``python -c "from isaacteleop.cloudxr.runtime import run; run()"``;
      ``bench/isaacteleop_shim`` (first on PYTHONPATH) makes that ``run()``
      the sim (``python -m cxrd.sim``) with the same startup delay
      (``CXRD_SIM_STARTUP_DELAY``). Reported: the construction to its return
      (the runtime ready, its WSS proxy thread started), spawn to usable (as in
      a), and the launcher's ``stop()`` on the way out, apart. The first round
      of each is a warm-up (caches; isaacteleop's certificate) and not counted.

   Target: (a) with Isaac Lab under a tenth of the launcher's construction.

SESSION is ``bench/run_overhead_session.py``, run by path; the warm cxrd
(``Stand``, ``warm_cxrd``) is in ``bench/run_overhead_stand.py``. The
stand-in is not NVIDIA software. Prints one JSON object.

    .venv/bin/python bench/run_overhead.py [--runs 10] [--delay 2.0] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pstats
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any

from benchlib import free_port, processes_of
from run_overhead_stand import CXRCTL, WAIT, Stand, clean_env, warm_cxrd

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SHIM = BENCH / "isaacteleop_shim"
TESTS = ROOT / "tests"
CACHE = ROOT / ".cache"
TELEOP_14 = CACHE / "isaacteleop-1.4.145"
ISAACLAB = CACHE / "isaaclab-3.0.0"
PROFILE = ISAACLAB / "isaaclab_teleop" / "cloudxrjs-cloudxr.env"
# The program both session figures time, run by path (see its docstring).
SESSION = BENCH / "run_overhead_session.py"
TRUE = "/bin/true"
SIM_BANNER = "SIMULATED CloudXR runtime"  # what cxrd.sim prints first
RUN_TARGET = 1.2  # cxrctl run -- true at most this times cxrctl status
SESSION_TARGET = 0.1  # session start through cxrctl run under this share of the launcher's


def stats(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 1),
        "min": round(min(values), 1),
        "max": round(max(values), 1),
    }


def ratio(ours: list[float], theirs: list[float]) -> float:
    return round(statistics.median(ours) / statistics.median(theirs), 3)


def run_true(stand: Stand, runs: int) -> dict[str, Any]:
    cases = {
        "true": [TRUE],
        "cxrctl_status": [str(CXRCTL), "status"],
        "cxrctl_run_true": [str(CXRCTL), "run", "--", TRUE],
        # The floors under both: the interpreter, then it and cxrctl's imports.
        "python_c_pass": [sys.executable, "-c", "pass"],
        "python_import_cxrctl": [sys.executable, "-c", "import cxrd.cli.main"],
    }
    for argv in cases.values():  # warm the page cache, bytecode and the bus
        stand.timed(argv)
    ms: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(runs):
        for name, argv in cases.items():
            ms[name].append(stand.timed(argv))
    med = {name: statistics.median(values) for name, values in ms.items()}
    over = ratio(ms["cxrctl_run_true"], ms["cxrctl_status"])
    return {
        "ms": {name: stats(values) for name, values in ms.items()},
        "ratio_run_over_status": over,
        "target_ratio_at_most": RUN_TARGET,
        "target_met": over <= RUN_TARGET,
        # Medians' differences: what each command does once imported.
        "split_ms": {
            "interpreter": round(med["python_c_pass"], 1),
            "cxrctl_imports": round(med["python_import_cxrctl"] - med["python_c_pass"], 1),
            "status_work": round(med["cxrctl_status"] - med["python_import_cxrctl"], 1),
            "run_true_work": round(med["cxrctl_run_true"] - med["python_import_cxrctl"], 1),
            "run_minus_status": round(med["cxrctl_run_true"] - med["cxrctl_status"], 1),
        },
        "raw_ms": {name: [round(v, 1) for v in values] for name, values in ms.items()},
    }


def _importtime(stand: Stand, args: list[str]) -> list[tuple[int, str, int, int]]:
    """(depth, module, self us, cumulative us) from ``python -X importtime -m cxrd.cli``."""
    err = stand.check([sys.executable, "-X", "importtime", "-m", "cxrd.cli", *args]).stderr
    found = []
    for line in err.decode(errors="replace").splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)", line)
        if m:
            found.append((len(m[3]) // 2, m[4], int(m[1]), int(m[2])))
    return found


def _work(stand: Stand, args: list[str]) -> dict[str, float]:
    """cxrctl's heaviest calls once imported (cProfile, cumulative ms; one run, inflated).

    cxrd's own functions, and the time blocked in epoll (waiting for the bus,
    the daemon or the child) and in fork/exec.
    """
    with tempfile.NamedTemporaryFile(suffix=".prof", dir=stand.tmp) as prof:
        stand.check([sys.executable, "-m", "cProfile", "-o", prof.name, "-m", "cxrd.cli", *args])
        raw: dict[Any, Any] = pstats.Stats(prof.name).stats  # type: ignore[attr-defined]
    rows = []
    for (path, line, func), (_, _, _, cum, _) in raw.items():
        mine = f"{os.sep}cxrd{os.sep}" in path and func != "<module>"
        waits = "'poll' of 'select.epoll'" in func or "fork_exec" in func
        if mine or waits:
            where = f"{Path(path).parent.name}/{Path(path).name}:{line}:" if mine else ""
            rows.append((cum, f"{where}{func}"))
    rows.sort(reverse=True)
    return {name: round(cum * 1e3, 1) for cum, name in rows[:12]}


def profile(stand: Stand) -> dict[str, Any]:
    """Where ``cxrctl status`` and ``cxrctl run -- true`` spend their time (one run each)."""
    out: dict[str, Any] = {}
    for name, args in {"status": ["status"], "run_true": ["run", "--", TRUE]}.items():
        imports = _importtime(stand, args)
        top = [cum for depth, _, _, cum in imports if depth == 0]
        # cxrctl's own modules and what they pull in, two to four levels under cxrd.cli.
        tree = sorted((i for i in imports if 2 <= i[0] <= 4), key=lambda i: i[3], reverse=True)
        heavy = sorted(imports, key=lambda i: i[2], reverse=True)
        out[name] = {
            "imports_ms": round(sum(top) / 1e3, 1),
            "modules": len(imports),
            "heaviest_imports_cumulative_ms": {m: round(c / 1e3, 1) for _, m, _, c in tree[:10]},
            "heaviest_imports_self_ms": {m: round(us / 1e3, 1) for _, m, us, _ in heavy[:8]},
            "work_cprofile_ms": _work(stand, args),
        }
    return out


def _session_argv(mode: str) -> list[str]:
    paths = [str(TESTS), str(TELEOP_14), str(ISAACLAB)]
    return [sys.executable, str(SESSION), mode, str(PROFILE), *paths]


def _stamps(argv: list[str], env: Mapping[str, str], stderr: Path) -> tuple[float, dict[str, Any]]:
    """The spawn time and the session's stamps (``time.monotonic()``), the process exited 0."""
    with stderr.open("wb") as err:
        began = time.monotonic()
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,  # its own group: a timeout ends the session with it
        )
        try:
            out, _ = proc.communicate(timeout=WAIT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=WAIT)
            raise RuntimeError(f"{' '.join(argv)} ran past {WAIT:g} s") from None
    lines = out.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"{' '.join(argv)} exited {proc.returncode}\n{stderr.read_text(errors='replace')}"
        )
    stamps: dict[str, Any] = json.loads(lines[-1])
    stamps["exited"] = time.monotonic()
    return began, stamps


class Launcher14:
    """Isaac Lab's session on isaacteleop 1.4's own launcher, the sim behind the shim."""

    def __init__(self, tmp: Path, delay: float) -> None:
        self.home = tmp / "home-launcher"
        self.home.mkdir()
        self.install = self.home / ".cloudxr"
        self.stderr = tmp / "launcher.stderr"
        self.argv = _session_argv("isaaclab")
        self.env = clean_env(
            HOME=str(self.home),  # Isaac Lab's ~/.cloudxr, in the temp dir
            PYTHONPATH=os.pathsep.join((str(SHIM), str(TELEOP_14), str(ISAACLAB))),
            ISAACLAB_CXR_ACCEPT_EULA="1",  # accept_eula=True
            CXRD_SIM_STARTUP_DELAY=repr(delay),
            NV_CXR_SERVER_PORT=str(free_port()),  # the sim's signaling port, never 49100
            PROXY_PORT=str(free_port()),  # isaacteleop's WSS proxy, never 48322
        )

    def once(self) -> dict[str, float]:
        try:
            began, t = _stamps(self.argv, self.env, self.stderr)
        finally:
            left = self._leftovers()
        if left:
            raise RuntimeError(f"isaacteleop's launcher left processes {left}")
        if not t.get("launched") or "construct1" not in t:
            raise RuntimeError(f"the launcher did not run: {t}\n{self.stderr.read_text()}")
        worker = self.install / "logs" / "runtime_worker_stderr.log"
        if SIM_BANNER not in worker.read_text(errors="replace"):
            raise RuntimeError(f"the launcher's runtime was not the sim: see {worker}")
        return {
            "construct_to_return": (t["construct1"] - t["construct0"]) * 1e3,
            "spawn_to_usable": (t["usable"] - began) * 1e3,
            "stop": (t["stop1"] - t["stop0"]) * 1e3,
        }

    def _leftovers(self) -> list[int]:
        deadline = time.monotonic() + 10.0
        while (left := processes_of(self.install)) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in left:  # the runtime our own child spawned
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return left


def under_run(stand: Stand, mode: str) -> dict[str, float]:
    argv = [str(CXRCTL), "run", "--", *_session_argv(mode)]
    began, t = _stamps(argv, stand.env, stand.tmp / f"run-{mode}.stderr")
    if t.get("launched"):
        raise RuntimeError("Isaac Lab launched its own runtime under cxrctl run")
    return {
        "spawn_to_usable": (t["usable"] - began) * 1e3,
        "spawn_to_session_main": (t["main"] - began) * 1e3,
        "session_main_to_usable": (t["usable"] - t["main"]) * 1e3,
        "spawn_to_exit": (t["exited"] - began) * 1e3,
    }


def sourced(stand: Stand, env: Mapping[str, str]) -> dict[str, float]:
    """The session with the runtime's environment already there: no cxrctl, no lease."""
    began, t = _stamps(_session_argv("isaaclab"), env, stand.tmp / "sourced.stderr")
    if t.get("launched"):
        raise RuntimeError("Isaac Lab launched its own runtime with cxrd's environment")
    return {
        "spawn_to_usable": (t["usable"] - began) * 1e3,
        "spawn_to_session_main": (t["main"] - began) * 1e3,
    }


def sessions(stand: Stand, runs: int, delay: float) -> dict[str, Any]:
    missing = [str(p) for p in (TELEOP_14 / "isaacteleop", PROFILE) if not p.exists()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: scripts/setup.sh fetches them")
    launcher = Launcher14(stand.tmp, delay)
    # eval "$(cxrctl env)" once, then ISAACLAB_CXR_SKIP_AUTOLAUNCH=1 as cxrctl run sets it.
    runtime_env = json.loads(stand.cxrctl("env", "--shell", "json").stdout)
    env = {**stand.env, **runtime_env, "ISAACLAB_CXR_SKIP_AUTOLAUNCH": "1"}
    pid_before = stand.runtime_pid()
    rows: dict[str, list[dict[str, float]]] = {
        "isaaclab": [],
        "minimal": [],
        "sourced": [],
        "launcher": [],
    }
    for run in range(runs + 1):  # the first round warms caches and writes the cert: not counted
        got = {
            "isaaclab": under_run(stand, "isaaclab"),
            "minimal": under_run(stand, "minimal"),
            "sourced": sourced(stand, env),
            "launcher": launcher.once(),
        }
        if run:
            for name, row in got.items():
                rows[name].append(row)
    if stand.runtime_pid() != pid_before:
        raise RuntimeError("cxrd's runtime restarted during the sessions: not a warm figure")

    def column(name: str, key: str) -> list[float]:
        return [row[key] for row in rows[name]]

    def table(name: str) -> dict[str, dict[str, float]]:
        return {key: stats(column(name, key)) for key in rows[name][0]}

    lab, construct = (
        column("isaaclab", "spawn_to_usable"),
        column("launcher", "construct_to_return"),
    )
    share = ratio(lab, construct)
    return {
        "cxrctl_run_isaaclab_ms": table("isaaclab"),
        "cxrctl_run_minimal_ms": table("minimal"),
        "env_sourced_isaaclab_ms": table("sourced"),
        "isaacteleop_1_4_launcher_ms": table("launcher"),
        "ratio_session_start": {
            # the target's: cxrctl run's spawn to usable over the launcher's construction
            "isaaclab_over_launcher_construct": share,
            "minimal_over_launcher_construct": ratio(
                column("minimal", "spawn_to_usable"), construct
            ),
            # both from a process spawn to usable
            "isaaclab_over_launcher_spawn_to_usable": ratio(
                lab, column("launcher", "spawn_to_usable")
            ),
            "env_sourced_isaaclab_over_launcher_construct": ratio(
                column("sourced", "spawn_to_usable"), construct
            ),
        },
        # cxrctl run's own share: its session against the same one with the env sourced.
        "cxrctl_run_added_ms": {
            "spawn_to_usable": round(
                statistics.median(lab) - statistics.median(column("sourced", "spawn_to_usable")),
                1,
            ),
        },
        "target_ratio_under": SESSION_TARGET,
        "target_met": share < SESSION_TARGET,
        "raw_ms": {
            "cxrctl_run_isaaclab_spawn_to_usable": [round(v, 1) for v in lab],
            "cxrctl_run_minimal_spawn_to_usable": [
                round(v, 1) for v in column("minimal", "spawn_to_usable")
            ],
            "launcher_construct_to_return": [round(v, 1) for v in construct],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="measured runs of each case")
    parser.add_argument(
        "--delay", type=float, default=2.0, help="the sim's startup delay, seconds (both sides)"
    )
    parser.add_argument("--profile", action="store_true", help="profile cxrctl even if on target")
    parser.add_argument(
        "--skip-sessions", action="store_true", help="only part 1 (cxrctl run -- true)"
    )
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    began = time.monotonic()
    result: dict[str, Any] = {"runs": args.runs, "stand_in": "python -m cxrd.sim"}
    with warm_cxrd(args.delay) as stand:
        first = run_true(stand, args.runs)
        result["run_true"] = first
        if args.profile or not first["target_met"]:
            result["profile"] = profile(stand)
        if not args.skip_sessions:
            result["session_start"] = sessions(stand, args.runs, args.delay)
            result["session_start"]["stand_in_delay_ms"] = args.delay * 1e3
    result["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
    }
    result["bench_wall_s"] = round(time.monotonic() - began, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
