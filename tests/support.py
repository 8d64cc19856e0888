"""Shared helpers for tests: timeouts scaled from one constant, free ports."""

from __future__ import annotations

import os
import socket

# Every wait in the tests is a multiple of this; slow CI sets CXRD_TEST_TIMEOUT_SCALE.
TIMEOUT = 10.0 * float(os.environ.get("CXRD_TEST_TIMEOUT_SCALE", "1"))


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
