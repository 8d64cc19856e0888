"""Readiness latency: from the sentinel's creation to READY=1, over N daemon starts.

Runs the real daemon (``python -m cxrd``) with the sim runtime and a real
NOTIFY_SOCKET, N times. Prints JSON:

- ``sentinel_to_ready_ms``: from the moment this script creates
  ``runtime_started`` itself (the sim runs with ``never_ready``, so the file's
  creation time is known exactly, not read from a coarse mtime) to READY=1's
  arrival; median and max.
- ``start_to_ready_ms``: in separate runs where the sim writes the sentinel after
  its own startup delay, READY=1's arrival minus the daemon's spawn;
  ``overhead_ms`` is that minus the sim's delay.

With ``--side-by-side``, it compares start overhead on one stand-in (the sim,
``python -m cxrd.sim``, which writes ``run/runtime_started`` after
``--delay``): for each of N rounds, interleaved so machine load hits all alike,
start-to-ready minus the delay for

- ``cxrd_foreground``: ``python -m cxrd --runtime sim`` spawned to READY=1 on
  a NOTIFY_SOCKET;
- ``cxrd_systemd``: a real ``systemctl --user start cloudxr`` (the unit from
  ``cxrctl install``) in a private ``systemd --user`` (tests/fixtures_systemd;
  needs root), from the spawn of ``systemctl`` to its return (Type=notify:
  READY=1). A drop-in lifts only the unit's start rate limit, for N starts;
- ``isaacteleop``: ``python -m isaacteleop.cloudxr.service start`` with the
  shim in ``bench/isaacteleop_shim`` first on PYTHONPATH (its worker's
  ``run()`` runs the sim), from the spawn of that CLI to ``serving``: its WSS
  proxy port accepts a TCP connection, which its ``CloudXRService`` does only
  after it saw the sentinel (what cxrd's READY=1 also means). The CLI's own
  return is reported too (``cli_return``): it returns once ``ipc_cloudxr``
  accepts, which the stand-in does before its delay, so it can come before
  the runtime is ready; a run where it exits 1 ("exited during startup")
  while the service goes on to serve is counted apart
  (``isaacteleop_cli_spurious_failures``), its serving time kept.

It prints medians and the ratios cxrd/isaacteleop (target: at most 0.5). The
stand-in is not NVIDIA software; the EULA marker isaacteleop's service checks
is written into each throwaway install dir so that its start path runs as
with an accepted EULA.

With ``--runtime isaacteleop --accept-eula`` (a machine with an NVIDIA driver,
a Vulkan loader and ``cxrd[cloudxr]``), it times the real runtime instead:
start to READY=1 and SIGTERM to exit; ``--accept-eula`` writes the EULA marker
into the benchmark's throwaway install dir, so pass it only if you accept the
CloudXR EULA.

Usage: python bench/readiness.py [--runs 20] [--delay 0.2] [--no-proxy]
       python bench/readiness.py --side-by-side [--runs 10] [--delay 0.2]
       python bench/readiness.py --runtime isaacteleop --accept-eula [--runs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import free_port, processes_of


def one_run(
    tmp: Path, delay: float, proxy: bool, *, own_sentinel: bool, real: bool = False
) -> tuple[float, float]:
    """Milliseconds to READY=1 (from the spawn, or from our own sentinel), and to stop."""
    install = tmp / "cloudxr"
    run_dir = install / "run"
    config = tmp / "cxrd.toml"
    if real:
        run_dir.mkdir(parents=True, mode=0o700)
        (run_dir / "eula_accepted").write_text("accepted")
        runtime = '[runtime]\nbackend = "isaacteleop"\nstartup_timeout = 120.0\n'
    else:
        runtime = (
            '[runtime]\nbackend = "sim"\n'
            f"[runtime.sim]\nstartup_delay = {delay}\nnever_ready = {str(own_sentinel).lower()}\n"
        )
    # The real runtime's signaling port is fixed at 49100.
    backend_port = 49100 if real else free_port()
    config.write_text(
        f'install_dir = "{install}"\n{runtime}'
        f'[proxy]\nenabled = {str(proxy).lower()}\nhost = "127.0.0.1"\n'
        f"port = {free_port()}\nbackend_port = {backend_port}\n"
    )
    sock_path = tmp / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(30)
        env = {k: v for k, v in os.environ.items() if k != "DBUS_SESSION_BUS_ADDRESS"}
        env.update(NOTIFY_SOCKET=str(sock_path), XDG_RUNTIME_DIR=str(tmp))
        spawned = time.time()
        proc = subprocess.Popen(
            [sys.executable, "-m", "cxrd", "--config", str(config)],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        try:
            if own_sentinel:
                # The sim binds ipc_cloudxr once up; give cxrd a moment past that.
                deadline = time.time() + 30
                while not (run_dir / "ipc_cloudxr").exists():
                    if time.time() > deadline:
                        raise RuntimeError("the sim did not come up")
                    time.sleep(0.01)
                time.sleep(0.2)
                spawned = time.time()
                (run_dir / "runtime_started").touch()
            while True:
                data = sock.recv(65536)
                if b"READY=1" in data.split(b"\n"):
                    arrived = time.time()
                    break
                if b"STATUS=Failed" in data:
                    raise RuntimeError(data.decode(errors="replace"))
        finally:
            stopping = time.time()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            stopped = time.time()
        sock_path.unlink()
    return (arrived - spawned) * 1e3, (stopped - stopping) * 1e3


def stats(values: list[float], digits: int = 1) -> dict[str, float]:
    return {"median": round(statistics.median(values), digits), "max": round(max(values), digits)}


BENCH = Path(__file__).resolve().parent
SHIM = BENCH / "isaacteleop_shim"
TESTS = BENCH.parent / "tests"
UNIT = "cloudxr.service"


def _pythonpath(*first: Path) -> str:
    """PYTHONPATH with ``first`` ahead of the caller's own (which may pick a cxrd tree)."""
    parts = [str(p) for p in first] + [p for p in os.environ.get("PYTHONPATH", "").split(":") if p]
    return ":".join(parts)


def _leftovers(install: Path) -> list[int]:
    """Processes still naming the install dir a moment after a stop (should be none)."""
    deadline = time.monotonic() + 5.0
    while (left := processes_of(install)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _tails(install: Path) -> str:
    """The last lines of isaacteleop's service and worker logs, for a failed start."""
    out = []
    for name in ("service.log", "runtime_worker_stderr.log", "runtime_stderr.log"):
        with contextlib.suppress(OSError):
            lines = (install / "logs" / name).read_text(errors="replace").splitlines()
            out.append(f"--- {name} ---\n" + "\n".join(lines[-15:]))
    return "\n" + "\n".join(out)


def cxrd_foreground(delay: float) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        return one_run(Path(tmp), delay, True, own_sentinel=False)[0] - delay * 1e3


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def isaacteleop_service(delay: float, timeout: float = 60.0) -> tuple[float, float | None]:
    """isaacteleop's detached service on the stand-in: ms over the delay to serving, to return."""
    with tempfile.TemporaryDirectory(prefix="cxrd-bench-it-") as name:
        tmp = Path(name)
        install, home = tmp / "cloudxr", tmp / "home"
        (install / "run").mkdir(parents=True, mode=0o700)
        home.mkdir()
        (install / "run" / "eula_accepted").write_text("accepted")
        proxy_port = free_port()
        drop = ("NOTIFY_SOCKET", "DBUS_SESSION_BUS_ADDRESS", "JOURNAL_STREAM", "WATCHDOG_USEC")
        env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("CXRD_")}
        env.update(
            HOME=str(home),  # nothing of ~/.cloudxr
            PYTHONPATH=_pythonpath(SHIM),
            PROXY_PORT=str(proxy_port),  # never 48322
            CXRD_SIM_STARTUP_DELAY=repr(delay),
            NV_CXR_SERVER_PORT=str(free_port()),  # never 49100
        )
        cli = [sys.executable, "-m", "isaacteleop.cloudxr.service"]
        where = ["--cloudxr-install-dir", str(install)]
        began = time.monotonic()
        proc = subprocess.Popen(
            [*cli, "start", *where],
            env=env,
            cwd=tmp,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        serving = returned = None
        try:
            # No event to wait on in another program's start path: poll it finely.
            while serving is None or returned is None:
                now = time.monotonic()
                if now - began > timeout:
                    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                    raise RuntimeError(
                        f"isaacteleop's service not serving within {timeout:g} s "
                        f"(start exited {proc.returncode}): {err}{_tails(install)}"
                    )
                if returned is None and proc.poll() is not None:
                    returned = now
                if serving is None and _listening(proxy_port):
                    serving = now
                time.sleep(0.002)
        finally:
            if proc.poll() is None:
                proc.wait(timeout=timeout)
            if proc.stderr is not None:
                proc.stderr.close()
            subprocess.run(
                [*cli, "stop", *where],
                env=env,
                cwd=tmp,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                timeout=timeout,
                check=True,
            )
            left = _leftovers(install)
            if left:
                raise RuntimeError(f"isaacteleop's service left processes {left}")
    # Its start can report "exited during startup" for a service that then
    # serves (its pid check races the child's exec): no CLI figure for that run.
    cli_ms = (returned - began) * 1e3 - delay * 1e3 if proc.returncode == 0 else None
    return (serving - began) * 1e3 - delay * 1e3, cli_ms


class SystemdCxrd:
    """cxrd installed as ``cloudxr.service`` in a private ``systemd --user`` (needs root)."""

    def __init__(self, root: Path) -> None:
        sys.path.insert(0, str(TESTS))
        import fixtures_systemd  # only this figure needs a test fixture

        self._fixtures = fixtures_systemd
        reason = fixtures_systemd._why_no_systemd()
        if reason is not None:
            raise RuntimeError(reason)
        self.root = root
        self.manager = fixtures_systemd._start_manager(root)
        try:
            self._install()
        except BaseException:
            self.close()
            raise

    def _install(self) -> None:
        extra = {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}
        cxrctl = str(Path(sys.executable).parent / "cxrctl")
        self.manager.run(cxrctl, "install", extra_env=extra)
        env_line = f"Environment=PYTHONPATH={extra['PYTHONPATH']}\n" if extra else ""
        self.manager.write_dropin(
            UNIT,
            "bench",
            # N starts in a row would meet StartLimitBurst=; nothing else changes.
            "[Unit]\nStartLimitIntervalSec=0\n"
            f"[Service]\nStandardError=append:{self.root / 'cxrd.stderr'}\n{env_line}",
        )
        self.manager.systemctl("daemon-reload")

    def start_overhead(self, run: int, delay: float) -> float:
        install = self.root / f"cloudxr-{run}"
        config = self.manager.config_home / "cxrd" / "cxrd.toml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(
            f'install_dir = "{install}"\n[runtime]\nbackend = "sim"\n'
            f"[runtime.sim]\nstartup_delay = {delay}\n"
            f'[proxy]\nhost = "127.0.0.1"\nport = {free_port()}\nbackend_port = {free_port()}\n'
        )
        began = time.monotonic()
        result = self.manager.systemctl("start", UNIT, check=False, timeout=60)
        took = time.monotonic() - began
        if result.returncode != 0:
            raise RuntimeError(
                f"systemctl --user start exited {result.returncode}: {result.stderr}"
            )
        self.manager.systemctl("stop", UNIT, timeout=60)
        left = _leftovers(install)
        if left:
            raise RuntimeError(f"cloudxr.service left processes {left}")
        return took * 1e3 - delay * 1e3

    def close(self) -> None:
        self._fixtures._stop_manager(self.manager)


def side_by_side(runs: int, delay: float) -> dict[str, object]:
    """Start overhead of cxrd (foreground, systemd) and isaacteleop's service, same stand-in."""
    fg: list[float] = []
    unit: list[float] = []
    serving: list[float] = []
    cli: list[float] = []
    cli_failed = 0
    with tempfile.TemporaryDirectory(prefix="cxrd-bench-systemd-") as root:
        systemd: SystemdCxrd | None = None
        skipped = ""
        try:
            systemd = SystemdCxrd(Path(root))
        except RuntimeError as exc:
            skipped = str(exc)
        try:
            for run in range(runs):
                fg.append(cxrd_foreground(delay))
                if systemd is not None:
                    unit.append(systemd.start_overhead(run, delay))
                s, c = isaacteleop_service(delay)
                serving.append(s)
                if c is None:
                    cli_failed += 1
                else:
                    cli.append(c)
        finally:
            if systemd is not None:
                systemd.close()

    def ratio(ours: list[float], theirs: list[float]) -> float | None:
        if not ours or not theirs or statistics.median(theirs) <= 0:
            return None
        return round(statistics.median(ours) / statistics.median(theirs), 3)

    result: dict[str, object] = {
        "runs": runs,
        "stand_in": "python -m cxrd.sim",
        "stand_in_delay_ms": delay * 1e3,
        "overhead_ms": {
            "cxrd_foreground": stats(fg),
            "cxrd_systemd": stats(unit) if unit else f"skipped: {skipped}",
            "isaacteleop_serving": stats(serving),
            "isaacteleop_cli_return": stats(cli) if cli else None,
        },
        # Runs where `service start` exited 1 ("exited during startup") and the
        # service came up and served anyway; they count for serving only.
        "isaacteleop_cli_spurious_failures": cli_failed,
        "ratio_cxrd_over_isaacteleop": {
            "foreground": ratio(fg, serving),
            "systemd": ratio(unit, serving),
            "foreground_vs_cli_return": ratio(fg, cli),
            "systemd_vs_cli_return": ratio(unit, cli),
        },
        "target_ratio_at_most": 0.5,
        "raw_ms": {
            "cxrd_foreground": [round(v, 1) for v in fg],
            "cxrd_systemd": [round(v, 1) for v in unit],
            "isaacteleop_serving": [round(v, 1) for v in serving],
            "isaacteleop_cli_return": [round(v, 1) for v in cli],
        },
    }
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--delay", type=float, default=0.2, help="the sim's startup delay, seconds")
    p.add_argument("--no-proxy", action="store_true", help="runtime only")
    p.add_argument("--runtime", choices=("sim", "isaacteleop"), default="sim")
    p.add_argument("--accept-eula", action="store_true", help="isaacteleop: you accept it")
    p.add_argument(
        "--side-by-side",
        action="store_true",
        help="start overhead: cxrd (foreground, systemd) against isaacteleop's service",
    )
    args = p.parse_args()
    if args.side_by_side:
        print(json.dumps(side_by_side(args.runs, args.delay), indent=2))
        return
    proxy = not args.no_proxy
    if args.runtime == "isaacteleop":
        if not args.accept_eula:
            p.error("--runtime isaacteleop needs --accept-eula (the CloudXR EULA)")
        runs = []
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory() as tmp:
                runs.append(one_run(Path(tmp), 0.0, proxy, own_sentinel=False, real=True))
        real = {
            "runs": args.runs,
            "runtime": "isaacteleop",
            "proxy": proxy,
            "start_to_ready_ms": stats([r[0] for r in runs]),
            "stop_ms": stats([r[1] for r in runs]),
        }
        print(json.dumps(real, indent=2))
        return
    to_ready, start = [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            to_ready.append(one_run(Path(tmp), args.delay, proxy, own_sentinel=True)[0])
        with tempfile.TemporaryDirectory() as tmp:
            start.append(one_run(Path(tmp), args.delay, proxy, own_sentinel=False)[0])
    result = {
        "runs": args.runs,
        "sim_startup_delay_ms": args.delay * 1e3,
        "proxy": proxy,
        "sentinel_to_ready_ms": stats(to_ready, 3),
        "start_to_ready_ms": stats(start),
        "overhead_ms": stats([ms - args.delay * 1e3 for ms in start]),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
