"""Which web pages may use the proxy: Origin on WebSocket upgrades and /healthz, and CORS.

Real ``python -m cxrd.proxy`` processes over real TLS, and a real headless
Chromium for what a browser does with a page from another origin.
"""

from __future__ import annotations

import asyncio
import http.server
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from fixtures_proxy import Backend, Proxy, client_tls, fetch
from support import TIMEOUT
from test_headsets import CHROMIUM, DevTools, headless_chromium
from websockets.asyncio.client import connect

from cxrd.config import load_config
from cxrd.errors import InvalidConfig
from cxrd.system.addresses import headset_urls

PUBLISHED = "https://nvidia.github.io"


@pytest.fixture(scope="module")
def proxy(
    certs: Any, backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    site = tmp_path_factory.mktemp("site")
    (site / "index.html").write_text("<!doctype html><title>t</title>\n")
    running = Proxy(
        certs, backend.port, "--client-dir", str(site), "--origin", "https://lab.example:8443"
    )
    yield running
    assert running.stop() == 0


def upgrade(proxy: Proxy, certs: Any, path: str, headers: dict[str, str]) -> dict[str, str]:
    """A raw WebSocket upgrade with exactly these headers (Host included): the answer's head."""
    lines = [
        f"GET {path} HTTP/1.1",
        *(f"{name}: {value}" for name, value in headers.items()),
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT)
    with client_tls(certs).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head and (chunk := tls.recv(4096)):
            head += chunk
    status, *fields = head.split(b"\r\n\r\n")[0].decode().split("\r\n")
    answer = {"status": status.split(" ")[1]}
    for field in fields:
        name, _, value = field.partition(": ")
        answer[name] = value
    return answer


def test_every_url_cxrctl_url_prints_the_published_client_and_proxy_origins_may_connect(
    proxy: Proxy, certs: Any
) -> None:
    own = [u.cert_page for u in headset_urls("0.0.0.0", proxy.port)]
    own += [u.cert_page for u in headset_urls("127.0.0.1", proxy.port)]
    for page in own:  # the page was served by this proxy under the name the browser used
        host = urlsplit(page).netloc
        answer = upgrade(proxy, certs, "/own", {"Host": host, "Origin": page.rstrip("/")})
        assert answer["status"] == "101", page
        assert "Access-Control-Allow-Origin" not in answer  # browsers need no CORS here
    here = f"127.0.0.1:{proxy.port}"
    for origin in (PUBLISHED, "https://lab.example:8443", "HTTPS://Lab.Example:8443"):
        assert upgrade(proxy, certs, "/ok", {"Host": here, "Origin": origin})["status"] == "101"
    assert upgrade(proxy, certs, "/native", {"Host": here})["status"] == "101"  # no Origin


def test_a_page_of_another_origin_gets_403_and_one_log_line(
    proxy: Proxy, backend: Backend, certs: Any
) -> None:
    here = f"127.0.0.1:{proxy.port}"
    refused = (
        "https://ads.example",
        f"https://127.0.0.1:{proxy.port + 1}",  # another port of this host
        f"http://{here}",  # not over TLS: not a page of this proxy
        "null",  # a sandboxed frame or a file:// page
        "https://nvidia.github.io.evil.example",
        "https://lab.example",  # proxy.origins names port 8443
    )
    for origin in refused:
        for path in ("/refused", "/client/refused"):  # under the hosted client's path too
            answer = upgrade(proxy, certs, path, {"Host": here, "Origin": origin})
            assert answer["status"] == "403", (path, origin)
        status, headers, body = fetch(proxy, certs, "GET", "/healthz", {"Origin": origin})
        assert status == 403 and b"proxy.origins" in body and b"backend" not in body
        assert headers["Access-Control-Allow-Origin"] is None
    assert not {"/refused", "/client/refused"} & set(backend._closes)  # the runtime saw none
    line = proxy.wait_line(r"refused: Origin")
    assert "'https://ads.example' not allowed" in line
    # Eighteen refusals, one line: a page retrying in a loop cannot fill the log.
    assert fetch(proxy, certs, "GET", "/client/index.html")[0] == 200
    between = []
    while not re.search(r"http GET path='/client/index.html'", seen := proxy.wait_line(".")):
        between.append(seen)
    assert not [x for x in between if "refused: Origin" in x], between


def test_cors_names_the_allowed_origin_only_where_a_page_may_read(proxy: Proxy, certs: Any) -> None:
    status, headers, body = fetch(proxy, certs, "GET", "/healthz", {"Origin": PUBLISHED})
    assert status == 200 and b"backend_reachable" in body
    assert headers["Access-Control-Allow-Origin"] == PUBLISHED and headers["Vary"] == "Origin"
    status, headers, _ = fetch(proxy, certs, "OPTIONS", "/healthz", {"Origin": PUBLISHED})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == PUBLISHED
    assert headers["Access-Control-Allow-Methods"] == "GET, HEAD"
    for method, path, origin in (
        ("GET", "/healthz", None),  # curl, a probe: no page, no CORS
        ("GET", "/", "https://ads.example"),  # the certificate page, read by nobody else
        ("GET", "/client/index.html", PUBLISHED),  # the hosted client's own files
    ):
        status, headers, _ = fetch(proxy, certs, method, path, {"Origin": origin} if origin else {})
        assert status == 200, path
        assert headers["Access-Control-Allow-Origin"] is None, (path, origin)
    for path in ("/client/index.html", "/healthz"):  # OPTIONS only where a page reads
        headers_sent = {"Origin": PUBLISHED} if path == "/client/index.html" else {}
        assert fetch(proxy, certs, "OPTIONS", path, headers_sent)[0] == 405, path


def test_a_star_lets_any_page_in_and_cors_still_names_it(certs: Any, backend: Backend) -> None:
    proxy = Proxy(certs, backend.port, "--origin", "*")
    try:
        here = f"127.0.0.1:{proxy.port}"
        answer = upgrade(proxy, certs, "/any", {"Host": here, "Origin": "https://ads.example"})
        assert answer["status"] == "101"
        _, headers, _ = fetch(proxy, certs, "GET", "/healthz", {"Origin": "https://ads.example"})
        assert headers["Access-Control-Allow-Origin"] == "https://ads.example"
    finally:
        assert proxy.stop() == 0


def test_proxy_origins_in_the_config_are_normalised_or_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "cxrd.toml"
    path.write_text('[proxy]\norigins = ["*", "HTTPS://Lab.Example:443/"]\n')
    assert load_config(path).proxy.origins == ("*", "https://lab.example")
    path.write_text('[proxy]\norigins = ["https://nvidia.github.io/IsaacTeleop/"]\n')
    with pytest.raises(InvalidConfig, match=r"proxy\.origins: .* a page, not an origin"):
        load_config(path)


# A real browser -------------------------------------------------------------------

OTHER_PAGE = """<!doctype html><meta charset=utf-8><title>elsewhere</title><p id=s>connecting</p>
<script>
const s = document.getElementById("s");
const ws = new WebSocket("wss://127.0.0.1:PORT/sign_in");
ws.onopen = () => { s.textContent = "open"; };
ws.onclose = (e) => { if (s.textContent === "connecting") s.textContent = "refused " + e.code; };
</script>
"""


class OtherOrigin:
    """A plain HTTP server on another port: pages of an origin the proxy does not know."""

    def __init__(self, page: str) -> None:
        body = page.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/page.html"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> OtherOrigin:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(TIMEOUT)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (setup.sh)")
def test_headless_chromium_on_a_page_of_another_origin_cannot_open_the_websocket(
    certs: Any, backend: Backend, tmp_path: Path
) -> None:
    strict = Proxy(certs, backend.port)
    lax = Proxy(certs, backend.port, "--origin", "*")  # the same page, let in: the control

    async def scenario(pages: list[str]) -> list[str]:
        shown = []
        async with (
            headless_chromium(tmp_path / "profile") as (_, tab),
            connect(tab, max_size=None) as ws,
        ):
            devtools_tab = DevTools(ws)
            for page in pages:
                await devtools_tab.open_and_wait(page, "</p>")
                result = "connecting"
                async with asyncio.timeout(TIMEOUT):
                    while result == "connecting":
                        await asyncio.sleep(0.05)  # the page is Chromium's: polled, bounded
                        result = await devtools_tab.evaluate(
                            "document.getElementById('s').textContent"
                        )
                shown.append(result)
        return shown

    try:
        with (
            OtherOrigin(OTHER_PAGE.replace("PORT", str(strict.port))) as refused,
            OtherOrigin(OTHER_PAGE.replace("PORT", str(lax.port))) as allowed,
        ):
            shown = asyncio.run(asyncio.wait_for(scenario([refused.url, allowed.url]), 6 * TIMEOUT))
            assert shown == ["refused 1006", "open"]  # 1006: what a page sees of a 403
            line = strict.wait_line(r"refused: Origin")
            assert f"'{urlsplit(refused.url).scheme}://{urlsplit(refused.url).netloc}'" in line
    finally:
        assert strict.stop() == 0 and lax.stop() == 0
