#!/usr/bin/env python3
"""Round-trip latency and throughput: direct, through cxrd's proxy, through isaacteleop's.

One run, side by side, so the three share the machine's state: a backend echo
server in its own process, each proxy in its own process, and the clients in
another. For 1 and 8 clients, each client sends a message and waits for its
echo, again and again; rounds alternate between targets. Prints JSON with
p50/p99 round trip (µs) and round trips per second, the latency each proxy
adds over direct, the share of direct throughput it keeps, and whether cxrd
meets the targets of issue 3 (at most half isaacteleop's added latency, at
least twice its 8-client throughput).

``tls_layer`` sets cxrd's own TLS layer (proxy/tls.py: SSLObject over memory
BIOs) against the same relay over asyncio's TLS transport
(``create_server(ssl=...)``). On the 2-core development VM proxy/tls.py won
in every run: 1.04-1.17x the round trips per second and 12-25% less proxy CPU
per round trip, for 1 and for 8 clients; so the product keeps it.

    .venv/bin/python bench/proxy_relay.py [--seconds 0.75] [--rounds 6] [--size 200]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import free_port

HERE = Path(__file__).resolve()
CLIENT_COUNTS = (1, 8)


# Roles run in child processes --------------------------------------------------


async def backend_role(port: int) -> None:
    from websockets.asyncio.server import ServerConnection, serve

    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async with serve(echo, "127.0.0.1", port, compression=None, max_size=None):
        print("READY", flush=True)
        await asyncio.Future()


async def isaacteleop_role(port: int, backend_port: int) -> None:
    from isaacteleop.cloudxr import wss  # installed in the venv; reads CXR_INSTALL_DIR

    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    await wss.run(
        None,
        stop,
        backend_host="127.0.0.1",
        backend_port=backend_port,
        proxy_port=port,
        on_listening=lambda: print("READY", flush=True),
    )


async def splice_role(port: int, backend_port: int) -> None:
    """A bare TCP forwarder (no TLS, no parsing): the floor of any user-space hop here."""
    loop = asyncio.get_running_loop()

    class Leg(asyncio.Protocol):
        peer: asyncio.Transport | None = None
        early: bytes = b""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            if self.peer is None:
                self.early += data
            else:
                self.peer.write(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.peer is not None:
                self.peer.close()

    class Front(Leg):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self.opening = loop.create_task(self.open())

        async def open(self) -> None:
            back = Leg()
            back.peer = self.transport  # type: ignore[assignment]
            bt, _ = await loop.create_connection(lambda: back, "127.0.0.1", backend_port)
            self.peer = bt
            if self.early:
                bt.write(self.early)

    await loop.create_server(Front, "127.0.0.1", port)
    print("READY", flush=True)
    await asyncio.Future()


async def asyncio_tls_role(port: int, backend_port: int, cert: str, key: str) -> None:
    """cxrd's proxy with its TLS layer swapped for asyncio's (``create_server(ssl=...)``)."""
    from asyncio.sslproto import SSLProtocol

    from cxrd.proxy.admission import Ticket
    from cxrd.proxy.connection import ClientConn
    from cxrd.proxy.server import ProxyOptions, ProxyServer, server_tls_context
    from cxrd.system.listeners import bind_listener

    class AsyncioTlsProxy(ProxyServer):
        def _protocol_for(self, ticket: Ticket) -> asyncio.BaseProtocol:
            # What create_server(ssl=...) plugs under each accepted socket.
            loop = asyncio.get_running_loop()
            return SSLProtocol(
                loop,
                ClientConn(self, ticket),
                self.tls,
                loop.create_future(),
                server_side=True,
                ssl_handshake_timeout=round(self.options.handshake_timeout),
            )

    tls = server_tls_context(Path(cert), Path(key))
    # asyncio's TLS transport does not release a connection's admission ticket: no bounds.
    unbounded = ProxyOptions(
        backend_port=backend_port, max_pending=1 << 30, max_per_address=1 << 30
    )
    server = AsyncioTlsProxy(bind_listener("127.0.0.1", port), tls, unbounded)
    await server.serve(on_listening=lambda: print("READY", flush=True))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one_client(
    url: str,
    payload: str,
    ready: asyncio.Barrier,
    go: asyncio.Event,
    window: list[float],
    samples: list[int],
) -> None:
    """Connect and warm up, wait for every client, then round-trip until the window closes."""
    from websockets.asyncio.client import connect

    context = None
    if url.startswith("wss:"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    async with connect(url, ssl=context, compression=None, max_size=None) as ws:
        for _ in range(20):
            await ws.send(payload)
            await ws.recv()
        await ready.wait()  # every client is connected and warm
        await go.wait()  # the window is open
        until = window[1]
        clock = time.perf_counter_ns
        while time.monotonic() < until:
            start = clock()
            await ws.send(payload)
            await ws.recv()
            samples.append(clock() - start)


async def measure(
    url: str, count: int, payload: str, seconds: float, pids: list[int]
) -> tuple[list[int], float, list[float]]:
    """Round-trip times, the window's length, and CPU seconds each of ``pids`` (and we) used."""
    samples: list[int] = []
    window = [0.0, 0.0]
    before: list[float] = []

    ready, go = asyncio.Barrier(count + 1), asyncio.Event()
    clients = [
        asyncio.create_task(one_client(url, payload, ready, go, window, samples))
        for _ in range(count)
    ]
    await ready.wait()
    before[:] = [*(cpu_seconds(pid) for pid in pids), time.process_time()]
    window[0] = time.monotonic()
    window[1] = window[0] + seconds
    go.set()
    await asyncio.gather(*clients)
    end = time.monotonic()
    after = [*(cpu_seconds(pid) for pid in pids), time.process_time()]
    return samples, end - window[0], [b - a for a, b in zip(before, after, strict=True)]


async def clients_role(
    targets: dict[str, str], pids: dict[str, int], seconds: float, rounds: int, size: int
) -> None:
    payload = ('{"type":"signal","data":"' + "x" * size)[: size - 2] + '"}'
    keys = [(t, n) for t in targets for n in CLIENT_COUNTS]
    samples: dict[tuple[str, int], list[int]] = {key: [] for key in keys}
    elapsed = dict.fromkeys(keys, 0.0)
    cpu = {key: [0.0, 0.0, 0.0] for key in keys}  # proxy, backend, clients
    per_round: dict[tuple[str, int], list[tuple[float, float]]] = {key: [] for key in keys}
    for _ in range(rounds):
        for name, url in targets.items():
            for count in CLIENT_COUNTS:
                watched = [pids.get(name, pids["backend"]), pids["backend"]]
                got, took, used = await measure(url, count, payload, seconds, watched)
                if name not in pids:
                    used[0] = 0.0
                key = (name, count)
                samples[key].extend(got)
                elapsed[key] += took
                cpu[key] = [a + b for a, b in zip(cpu[key], used, strict=True)]
                per_round[key].append((statistics.median(got) / 1000, len(got) / took))
    result: dict[str, Any] = {}
    for (name, count), values in samples.items():
        values.sort()
        per_trip = 1e6 / len(values)
        entry: dict[str, Any] = {
            "round_trips": len(values),
            "p50_us": round(statistics.median(values) / 1000, 1),
            "p99_us": round(values[int(len(values) * 0.99) - 1] / 1000, 1),
            "msgs_per_s": round(len(values) / elapsed[name, count]),
            "client_cpu_us_per_round_trip": round(cpu[name, count][2] * per_trip, 1),
            "backend_cpu_us_per_round_trip": round(cpu[name, count][1] * per_trip, 1),
            "rounds": [
                {"p50_us": round(p50, 1), "msgs_per_s": round(rate)}
                for p50, rate in per_round[name, count]
            ],
        }
        if name in pids:
            entry["proxy_cpu_us_per_round_trip"] = round(cpu[name, count][0] * per_trip, 1)
        result.setdefault(name, {})[f"{count}_clients"] = entry
    print(json.dumps(result), flush=True)


# Orchestration -------------------------------------------------------------------


def start(
    argv: list[str], env: dict[str, str] | None = None, **kwargs: Any
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, **kwargs
    )


def wait_ready(proc: subprocess.Popen[str], what: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the child prints READY once it listens
    if line.strip() != "READY":
        raise SystemExit(f"{what} did not start (got {line!r})")


def run_peer_role(args: argparse.Namespace) -> bool:
    """Run ``--role backend`` or ``--role isaacteleop`` (bench/admission.py's too) to its
    end; False for any other role."""
    if args.role == "backend":
        asyncio.run(backend_role(args.port))
    elif args.role == "isaacteleop":
        asyncio.run(isaacteleop_role(args.port, args.backend_port))
    else:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    roles = ("main", "backend", "isaacteleop", "splice", "asyncio_tls", "clients")
    parser.add_argument("--role", choices=roles, default="main")
    parser.add_argument("--port", type=int)
    parser.add_argument("--backend-port", type=int)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--targets")
    parser.add_argument("--pids")
    parser.add_argument("--seconds", type=float, default=0.75)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--size", type=int, default=200, help="message size in bytes")
    args = parser.parse_args()
    if run_peer_role(args):
        return
    if args.role == "splice":
        asyncio.run(splice_role(args.port, args.backend_port))
        return
    if args.role == "asyncio_tls":
        asyncio.run(asyncio_tls_role(args.port, args.backend_port, args.cert, args.key))
        return
    if args.role == "clients":
        targets, pids = json.loads(args.targets), json.loads(args.pids)
        asyncio.run(clients_role(targets, pids, args.seconds, args.rounds, args.size))
        return

    from cxrd.proxy.certs import ensure_certificate

    py = sys.executable
    procs: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory(prefix="cxrd-bench-") as tmp, contextlib.ExitStack() as stack:
        try:
            cert, key = ensure_certificate(Path(tmp) / "certs")
            ports = (free_port() for _ in range(5))
            backend_port, cxrd_port, teleop_port, splice_port, aio_port = ports
            backend = start([py, str(HERE), "--role", "backend", "--port", str(backend_port)])
            procs.append(backend)
            wait_ready(backend, "backend")

            ready_r, ready_w = os.pipe()
            cxrd = subprocess.Popen(
                [py, "-m", "cxrd.proxy", "--host", "127.0.0.1", "--port", str(cxrd_port),
                 "--backend-port", str(backend_port), "--cert", str(cert), "--key", str(key),
                 "--log", str(Path(tmp) / "wss.log"), "--ready-fd", str(ready_w)],
                pass_fds=(ready_w,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            procs.append(cxrd)  # type: ignore[arg-type]
            os.close(ready_w)
            # The proxy keeps the pipe after READY (a line per headset session): one line.
            ready = stack.enter_context(os.fdopen(ready_r, "rb"))
            if ready.readline() != b"READY\n":
                raise SystemExit("cxrd proxy did not start")

            env = {**os.environ, "CXR_INSTALL_DIR": str(Path(tmp) / "isaacteleop")}
            teleop = start(
                [py, str(HERE), "--role", "isaacteleop", "--port", str(teleop_port),
                 "--backend-port", str(backend_port)],
                env=env,
            )  # fmt: skip
            procs.append(teleop)
            wait_ready(teleop, "isaacteleop proxy")

            splice = start(
                [py, str(HERE), "--role", "splice", "--port", str(splice_port),
                 "--backend-port", str(backend_port)],
            )  # fmt: skip
            procs.append(splice)
            wait_ready(splice, "tcp splice")

            aio = start(
                [py, str(HERE), "--role", "asyncio_tls", "--port", str(aio_port),
                 "--backend-port", str(backend_port), "--cert", str(cert), "--key", str(key)],
            )  # fmt: skip
            procs.append(aio)
            wait_ready(aio, "cxrd proxy over asyncio's TLS")

            targets = {
                "direct": f"ws://127.0.0.1:{backend_port}/",
                "tcp_splice": f"ws://127.0.0.1:{splice_port}/",
                "cxrd": f"wss://127.0.0.1:{cxrd_port}/",
                "cxrd_asyncio_tls": f"wss://127.0.0.1:{aio_port}/",
                "isaacteleop": f"wss://127.0.0.1:{teleop_port}/",
            }
            pids = {
                "backend": backend.pid,
                "tcp_splice": splice.pid,
                "cxrd": cxrd.pid,
                "cxrd_asyncio_tls": aio.pid,
                "isaacteleop": teleop.pid,
            }
            clients = subprocess.run(
                [py, str(HERE), "--role", "clients", "--targets", json.dumps(targets),
                 "--pids", json.dumps(pids),
                 "--seconds", str(args.seconds), "--rounds", str(args.rounds),
                 "--size", str(args.size)],
                capture_output=True, text=True, timeout=600, check=True,
            )  # fmt: skip
            results = json.loads(clients.stdout)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    print(json.dumps(summarize(results, args), indent=2))


def tls_layer(results: dict[str, Any]) -> dict[str, Any]:
    """cxrd's own TLS layer (proxy/tls.py) against asyncio's, both relaying the same way."""
    own, aio = results["cxrd"], results["cxrd_asyncio_tls"]
    compared: dict[str, Any] = {}
    for count in CLIENT_COUNTS:
        mine, theirs = own[f"{count}_clients"], aio[f"{count}_clients"]
        rounds = zip(mine["rounds"], theirs["rounds"], strict=True)
        compared[f"{count}_clients"] = {
            "p50_us": [mine["p50_us"], theirs["p50_us"]],
            "msgs_per_s": [mine["msgs_per_s"], theirs["msgs_per_s"]],
            "proxy_cpu_us_per_round_trip": [
                mine["proxy_cpu_us_per_round_trip"],
                theirs["proxy_cpu_us_per_round_trip"],
            ],
            "median_round_throughput_ratio_own_over_asyncio": round(
                statistics.median(m["msgs_per_s"] / t["msgs_per_s"] for m, t in rounds), 3
            ),
        }
    return {"pairs_are": ["cxrd proxy/tls.py", "asyncio create_server(ssl=...)"], **compared}


def summarize(results: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    direct = results["direct"]
    derived: dict[str, Any] = {}
    for name in ("tcp_splice", "cxrd", "cxrd_asyncio_tls", "isaacteleop"):
        one, eight = results[name]["1_clients"], results[name]["8_clients"]
        derived[name] = {
            "added_p50_us_1_client": round(one["p50_us"] - direct["1_clients"]["p50_us"], 1),
            "throughput_kept_8_clients": round(
                eight["msgs_per_s"] / direct["8_clients"]["msgs_per_s"], 3
            ),
        }
    cx, it = derived["cxrd"], derived["isaacteleop"]
    # The machine is shared: besides the pooled figures, compare round by round
    # (targets alternate within a round) and take the median of the ratios.
    rounds = zip(
        direct["1_clients"]["rounds"],
        results["cxrd"]["1_clients"]["rounds"],
        results["isaacteleop"]["1_clients"]["rounds"],
        results["cxrd"]["8_clients"]["rounds"],
        results["isaacteleop"]["8_clients"]["rounds"],
        strict=True,
    )
    latency_ratios, throughput_ratios = [], []
    for d1, c1, i1, c8, i8 in rounds:
        latency_ratios.append((c1["p50_us"] - d1["p50_us"]) / (i1["p50_us"] - d1["p50_us"]))
        throughput_ratios.append(c8["msgs_per_s"] / i8["msgs_per_s"])
    latency_median = statistics.median(latency_ratios)
    throughput_median = statistics.median(throughput_ratios)
    return {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "tls_layer": tls_layer(results),
        "message_bytes": args.size,
        "seconds_per_run": args.seconds,
        "rounds": args.rounds,
        "results": results,
        "vs_direct": derived,
        "targets": {
            "added_latency_ratio_cxrd_over_isaacteleop": round(
                cx["added_p50_us_1_client"] / it["added_p50_us_1_client"], 3
            ),
            "throughput_ratio_8_clients_cxrd_over_isaacteleop": round(
                results["cxrd"]["8_clients"]["msgs_per_s"]
                / results["isaacteleop"]["8_clients"]["msgs_per_s"],
                3,
            ),
            "median_round_added_latency_ratio": round(latency_median, 3),
            "median_round_throughput_ratio": round(throughput_median, 3),
            "latency_target_met (<= 0.5)": latency_median <= 0.5,
            "throughput_target_met (>= 2)": throughput_median >= 2,
        },
    }


if __name__ == "__main__":
    main()
