"""``cxrctl client fetch``, ``cxrctl cert renew``, ``cxrctl url`` and renewal at start."""

from __future__ import annotations

import datetime as dt
import functools
import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from support import TIMEOUT, free_port

from cxrd.config import Config, ProxyConfig
from cxrd.proxy.certs import ensure_certificate, generate_pair
from cxrd.proxy.launch import prepare_proxy
from cxrd.system import webclient
from cxrd.system.addresses import ipv4_addresses


def cxrctl(install: Path, *args: str) -> subprocess.CompletedProcess[str]:
    config = install / "cxrd.toml"
    if not config.exists():
        config.write_text(f'install_dir = "{install}"\n[proxy]\nport = 48999\n')
    return subprocess.run(
        [sys.executable, "-m", "cxrd.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=4 * TIMEOUT,
        env={"PATH": "/usr/bin:/bin", "HOME": str(install), "NO_COLOR": "1"},
    )


@pytest.fixture
def published(tmp_path: Path) -> Iterator[str]:
    """A local web server holding a client build, as the published site would."""
    site = tmp_path / "site" / "v9.9.9"
    site.mkdir(parents=True)
    (site / "index.html").write_text("<title>fetched client</title>")
    (site / "bundle.js").write_bytes(b"x" * 200_000)
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "site")
    )
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v9.9.9/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)


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
