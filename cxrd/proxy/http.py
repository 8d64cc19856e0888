"""The proxy's plain HTTP side and header rules; pure, no I/O.

Nothing a request carries is ever written into a response body: the
certificate page is a constant, errors are fixed texts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

CORS_HEADERS: Mapping[str, str] = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Headers": "*",
    "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, OPTIONS",
    "Access-Control-Expose-Headers": "*",
}

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
# ones the backend leg computes itself, and every Sec-WebSocket-* header.
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
    }
)


def is_upgrade(request: Request) -> bool:
    return any(
        token.strip().lower() == "websocket"
        for value in request.headers.get_all("Upgrade")
        for token in value.split(",")
    )


def is_preflight(request: Request) -> bool:
    return request.method == "OPTIONS" or "Access-Control-Request-Method" in request.headers


def route_path(request: Request) -> str:
    """The request's path without its query, for routing and logs."""
    return request.path.split("?", 1)[0]


def end_to_end_headers(request: Request) -> list[tuple[str, str]]:
    """The client's headers a backend may see: not hop-by-hop, not Sec-WebSocket-*."""
    named = {
        token.strip().lower()
        for value in request.headers.get_all("Connection")
        for token in value.split(",")
    }
    return [
        (name, value)
        for name, value in request.headers.raw_items()
        if (lowered := name.lower()) not in HOP_BY_HOP
        and lowered not in named
        and not lowered.startswith("sec-websocket-")
    ]


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
    """A whole HTTP/1.1 response that closes the connection, CORS headers included.

    ``extra`` adds headers or replaces the defaults; ``length`` is the
    Content-Length a HEAD answer announces when ``body`` was not read.
    """
    headers = {
        "Content-Type": content_type,
        "Content-Length": str(len(body) if length is None else length),
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Connection": "close",
        **CORS_HEADERS,
        **(extra or {}),
    }
    return Response(status, reason, Headers(headers), b"" if head_only else body).serialize()


def redirect(location: str) -> bytes:
    """301 to ``location`` (a path on this server, built from a checked request path)."""
    return response(
        301, "Moved Permanently", b"", "text/plain; charset=utf-8", extra={"Location": location}
    )


def forbidden() -> bytes:
    return error(403, "Forbidden", "This address may not use this proxy.")


def cert_page(*, head_only: bool = False) -> bytes:
    return response(
        200,
        "OK",
        CERT_PAGE,
        "text/html; charset=utf-8",
        extra={"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"},
        head_only=head_only,
    )


def preflight() -> bytes:
    return response(200, "OK", b"OK", "text/plain; charset=utf-8")


def health(report: Mapping[str, Any], *, head_only: bool = False) -> bytes:
    body = json.dumps(dict(report), sort_keys=True).encode() + b"\n"
    return response(200, "OK", body, "application/json", head_only=head_only)


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
