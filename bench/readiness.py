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


def one_run(tmp: Path, delay: float, proxy: bool, *, own_sentinel: bool) -> float:
    """Milliseconds to READY=1: from the spawn, or from our own sentinel."""
    install = tmp / "cloudxr"
    run_dir = install / "run"
    config = tmp / "cxrd.toml"
    config.write_text(
        f'install_dir = "{install}"\n[runtime]\nbackend = "sim"\n'
        f"[runtime.sim]\nstartup_delay = {delay}\nnever_ready = {str(own_sentinel).lower()}\n"
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
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        sock_path.unlink()
    return (arrived - spawned) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--delay", type=float, default=0.2, help="the sim's startup delay, seconds")
    p.add_argument("--no-proxy", action="store_true", help="runtime only")
    args = p.parse_args()
    to_ready, start = [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            to_ready.append(one_run(Path(tmp), args.delay, not args.no_proxy, own_sentinel=True))
        with tempfile.TemporaryDirectory() as tmp:
            start.append(one_run(Path(tmp), args.delay, not args.no_proxy, own_sentinel=False))
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
