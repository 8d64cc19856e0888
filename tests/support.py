"""Shared helpers for tests: timeouts scaled from one constant, free ports."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")

# Every wait in the tests is a multiple of this; slow CI sets CXRD_TEST_TIMEOUT_SCALE.
TIMEOUT = 10.0 * float(os.environ.get("CXRD_TEST_TIMEOUT_SCALE", "1"))


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
