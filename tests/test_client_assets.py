"""``cxrctl client fetch``, ``cxrctl cert renew``, ``cxrctl url`` and renewal at start."""

from __future__ import annotations

import contextlib
import datetime as dt
import http.server
import json
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from support import TIMEOUT, free_port

from cxrd.config import Config, ProxyConfig
from cxrd.proxy.certs import ensure_certificate, generate_pair
from cxrd.proxy.launch import prepare_proxy
from cxrd.system import webclient
from cxrd.system.addresses import ipv4_addresses


def cxrctl_command(install: Path, *args: str) -> list[str]:
    config = install / "cxrd.toml"
    if not config.exists():
        config.write_text(f'install_dir = "{install}"\n[proxy]\nport = 48999\n')
    return [sys.executable, "-m", "cxrd.cli", "--config", str(config), *args]


def cli_env(install: Path, **extra: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": str(install), "NO_COLOR": "1", **extra}


def cxrctl(install: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cxrctl_command(install, *args),
        capture_output=True,
        text=True,
        timeout=4 * TIMEOUT,
        env=cli_env(install, **env),
    )


class Site:
    """A local web server for ``directory`` (TLS with ``tls``); ``moved``: prefix -> new base."""

    def __init__(self, directory: Path, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[str] = []
        self.moved: dict[str, str] = {}
        site = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(directory), **kwargs)

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                site.requests.append(self.path)
                for prefix, base in site.moved.items():
                    if self.path.startswith(prefix):
                        self.send_response(302)
                        self.send_header("Location", base + self.path[len(prefix) :])
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                super().do_GET()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(TIMEOUT)


def build(site: Path) -> Path:
    """A client build as the published site holds it, under ``site``/v9.9.9."""
    build = site / "v9.9.9"
    build.mkdir(parents=True)
    (build / "index.html").write_text("<title>fetched client</title>")
    (build / "bundle.js").write_bytes(b"x" * 200_000)
    return build


@pytest.fixture
def published(tmp_path: Path) -> Iterator[str]:
    """A local web server holding a client build, as the published site would."""
    build(tmp_path / "site")
    server = Site(tmp_path / "site")
    try:
        yield f"http://127.0.0.1:{server.port}/v9.9.9/"
    finally:
        server.close()


def test_client_fetch_downloads_the_file_list_into_the_client_dir(
    tmp_path: Path, published: str
) -> None:
    done = cxrctl(tmp_path, "client", "fetch", "--from", published)
    assert done.returncode == 0, done.stderr
    client = tmp_path / "static-client"
    assert (client / "index.html").read_text() == "<title>fetched client</title>"
    assert (client / "bundle.js").stat().st_size == 200_000
    assert not (client / "bundle.emulator.js").exists()  # optional, and not published here
    again = cxrctl(tmp_path, "client", "fetch", "--from", published)
    assert again.returncode != 0 and "--force" in again.stderr


def test_client_fetch_from_a_directory_and_a_failed_fetch_keeps_the_old_client(
    tmp_path: Path,
) -> None:
    build = tmp_path / "build"
    build.mkdir()
    (build / "index.html").write_text("old")
    (build / "bundle.js").write_text("old()")
    assert cxrctl(tmp_path, "client", "fetch", "--from", str(build)).returncode == 0
    client = tmp_path / "static-client"
    (build / "index.html").write_text("new")
    (build / "bundle.js").unlink()  # an incomplete build: required file missing
    failed = cxrctl(tmp_path, "client", "fetch", "--force", "--from", str(build))
    assert failed.returncode != 0 and "bundle.js: not found" in failed.stderr
    assert (client / "index.html").read_text() == "old"  # untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".static")] == []


def test_client_fetch_offline_says_so_and_keeps_the_old_client(tmp_path: Path) -> None:
    client = tmp_path / "static-client"
    client.mkdir()
    (client / "index.html").write_text("kept")
    dead = f"http://127.0.0.1:{free_port()}/"
    failed = cxrctl(tmp_path, "client", "fetch", "--force", "--from", dead)
    assert failed.returncode == 1
    assert "cannot download" in failed.stderr and "--from DIR" in failed.stderr
    assert (client / "index.html").read_text() == "kept"


class Trickle:
    """A web server that sends its answer a byte every INTERVAL s: no read ever times out.

    The status line and headers come at once with ``head_at_once``, else a byte at a time
    too. It serves one request and sends at most a bounded number of bytes.
    """

    INTERVAL = 0.25

    def __init__(self, *, head_at_once: bool) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(4 * TIMEOUT)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/v9.9.9/"
        self._head_at_once = head_at_once
        self.answering = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        with conn:
            conn.recv(65536)  # the request head
            head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
            rest = b"x" * 100_000
            if self._head_at_once:
                conn.sendall(head)
            else:
                rest = head + rest
            self.answering.set()
            for byte in rest[: int(6 * TIMEOUT / self.INTERVAL)]:
                if self._stop.wait(self.INTERVAL):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(TIMEOUT)


def staging_dirs(install: Path) -> list[str]:
    return [p.name for p in install.iterdir() if p.name.startswith(".static-client")]


@pytest.mark.parametrize("head_at_once", [True, False], ids=["trickled-body", "trickled-head"])
def test_a_trickling_server_meets_the_overall_deadline_with_a_clear_error(
    tmp_path: Path, head_at_once: bool
) -> None:
    server = Trickle(head_at_once=head_at_once)
    try:
        began = time.monotonic()
        failed = cxrctl(tmp_path, "client", "fetch", "--from", server.url, "--timeout", "1")
        took = time.monotonic() - began
    finally:
        server.close()
    assert failed.returncode == 1, failed.stderr
    assert f"{server.url}index.html: not fetched within 1 s (--timeout)" in failed.stderr
    assert took < TIMEOUT, f"{took:.1f} s for a 1 s deadline (the per-read timeout is 30 s)"
    assert not (tmp_path / "static-client").exists() and staging_dirs(tmp_path) == []


def test_an_https_to_http_redirect_is_refused_and_https_redirects_are_followed(
    tmp_path: Path,
) -> None:
    build(tmp_path / "site")
    cert, key = generate_pair_in(tmp_path / "tls")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    plain, secure = Site(tmp_path / "site"), Site(tmp_path / "site", tls)
    secure.moved = {
        "/moved/": f"https://localhost:{secure.port}/v9.9.9/",
        "/downgrade/": f"http://127.0.0.1:{plain.port}/v9.9.9/",
    }
    trust = {"SSL_CERT_FILE": str(cert)}
    try:
        refused = cxrctl(
            tmp_path, "client", "fetch", "--from", f"https://localhost:{secure.port}/downgrade/",
            **trust,
        )  # fmt: skip
        followed = cxrctl(
            tmp_path, "client", "fetch", "--from", f"https://localhost:{secure.port}/moved/",
            **trust,
        )  # fmt: skip
    finally:
        plain.close()
        secure.close()
    assert refused.returncode == 1, refused.stderr
    assert "from https to plain http: refused" in refused.stderr
    assert f"redirected to http://127.0.0.1:{plain.port}/v9.9.9/index.html" in refused.stderr
    assert plain.requests == []  # never asked
    assert followed.returncode == 0, followed.stderr
    assert (
        tmp_path / "static-client" / "index.html"
    ).read_text() == "<title>fetched client</title>"
    assert staging_dirs(tmp_path) == []


def generate_pair_in(directory: Path) -> tuple[Path, Path]:
    directory.mkdir()
    cert, key = directory / "site.crt", directory / "site.key"
    generate_pair(cert, key)
    return cert, key


@contextlib.contextmanager
def sigint_not_ignored() -> Iterator[None]:
    """A child started here gets SIGINT's default, not an ignore the runner may have set."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_a_running_fetch_and_leaves_no_staging_directory(
    tmp_path: Path, signum: signal.Signals
) -> None:
    server = Trickle(head_at_once=True)
    try:
        with sigint_not_ignored():
            fetch = subprocess.Popen(
                cxrctl_command(tmp_path, "client", "fetch", "--from", server.url),
                env=cli_env(tmp_path),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        try:
            assert server.answering.wait(TIMEOUT), "the fetch never asked"
            assert len(staging_dirs(tmp_path)) == 1  # what the signal must clean up
            fetch.send_signal(signum)
            _, stderr = fetch.communicate(timeout=TIMEOUT)
        finally:
            if fetch.poll() is None:
                fetch.kill()
                fetch.communicate()
    finally:
        server.close()
    assert fetch.returncode == 128 + signum, stderr
    assert f"stopped by {signum.name}" in stderr
    assert staging_dirs(tmp_path) == [] and not (tmp_path / "static-client").exists()


def test_default_source_is_the_build_for_the_installed_runtime_package() -> None:
    from importlib.metadata import version

    assert webclient.default_source() == (
        f"https://nvidia.github.io/IsaacCapture/client/v{version('isaacteleop')}/"
    )


def _not_after(cert: Path) -> dt.datetime:
    return x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc


def test_a_generated_certificate_near_its_end_is_renewed_at_start(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    generate_pair(certs / "server.crt", certs / "server.key", days=10)
    config = Config(install_dir=str(tmp_path), proxy=ProxyConfig(host="127.0.0.1", port=0))
    launch = prepare_proxy(config)
    launch.close()
    left = _not_after(certs / "server.crt") - dt.datetime.now(dt.UTC)
    assert left > dt.timedelta(days=300)
    assert "must accept it again" in launch.cert_note
    assert (certs / "server.key").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in certs.iterdir()) == ["server.crt", "server.key"]


def test_a_users_pair_is_never_renewed_only_warned_about(tmp_path: Path) -> None:
    cert, key = tmp_path / "mine.crt", tmp_path / "mine.key"
    generate_pair(cert, key, days=10)
    before = cert.read_bytes(), key.read_bytes()
    config = Config(
        install_dir=str(tmp_path / "install"),
        proxy=ProxyConfig(host="127.0.0.1", port=0, cert=str(cert), key=str(key)),
    )
    launch = prepare_proxy(config)
    launch.close()
    assert (cert.read_bytes(), key.read_bytes()) == before
    assert "expires on" in launch.cert_note and "never will" in launch.cert_note
    (tmp_path / "cxrd.toml").write_text(
        f'install_dir = "{tmp_path}"\n[proxy]\ncert = "{cert}"\nkey = "{key}"\n'
    )
    refused = cxrctl(tmp_path, "cert", "renew")
    assert refused.returncode != 0 and "never replaces" in refused.stderr
    assert cert.read_bytes() == before[0]


def test_cert_renew_replaces_the_generated_pair_and_covers_the_urls(tmp_path: Path) -> None:
    cert, _ = ensure_certificate(tmp_path / "certs")
    old = cert.read_bytes()
    done = cxrctl(tmp_path, "cert", "renew")
    assert done.returncode == 0, done.stderr
    assert cert.read_bytes() != old and "accept it again" in done.stdout
    names = x509.load_pem_x509_certificate(cert.read_bytes()).extensions
    san = names.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert set(ipv4_addresses()) <= ips and "127.0.0.1" in ips


def test_url_prints_the_certificate_page_and_the_client_for_each_address(tmp_path: Path) -> None:
    shown = cxrctl(tmp_path, "url", "--json")
    assert shown.returncode == 0, shown.stderr
    urls = json.loads(shown.stdout)
    hosts = [u["host"] for u in urls]
    assert hosts[: len(ipv4_addresses())] == (ipv4_addresses() or ["127.0.0.1"])
    first = urls[0]
    assert first["cert_page"] == f"https://{first['host']}:48999/"
    assert (
        first["client"]
        == f"https://{first['host']}:48999/client/?serverIP={first['host']}&port=48999"
    )
    qr = cxrctl(tmp_path, "url", "--qr")
    assert qr.returncode == 0 and first["client"] in qr.stdout
    assert "█" in qr.stdout or "▀" in qr.stdout  # a QR code drawn in the terminal
