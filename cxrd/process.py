"""Child process groups: spawn, stop, reap. The one home of fork/exec and kill.

Each child runs in a new session, so its pid is its process group id and one
``killpg`` reaches every grandchild that did not leave the group.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ChildSpec:
    """How to start one child: what runs, with which environment, logging where."""

    name: str  # "runtime" or "proxy"; used in logs and errors
    argv: tuple[str, ...]
    env: Mapping[str, str]  # the child's whole environment
    stderr: Path  # appended to; never a pipe
    stdout: Path | None = None  # None: /dev/null
    cwd: Path | None = None
    pass_fds: tuple[int, ...] = field(default=())
