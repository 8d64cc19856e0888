"""Directories and files only this user can touch: ``run/``, ``certs/`` and ``logs/``.

An install dir may sit in a shared lab path, where another user can create
entries before cxrd does. A directory planted there (or a symlink to one)
would hand them cxrd's lock, its private key or its logs, and a symlink
planted at a log file would make cxrd append to whatever file it points to.
So each directory cxrd writes into is a real directory of its own, mode 0700
(put right when it is ours and looser), and each file it writes there is
opened without following a link, refused when another user owns it, and made
0600. Modes never depend on the umask: what is made is ``fchmod``-ed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import stat
from pathlib import Path
from typing import NoReturn

from cxrd.errors import InvalidConfig

ELSEWHERE = "or set install_dir (--install-dir) to a directory of your own"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted at a log file's name would block an O_WRONLY open
# for ever; on a regular file the flag does nothing.
_FILE_FLAGS = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def ensure_private_dir(path: Path, what: str, holds: str) -> None:
    """Make ``path`` or check it: a real directory, ours, 0700; InvalidConfig if not.

    ``what`` names it ("the log directory"), ``holds`` says what a link or
    another user's directory would give away ("its logs"). The install dir
    above it is made too, 0700 when it is made here. Only the mode of our
    own directory is put right; nothing of another user's is touched.
    """
    try:
        _make_install_dir(path.parent)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    except OSError as exc:
        raise InvalidConfig(
            f"{exc.filename or path}: cannot make {what} {path}: {exc.strerror}; "
            f"make {path.parent} a directory you can write, {ELSEWHERE}"
        ) from None
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError as exc:
        _refuse_unusable(path, what, holds, exc)
    try:
        info = os.fstat(fd)
        _check_owner(path, info.st_uid, "cxrd makes it again, mode 0700")
        if stat.S_IMODE(info.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def open_private_file(path: Path, flags: int) -> int:
    """An fd on ``path`` in a private directory, made 0600: no link followed, another's refused.

    ``flags`` says the access (``os.O_WRONLY | os.O_APPEND``); the file is
    created when missing. InvalidConfig for a link, a file that is not a
    regular one, or one that another user owns; OSError for the rest.
    """
    try:
        fd = os.open(path, flags | _FILE_FLAGS, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidConfig(
                f"{path} is a symbolic link; cxrd writes only to a file of its own and does "
                f"not follow it: remove the link (cxrd makes the file)"
            ) from None
        if exc.errno == errno.ENXIO:  # a FIFO with no reader
            raise InvalidConfig(
                f"{path} is not a regular file: remove it (cxrd makes it)"
            ) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidConfig(f"{path} is not a regular file: remove it (cxrd makes it)")
        _check_owner(path, info.st_uid, "cxrd makes it again, mode 0600")
        if stat.S_IMODE(info.st_mode) != 0o600:
            os.fchmod(fd, 0o600)
        os.set_blocking(fd, True)  # O_NONBLOCK was for the open only (a child may get this fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_owner(path: Path, uid: int, again: str) -> None:
    """InvalidConfig naming both users unless ``uid`` is ours; ``again``: what removing it does."""
    if uid != os.getuid():
        raise InvalidConfig(
            f"{path} belongs to {describe_user(uid)}, not to {describe_user(os.getuid())}: "
            f"remove it ({again}), {ELSEWHERE}"
        )


def describe_user(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _make_install_dir(install: Path) -> None:
    """The install dir and its parents; the install dir itself 0700 when it is made here."""
    try:
        try:
            os.mkdir(install, 0o700)
        except FileNotFoundError:
            install.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(install, 0o700)
    except FileExistsError:
        return
    fd = os.open(install, _DIR_FLAGS)
    try:
        os.fchmod(fd, 0o700)  # whatever the umask took away
    finally:
        os.close(fd)


def _refuse_unusable(path: Path, what: str, holds: str, exc: OSError) -> NoReturn:
    """Why ``path`` cannot be opened as a directory: a link, another user's, or ``exc``."""
    try:
        info = os.lstat(path)
    except OSError:
        pass
    else:
        if stat.S_ISLNK(info.st_mode):
            raise InvalidConfig(
                f"{path} is a symbolic link; cxrd keeps {holds} only in a real directory of "
                f"its own: remove the link (cxrd makes the directory), {ELSEWHERE}"
            ) from None
        _check_owner(path, info.st_uid, "cxrd makes it again, mode 0700")
    raise InvalidConfig(
        f"{path}: cannot use it as {what}: {exc.strerror}; remove it (cxrd makes it again), "
        f"{ELSEWHERE}"
    ) from None
