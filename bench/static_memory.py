"""Proxy memory per client that asks for the web client's bundle and never reads it.

Starts ``python -m cxrd.proxy`` from each source tree given (``--tree NAME=DIR``,
default this checkout as ``now``) with a client directory holding a bundle.js of
``--size`` bytes (8 MiB: the bundle issue 17 measured with), lets ``--clients``
TLS clients (64) each send ``GET /client/bundle.js`` and never read, waits
until the proxy's RSS has not grown for a second, and prints the growth per
stalled client. Old code side by side::

    git worktree add /tmp/static-before 086e5e8^
    python bench/static_memory.py --tree now=. --tree before=/tmp/static-before

Target (issue 17): at most 256 KiB of proxy RSS per stalled client.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import free_port, rss_kib

HERE = Path(__file__).resolve().parent.parent


def start_proxy(
    tree: Path, certs: tuple[Path, Path], site: Path
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    ready_r, ready_w = os.pipe()
    argv = [
        sys.executable, "-m", "cxrd.proxy", "--host", "127.0.0.1", "--port", str(port),
        "--backend-port", str(free_port()), "--cert", str(certs[0]), "--key", str(certs[1]),
        "--ready-fd", str(ready_w), "--client-dir", str(site),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree)}
    usage = subprocess.run(
        [*argv[:3], "--help"], env=env, cwd=tree, capture_output=True, text=True
    ).stdout
    for flag, value in (("--send-timeout", "600"), ("--max-per-address", "1000"),
                        ("--max-pending", "1000"), ("--head-timeout", "600")):  # fmt: skip
        if flag in usage:  # this tree's admission bounds: out of the way of the measure
            argv += [flag, value]
    proc = subprocess.Popen(argv, pass_fds=(ready_w,), env=env, cwd=tree, stderr=subprocess.DEVNULL)
    os.close(ready_w)
    with os.fdopen(ready_r, "rb") as ready:
        if ready.readline() != b"READY\n":
            proc.kill()
            raise RuntimeError(f"the proxy from {tree} did not start")
    return proc, port


def settled_rss(pid: int, timeout: float = 60.0) -> int:
    """The proxy's RSS (KiB) once it has not grown for a second."""
    deadline = time.monotonic() + timeout
    last, since = rss_kib(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = rss_kib(pid)
        if now > last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= 1.0:
            return now
    return last


def measure(tree: Path, certs: tuple[Path, Path], site: Path, clients: int) -> dict[str, float]:
    proc, port = start_proxy(tree, certs, site)
    context = ssl.create_default_context(cafile=str(certs[0]))
    held: list[ssl.SSLSocket] = []
    try:
        # One whole fetch first, so what every request needs once is already there.
        with (
            socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"GET /client/bundle.js HTTP/1.1\r\nHost: x\r\n\r\n")
            while tls.recv(1 << 16):
                pass
        base = settled_rss(proc.pid)
        for _ in range(clients):
            raw = socket.socket()
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            raw.settimeout(30)
            raw.connect(("127.0.0.1", port))
            tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
            tls.sendall(b"GET /client/bundle.js HTTP/1.1\r\nHost: x\r\n\r\n")
            held.append(tls)  # and never read
        stalled = settled_rss(proc.pid)
        return {
            "base_rss_kib": base,
            "stalled_rss_kib": stalled,
            "per_client_kib": round((stalled - base) / clients, 1),
        }
    finally:
        for tls in held:
            tls.close()
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tree", action="append", default=[], help="NAME=DIR (repeatable)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--size", type=int, default=8 * 1024 * 1024)
    args = parser.parse_args()
    trees = [t.split("=", 1) for t in args.tree] or [["now", str(HERE)]]
    sys.path.insert(0, str(HERE))
    from cxrd.proxy.certs import ensure_certificate

    with tempfile.TemporaryDirectory() as tmp:
        certs = ensure_certificate(Path(tmp) / "certs")
        site = Path(tmp) / "client"
        site.mkdir()
        (site / "index.html").write_text("<!doctype html><title>bench</title>\n")
        (site / "bundle.js").write_bytes(os.urandom(args.size))
        results = {}
        for name, tree in trees:
            results[name] = measure(Path(tree).resolve(), certs, site, args.clients)
            print(f"{name:>8}: {results[name]}", flush=True)
    print(json.dumps({"clients": args.clients, "bundle_bytes": args.size, **results}))


if __name__ == "__main__":
    main()
