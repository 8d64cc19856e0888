"""Bounded log files in ``<install>/logs``: the one home of rotation and pruning.

A file is rotated by renaming: ``name`` becomes ``name.1``, ``name.1`` becomes
``name.2``, and so on; only ``keep`` rotated files are kept. Who may rename a
file depends on who holds it open:

- **A writer we do not control** (the runtime: NVIDIA's, or any
  ``runtime.command``) holds an fd on the file, so a rename would leave it
  writing into ``name.1`` for good, and copy-then-truncate loses what it
  writes between the copy and the truncate. So the child never gets the file:
  its stderr is a pipe, and a :class:`Relay` thread in cxrd appends what comes
  out of the pipe to the file and rotates the file itself, at a line end,
  before a write would take it past ``max_bytes``. Nothing is lost (the pipe
  holds what the child writes while the thread rotates) and the event loop
  never waits on the disk: the thread does all the file I/O. A child's line
  is in the file before its exit is reported (:meth:`Relay.drained`), so a
  crash's diagnosis still reads its last lines.
- **isaacteleop's ``run()`` with ``NV_CXR_FILE_LOGGING`` on** (its default)
  opens ``runtime_stderr.log`` itself (``O_TRUNC``, not ``O_APPEND``) and
  moves its stderr there, so no pipe of ours sees those lines and renaming or
  truncating under it is unsound. It truncates the file at every start, which
  bounds the file to one run; cxrd rotates the last run's file away before
  each start (:func:`rotate_stale`), so a crash loop keeps ``keep`` runs'
  tracebacks instead of none, and cannot bound a single run's file.
- **The proxy** is ours: it rotates ``wss.log`` itself from its logging handler
  (:func:`rotating_handler`), which checks the size before every record; its
  stderr (tracebacks) goes through a :class:`Relay` like the runtime's.
- The native runtime writes a new ``cxr_server.<timestamp>.log`` at each
  start: before each start the oldest are removed (:func:`prune`), leaving
  ``keep`` with the one the starting runtime writes.

No periodic check is needed: every writer whose file cxrd may rotate is
checked at every write, and the only files that appear by themselves appear
at a runtime start. ``tail -F`` (``cxrctl logs -f``) follows the name across a
rotation.

Logs name client addresses and session times: ``logs/`` is a private
directory of ours (:func:`ensure_logs_dir`, 0700) and every file cxrd writes
there is opened without following a link and made 0600
(:func:`cxrd.system.private.open_private_file`). A relay that cannot open its
file (a full disk, the directory gone, a link planted there) drops what comes
and tries again at the next write, so it never stays dead until the child
restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import logging.handlers
import os
import threading
from pathlib import Path

from cxrd.config import LogsConfig
from cxrd.errors import CxrdError
from cxrd.system.private import ensure_private_dir, open_private_file

log = logging.getLogger(__name__)

_CHUNK = 65536


def ensure_logs_dir(logs: Path) -> None:
    """Make ``logs`` or check it: a real directory of ours, 0700 (InvalidConfig if not)."""
    ensure_private_dir(logs, "the log directory", "its logs")


def open_log(path: Path) -> int:
    """An fd appending to ``path``, 0600, never through a link (InvalidConfig naming it)."""
    return open_private_file(path, os.O_WRONLY | os.O_APPEND)


def rotated(path: Path, index: int) -> Path:
    """``name.<index>``: 1 is the newest rotated file."""
    return path.with_name(f"{path.name}.{index}")


def rotate(path: Path, keep: int) -> None:
    """Shift ``name`` to ``name.1`` and each ``name.N`` one up; drop what passes ``keep``."""
    for stale in path.parent.glob(f"{path.name}.*"):
        suffix = stale.name[len(path.name) + 1 :]
        if suffix.isdigit() and int(suffix) >= keep:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
    for index in range(keep - 1, 0, -1):
        with contextlib.suppress(FileNotFoundError):
            os.replace(rotated(path, index), rotated(path, index + 1))
    with contextlib.suppress(FileNotFoundError):
        os.replace(path, rotated(path, 1))


def rotate_stale(path: Path, limits: LogsConfig) -> None:
    """Before a start: keep a previous run's file that the child would truncate."""
    try:
        if path.stat().st_size > 0:
            rotate(path, limits.keep)
    except OSError:
        pass


def prune(directory: Path, pattern: str, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` files matching ``pattern``; return those removed."""
    found = []
    for path in directory.glob(pattern):
        with contextlib.suppress(OSError):
            found.append((path.stat().st_mtime, path.name, path))
    found.sort(reverse=True)
    removed = []
    for _, _, path in found[keep:]:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


class Relay:
    """A pipe for a child's stderr and the thread that appends it to ``path``, rotating.

    The child gets :attr:`write_fd`; call :meth:`start` once it has its copy.
    The thread ends when every holder of the write end has closed it.
    """

    def __init__(self, path: Path, limits: LogsConfig) -> None:
        self.path = path
        self._limits = limits
        self._read, self.write_fd = os.pipe()
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def start(self) -> None:
        """The child has its copy of the write end: close ours and begin relaying."""
        os.close(self.write_fd)
        loop = asyncio.get_running_loop()
        thread = threading.Thread(
            target=self._run, args=(loop,), name=f"relay {self.path.name}", daemon=True
        )
        thread.start()

    def abandon(self) -> None:
        """The child never started: close both ends."""
        os.close(self.write_fd)
        os.close(self._read)

    async def drained(self, timeout: float) -> None:
        """Return once all the child wrote is in the file, or after ``timeout``.

        A process that left the child's group may hold the pipe for longer;
        the thread goes on relaying it.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._done)

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            _Appender(self.path, self._limits).drain(self._read)
        finally:
            os.close(self._read)
            with contextlib.suppress(RuntimeError):  # the loop is closed: cxrd is exiting
                loop.call_soon_threadsafe(_settle, self._done)


def _settle(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


class _Appender:
    """Appends to ``path``, rotating at a line end before it would pass ``max_bytes``.

    A write that finds no open file opens it first: after a failed open or
    rotation, the next write tries again.
    """

    def __init__(self, path: Path, limits: LogsConfig) -> None:
        self._path = path
        self._limits = limits
        self._fd = -1
        self._size = 0
        self._failed = False

    def drain(self, read_fd: int) -> None:
        try:
            self._open()  # the file is there from the child's start, as `tail -F` expects
            while data := os.read(read_fd, _CHUNK):
                self._write(data)
        finally:
            self._close()

    def _open(self) -> bool:
        """Whether the file is open, opening it if not."""
        if self._fd >= 0:
            return True
        try:
            fd = open_log(self._path)
        except (OSError, CxrdError) as exc:
            self._fail(exc)
            return False
        self._fd = fd
        try:
            self._size = os.fstat(fd).st_size
        except OSError as exc:
            self._fail(exc)
            self._close()
            return False
        return True

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _rotate(self) -> None:
        self._close()
        try:
            rotate(self._path, self._limits.keep)
        except OSError as exc:
            self._fail(exc)
        self._open()

    def _write(self, data: bytes) -> None:
        if not self._open():
            return  # dropped; the next write tries again
        room = max(0, self._limits.max_bytes - self._size)
        if len(data) > room and self._size > 0:
            cut = data.rfind(b"\n", 0, room) + 1  # 0: no line end fits, all goes to the next
            self._append(data[:cut])
            self._rotate()
            data = data[cut:]
        self._append(data)

    def _append(self, data: bytes) -> None:
        view = memoryview(data)
        while view and self._fd >= 0:
            try:
                written = os.write(self._fd, view)
            except OSError as exc:  # a full disk: the child's lines are dropped, never blocked
                self._fail(exc)
                return
            self._size += written
            view = view[written:]
        if self._failed and not view:
            self._failed = False
            log.info("writing %s again", self._path)

    def _fail(self, exc: OSError | CxrdError) -> None:
        if not self._failed:
            self._failed = True
            log.warning(
                "cannot write %s: %s; dropping what is written there until it can be",
                self._path,
                exc,
            )


class _RotatingHandler(logging.handlers.RotatingFileHandler):
    def _open(self) -> io.TextIOWrapper:
        fd = open_log(Path(self.baseFilename))
        return open(fd, "a", encoding=self.encoding, errors=self.errors)

    def doRollover(self) -> None:
        if self.stream:
            self.stream.close()
        rotate(Path(self.baseFilename), self.backupCount)
        self.stream = self._open()


def rotating_handler(path: Path, limits: LogsConfig) -> logging.Handler:
    """A handler for a log we write ourselves: rotates before a record passes the size.

    InvalidConfig when ``path`` is a link or another user's file (:func:`open_log`).
    """
    return _RotatingHandler(
        path, maxBytes=limits.max_bytes, backupCount=limits.keep, encoding="utf-8"
    )
