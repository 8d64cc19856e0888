"""Put the CloudXR web client into the client directory (``cxrctl client fetch``).

The default source and the file list are isaacteleop's: the build published
for the installed ``isaacteleop`` version under
``https://nvidia.github.io/IsaacCapture/client/v<version>/``, files
``index.html`` and ``bundle.js`` (required) and ``bundle.emulator.js``
(optional). Everything is fetched into a fresh directory beside the target,
then swapped in with renames, so a failed fetch leaves the old client as it
was. The daemon never calls this; only a person does.

The whole fetch has one deadline (``--timeout``): at its end a timer thread
shuts down every socket the fetch opened, which ends a read however slowly the
server trickles bytes (a timeout per read never fires for a server that sends
a byte every few seconds). A redirect from https to plain http is refused:
the files become a page that headsets run. The staging directory goes on every
way out, an exception raised by a signal handler included (the CLI turns
SIGINT, SIGTERM and SIGHUP into one); those signals are held while it is made,
swapped in and removed, so none of these is cut in half.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import IO, Any
from urllib.parse import urljoin, urlsplit

from cxrd.errors import CxrdError

PUBLISHED = "https://nvidia.github.io/IsaacCapture/client/"
REQUIRED = ("index.html", "bundle.js")
OPTIONAL = ("bundle.emulator.js",)
MAX_FILE = 32 * 1024 * 1024  # per file, as isaacteleop caps them
CHUNK = 64 * 1024
TIMEOUT = 30.0  # per socket operation
DEADLINE = 120.0  # the whole fetch (--timeout)
HELD_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})

Progress = Callable[[str, int, int | None], None]  # file name, bytes so far, total if known


class FetchFailed(CxrdError):
    """The web client could not be fetched; the old one, if any, is untouched."""


def default_source() -> str:
    """The build matching the installed runtime package, as isaacteleop picks it."""
    try:
        v = version("isaacteleop").strip()
    except PackageNotFoundError:
        return urljoin(PUBLISHED, "main/")
    if re.fullmatch(r"\d+\.\d+\.\d+", v):
        return urljoin(PUBLISHED, f"v{v}/")
    if m := re.match(r"(\d+)\.(\d+)", v):
        return urljoin(PUBLISHED, f"release-{m[1]}.{m[2]}.x/")
    return PUBLISHED


def fetch(
    target: Path,
    source: str,
    *,
    force: bool,
    progress: Progress | None = None,
    timeout: float = DEADLINE,
) -> Path:
    """Fetch the client from ``source`` (a base URL or a directory) into ``target``.

    FetchFailed when it cannot, or when it takes more than ``timeout`` seconds.
    """
    if (target / "index.html").is_file() and not force:
        raise FetchFailed(f"{target} already holds a web client; --force replaces it")
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # the install dir, if made
    deadline = _Deadline(timeout)
    staging: Path | None = None
    try:
        with _signals_held():
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        opener = urllib.request.build_opener(
            _NoDowngrade(), _WatchedHTTP(deadline), _WatchedHTTPS(deadline)
        )
        for name in (*REQUIRED, *OPTIONAL):
            got = _copy(opener, deadline, source, name, staging / name, progress)
            if not got and name in REQUIRED:
                raise FetchFailed(f"{_where(source, name)}: not found")
        staging.chmod(0o755)
        with _signals_held():  # never the old client moved away and the new one not in
            _swap(staging, target)
    finally:
        deadline.cancel()
        if staging is not None:
            with _signals_held():
                shutil.rmtree(staging, ignore_errors=True)
    return target


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP wait until the block is done (then they arrive)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class _Deadline:
    """The whole fetch's time limit: when it passes, every socket it opened is shut down."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def left(self) -> float:
        return self._end - time.monotonic()

    def check(self, where: str) -> None:
        if self.expired or self.left() <= 0:
            raise FetchFailed(
                f"{where}: not fetched within {self.seconds:g} s (--timeout); "
                "the old client, if any, is untouched"
            )

    def watch(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)
        return sock

    def cancel(self) -> None:
        self._timer.cancel()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # a blocked recv() in the fetching thread returns


def _watched(
    base: type[http.client.HTTPConnection], deadline: _Deadline
) -> Callable[..., http.client.HTTPConnection]:
    """``base``, its socket (a proxy's included) watched by ``deadline`` from its connect."""

    def connection(host: str, **kwargs: Any) -> http.client.HTTPConnection:
        conn = base(host, **kwargs)
        # http.client's one hook for the socket it connects, before any byte (the TLS
        # handshake's included) is read from it.
        create = conn._create_connection  # type: ignore[attr-defined]
        conn._create_connection = lambda *a, **k: deadline.watch(create(*a, **k))  # type: ignore[attr-defined]
        return conn

    return connection


class _WatchedHTTP(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self._connection = _watched(http.client.HTTPConnection, deadline)

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._connection, req)


class _WatchedHTTPS(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self._connection = _watched(http.client.HTTPSConnection, deadline)

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._connection, req)


class _NoDowngrade(urllib.request.HTTPRedirectHandler):
    """Follows redirects, except from https to anything else."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if urlsplit(req.full_url).scheme == "https" and urlsplit(newurl).scheme != "https":
            fp.close()
            raise FetchFailed(
                f"{req.full_url}: redirected to {newurl}, from https to plain http: refused "
                "(anyone on the way could change what headsets run); use --from with an "
                "https URL that serves the files itself"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _where(source: str, name: str) -> str:
    return (
        urljoin(source if source.endswith("/") else source + "/", name)
        if _is_url(source)
        else (str(Path(source) / name))
    )


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _copy(
    opener: urllib.request.OpenerDirector,
    deadline: _Deadline,
    source: str,
    name: str,
    dest: Path,
    progress: Progress | None,
) -> bool:
    """One file into ``dest``; False when the source has no such file."""
    where = _where(source, name)
    deadline.check(where)
    if not _is_url(source):
        path = Path(where)
        if not path.is_file():
            return False
        if path.stat().st_size > MAX_FILE:
            raise FetchFailed(f"{path}: larger than {MAX_FILE} bytes")
        shutil.copyfile(path, dest)
        return True
    request = urllib.request.Request(where, headers={"User-Agent": "cxrd"})
    try:
        with (
            opener.open(request, timeout=max(0.01, min(TIMEOUT, deadline.left()))) as reply,
            dest.open("wb") as out,
        ):
            length = reply.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if total is not None and total > MAX_FILE:
                raise FetchFailed(f"{where}: {total} bytes, more than {MAX_FILE}")
            done = 0
            while chunk := reply.read(CHUNK):
                done += len(chunk)
                if done > MAX_FILE:
                    raise FetchFailed(f"{where}: more than {MAX_FILE} bytes")
                out.write(chunk)
                if progress is not None:
                    progress(name, done, total)
    except urllib.error.HTTPError as exc:
        deadline.check(where)
        if exc.code == 404:
            return False
        raise FetchFailed(f"{where}: the server answered {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        deadline.check(where)  # the deadline shut the socket: say so, not what it broke
        why = getattr(exc, "reason", None) or exc
        raise FetchFailed(
            f"cannot download {where}: {why}; offline? copy the client from another "
            "machine and use `cxrctl client fetch --from DIR`"
        ) from None
    deadline.check(where)  # a body cut short by the deadline is not a whole file
    if done == 0:
        raise FetchFailed(f"{where}: empty")
    return True


def _swap(staging: Path, target: Path) -> None:
    """``staging`` becomes ``target``; the old ``target`` is removed only once that holds."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    had_old = target.exists()
    if had_old:
        target.rename(old)
    try:
        staging.rename(target)
    except OSError:
        if had_old:
            old.rename(target)
        raise
    with contextlib.suppress(OSError):
        shutil.rmtree(old)
