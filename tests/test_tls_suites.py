"""The proxy's TLS 1.2 suites: AEAD with ECDHE only (issue 17, item 12).

A real TLS client (OpenSSL through Python's ``ssl``) offers exactly one suite
at TLS 1.2 to the real proxy process: each CBC suite that the proxy accepted
before is refused in the handshake, each AEAD suite is served.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_proxy import Proxy
from support import TIMEOUT, free_port

# What OpenSSL's default let a TLS 1.2 client pick with the generated (RSA) pair.
REFUSED = (
    "ECDHE-RSA-AES128-SHA256",
    "ECDHE-RSA-AES256-SHA384",
    "DHE-RSA-AES128-SHA256",
    "DHE-RSA-AES256-SHA256",
    "DHE-RSA-AES128-GCM-SHA256",  # AEAD, but finite-field DHE: no browser needs it
)
SERVED = (
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-RSA-CHACHA20-POLY1305",
)


@pytest.fixture(scope="module")
def proxy(certs: tuple[Path, Path]) -> Iterator[Proxy]:
    running = Proxy(certs, free_port())
    yield running
    assert running.stop() == 0


def tls12_connect(proxy: Proxy, cert: Path, suite: str) -> ssl.SSLSocket:
    """A TLS 1.2 connection to the proxy, its client offering only ``suite``; SSLError if
    the handshake fails."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cert)
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(suite)
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT)
    try:
        return context.wrap_socket(raw, server_hostname="localhost")
    except BaseException:
        raw.close()
        raise


@pytest.mark.parametrize("suite", REFUSED)
def test_a_tls_1_2_client_offering_only_a_cbc_or_dhe_suite_is_refused(
    proxy: Proxy, certs: tuple[Path, Path], suite: str
) -> None:
    with pytest.raises(ssl.SSLError) as refused:
        tls12_connect(proxy, certs[0], suite).close()
    assert "HANDSHAKE_FAILURE" in str(refused.value).upper()


@pytest.mark.parametrize("suite", SERVED)
def test_a_tls_1_2_client_offering_an_aead_suite_is_served(
    proxy: Proxy, certs: tuple[Path, Path], suite: str
) -> None:
    with tls12_connect(proxy, certs[0], suite) as tls:
        cipher = tls.cipher()
        assert cipher is not None and cipher[0] == suite
        tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert tls.recv(64).startswith(b"HTTP/1.1 200 ")
