"""Admission at accept(): proxy.allow, pending and per-address bounds, deadlines, fds.

The policy's tables are tested pure; the rest against the real proxy process
(real TLS, real sockets) with the attacker on 127.0.0.2 and the headset on
127.0.0.1. Every loop is bounded in count, every wait in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import resource
import select
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_proxy import UPGRADE, Backend, Proxy, client_tls, open_ws, run
from support import TIMEOUT, free_port, wait_until

from cxrd.proxy.admission import Admission, Phase, Refusal, RefusalLog, Ticket, peer_address
from cxrd.proxy.connection import FOREIGN_ORIGIN

HEADSET = "127.0.0.1"
ATTACKER = "127.0.0.2"
A = ipaddress.ip_address(ATTACKER)
H = ipaddress.ip_address(HEADSET)
ONE_SECOND = TIMEOUT / 10  # "within a second", scaled like every wait here


# The policy, pure ---------------------------------------------------------------


def test_allow_matches_ipv4_mapped_peers_as_ipv4() -> None:
    admission = Admission([ipaddress.ip_network("10.0.0.0/24")], 8, 8)
    mapped = peer_address(("::ffff:10.0.0.7", 5000, 0, 0))
    assert mapped == ipaddress.ip_address("10.0.0.7")
    assert isinstance(admission.admit(mapped), Ticket)
    outside = peer_address(("::ffff:10.0.1.7", 5000, 0, 0))
    assert outside is not None and admission.admit(outside) is Refusal.NOT_ALLOWED


def test_one_address_holds_at_most_its_share_sessions_included() -> None:
    admission = Admission([], max_pending=10, max_per_address=3)
    first = admission.admit(A)
    assert isinstance(first, Ticket)
    first.enter(Phase.SESSION)
    others = [admission.admit(A) for _ in range(2)]
    assert all(isinstance(t, Ticket) for t in others)
    assert admission.admit(A) is Refusal.ADDRESS_FULL
    assert isinstance(admission.admit(H), Ticket)  # another address is not affected
    first.release()
    first.release()  # idempotent
    assert isinstance(admission.admit(A), Ticket)


def test_a_full_pending_table_evicts_the_busiest_address_oldest_head_first() -> None:
    admission = Admission([], max_pending=4, max_per_address=4)
    aborted: list[int] = []
    flood = []
    for n in range(4):
        ticket = admission.admit(A)
        assert isinstance(ticket, Ticket)
        ticket.bind(lambda n=n: aborted.append(n))
        flood.append(ticket)
    flood[0].enter(Phase.ANSWER)  # being answered: evicted only after half-open ones
    headset = admission.admit(H)
    assert isinstance(headset, Ticket)
    assert aborted == [1] and admission.pending == 4
    flood[1].release()  # its transport closes later: nothing more happens
    # The attacker cannot evict the headset back: its address holds more, not fewer.
    assert admission.admit(A) is Refusal.PENDING_FULL
    # Other addresses take the attacker's while it holds two more than they do.
    for n, evicted in ((3, [1, 2]), (4, [1, 2, 3])):
        newcomer = admission.admit(ipaddress.ip_address(f"127.0.0.{n}"))
        assert isinstance(newcomer, Ticket) and aborted == evicted
    # Equal shares (one each, the attacker's being answered): no churn, refused.
    assert admission.admit(ipaddress.ip_address("127.0.0.5")) is Refusal.PENDING_FULL


def test_refusals_are_logged_once_per_interval_with_a_count() -> None:
    now = [0.0]
    refusals = RefusalLog(interval=10.0, clock=lambda: now[0])
    assert refusals.line(Refusal.NOT_ALLOWED, "127.0.0.2:1") is not None
    assert [refusals.line(Refusal.NOT_ALLOWED, f"127.0.0.2:{p}") for p in range(5)] == [None] * 5
    assert refusals.line(Refusal.ADDRESS_FULL, "127.0.0.2:9") is not None  # another kind
    # A web page's Origin refused after TLS (cxrd.proxy.connection) is one more kind.
    assert [refusals.more(FOREIGN_ORIGIN) for _ in range(3)] == ["", None, None]
    now[0] = 10.5
    line = refusals.line(Refusal.NOT_ALLOWED, "127.0.0.2:7")
    assert line is not None and "and 5 more" in line and "proxy.allow" in line
    assert refusals.more(FOREIGN_ORIGIN) == " (and 2 more since the last such line)"
    assert refusals.line(Refusal.NOT_ALLOWED, "127.0.0.2:8") is None  # the interval again


# The real proxy --------------------------------------------------------------------


class Held:
    """An attacker's sockets from 127.0.0.2, closed at the end of the test."""

    def __init__(self, proxy: Proxy, certs: tuple[Path, Path], source: str = ATTACKER) -> None:
        self.port = proxy.port
        self.tls = client_tls(certs)
        self.source = source
        self.socks: list[socket.socket] = []

    def tcp(self) -> socket.socket:
        sock = socket.create_connection(
            ("127.0.0.1", self.port), timeout=TIMEOUT, source_address=(self.source, 0)
        )
        self.socks.append(sock)
        return sock

    def refused(self) -> bool:
        """A connection is closed at accept: not one byte (no ServerHello) comes back."""
        try:
            sock = self.tcp()
            sock.sendall(b"\x16\x03\x01")  # the start of a ClientHello
            return sock.recv(16) == b""
        except ConnectionResetError:
            return True

    def tls_done(self) -> ssl.SSLSocket:
        sock = self.tls.wrap_socket(self.tcp(), server_hostname="127.0.0.1")
        self.socks.append(sock)
        return sock

    def partial_head(self) -> None:
        self.tls_done().sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")

    def stalled_download(self, path: str) -> None:
        """A GET of a /client/ file whose answer it never reads past the first bytes."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window
        sock.bind((self.source, 0))
        sock.settimeout(TIMEOUT)
        sock.connect(("127.0.0.1", self.port))
        self.socks.append(sock)
        tls = self.tls.wrap_socket(sock, server_hostname="127.0.0.1")
        self.socks.append(tls)
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        assert tls.recv(64).startswith(b"HTTP/1.1 200 ")

    def session(self) -> None:
        sock = self.tls_done()
        sock.sendall(UPGRADE.format(path="/held").encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 101 ")

    def open_count(self) -> int:
        return sum(not closed(sock) for sock in self.socks if sock.fileno() >= 0)

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


@contextlib.contextmanager
def attacked(
    certs: tuple[Path, Path], backend: Backend, *flags: str
) -> Iterator[tuple[Proxy, Held]]:
    """A proxy with these flags, and the attacker's sockets to it; both closed at the end
    (the proxy's lines stay for the test to read)."""
    proxy = Proxy(certs, backend.port, *flags)
    held = Held(proxy, certs)
    try:
        yield proxy, held
    finally:
        held.close()
        assert proxy.stop() == 0


def closed(sock: socket.socket) -> bool:
    """The proxy has closed or reset this connection (nothing read from it)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP)
    gone = select.POLLRDHUP | select.POLLHUP | select.POLLERR
    return any(events & gone for _, events in poller.poll(0))


def headset_connects(proxy: Proxy, certs: tuple[Path, Path], times: int) -> list[float]:
    """Seconds each of ``times`` WebSocket opens (and one echo) from 127.0.0.1 took."""

    async def once(n: int) -> float:
        started = time.monotonic()
        async with asyncio.timeout(ONE_SECOND):
            async with open_ws(proxy, certs, f"/headset{n}", local_addr=(HEADSET, 0)) as ws:
                await ws.send("hi")
                assert await ws.recv() == "hi"
        return time.monotonic() - started

    async def all_of() -> list[float]:
        return [await once(n) for n in range(times)]

    result: list[float] = run(all_of())
    return result


def test_a_peer_outside_allow_is_closed_at_accept_before_any_tls_byte(
    certs: tuple[Path, Path], backend: Backend
) -> None:
    # The headset is allowed by its IPv4-mapped spelling: it means 127.0.0.1.
    with attacked(certs, backend, "--allow", "::ffff:127.0.0.1") as (proxy, held):
        assert all(held.refused() for _ in range(20))
        line = proxy.wait_line("refused at accept")
        assert ATTACKER in line and "not in proxy.allow" in line
        with pytest.raises(OSError):  # a reset or an EOF: never a ServerHello
            held.tls_done()
        assert headset_connects(proxy, certs, 1)
    refusals = [line for line in list(proxy.lines.queue) if "refused at accept" in line]
    assert refusals == [], "one line for the whole burst (rate-limited)"


def test_a_headset_gets_in_within_a_second_while_another_address_holds_the_table(
    certs: tuple[Path, Path], backend: Backend
) -> None:
    # The attacker's share (12) is more than the pending table (8): only eviction
    # of its oldest half-open connections lets the headset in.
    with attacked(certs, backend, "--max-pending", "8", "--max-per-address", "12") as (proxy, held):
        for _ in range(4):
            held.session()  # idle WebSocket sessions
        for _ in range(3):
            held.tcp()  # TCP open, no TLS
        for _ in range(3):
            held.tls_done()  # TLS done, no request head
        for _ in range(2):
            held.partial_head()
        assert all(held.refused() for _ in range(10))  # over its share
        wait_until(lambda: held.open_count() == 12, "the attacker to hold its 12 connections")
        times = headset_connects(proxy, certs, 5)
        assert max(times) < ONE_SECOND
        assert held.open_count() <= 12
        proxy.wait_line("max_per_address reached")


def test_a_headset_gets_in_while_a_few_addresses_hold_the_table_with_stalled_downloads(
    certs: tuple[Path, Path], backend: Backend, tmp_path: Path
) -> None:
    # Two addresses fill the pending table with /client/ answers they never read (each
    # renewable every send_timeout): answers are evicted too once no half-open one is left.
    (tmp_path / "bundle.js").write_bytes(bytes(8 * 1024 * 1024))
    flags = ("--client-dir", str(tmp_path), "--max-pending", "4", "--max-per-address", "2")
    with attacked(certs, backend, *flags) as (proxy, held):
        other = Held(proxy, certs, "127.0.0.3")
        try:
            for attacker in (held, other):
                for _ in range(2):
                    attacker.stalled_download("/client/bundle.js")
            assert max(headset_connects(proxy, certs, 3)) < ONE_SECOND
        finally:
            other.close()


def test_handshake_and_head_deadlines_close_half_open_connections(
    certs: tuple[Path, Path], backend: Backend
) -> None:
    deadlines = ("--handshake-timeout", "0.3", "--head-timeout", "0.3")
    with attacked(certs, backend, *deadlines) as (_, held):
        started = time.monotonic()
        socks = [held.tcp(), held.tls_done()]
        held.partial_head()
        wait_until(lambda: held.open_count() == 0, "the deadlines to close all three")
        assert time.monotonic() - started >= 0.25
        assert all(closed(sock) for sock in socks)


def test_out_of_fds_the_proxy_backs_off_logs_once_and_accepts_again(
    certs: tuple[Path, Path], backend: Backend
) -> None:
    with attacked(certs, backend) as (proxy, held):
        pid = proxy.proc.pid
        _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        in_use = len(os.listdir(f"/proc/{pid}/fd"))
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 2, hard))
        for _ in range(6):
            held.tcp()  # two are accepted; the others wait in the backlog
        line = proxy.wait_line("accept\\(\\) failed")
        assert "Too many open files" in line
        assert held.open_count() == 6  # queued in the backlog, none reset
        held.close()  # the two accepted ones go; their fds come back
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
        proxy.wait_line("accepting again after")
        assert headset_connects(proxy, certs, 1)
    again = [line for line in list(proxy.lines.queue) if "accept() failed" in line]
    assert again == [], "logged once however many retries"


def test_the_fd_limit_is_raised_to_the_hard_one_and_a_too_small_one_is_named(
    certs: tuple[Path, Path], backend: Backend, tmp_path: Path
) -> None:
    cert, key = certs
    argv = [
        sys.executable, "-m", "cxrd.proxy", "--host", "127.0.0.1", "--port", str(free_port()),
        "--backend-port", str(backend.port), "--cert", str(cert), "--key", str(key),
    ]  # fmt: skip

    def limited(soft: int, hard: int) -> Any:
        return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    small = subprocess.run(
        argv, preexec_fn=limited(128, 128), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert small.returncode != 0
    assert "proxy.max_pending 64 and proxy.max_connections 64" in small.stderr
    assert "open-file limit is 128" in small.stderr
    proc = subprocess.Popen(
        [*argv, "--log", str(tmp_path / "wss.log")], preexec_fn=limited(128, 4096)
    )
    try:
        wait_until(lambda: "listening on" in _text(tmp_path / "wss.log"), "the proxy to listen")
        assert resource.prlimit(proc.pid, resource.RLIMIT_NOFILE) == (4096, 4096)
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""
