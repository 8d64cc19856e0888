"""The run dir: the daemon's lock, stale files, liveness of a runtime, the last error.

One home for the files under ``<install>/run`` that cxrd itself owns.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pwd
import socket
import stat
import struct
import time
from pathlib import Path
from typing import NoReturn

from cxrd import constants as C
from cxrd.errors import AlreadyServing, InvalidConfig

# sun_path holds 108 bytes with its terminating NUL, which C runtimes write.
MAX_SOCKET_PATH = 107

_ELSEWHERE = "or set install_dir (--install-dir) to a directory of your own"


def ensure_run_dir(run_dir: Path) -> None:
    """Make ``run_dir`` (and the install dir above it), or check it: a real directory, ours, 0700.

    The lock, the runtime's socket and the environment file live here: a
    symlink or another user's directory would hand them to whoever controls
    it, so either is refused. Only the mode of our own directory is put right.
    """
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(run_dir, 0o700)
    except OSError as exc:
        raise InvalidConfig(
            f"{exc.filename or run_dir}: cannot make the run directory {run_dir}: "
            f"{exc.strerror}; make {run_dir.parent} a directory you can write, {_ELSEWHERE}"
        ) from None
    try:
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        _refuse_unusable(run_dir, exc)
    try:
        info = os.fstat(fd)
        _check_owner(run_dir, info.st_uid)
        if stat.S_IMODE(info.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def _refuse_unusable(run_dir: Path, exc: OSError) -> NoReturn:
    """Why ``run_dir`` cannot be opened as a directory: a link, another user's, or ``exc``."""
    try:
        info = os.lstat(run_dir)
    except OSError:
        pass
    else:
        if stat.S_ISLNK(info.st_mode):
            raise InvalidConfig(
                f"{run_dir} is a symbolic link; cxrd keeps its lock and the runtime's socket "
                f"only in a real directory: remove the link (cxrd makes the directory), "
                f"{_ELSEWHERE}"
            ) from None
        _check_owner(run_dir, info.st_uid)
    raise InvalidConfig(
        f"{run_dir}: cannot use it as the run directory: {exc.strerror}; remove it "
        f"(cxrd makes it again), {_ELSEWHERE}"
    ) from None


def _check_owner(run_dir: Path, uid: int) -> None:
    if uid != os.getuid():
        raise InvalidConfig(
            f"{run_dir} belongs to {_user(uid)}, not to {_user(os.getuid())}: remove it "
            f"(cxrd makes it again, mode 0700), {_ELSEWHERE}"
        )


def _user(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


class InstallLock:
    """An flock on ``run/cxrd.lock`` held for the daemon's life: one cxrd per install dir."""

    def __init__(self, run_dir: Path) -> None:
        ensure_run_dir(run_dir)
        self.path = run_dir / C.LOCK_FILE
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self._fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            raise InvalidConfig(
                f"{self.path}: cannot open the install lock: {exc.strerror}; make {run_dir} "
                f"writable, {_ELSEWHERE}"
            ) from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
            os.close(self._fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise AlreadyServing(f"another cxrd{who} already serves {run_dir.parent}") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)


def live_runtime_pid(run_dir: Path) -> int | None:
    """The pid of a runtime answering on ``ipc_cloudxr``; 0 if live but unknown; None if none.

    A socket file alone proves nothing: only a successful connect() does. Like
    isaacteleop, an error that is not a plain "nobody listens" counts as live.
    A path too long for a Unix socket is an error of its own: no runtime can
    serve there, and "live" would send the user looking for one.
    """
    path = run_dir / C.IPC_SOCKET
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        install = run_dir.parent
        limit = MAX_SOCKET_PATH - size + len(os.fsencode(install))
        raise InvalidConfig(
            f"{path}: {size} bytes, too long for the runtime's Unix socket (at most "
            f"{MAX_SOCKET_PATH}): set install_dir (--install-dir) to a path of at most "
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
