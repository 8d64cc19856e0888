"""The proxy's pieces: certificates, port binding, the launch spec, the frame scanner."""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
import subprocess
import sys
from ipaddress import ip_network
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from support import TIMEOUT, free_port

from cxrd.config import Config, ProxyConfig, RuntimeConfig, load_config
from cxrd.errors import InvalidConfig, StartFailed
from cxrd.proxy import frames as F
from cxrd.proxy.__main__ import parse_args
from cxrd.proxy.certs import ensure_certificate, generate_pair, validate_pair
from cxrd.proxy.launch import ProxyLaunch, prepare_proxy
from cxrd.proxy.relay import Half
from cxrd.proxy.server import ProxyOptions
from cxrd.system.addresses import ipv4_addresses
from cxrd.system.listeners import bind_listener, port_holder

# Certificates ---------------------------------------------------------------


def test_generated_pair_is_private_from_creation_and_names_this_host(tmp_path: Path) -> None:
    old = os.umask(0)  # the key's mode must not depend on the umask
    try:
        cert, key = ensure_certificate(tmp_path / "certs")
    finally:
        os.umask(old)
    assert (cert.name, key.name) == ("server.crt", "server.key")
    assert key.stat().st_mode & 0o777 == 0o600
    info = validate_pair(cert, key)
    assert info.subject == "CN=localhost"
    assert {"localhost", "127.0.0.1", socket.gethostname()} <= set(info.sans)
    days = (info.not_after - dt.datetime.now(dt.UTC)).days
    assert 363 <= days <= 365
    assert b"BEGIN RSA PRIVATE KEY" in key.read_bytes()


def test_an_existing_pair_is_reused_unchanged(tmp_path: Path) -> None:
    first = ensure_certificate(tmp_path)
    before = [p.read_bytes() for p in first]
    second = ensure_certificate(tmp_path)
    assert second == first
    assert [p.read_bytes() for p in second] == before


@pytest.mark.parametrize("missing", ["server.key", "server.crt"])
def test_half_a_pair_is_an_error_naming_the_file_and_nothing_is_written(
    tmp_path: Path, missing: str
) -> None:
    cert, key = ensure_certificate(tmp_path)
    (tmp_path / missing).unlink()
    present = key if missing == "server.crt" else cert
    before = present.read_bytes()
    with pytest.raises(StartFailed, match=re.escape(str(tmp_path / missing))):
        ensure_certificate(tmp_path)
    assert not (tmp_path / missing).exists()
    assert present.read_bytes() == before


def test_garbage_certificate_is_named(tmp_path: Path) -> None:
    cert, _ = ensure_certificate(tmp_path)
    cert.write_text("not a certificate\n")
    with pytest.raises(StartFailed, match=f"{re.escape(str(cert))}: not a PEM certificate"):
        ensure_certificate(tmp_path)


def test_mismatched_key_is_named(tmp_path: Path) -> None:
    cert, _ = ensure_certificate(tmp_path / "a")
    _, other_key = ensure_certificate(tmp_path / "b")
    with pytest.raises(StartFailed, match="does not belong to the certificate"):
        validate_pair(cert, other_key)


def test_expired_certificate_is_named_with_its_date(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=400))
        .not_valid_after(now - dt.timedelta(days=35))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "old.crt", tmp_path / "old.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    expired_on = (now - dt.timedelta(days=35)).strftime("%Y-%m-%d")
    with pytest.raises(
        StartFailed, match=f"{re.escape(str(cert_path))}: .*expired on {expired_on}"
    ):
        validate_pair(cert_path, key_path)


def test_unreadable_and_encrypted_keys_are_named(tmp_path: Path) -> None:
    cert, key = ensure_certificate(tmp_path)
    with pytest.raises(StartFailed, match=f"{re.escape(str(tmp_path / 'nope.key'))}: cannot read"):
        validate_pair(cert, tmp_path / "nope.key")
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(StartFailed, match="encrypted"):
        validate_pair(cert, locked)


def test_generation_never_replaces_an_existing_key(tmp_path: Path) -> None:
    key = tmp_path / "server.key"
    key.write_text("someone's key")
    with pytest.raises(StartFailed, match="cannot create the private key"):
        generate_pair(tmp_path / "server.crt", key)
    assert key.read_text() == "someone's key"
    assert not (tmp_path / "server.crt").exists()


# Ports ---------------------------------------------------------------

HOLDER = (
    "import socket, sys; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen();"
    "print(s.getsockname()[1], flush=True); sys.stdin.read()"
)


def test_taken_port_names_the_holding_process() -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        port = int(holder.stdout.readline())
        pid, name = port_holder(port) or (0, "")
        assert pid == holder.pid
        assert name.startswith("python")
        with pytest.raises(StartFailed) as failed:
            bind_listener("127.0.0.1", port)
        assert str(failed.value) == f"port {port} on 127.0.0.1 is taken by pid {pid} ({name})"
    finally:
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.close()
        holder.wait(TIMEOUT)
        holder.stdout.close()


def test_free_port_has_no_holder_and_binds_a_private_listener() -> None:
    port = free_port()
    assert port_holder(port) is None
    with bind_listener("127.0.0.1", port) as sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert sock.get_inheritable() is False
        holder = port_holder(port)
        assert holder is not None and holder[0] == os.getpid()


def test_unknown_address_is_a_start_error() -> None:
    with pytest.raises(StartFailed, match=r"203\.0\.113\.7 is not an address of this machine"):
        bind_listener("203.0.113.7", free_port())  # a documentation address; nothing is sent


# Launch ---------------------------------------------------------------


def test_prepare_proxy_makes_a_certificate_binds_and_describes_the_child(tmp_path: Path) -> None:
    port = free_port()
    config = Config(
        install_dir=str(tmp_path),
        runtime=RuntimeConfig(signaling_port=40123),  # where the proxy forwards
        proxy=ProxyConfig(host="127.0.0.1", port=port, max_connections=7),
    )
    launch = prepare_proxy(config)
    try:
        assert launch.url == f"https://127.0.0.1:{port}/client/?serverIP=127.0.0.1&port={port}"
        assert launch.port == port
        assert launch.cert == tmp_path / "certs" / "server.crt" and launch.cert.exists()
        assert launch.log_path == tmp_path / "logs" / "wss.log"
        spec = launch.spec(99)
        argv = list(spec.argv)
        assert argv[:3] == [sys.executable, "-m", "cxrd.proxy"]
        assert argv[argv.index("--listen-fd") + 1] == str(launch.listener.fileno())
        assert argv[argv.index("--ready-fd") + 1] == "99"
        assert argv[argv.index("--backend-port") + 1] == "40123"
        assert argv[argv.index("--max-connections") + 1] == "7"
        assert argv[argv.index("--parent-pid") + 1] == str(os.getpid())
        assert spec.pass_fds == (launch.listener.fileno(), 99)
        assert spec.stderr.parent == tmp_path / "logs"
        with pytest.raises(StartFailed, match=f"port {port} on 127.0.0.1 is taken by pid"):
            prepare_proxy(config)  # the daemon holds the port while it lives
    finally:
        launch.close()
    bind_listener("127.0.0.1", port).close()  # released


def test_prepare_proxy_validates_a_configured_pair(tmp_path: Path) -> None:
    cert, _ = ensure_certificate(tmp_path / "a")
    _, key = ensure_certificate(tmp_path / "b")
    config = Config(
        install_dir=str(tmp_path / "install"),
        proxy=ProxyConfig(port=free_port(), cert=str(cert), key=str(key)),
    )
    with pytest.raises(StartFailed, match=re.escape(str(key))):
        prepare_proxy(config)
    assert not (tmp_path / "install" / "certs").exists()  # nothing generated instead


def test_urls_on_every_address_name_each_ipv4_address_not_the_host_name(tmp_path: Path) -> None:
    config = Config(install_dir=str(tmp_path), proxy=ProxyConfig(host="0.0.0.0", port=free_port()))
    launch = prepare_proxy(config)
    launch.close()
    addresses = ipv4_addresses() or ["127.0.0.1"]
    port = launch.port
    expected = [f"https://{a}:{port}/client/?serverIP={a}&port={port}" for a in addresses]
    assert list(launch.urls[: len(addresses)]) == expected
    assert all(socket.gethostname() + ":" not in url for url in launch.urls)


PROCESS_SETTINGS = (
    "max_message_size", "max_connections", "max_pending", "max_per_address",
    "handshake_timeout", "head_timeout", "send_timeout", "ping_interval", "ping_timeout",
)  # fmt: skip


def test_every_proxy_setting_in_the_config_reaches_the_proxy_process(tmp_path: Path) -> None:
    path = tmp_path / "cxrd.toml"
    path.write_text(
        "[proxy]\nmax_message_size = 65536\nmax_connections = 7\nmax_pending = 9\n"
        "max_per_address = 3\nhandshake_timeout = 1.5\nhead_timeout = 2.5\n"
        "send_timeout = 3.5\nping_interval = 4.5\nping_timeout = 5.5\n"
        "allow = ['::ffff:10.0.0.7', '10.1.0.0/16']\n"
        "origins = ['HTTPS://Lab.Example:8443', '*']\n"
    )
    settings = load_config(path).proxy
    with socket.socket() as listener:
        launch = ProxyLaunch(
            listener=listener,
            urls=(),
            port=48322,
            log_path=tmp_path / "wss.log",
            cert=tmp_path / "server.crt",
            key=tmp_path / "server.key",
            settings=settings,
        )
        argv = launch.spec(ready_fd=3).argv
    assert argv[1:3] == ("-m", "cxrd.proxy")
    args = parse_args(list(argv[3:]))
    assert {key: getattr(args, key) for key in PROCESS_SETTINGS} == {
        key: getattr(settings, key) for key in PROCESS_SETTINGS
    }
    assert args.allow == [ip_network("10.0.0.7/32"), ip_network("10.1.0.0/16")]
    assert args.origin == ["https://lab.example:8443", "*"]
    # Left out of the file, the proxy runs with the config's defaults.
    defaults = {key: getattr(ProxyConfig(), key) for key in PROCESS_SETTINGS}
    assert {key: getattr(ProxyOptions(), key) for key in PROCESS_SETTINGS} == defaults
    assert defaults["send_timeout"] == 10.0
    path.write_text("[proxy]\nsend_timeout = 0\n")
    with pytest.raises(InvalidConfig, match=r"proxy\.send_timeout: must be greater than 0"):
        load_config(path)


# The frame scanner ---------------------------------------------------------------


class Recorder:
    """Stands in for the relay session and the destination transport; records what happens."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.events: list[tuple[str, object]] = []

    def write(self, data: bytes) -> None:
        self.written += data

    def close_seen(self, half: Half) -> None:
        self.events.append(("close", (half.close_code, half.close_reason)))

    def oversize(self, half: Half, size: int) -> None:
        self.events.append(("oversize", size))
        half.inject(b"<close>", then_stop=True)

    def protocol_error(self, half: Half, problem: str) -> None:
        self.events.append(("protocol_error", problem))

    def client_ping(self, payload: bytes) -> None:
        self.events.append(("ping", payload))


def half(from_client: bool = True, max_size: int | None = None) -> tuple[Half, Recorder]:
    rec = Recorder()
    return Half(rec, None, rec, from_client=from_client, max_size=max_size), rec  # type: ignore[arg-type]


def test_frames_pass_unchanged_whatever_the_read_boundaries() -> None:
    frames = [
        F.encode_frame(op, payload, mask=True)
        for op, payload in [
            (F.OP_TEXT, b"hello"),
            (F.OP_BINARY, b"\x00" * 300),  # 16-bit length
            (F.OP_PING, b"p" * 125),  # the client's: answered by the proxy, not passed on
            (F.OP_BINARY, b"\x01" * 70000),  # 64-bit length
            (F.OP_PONG, b"q"),
            (F.OP_PING, b"r"),
            (F.OP_CLOSE, F.close_payload(4003, "done")),
        ]
    ]
    stream = b"".join(frames)
    passed = b"".join(f for f in frames if f[0] & 0x0F != F.OP_PING)
    for size in (1, 2, 3, 7, 13, 1000, len(stream)):
        relay, rec = half()
        for i in range(0, len(stream), size):
            relay.data_received(stream[i : i + size])
        assert bytes(rec.written) == passed
        assert rec.events == [("ping", b"p" * 125), ("ping", b"r"), ("close", (4003, "done"))]
        assert relay.nbytes == len(stream)


def test_the_backends_pings_pass_to_the_client() -> None:
    relay, rec = half(from_client=False)
    stream = F.encode_frame(F.OP_PING, b"runtime", mask=False) + F.encode_frame(
        F.OP_TEXT, b"x", mask=False
    )
    relay.data_received(stream)
    assert bytes(rec.written) == stream and rec.events == []


def test_a_split_header_is_held_back_until_complete() -> None:
    relay, rec = half(from_client=False)
    frame = F.encode_frame(F.OP_TEXT, b"x" * 200, mask=False)  # 4-byte header
    relay.data_received(frame[:3])
    assert rec.written == b""  # nothing of a frame whose header is incomplete
    relay.data_received(frame[3:])
    assert rec.written == frame


def test_injected_frames_wait_for_the_end_of_the_current_frame() -> None:
    relay, rec = half(from_client=False)
    frame = F.encode_frame(F.OP_BINARY, b"y" * 1000, mask=False)
    relay.data_received(frame[:500])
    relay.inject(b"<ping>")
    assert rec.written == frame[:500]
    relay.data_received(frame[500:] + b"\x81\x01z")
    assert bytes(rec.written) == frame + b"<ping>" + b"\x81\x01z"


def test_a_message_over_the_limit_is_stopped_before_its_first_byte() -> None:
    relay, rec = half(max_size=100)
    first = F.encode_frame(F.OP_TEXT, b"a" * 60, mask=True)
    first = bytes([first[0] & 0x7F]) + first[1:]  # not final: a fragmented message
    second = F.encode_frame(F.OP_CONTINUATION, b"b" * 60, mask=True)
    relay.data_received(first + second)
    assert bytes(rec.written) == first + b"<close>"
    assert rec.events == [("oversize", 120)]
    relay.data_received(F.encode_frame(F.OP_TEXT, b"late", mask=True))
    assert bytes(rec.written) == first + b"<close>"  # nothing forwarded after the close


@pytest.mark.parametrize(
    ("from_client", "frame", "problem"),
    [
        (True, F.encode_frame(F.OP_TEXT, b"hi", mask=False), "unmasked client frame"),
        (False, F.encode_frame(F.OP_TEXT, b"hi", mask=True), "masked backend frame"),
        (False, b"\xc1\x02hi", "reserved bits"),
        (False, b"\x83\x00", "reserved opcode"),
    ],
)
def test_protocol_violations_are_reported(from_client: bool, frame: bytes, problem: str) -> None:
    relay, rec = half(from_client=from_client)
    relay.data_received(frame)
    assert rec.written == b""
    assert rec.events[0][0] == "protocol_error" and problem in str(rec.events[0][1])


def test_close_frames_carry_their_code_and_a_reason_cut_to_fit() -> None:
    payload = F.close_payload(1001, "é" * 100)
    assert len(payload) <= F.MAX_CONTROL_PAYLOAD
    code, reason = F.parse_close(payload)
    assert code == 1001 and set(reason) == {"é"}
    assert F.parse_close(b"") == (F.CLOSE_NO_STATUS, "")


def test_the_proxy_program_imports_neither_the_supervisor_nor_dbus_nor_sdnotify() -> None:
    probe = (
        "import sys, cxrd.proxy.__main__; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dbus_fast', 'sdnotify') "
        "or m in ('cxrd.core.supervisor', 'cxrd.daemon', 'cxrd.dbus.connection')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=TIMEOUT, check=True
    )
    assert out.stdout.strip() == "[]"
