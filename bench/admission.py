#!/usr/bin/env python3
"""Does a headset get in while another host floods the proxy? cxrd now, cxrd before, isaacteleop.

An attacker on 127.0.0.2 keeps up to 580 connections open (more than the old
table's 320): TCP with no TLS, TLS with no request head, half a request head, and
idle WebSocket sessions, reopening each as soon as the proxy closes it, at
most ``--rate`` new connections a second. Meanwhile a headset on 127.0.0.1
opens a WebSocket and gets one echo, ``--probes`` times in a row, each within
``--probe-timeout`` seconds or counted failed. Each proxy is measured quiet
(no attacker) and under the flood, for ``proxy.allow = 127.0.0.1/32`` (the
attacker is outside) and for no allow (everyone, the default); isaacteleop's
proxy has no allow, so it runs the second case only. Figures: the attacker's
connections held (median, max, sampled at each probe) and the headset's
connect+echo p50/p99 (ms) and failures.

On the 2-core development VM (shared, loaded), 15 probes, flood at 300 connects/s
(headset connect+echo p50/p99 ms, failed of 15; attacker connections held, median):

    cxrd now,    allow 127.0.0.1/32:   44 /   82, 0 failed; held 0   (reset at accept)
    cxrd now,    allow everyone:       30 /  119, 0 failed; held 16  (proxy.max_per_address)
    cxrd before, allow 127.0.0.1/32: 2508 / 2508, 14 failed; held 447 (403 only after TLS+head)
    cxrd before, allow everyone:     2749 / 2749, 14 failed; held 462
    isaacteleop (no allow):            46 /   61, 1 failed; held 580 (no bound: fds go first)

The proxy "before" is another checkout, run with PYTHONPATH pointing at it:

    git worktree add /tmp/proxy-before <commit before the change>
    .venv/bin/python bench/admission.py --before /tmp/proxy-before [--probes 15]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import free_port
from proxy_relay import run_peer_role, start, wait_ready

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
ATTACKER, HEADSET = "127.0.0.2", "127.0.0.1"
# 580 in all: more TLS-done idle connections (440 with the half heads) than the old
# proxy's table (4 x max_connections + 64 = 320), as in issue 17.
SLOTS = {"tcp": 100, "tls": 340, "partial": 100, "session": 40}
SETTLE = 3.0  # seconds of flood before the first probe


class Flood:
    """The attacker: one task per slot, each holding one connection of its kind at a time."""

    def __init__(self, port: int, tls: ssl.SSLContext, rate: float) -> None:
        self.port, self.tls, self.rate = port, tls, rate
        self.held = 0
        self.opened = 0
        self._next = 0.0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for kind, count in SLOTS.items():
            self._tasks += [asyncio.create_task(self._slot(kind)) for _ in range(count)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _pace(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        at = max(now, self._next)
        self._next = at + 1.0 / self.rate
        await asyncio.sleep(at - now)

    async def _slot(self, kind: str) -> None:
        from websockets.asyncio.client import connect

        while not self._stop.is_set():
            await self._pace()
            try:
                async with asyncio.timeout(10.0):
                    if kind == "session":
                        ws = await connect(
                            f"wss://127.0.0.1:{self.port}/flood",
                            ssl=self.tls,
                            local_addr=(ATTACKER, 0),
                            compression=None,
                            ping_interval=None,
                        )
                        closed: Any = ws.wait_closed()
                    else:
                        reader, writer = await asyncio.open_connection(
                            "127.0.0.1",
                            self.port,
                            local_addr=(ATTACKER, 0),
                            ssl=None if kind == "tcp" else self.tls,
                            server_hostname=None if kind == "tcp" else "127.0.0.1",
                        )
                        if kind == "partial":
                            writer.write(b"GET /flood HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                        closed = _until_eof(reader)
            except Exception:  # refused, reset, timed out: try again at the next pace
                continue
            self.held += 1
            self.opened += 1
            try:
                stop = asyncio.ensure_future(self._stop.wait())
                end = asyncio.ensure_future(closed)
                await asyncio.wait({stop, end}, return_when=asyncio.FIRST_COMPLETED)
                for future in (stop, end):
                    future.cancel()
            finally:
                self.held -= 1
                if kind == "session":
                    ws.transport.abort()
                else:
                    writer.transport.abort()


async def _until_eof(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(Exception):
        while await reader.read(4096):
            pass


async def probes(port: int, tls: ssl.SSLContext, count: int, timeout: float) -> list[float | None]:
    """The headset: seconds to open a WebSocket and get one echo, None when it failed."""
    from websockets.asyncio.client import connect

    times: list[float | None] = []
    for n in range(count):
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                async with connect(
                    f"wss://127.0.0.1:{port}/headset{n}",
                    ssl=tls,
                    local_addr=(HEADSET, 0),
                    compression=None,
                ) as ws:
                    await ws.send("hi")
                    await ws.recv()
            times.append(time.monotonic() - started)
        except Exception:
            times.append(None)
        await asyncio.sleep(0.1)
    return times


def figures(times: list[float | None], held: list[int]) -> dict[str, Any]:
    ok = sorted(t * 1000 for t in times if t is not None)
    out: dict[str, Any] = {"probes": len(times), "failed": len(times) - len(ok)}
    if ok:
        out["connect_p50_ms"] = round(statistics.median(ok), 1)
        out["connect_p99_ms"] = round(ok[min(len(ok) - 1, int(0.99 * len(ok)))], 1)
    if held:
        out["attacker_held_median"] = statistics.median(held)
        out["attacker_held_max"] = max(held)
    return out


async def measure(port: int, tls: ssl.SSLContext, args: argparse.Namespace) -> dict[str, Any]:
    quiet = await probes(port, tls, max(3, args.probes // 3), args.probe_timeout)
    flood = Flood(port, tls, args.rate)
    flood.start()
    await asyncio.sleep(SETTLE)
    held: list[int] = []
    times: list[float | None] = []
    for _ in range(args.probes):
        held.append(flood.held)
        times += await probes(port, tls, 1, args.probe_timeout)
    opened = flood.opened
    await flood.stop()
    return {
        "quiet": figures(quiet, []),
        "flood": {**figures(times, held), "attacker_connections_opened": opened},
    }


def run_proxy(
    argv: list[str], env: dict[str, str], tls: ssl.SSLContext, args: argparse.Namespace
) -> dict[str, Any]:
    # From the tree's own directory: ``-m`` puts the working directory first on sys.path.
    proc = start(argv, env=env, cwd=env.get("PYTHONPATH"))
    try:
        wait_ready(proc, argv[2])
        return asyncio.run(measure(int(argv[argv.index("--port") + 1]), tls, args))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cxrd_argv(port: int, backend: int, tmp: Path, allow: bool) -> list[str]:
    """``python -m cxrd.proxy`` printing READY on stdout (its --ready-fd 1)."""
    return [
        sys.executable, "-m", "cxrd.proxy", "--host", "127.0.0.1", "--port", str(port),
        "--backend-port", str(backend), "--cert", str(tmp / "certs" / "server.crt"),
        "--key", str(tmp / "certs" / "server.key"), "--log", str(tmp / f"wss.{port}.log"),
        "--ready-fd", "1", *(("--allow", "127.0.0.1/32") if allow else ()),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--role", choices=("main", "backend", "isaacteleop"), default="main")
    parser.add_argument("--port", type=int)
    parser.add_argument("--backend-port", type=int)
    parser.add_argument("--before", type=Path, help="a checkout of cxrd before the change")
    parser.add_argument("--probes", type=int, default=15)
    parser.add_argument("--probe-timeout", type=float, default=3.0)
    parser.add_argument("--rate", type=float, default=300.0, help="attacker connects per second")
    args = parser.parse_args()
    if run_peer_role(args):
        return

    from cxrd.proxy.certs import ensure_certificate

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the attacker's 320 and more
    py = sys.executable
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cxrd-bench-") as tmp:
        ensure_certificate(Path(tmp) / "certs")
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE  # isaacteleop's proxy makes its own certificate
        backend_port = free_port()
        backend = start([py, str(HERE), "--role", "backend", "--port", str(backend_port)])
        try:
            wait_ready(backend, "backend")
            trees = {"cxrd": ROOT, **({"cxrd_before": args.before} if args.before else {})}
            for name, tree in trees.items():
                env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
                for allow in (True, False):
                    label = f"{name}, {'allow 127.0.0.1/32' if allow else 'allow everyone'}"
                    argv = cxrd_argv(free_port(), backend_port, Path(tmp), allow)
                    results[label] = run_proxy(argv, env, tls, args)
                    print(f"{label}: {json.dumps(results[label])}", file=sys.stderr)
            env = {**os.environ, "CXR_INSTALL_DIR": str(Path(tmp) / "isaacteleop")}
            port = free_port()
            argv = [py, str(HERE), "--role", "isaacteleop", "--port", str(port),
                    "--backend-port", str(backend_port)]  # fmt: skip
            label = "isaacteleop (no allow)"
            results[label] = run_proxy(argv, env, tls, args)
        finally:
            backend.terminate()
            backend.wait(timeout=10)
    print(
        json.dumps({"attacker": ATTACKER, "headset": HEADSET, "slots": SLOTS, **results}, indent=2)
    )


if __name__ == "__main__":
    main()
