"""Shared helpers for tests: timeouts scaled from one constant, free ports."""

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TypeVar, cast

import pytest

_T = TypeVar("_T")

# Every wait in the tests is a multiple of this; slow CI sets CXRD_TEST_TIMEOUT_SCALE.
TIMEOUT = 10.0 * float(os.environ.get("CXRD_TEST_TIMEOUT_SCALE", "1"))


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mode(path: Path) -> int:
    """The permission bits of ``path`` itself (a link is not followed)."""
    return stat.S_IMODE(os.lstat(path).st_mode)


def wait_until(
    predicate: Callable[[], _T], what: str, *, timeout: float = TIMEOUT, interval: float = 0.02
) -> _T:
    """Poll a condition that only another process can change (no event to await)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def exported_env_reader() -> Callable[[Path], dict[str, str]]:
    """isaacteleop's ``read_exported_env`` (1.5 on; skips the test on 1.4, which has none).

    1.4 writes the same file but never reads it back (its launcher runs the
    runtime in-process); there, the byte-for-byte and shell tests cover it.
    """
    module = pytest.importorskip("isaacteleop.cloudxr.env_config")
    reader = getattr(module, "read_exported_env", None)
    if reader is None:
        pytest.skip(f"isaacteleop {metadata.version('isaacteleop')} has no read_exported_env")
    return cast(Callable[[Path], dict[str, str]], reader)
