"""Wait for a file to appear: inotify where the kernel has it, polling only as a fallback."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import os
import struct
from pathlib import Path

log = logging.getLogger(__name__)

_IN_CREATE = 0x00000100
_IN_MOVED_TO = 0x00000080
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len
FALLBACK_POLL_INTERVAL = 0.05


class _Inotify:
    """One inotify watch on a directory, readable from the event loop."""

    _libc: ctypes.CDLL | None = None

    def __init__(self, directory: Path) -> None:
        libc = self._load()
        self.fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        wd = libc.inotify_add_watch(self.fd, os.fsencode(directory), _IN_CREATE | _IN_MOVED_TO)
        if wd < 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, f"inotify_add_watch({directory}) failed")

    @classmethod
    def _load(cls) -> ctypes.CDLL:
        if cls._libc is None:
            cls._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return cls._libc

    def names(self) -> list[str]:
        """The names created since the last call; [] when there are none."""
        try:
            data = os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return []
        names = []
        offset = 0
        while offset < len(data):
            _wd, _mask, _cookie, length = _EVENT_HEADER.unpack_from(data, offset)
            offset += _EVENT_HEADER.size
            names.append(os.fsdecode(data[offset : offset + length].rstrip(b"\0")))
            offset += length
        return names

    def close(self) -> None:
        os.close(self.fd)


async def wait_for_file(path: Path) -> None:
    """Return once ``path`` exists. The caller bounds the wait (``asyncio.timeout``)."""
    try:
        watch = _Inotify(path.parent)
    except (OSError, AttributeError) as exc:
        if isinstance(exc, OSError) and exc.errno == errno.ENOENT:
            raise
        log.warning("inotify unavailable (%s); polling for %s", exc, path)
        while not path.exists():
            await asyncio.sleep(FALLBACK_POLL_INTERVAL)
        return
    loop = asyncio.get_running_loop()
    appeared: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if path.name in watch.names() and not appeared.done():
            appeared.set_result(None)

    loop.add_reader(watch.fd, on_readable)
    try:
        # The watch is in place: a file created from now on is seen; one that
        # already exists is caught here.
        if path.exists():
            return
        await appeared
    finally:
        loop.remove_reader(watch.fd)
        watch.close()
