"""Wait for a file to appear: inotify where the kernel has it, polling only as a fallback.

:class:`Inotify` and :class:`Watch` are shared with ``envguard`` (which watches
``run/cloudxr.env`` for other programs' writes, with a mask of its own).

The watch is on the file's directory. When the kernel drops events (queue
overflow) or the watch itself (the directory was removed or moved away), the
file is looked for again and the watch re-established: on the directory if it
is back, else on its deepest existing ancestor until the directory returns.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import struct
from pathlib import Path

log = logging.getLogger(__name__)

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
_IN_DELETE_SELF = 0x00000400
_IN_MOVE_SELF = 0x00000800
_IN_Q_OVERFLOW = 0x00004000  # events were lost; wd is -1
_IN_IGNORED = 0x00008000  # the watch is gone (its directory removed, or inotify_rm_watch)
_IN_ONLYDIR = 0x01000000
# What every directory watch needs: to see its directory go, and a child appear (an
# ancestor watched while the directory is missing sees it come back).
BASE_MASK = IN_CREATE | IN_MOVED_TO | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR
LOST = _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_IGNORED
_EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len
FALLBACK_POLL_INTERVAL = 0.05


class Inotify:
    """An inotify instance, readable from the event loop."""

    _libc: ctypes.CDLL | None = None

    def __init__(self) -> None:
        self._c = self._load()
        self.fd = self._c.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")

    @classmethod
    def _load(cls) -> ctypes.CDLL:
        if cls._libc is None:
            cls._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return cls._libc

    def watch(self, directory: Path, mask: int = BASE_MASK) -> int:
        wd: int = self._c.inotify_add_watch(self.fd, os.fsencode(directory), mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(directory))
        return wd

    def unwatch(self, wd: int) -> None:
        self._c.inotify_rm_watch(self.fd, wd)  # EINVAL if the kernel already dropped it

    def events(self) -> list[tuple[int, int, str]]:
        """The (wd, mask, name) events since the last call; [] when there are none."""
        try:
            data = os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return []
        events = []
        offset = 0
        while offset < len(data):
            wd, mask, _cookie, length = _EVENT_HEADER.unpack_from(data, offset)
            offset += _EVENT_HEADER.size
            events.append((wd, mask, os.fsdecode(data[offset : offset + length].rstrip(b"\0"))))
            offset += length
        return events

    def close(self) -> None:
        os.close(self.fd)


class Watch:
    """The watch that can see ``path`` appear: on its directory, or on the nearest ancestor.

    ``mask`` adds events to :data:`BASE_MASK` (envguard adds writes and removals).
    """

    def __init__(self, inotify: Inotify, path: Path, mask: int = 0) -> None:
        self._inotify = inotify
        self._path = path
        self._mask = BASE_MASK | mask
        self.directory = path.parent
        self.wd = inotify.watch(self.directory, self._mask)  # a missing one: the caller's error

    @property
    def on_directory(self) -> bool:
        """Whether the watch is on the file's own directory (not on an ancestor)."""
        return self.directory == self._path.parent

    def relevant(self, wd: int, mask: int, name: str) -> bool:
        """Whether this event may mean that ``path`` exists now or the watch must move."""
        if mask & _IN_Q_OVERFLOW:
            return True
        if wd != self.wd:
            return False  # a watch given up (its IN_IGNORED included)
        return bool(mask & LOST) or name == self._path.relative_to(self.directory).parts[0]

    def renew(self) -> None:
        """Watch the file's directory again if it is back, else its deepest existing ancestor."""
        for directory in (self._path.parent, *self._path.parent.parents):
            try:
                wd = self._inotify.watch(directory, self._mask)
            except (FileNotFoundError, NotADirectoryError):
                continue
            break
        else:  # a relative path whose working directory was removed
            raise FileNotFoundError(f"no directory left on the way to {self._path}")
        if wd != self.wd:
            self._inotify.unwatch(self.wd)
            if directory != self.directory:
                log.debug("watching %s for %s", directory, self._path)
        self.wd, self.directory = wd, directory


async def wait_for_file(path: Path) -> None:
    """Return once ``path`` exists. The caller bounds the wait (``asyncio.timeout``).

    A directory missing at the start is an error (FileNotFoundError), not a hang.
    """
    try:
        inotify = Inotify()
    except (OSError, AttributeError) as exc:  # AttributeError: a libc without inotify
        log.warning("inotify unavailable (%s); polling for %s", exc, path)
        await _poll(path)
        return
    try:
        try:
            watch = Watch(inotify, path)
        except (FileNotFoundError, NotADirectoryError):
            raise
        except OSError as exc:  # out of watches, say
            log.warning("cannot watch %s (%s); polling for %s", path.parent, exc, path)
            await _poll(path)
            return
        await _wait(inotify, watch, path)
    finally:
        inotify.close()


async def _wait(inotify: Inotify, watch: Watch, path: Path) -> None:
    loop = asyncio.get_running_loop()
    woken = asyncio.Event()

    def on_readable() -> None:
        if any(watch.relevant(*event) for event in inotify.events()):
            woken.set()

    loop.add_reader(inotify.fd, on_readable)
    try:
        # The watch is in place before each look: a file created after the look
        # is an event; one created before it is seen by the look.
        while not path.exists():
            await woken.wait()
            woken.clear()
            watch.renew()
    finally:
        loop.remove_reader(inotify.fd)


async def _poll(path: Path) -> None:
    while not path.exists():
        await asyncio.sleep(FALLBACK_POLL_INTERVAL)
