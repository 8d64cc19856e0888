"""The proxy's plain HTTP side and header rules; pure, no I/O.

Nothing a request carries is ever written into a response body: the
certificate page is a constant, errors are fixed texts.
"""

from __future__ import annotations

import contextlib
import json
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from cxrd.config_proxy import ANY_ORIGIN, normal_origin

# isaacteleop's published web client (GitHub Pages): it opens the WebSocket from there.
PUBLISHED_CLIENT_ORIGIN = "https://nvidia.github.io"

HEALTH_PATH = "/healthz"

CERT_PAGE = (
    b"<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
    b"<meta name=viewport content='width=device-width,initial-scale=1'>"
    b"<title>Certificate accepted</title>"
    b"<style>body{font-family:system-ui,sans-serif;display:flex;align-items:center;"
    b"justify-content:center;height:100vh;margin:0;background:#f5f5f5;color:#222}"
    b"main{text-align:center}h1{font-weight:600;font-size:1.5rem}p{color:#555}</style>"
    b"</head><body><main><h1>Certificate accepted</h1>"
    b"<p>This browser now trusts the CloudXR proxy. "
    b"Close this tab and return to the web client.</p></main></body></html>\n"
)

# Never forwarded to the backend: hop-by-hop headers (RFC 9110 §7.6.1), the
# ones the backend leg computes itself, every Sec-WebSocket-* header, and the
# client's claims about where it comes from (the proxy says that itself, in
# X-Forwarded-For).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "forwarded",
        "x-real-ip",
    }
)

# Bidirectional formatting characters (Unicode category Cf, but they reorder what a
# terminal shows, the "Trojan Source" trick); C0, DEL and C1 are category Cc.
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def terminal_safe(text: str, limit: int) -> str:
    """Network text (a header, a path) as it may enter a log, D-Bus or a terminal.

    Header bytes arrive decoded as ISO-8859-1; UTF-8 among them is decoded as
    such. Control characters (C0, DEL, C1 such as U+009B, the 8-bit CSI),
    bidirectional controls and line or paragraph separators are dropped;
    at most ``limit`` characters are kept.
    """
    with contextlib.suppress(UnicodeEncodeError):  # else already decoded beyond Latin-1
        text = text.encode("latin-1").decode("utf-8", "replace")
    kept = (
        c
        for c in text
        if c not in _BIDI and unicodedata.category(c) not in ("Cc", "Zl", "Zp", "Cs")
    )
    return "".join(kept)[:limit]


@dataclass(frozen=True)
class Origins:
    """Which web pages may open a WebSocket through the proxy or read ``/healthz``.

    The proxy's own pages (an ``Origin`` that is ``https://`` plus the request's
    own ``Host``: the page came from this very proxy, under whatever address
    or name the browser used, every URL ``cxrctl url`` prints included),
    isaacteleop's published client, and what ``proxy.origins`` adds (``*``:
    any page). A request without ``Origin`` is not a browser's page and passes.
    """

    extra: frozenset[str] = frozenset()  # normalised proxy.origins entries

    def allows(self, request: Request) -> bool:
        origins = request.headers.get_all("Origin")
        if not origins:
            return True
        if len(origins) > 1:
            return False
        if ANY_ORIGIN in self.extra:
            return True
        origin = normal_origin(origins[0])
        if origin is None:
            return False  # "null" (a sandboxed frame, a file://) or malformed
        if origin == PUBLISHED_CLIENT_ORIGIN or origin in self.extra:
            return True
        hosts = request.headers.get_all("Host")
        return len(hosts) == 1 and origin == normal_origin(f"https://{hosts[0]}")


def cors(request: Request) -> dict[str, str]:
    """CORS headers naming the request's (allowed) origin, or none without ``Origin``."""
    origin = request.headers.get_all("Origin")
    if len(origin) != 1:
        return {}
    return {"Access-Control-Allow-Origin": origin[0], "Vary": "Origin"}


def is_upgrade(request: Request) -> bool:
    return any(
        token.strip().lower() == "websocket"
        for value in request.headers.get_all("Upgrade")
        for token in value.split(",")
    )


def is_preflight(request: Request) -> bool:
    return request.method == "OPTIONS"


def route_path(request: Request) -> str:
    """The request's path without its query, for routing and logs."""
    return request.path.split("?", 1)[0]


def end_to_end_headers(request: Request, client_ip: str) -> list[tuple[str, str]]:
    """The client's headers a backend may see, then ``X-Forwarded-For: client_ip``.

    Not hop-by-hop, not Sec-WebSocket-*, not the client's own Forwarded,
    X-Forwarded-* or X-Real-IP: only the proxy knows where the client is.
    """
    named = {
        token.strip().lower()
        for value in request.headers.get_all("Connection")
        for token in value.split(",")
    }
    kept = [
        (name, value)
        for name, value in request.headers.raw_items()
        if (lowered := name.lower()) not in HOP_BY_HOP
        and lowered not in named
        and not lowered.startswith(("sec-websocket-", "x-forwarded-"))
    ]
    return [*kept, ("X-Forwarded-For", client_ip)]


def response(
    status: int,
    reason: str,
    body: bytes,
    content_type: str,
    *,
    extra: Mapping[str, str] | None = None,
    head_only: bool = False,
    length: int | None = None,
) -> bytes:
    """A whole HTTP/1.1 response that closes the connection.

    ``extra`` adds headers or replaces the defaults; ``length`` is the
    Content-Length a HEAD answer announces when ``body`` was not read.
    """
    headers = {
        "Content-Type": content_type,
        "Content-Length": str(len(body) if length is None else length),
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Connection": "close",
        **(extra or {}),
    }
    return Response(status, reason, Headers(headers), b"" if head_only else body).serialize()


def redirect(location: str) -> bytes:
    """301 to ``location`` (a path on this server, built from a checked request path)."""
    return response(
        301, "Moved Permanently", b"", "text/plain; charset=utf-8", extra={"Location": location}
    )


def foreign_origin() -> bytes:
    return error(403, "Forbidden", "This web page may not use this proxy (proxy.origins).")


def cert_page(*, head_only: bool = False, extra: Mapping[str, str] | None = None) -> bytes:
    csp = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"}
    return response(
        200,
        "OK",
        CERT_PAGE,
        "text/html; charset=utf-8",
        extra={**csp, **(extra or {})},
        head_only=head_only,
    )


def preflight(request: Request) -> bytes:
    """A browser's CORS preflight from an allowed origin: GET and HEAD, no extra headers."""
    allowed = {**cors(request), "Access-Control-Allow-Methods": "GET, HEAD"}
    return response(200, "OK", b"", "text/plain; charset=utf-8", extra=allowed)


def health(
    report: Mapping[str, Any], *, head_only: bool = False, extra: Mapping[str, str] | None = None
) -> bytes:
    body = json.dumps(dict(report), sort_keys=True).encode() + b"\n"
    return response(200, "OK", body, "application/json", head_only=head_only, extra=extra)


def error(status: int, reason: str, text: str, *, extra: Mapping[str, str] | None = None) -> bytes:
    return response(status, reason, text.encode() + b"\n", "text/plain; charset=utf-8", extra=extra)


def method_not_allowed() -> bytes:
    allow = {"Allow": "GET, HEAD, OPTIONS"}
    return error(405, "Method Not Allowed", "Method not allowed.", extra=allow)


def busy() -> bytes:
    return error(
        503,
        "Service Unavailable",
        "Too many connections; try again later.",
        extra={"Retry-After": "5"},
    )
