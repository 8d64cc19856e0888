"""The web client at ``/client/``, served from one directory and never outside it.

A request path is decoded once, split into segments, and refused if any
segment is empty, ``.``, ``..`` or carries a NUL or a backslash; the file it
names is then resolved (symlinks followed) and must still lie inside the
resolved directory, so neither ``%2e%2e`` nor a symlink leads out. Only
regular files up to :data:`MAX_FILE_SIZE` are served; a directory is never
listed, and every path that opened something closes it.

A file is streamed (:func:`send`), :data:`CHUNK` bytes at a time, each only
once the connection has taken the previous ones (the transport's write
flow control); a client that takes nothing for the send timeout is dropped.
So a client that never reads holds at most about a chunk and the transport's
buffer, never the file. (``sendfile`` cannot serve here: TLS is done in
user space, :mod:`cxrd.proxy.tls`.)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import mimetypes
import os
import stat
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from cxrd.proxy import http

PREFIX = "/client"
MAX_FILE_SIZE = 32 * 1024 * 1024  # what isaacteleop allows one client file to be
INDEX = "index.html"
CHUNK = 16 * 1024  # per read and write: one TLS record
SEND_BUFFER = 2 * CHUNK  # the transport pauses us once it holds this much unsent

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
    data: bytes  # the whole response, or its head when ``file`` follows
    note: str = ""  # why, for the log, when refused
    file: io.FileIO | None = None  # a regular file whose first ``length`` bytes are the body
    length: int = 0

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def serve(root: Path, target: str, *, head_only: bool) -> Answer:
    """The response to GET/HEAD ``target`` (path and query) under ``/client``. Blocking.

    A 200 to GET carries the open file: the caller sends it (:func:`send`) and
    closes it (:meth:`Answer.close`).
    """
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
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return Answer(404, _not_found(), "not a regular file")
        if info.st_size > MAX_FILE_SIZE:
            return Answer(404, _not_found(), f"larger than {MAX_FILE_SIZE} bytes")
        kind = content_type(real.name)
        cache = HTML_CACHE if kind.startswith("text/html") else ASSET_CACHE
        head = http.response(
            200,
            "OK",
            b"",
            kind,
            extra={"Cache-Control": cache},
            head_only=True,
            length=info.st_size,
        )
        if head_only:
            return Answer(200, head)
        file = io.FileIO(fd, "rb", closefd=True)
        fd = -1  # the file owns it now
        return Answer(200, head, file=file, length=info.st_size)
    finally:
        if fd >= 0:
            os.close(fd)


def discard(future: Future[Answer] | asyncio.Future[Answer]) -> None:
    """Done-callback of a :func:`serve` whose requester is gone: close what it opened."""
    if not future.cancelled() and future.exception() is None:
        future.result().close()


class Flow:
    """A connection's write flow control, as its protocol hears it, for :func:`send`."""

    def __init__(self) -> None:
        self.writable = asyncio.Event()
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()


async def respond(
    transport: asyncio.Transport,
    flow: Flow,
    root: Path,
    target: str,
    *,
    head_only: bool,
    timeout: float,
) -> Answer:
    """Serve ``target``: a file is sent here and the answer returned has nothing left
    to write; anything else (a 404, a redirect, a HEAD) is returned to be written.

    TimeoutError or OSError as :func:`send`; whatever was opened is closed on
    every path, a cancellation included.
    """
    loop = asyncio.get_running_loop()
    opening = loop.run_in_executor(
        None, functools.partial(serve, root, target, head_only=head_only)
    )
    try:
        answer = await asyncio.shield(opening)
    except asyncio.CancelledError:
        opening.add_done_callback(discard)  # the client left: close what it opens
        raise
    with contextlib.closing(answer):
        if answer.file is not None:
            await send(transport, flow, answer, timeout)
            return Answer(answer.status, b"", answer.note)
    return answer


async def send(transport: asyncio.Transport, flow: Flow, answer: Answer, timeout: float) -> None:
    """Write ``answer``: its head, then its file a chunk at a time as the client takes it.

    TimeoutError when the client takes nothing for ``timeout`` seconds; OSError
    if the file shrank meanwhile (the client then sees a short body).
    """
    loop = asyncio.get_running_loop()
    transport.set_write_buffer_limits(high=SEND_BUFFER)
    transport.write(answer.data)
    file = answer.file
    assert file is not None
    # Filled by a worker thread, allocated here: worker threads allocating every
    # chunk grow malloc arenas of their own (bench/static_memory.py: ~85 KiB
    # of RSS per stalled client). ssl copies what is written, so it is reused.
    buffer = bytearray(CHUNK)
    offset = 0
    while offset < answer.length:
        if not flow.writable.is_set():
            async with asyncio.timeout(timeout):
                await flow.writable.wait()
        view = memoryview(buffer)[: min(CHUNK, answer.length - offset)]
        size = await loop.run_in_executor(None, os.preadv, file.fileno(), [view], offset)
        if not size:
            raise OSError(f"the file shrank to {offset} bytes while being sent")
        transport.write(view[:size])
        offset += size


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
