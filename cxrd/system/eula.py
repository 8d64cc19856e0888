"""The NVIDIA CloudXR EULA marker, shared with isaacteleop.

isaacteleop records acceptance as ``<install>/run/eula_accepted`` holding
``accepted`` (a newline after it), creating the run dir 0700 and the file with
the default mode (0644 under the usual umask), and treats any regular file
there as acceptance. cxrd writes and tests the same file the same way, so
accepting in either tool counts for both.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Final

from cxrd import constants as C
from cxrd.system.rundir import ensure_run_dir

EULA_URL: Final = "https://github.com/NVIDIA/IsaacTeleop/blob/main/deps/cloudxr/CLOUDXR_LICENSE"

NOTICE: Final = f"""\
The CloudXR runtime (isaacteleop backend) is NVIDIA software under the NVIDIA
CloudXR license (EULA). Read it before accepting:

  {EULA_URL}

Accepting writes the same marker isaacteleop uses, so it counts for both."""

PROMPT: Final = "Accept the NVIDIA CloudXR EULA? [y/N]: "


def marker_path(install_path: Path) -> Path:
    return install_path / C.RUN_DIR / C.EULA_MARKER


def is_accepted(install_path: Path) -> bool:
    """True when the marker exists; isaacteleop applies the same test (a regular file)."""
    return marker_path(install_path).is_file()


def accept(install_path: Path) -> Path:
    """Record acceptance and return the marker's path. Idempotent.

    The marker appears whole or not at all (written aside, then renamed).
    """
    marker = marker_path(install_path)
    ensure_run_dir(marker.parent)  # ours, 0700, as the daemon checks it
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # left by a killed earlier run with our pid
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(C.EULA_MARKER_TEXT + "\n")
        os.replace(tmp, marker)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return marker
