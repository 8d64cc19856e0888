"""The core's own vocabulary: what it spawns, what it hears, how it words an exit. Pure.

The adapters produce these (``runtimes/`` a :class:`RuntimeLaunch`,
``proxy/`` the proxy's :class:`ChildSpec` and its :data:`SessionEvent`
lines, the host ports the rest) and import them from here; the core imports
none of its adapters.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cxrd.core.snapshot import Headset

if TYPE_CHECKING:
    from cxrd.config import LogsConfig

# ---- a child to spawn ------------------------------------------------------------


@dataclass(frozen=True)
class ChildSpec:
    """How to start one child: what runs, with which environment, logging where."""

    name: str  # "runtime" or "proxy"; used in logs and errors
    argv: tuple[str, ...]
    env: Mapping[str, str]  # the child's whole environment
    stderr: Path  # appended to (stdout goes to /dev/null)
    pass_fds: tuple[int, ...] = field(default=())
    # Given: the child writes to a pipe that cxrd relays into ``stderr``, rotating
    # it past these limits (cxrd.system.logfiles). None: the child gets the file.
    stderr_limits: LogsConfig | None = None


@dataclass(frozen=True)
class RuntimeLaunch:
    """How to start the runtime, and what the daemon publishes about it."""

    backend: str  # "isaacteleop" | "sim" | "command"
    spec: ChildSpec
    # What run/cloudxr.env holds and D-Bus ``Environment`` shows.
    environment: Mapping[str, str]
    stderr_log: Path
    logs_dir: Path  # NV_CXR_OUTPUT_DIR: where cxr_server.*.log appear


# ---- what the proxy reports: headset sessions ---------------------------------------


@dataclass(frozen=True)
class Opened:
    headset: Headset


@dataclass(frozen=True)
class Closed:
    id: str
    seconds: float
    code: int  # the WebSocket close code (1006: no close frame)


SessionEvent = Opened | Closed

# The WebSocket close code of a session that ended without a close frame
# (RFC 6455 7.4.1); the core reports it for the sessions of a proxy that died.
CLOSE_ABNORMAL = 1006

# ---- environment names: what a runtime's env file can hold --------------------------

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_env_value(key: str, value: str) -> None:
    """Raise :class:`ValueError` when ``key=value`` cannot be written to an env file."""
    if not ENV_NAME.match(key):
        raise ValueError(f"{key!r}: not a valid environment variable name")
    if "\0" in value:
        raise ValueError(f"{key}: value contains a NUL byte")
    # str.splitlines() is what isaacteleop's reader splits on: \n, \r and more.
    if len(f"x{value}x".splitlines()) != 1:
        raise ValueError(f"{key}: value contains a line break, which env-file readers cannot keep")


# ---- words -------------------------------------------------------------------------


def describe_exit(code: int | None) -> str:
    """Words for a return code: 'exited with code 1', 'killed by SIGSEGV'."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def as_verb(exit_words: str) -> str:
    """'killed by SIGSEGV' -> 'was killed by SIGSEGV', for "the runtime ..." sentences."""
    return f"was {exit_words}" if exit_words.startswith("killed") else exit_words


def headline(diagnosis: str) -> str:
    """The line that says what went wrong: the last line of the first section."""
    first = diagnosis.split("\n--- ")[0]
    lines = [ln.strip() for ln in first.splitlines() if ln.strip() and not ln.startswith("--- ")]
    return lines[-1][:300] if lines else ""
