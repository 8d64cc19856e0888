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

With ``--runtime isaacteleop --accept-eula`` (a machine with an NVIDIA driver,
a Vulkan loader and ``cxrd[cloudxr]``), it times the real runtime instead:
start to READY=1 and SIGTERM to exit; ``--accept-eula`` writes the EULA marker
into the benchmark's throwaway install dir, so pass it only if you accept the
CloudXR EULA.

Usage: python bench/readiness.py [--runs 20] [--delay 0.2] [--no-proxy]
       python bench/readiness.py --runtime isaacteleop --accept-eula [--runs 3]
"""

from __future__ import annotations

import argparse
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--delay", type=float, default=0.2, help="the sim's startup delay, seconds")
    p.add_argument("--no-proxy", action="store_true", help="runtime only")
    p.add_argument("--runtime", choices=("sim", "isaacteleop"), default="sim")
    p.add_argument("--accept-eula", action="store_true", help="isaacteleop: you accept it")
    args = p.parse_args()
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
