"""The web client at ``/client/``, served from one directory and never outside it.

A request path is decoded once, split into segments, and refused if any
segment is empty, ``.``, ``..`` or carries a NUL or a backslash; the file it
names is then resolved (symlinks followed) and must still lie inside the
resolved directory, so neither ``%2e%2e`` nor a symlink leads out. Only
regular files up to :data:`MAX_FILE_SIZE` are served; a directory is never
listed.
"""

from __future__ import annotations

import mimetypes
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from cxrd.proxy import http

PREFIX = "/client"
MAX_FILE_SIZE = 32 * 1024 * 1024  # what isaacteleop allows one client file to be
INDEX = "index.html"

# Types the client's files need, whatever the host's mime.types says.
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
}

# HTML is checked again on every load (a fetched client replaces it in place);
# the rest may be kept a while.
HTML_CACHE = "no-cache"
ASSET_CACHE = "public, max-age=3600"

MISSING_PAGE = (
    b"<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
    b"<meta name=viewport content='width=device-width,initial-scale=1'>"
    b"<title>Web client not installed</title>"
    b"<style>body{font-family:system-ui,sans-serif;max-width:40rem;margin:3rem auto;"
    b"padding:0 1rem;color:#222}code{background:#eee;padding:.1rem .3rem}</style>"
    b"</head><body><h1>The CloudXR web client is not installed</h1>"
    b"<p>This proxy serves the web client at <code>/client/</code>, but its directory "
    b"holds no <code>index.html</code>. On the machine that runs cxrd:</p>"
    b"<p><code>cxrctl client fetch</code></p>"
    b"<p>(or <code>cxrctl client fetch --from DIR</code> offline), then reload this page.</p>"
    b"</body></html>\n"
)


def is_client_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


@dataclass(frozen=True)
class Answer:
    status: int
    data: bytes  # the whole response
    note: str = ""  # why, for the log, when refused


def serve(root: Path, target: str, *, head_only: bool) -> Answer:
    """The response to GET/HEAD ``target`` (path and query) under ``/client``. Blocking."""
    path, _, query = target.partition("?")
    if path == PREFIX:
        location = PREFIX + "/" + (f"?{query}" if query else "")
        return Answer(301, http.redirect(location))
    relative = _relative(path[len(PREFIX) + 1 :])
    if relative is None:
        return Answer(404, _not_found(), "refused path")
    try:
        base = root.resolve(strict=True)
    except OSError:
        return _missing_client(relative)
    candidate = base.joinpath(*relative) if relative else base
    if not relative or path.endswith("/"):
        candidate = candidate / INDEX
    try:
        real = candidate.resolve(strict=True)
    except OSError:
        return _missing_client(relative) if not relative else Answer(404, _not_found())
    if not real.is_relative_to(base):
        return Answer(404, _not_found(), "outside the client directory")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return Answer(404, _not_found())
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            return Answer(404, _not_found())
        if info.st_size > MAX_FILE_SIZE:
            return Answer(404, _not_found(), f"larger than {MAX_FILE_SIZE} bytes")
        body = b"" if head_only else file.read(MAX_FILE_SIZE + 1)
    if len(body) > MAX_FILE_SIZE:
        return Answer(404, _not_found(), f"larger than {MAX_FILE_SIZE} bytes")
    kind = content_type(real.name)
    cache = HTML_CACHE if kind.startswith("text/html") else ASSET_CACHE
    data = http.response(
        200,
        "OK",
        body,
        kind,
        extra={"Cache-Control": cache},
        head_only=head_only,
        length=info.st_size,
    )
    return Answer(200, data)


def content_type(name: str) -> str:
    suffix = Path(name).suffix.lower()
    if suffix in TYPES:
        return TYPES[suffix]
    guessed, _ = mimetypes.guess_type(name)
    return guessed or "application/octet-stream"


def has_index(root: Path) -> bool:
    return (root / INDEX).is_file()


def _relative(rest: str) -> list[str] | None:
    """The decoded segments under /client/; None if any would step out or is odd."""
    try:
        decoded = unquote(rest, errors="strict")
    except UnicodeDecodeError:
        return None
    segments = decoded.split("/")
    if segments and segments[-1] == "":
        segments.pop()  # a trailing slash: the directory's index
    for segment in segments:
        if segment in ("", ".", "..") or "\0" in segment or "\\" in segment:
            return None
    return segments


def _missing_client(relative: list[str]) -> Answer:
    if relative:
        return Answer(404, _not_found())
    body = MISSING_PAGE
    page = http.response(404, "Not Found", body, "text/html; charset=utf-8")
    return Answer(404, page, "no index.html in the client directory")


def _not_found() -> bytes:
    return http.error(404, "Not Found", "Not found.")
