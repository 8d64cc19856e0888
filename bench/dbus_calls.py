"""Status() round trips through a real dbus-daemon to a real cxrd (sim runtime).

Starts a private dbus-daemon and cxrd in a temp dir (free ports, nothing of
~/.cloudxr touched), then measures:

- sequential: one connection, one call at a time: p50/p99 latency and calls/s,
  3 rounds, the median round reported (raw dbus-fast message), and once
  through cxrd.client including decoding;
- concurrent: 8 connections, each one call at a time, all at once: calls/s;
- Peer.Ping on the same path as the floor (answered inside dbus-fast).

Prints one JSON object. Targets (issue 4): p50 < 300 us, > 3,000 calls/s sequential.

    .venv/bin/python bench/dbus_calls.py [--calls 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import free_port, private_bus
from dbus_fast import Message, MessageFlag, MessageType
from dbus_fast.aio import MessageBus

from cxrd.client import AsyncCloudXRClient
from cxrd.constants import BUS_NAME, INTERFACE, OBJECT_PATH
from cxrd.dbus.connection import tolerate_full_socket

ROUNDS = 3
SETTLE = 1.0  # seconds


def status_message(member: str = "Status", interface: str = INTERFACE) -> Message:
    return Message(
        destination=BUS_NAME,
        path=OBJECT_PATH,
        interface=interface,
        member=member,
        flags=MessageFlag.NO_AUTOSTART,
    )


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def sequential(address: str, calls: int, member: str, interface: str) -> dict[str, float]:
    bus = await MessageBus(bus_address=address).connect()
    tolerate_full_socket(bus)
    try:
        for _ in range(calls // 10):  # warm up
            await bus.call(status_message(member, interface))
        latencies = []
        began = time.perf_counter()
        for _ in range(calls):
            t0 = time.perf_counter()
            reply = await bus.call(status_message(member, interface))
            latencies.append(time.perf_counter() - t0)
            assert reply is not None and reply.message_type is MessageType.METHOD_RETURN
        total = time.perf_counter() - began
    finally:
        bus.disconnect()
    latencies.sort()
    return {
        "p50_us": round(percentile(latencies, 0.5) * 1e6, 1),
        "p99_us": round(percentile(latencies, 0.99) * 1e6, 1),
        "calls_per_s": round(calls / total),
    }


async def via_client(address: str, calls: int) -> dict[str, float]:
    async with AsyncCloudXRClient(address) as client:
        for _ in range(calls // 10):
            await client.status()
        latencies = []
        began = time.perf_counter()
        for _ in range(calls):
            t0 = time.perf_counter()
            await client.status()
            latencies.append(time.perf_counter() - t0)
        total = time.perf_counter() - began
    latencies.sort()
    return {
        "p50_us": round(percentile(latencies, 0.5) * 1e6, 1),
        "p99_us": round(percentile(latencies, 0.99) * 1e6, 1),
        "calls_per_s": round(calls / total),
    }


async def concurrent(address: str, calls: int, clients: int) -> dict[str, float]:
    buses = [await MessageBus(bus_address=address).connect() for _ in range(clients)]
    for bus in buses:
        tolerate_full_socket(bus)
    per_client = calls // clients

    async def worker(bus: MessageBus) -> None:
        for _ in range(per_client):
            reply = await bus.call(status_message())
            assert reply is not None and reply.message_type is MessageType.METHOD_RETURN

    try:
        await asyncio.gather(*(worker(bus) for bus in buses[:1]))  # warm up
        began = time.perf_counter()
        await asyncio.gather(*(worker(bus) for bus in buses))
        total = time.perf_counter() - began
    finally:
        for bus in buses:
            bus.disconnect()
    return {"clients": clients, "calls_per_s": round(per_client * clients / total)}


def start_cxrd(tmp: Path, address: str) -> subprocess.Popen[bytes]:
    config = tmp / "cxrd.toml"
    config.write_text(
        f'install_dir = "{tmp / "cloudxr"}"\n'
        '[runtime]\nbackend = "sim"\nstartup_timeout = 20.0\n'
        "[runtime.sim]\nstartup_delay = 0.1\n"
        f'[proxy]\nhost = "127.0.0.1"\nport = {free_port()}\nbackend_port = {free_port()}\n'
    )
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    env["DBUS_SESSION_BUS_ADDRESS"] = address
    with (tmp / "cxrd.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "cxrd", "--config", str(config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )


async def measure(address: str, calls: int) -> dict[str, Any]:
    async with AsyncCloudXRClient(address) as client:
        await client.wait_ready(30.0)
    await asyncio.sleep(SETTLE)  # the runtime and proxy children finish starting up
    rounds = [await sequential(address, calls, "Status", INTERFACE) for _ in range(ROUNDS)]
    rounds.sort(key=lambda r: r["p50_us"])
    return {
        "status_sequential": rounds[len(rounds) // 2],  # the median round by p50
        "status_sequential_rounds": rounds,
        "status_via_client": await via_client(address, calls // 2),
        "status_concurrent": await concurrent(address, calls, 8),
        "ping_sequential_floor": await sequential(
            address, calls, "Ping", "org.freedesktop.DBus.Peer"
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="cxrd-bench-") as name,
        private_bus(Path(name)) as address,
    ):
        tmp = Path(name)
        daemon = start_cxrd(tmp, address)
        try:
            results = asyncio.run(measure(address, args.calls))
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
    seq = results["status_sequential"]
    results["targets"] = {
        "p50_under_300_us": seq["p50_us"] < 300,
        "over_3000_calls_per_s": seq["calls_per_s"] > 3000,
    }
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    results["calls"] = args.calls
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
