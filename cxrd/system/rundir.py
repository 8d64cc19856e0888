"""The run dir: the daemon's lock, stale files, liveness of a runtime, the last error.

One home for the files under ``<install>/run`` that cxrd itself owns.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import struct
import time
from pathlib import Path

from cxrd import constants as C
from cxrd.errors import AlreadyServing, InvalidConfig, StartFailed
from cxrd.system.private import ELSEWHERE, ensure_private_dir

log = logging.getLogger(__name__)


def ensure_run_dir(run_dir: Path) -> None:
    """Make ``run_dir`` (and the install dir above it), or check it: a real directory, ours, 0700.

    The lock, the runtime's socket and the environment file live here: a
    symlink or another user's directory would hand them to whoever controls
    it, so either is refused (:func:`cxrd.system.private.ensure_private_dir`).
    """
    ensure_private_dir(run_dir, "the run directory", "its lock and the runtime's socket")


class InstallLock:
    """An flock on ``run/cxrd.lock`` held for the daemon's life: one cxrd per install dir.

    The file holds the holder's pid until it releases the lock. A pid found
    there when the lock is taken is a cxrd that died (SIGKILL): the runtime
    files it left go now, unless a runtime answers (then they are its).
    """

    def __init__(self, run_dir: Path) -> None:
        ensure_run_dir(run_dir)
        self.path = run_dir / C.LOCK_FILE
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self._fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise _cannot_write(self.path, exc) from None
            raise InvalidConfig(
                f"{self.path}: cannot open the install lock: {exc.strerror}; make {run_dir} "
                f"writable, {ELSEWHERE}"
            ) from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
            os.close(self._fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise AlreadyServing(f"another cxrd{who} already serves {run_dir.parent}") from None
        try:
            previous = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(self._fd)
            raise _cannot_write(self.path, exc) from None
        if previous and live_runtime_pid(run_dir) is None:
            removed = remove_stale(run_dir)
            with contextlib.suppress(FileNotFoundError):
                (run_dir / C.ENV_FILE).unlink()
                removed.append(C.ENV_FILE)
            if removed:
                log.warning(
                    "the previous cxrd (pid %s) ended without cleaning up: removed %s from %s",
                    previous,
                    ", ".join(removed),
                    run_dir,
                )

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _cannot_write(path: Path, exc: OSError) -> StartFailed:
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return StartFailed(f"cannot write {path}: {exc.strerror or exc} ({code})")


def lock_holder(run_dir: Path) -> int | None:
    """The pid of the cxrd holding the install lock now (from /proc/locks); None if none.

    Read without taking the lock, which would fail a cxrd starting meanwhile.
    """
    try:
        info = os.stat(run_dir / C.LOCK_FILE)
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            table = f.read()
    except OSError:
        return None
    inode = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    for line in table.splitlines():
        # 1: FLOCK  ADVISORY  WRITE 4242 00:2f:1234 0 EOF
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == inode:
            return int(fields[4])
    return None


def leftovers(run_dir: Path) -> tuple[list[Path], Path]:
    """The files a runtime's run leaves in ``run_dir``, and the socket that says it still runs."""
    names = (C.ENV_FILE, *C.STALE_RUN_FILES)
    return [run_dir / name for name in names], run_dir / C.IPC_SOCKET


def live_runtime_pid(run_dir: Path) -> int | None:
    """The pid of a runtime answering on ``ipc_cloudxr``; 0 if live but unknown; None if none.

    A socket file alone proves nothing: only a successful connect() does. Like
    isaacteleop, an error that is not a plain "nobody listens" counts as live.
    A path too long for a Unix socket is an error of its own: no runtime can
    serve there, and "live" would send the user looking for one.
    """
    path = run_dir / C.IPC_SOCKET
    size = len(os.fsencode(path))
    if size > C.MAX_SOCKET_PATH:
        install = run_dir.parent
        limit = C.MAX_SOCKET_PATH - size + len(os.fsencode(install))
        raise InvalidConfig(
            f"{path}: {size} bytes, too long for the runtime's Unix socket (at most "
            f"{C.MAX_SOCKET_PATH}): set install_dir (--install-dir) to a path of at most "
            f"{limit} bytes instead of {install}"
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK):
                return None
            return 0
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid: int = struct.unpack("3i", creds)[0]
        return pid


def remove_stale(run_dir: Path) -> list[str]:
    """Remove what a dead runtime left behind; return the names removed."""
    removed = []
    for name in C.STALE_RUN_FILES:
        with contextlib.suppress(FileNotFoundError):
            (run_dir / name).unlink()
            removed.append(name)
    return removed


def write_last_error(run_dir: Path, what: str, error: str, stderr_tail: str) -> None:
    """Record why the daemon ended, for ``cxrctl status`` after it is gone.

    Raises OSError, or InvalidConfig for a run dir :func:`ensure_run_dir` refuses.
    """
    ensure_run_dir(run_dir)
    record = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "what": what,
        "error": error,
        "stderr_tail": stderr_tail,
        "pid": os.getpid(),
    }
    tmp = run_dir / f".{C.LAST_ERROR_FILE}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    os.replace(tmp, run_dir / C.LAST_ERROR_FILE)


def clear_last_error(run_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (run_dir / C.LAST_ERROR_FILE).unlink()


def read_last_error(run_dir: Path) -> dict[str, object] | None:
    try:
        data = json.loads((run_dir / C.LAST_ERROR_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
