"""Readiness latency: from the sentinel's creation to READY=1, over N daemon starts.

Runs the real daemon (``python -m cxrd``) with the sim runtime and a real
NOTIFY_SOCKET, N times. Prints JSON:

- ``sentinel_to_ready_ms``: READY=1's arrival minus the sentinel file's mtime
  (both wall clock, ns resolution), median and max.
- ``start_to_ready_ms``: READY=1's arrival minus the daemon's spawn;
  ``overhead_ms`` is that minus the sim's own startup delay.

Usage: python bench/readiness.py [--runs 20] [--delay 0.2]
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


def one_run(tmp: Path, delay: float, proxy: bool) -> tuple[float, float]:
    install = tmp / "cloudxr"
    config = tmp / "cxrd.toml"
    config.write_text(
        f'install_dir = "{install}"\n[runtime]\nbackend = "sim"\n'
        f"[runtime.sim]\nstartup_delay = {delay}\n"
        f'[proxy]\nenabled = {str(proxy).lower()}\nhost = "127.0.0.1"\n'
        f"port = {free_port()}\nbackend_port = {free_port()}\n"
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
            while True:
                data = sock.recv(65536)
                if b"READY=1" in data.split(b"\n"):
                    arrived = time.time()
                    break
            sentinel = (install / "run" / "runtime_started").stat().st_mtime_ns / 1e9
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        sock_path.unlink()
    return (arrived - sentinel) * 1e3, (arrived - spawned) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--delay", type=float, default=0.2, help="the sim's startup delay, seconds")
    p.add_argument("--no-proxy", action="store_true", help="runtime only")
    args = p.parse_args()
    to_ready, start = [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            a, b = one_run(Path(tmp), args.delay, not args.no_proxy)
        to_ready.append(a)
        start.append(b)
    result = {
        "runs": args.runs,
        "sim_startup_delay_ms": args.delay * 1e3,
        "proxy": not args.no_proxy,
        "sentinel_to_ready_ms": {
            "median": round(statistics.median(to_ready), 3),
            "max": round(max(to_ready), 3),
        },
        "start_to_ready_ms": {
            "median": round(statistics.median(start), 1),
            "max": round(max(start), 1),
        },
        "overhead_ms": {
            "median": round(statistics.median(start) - args.delay * 1e3, 1),
            "max": round(max(start) - args.delay * 1e3, 1),
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
