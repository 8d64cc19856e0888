"""The proxy's /client/ (the web client it hosts), over real TLS (proxy.allow: test_admission)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_proxy import Backend, Proxy, fetch, open_ws, run

from cxrd.proxy.static import MAX_FILE_SIZE

INDEX = b"<!doctype html><title>test client</title><script src=app.js></script>\n"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("site")
    root = base / "client"
    (root / "assets").mkdir(parents=True)
    (root / "index.html").write_bytes(INDEX)
    (root / "app.js").write_text("console.log('hi')\n")
    (root / "assets" / "app.wasm").write_bytes(b"\0asm\1\0\0\0")
    (base / "secret.txt").write_text("outside the client directory\n")
    (root / "leak.txt").symlink_to(base / "secret.txt")
    (root / "up").symlink_to(base)
    with (root / "huge.bin").open("wb") as huge:
        huge.truncate(MAX_FILE_SIZE + 1)  # sparse: big on paper only
    return root


@pytest.fixture(scope="module")
def hosting(certs: Any, backend: Backend, site: Path) -> Iterator[Proxy]:
    running = Proxy(certs, backend.port, "--client-dir", str(site))
    yield running
    assert running.stop() == 0


def test_client_files_are_served_with_their_types_and_cache_rules(
    hosting: Proxy, certs: Any
) -> None:
    status, headers, body = fetch(hosting, certs, "GET", "/client/?serverIP=10.0.0.5&port=48322")
    assert (status, body) == (200, INDEX)
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Cache-Control"] == "no-cache"
    status, headers, body = fetch(hosting, certs, "GET", "/client/app.js")
    assert status == 200 and body == b"console.log('hi')\n"
    assert headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert headers["Cache-Control"] == "public, max-age=3600"
    status, headers, _ = fetch(hosting, certs, "GET", "/client/assets/app.wasm")
    assert status == 200 and headers["Content-Type"] == "application/wasm"


def test_bare_client_path_redirects_keeping_the_query(hosting: Proxy, certs: Any) -> None:
    status, headers, _ = fetch(hosting, certs, "GET", "/client?serverIP=10.0.0.5&port=48322")
    assert status == 301
    assert headers["Location"] == "/client/?serverIP=10.0.0.5&port=48322"
    status, headers, _ = fetch(hosting, certs, "GET", "/client")
    assert (status, headers["Location"]) == (301, "/client/")


def test_head_announces_the_length_without_a_body(hosting: Proxy, certs: Any) -> None:
    status, headers, body = fetch(hosting, certs, "HEAD", "/client/index.html")
    assert status == 200 and body == b""
    assert headers["Content-Length"] == str(len(INDEX))


@pytest.mark.parametrize(
    "path",
    [
        "/client/../client/index.html",
        "/client/%2e%2e/secret.txt",
        "/client/%2E%2E%2Fsecret.txt",
        "/client/assets/..%2f..%2fsecret.txt",
        "/client/leak.txt",  # a symlink out of the directory
        "/client/up/secret.txt",  # a directory symlink out of it
        "/client/assets/",  # a directory without an index: never listed
        "/client/%00index.html",
        "/client/huge.bin",  # over the size bound
        "/client/nothing-here.js",
    ],
)
def test_nothing_outside_the_client_directory_or_over_the_bound_is_served(
    hosting: Proxy,
    certs: Any,
    path: str,
) -> None:
    status, _, body = fetch(hosting, certs, "GET", path)
    assert status == 404, path
    assert b"outside the client directory" not in body and b"app.wasm" not in body


def test_the_certificate_page_and_the_relay_still_answer_beside_the_client(
    hosting: Proxy,
    certs: Any,
) -> None:
    status, _, body = fetch(hosting, certs, "GET", "/")
    assert status == 200 and b"Certificate accepted" in body

    async def echo() -> None:
        async with open_ws(hosting, certs, "/client/ws") as ws:
            await ws.send("through")
            assert await ws.recv() == "through"

    run(echo())


def test_a_missing_client_answers_how_to_get_it(
    certs: Any,
    backend: Backend,
    tmp_path: Path,
) -> None:
    empty = tmp_path / "static-client"
    empty.mkdir()
    proxy = Proxy(certs, backend.port, "--client-dir", str(empty))
    try:
        status, headers, body = fetch(proxy, certs, "GET", "/client/?serverIP=1.2.3.4&port=1")
        assert status == 404 and headers["Content-Type"].startswith("text/html")
        assert b"cxrctl client fetch" in body
        proxy.wait_line("no index.html in the client directory")
    finally:
        assert proxy.stop() == 0


def test_client_dir_is_not_served_when_hosting_is_off(
    certs: Any,
    backend: Backend,
    site: Path,
) -> None:
    proxy = Proxy(certs, backend.port)
    try:
        status, _, body = fetch(proxy, certs, "GET", "/client/index.html")
        assert status == 200 and b"Certificate accepted" in body and INDEX not in body
    finally:
        assert proxy.stop() == 0
    assert os.path.exists(site / "index.html")
