"""Why a child failed, in words: log tails and the one line that says it. Reads files only."""

from __future__ import annotations

import os
from pathlib import Path


def tail_text(path: Path, *, start: int = 0, max_bytes: int = 4096, max_lines: int = 20) -> str:
    """The last lines of ``path`` written after byte ``start``; '' when none."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if start > size:
                start = 0  # truncated since (isaacteleop's run() reopens it with "w")
            f.seek(max(start, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    lines = data.decode("utf-8", errors="replace").splitlines()
    return "\n".join(lines[-max_lines:]).strip()


def log_section(path: Path, *, start: int = 0, max_lines: int = 20) -> str:
    """``--- path ---`` and the file's tail, or '' when it has nothing to say."""
    tail = tail_text(path, start=start, max_lines=max_lines)
    return f"--- {path} ---\n{tail}" if tail else ""


def newest_log(directory: Path, pattern: str, *, since: float) -> Path | None:
    """The newest file matching ``pattern`` written since ``since`` (Unix time)."""
    try:
        found = [(p.stat().st_mtime, p) for p in directory.glob(pattern)]
    except OSError:
        return None
    recent = [(mtime, p) for mtime, p in found if mtime >= since - 1]
    return max(recent)[1] if recent else None
