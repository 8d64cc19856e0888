"""The EULA marker is isaacteleop's: accepting in one tool counts in the other."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from support import TIMEOUT

from cxrd.system import eula

pytest.importorskip("isaacteleop.cloudxr.runtime")


def isaacteleop_check(run_dir: Path, *, accept: bool = False) -> subprocess.CompletedProcess[str]:
    """isaacteleop's own check_eula, with no terminal to prompt on (it exits 1 if not accepted).

    The install dir comes from ``CXR_INSTALL_DIR``, as in the runtime's own
    process: 1.4's check_eula takes no ``run_dir``.
    """
    code = (
        "from isaacteleop.cloudxr.runtime import check_eula\n"
        f"check_eula(accept_eula={True if accept else None})\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "CXR_INSTALL_DIR": str(run_dir.parent)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 3,
    )


def test_not_accepted_until_accept_and_isaacteleop_agrees(tmp_path: Path) -> None:
    install = tmp_path / "cloudxr"
    assert not eula.is_accepted(install)
    refused = isaacteleop_check(install / "run")
    assert refused.returncode == 1
    assert "EULA not accepted" in refused.stderr

    marker = eula.accept(install)

    assert marker == install / "run" / "eula_accepted"
    assert eula.is_accepted(install)
    assert isaacteleop_check(install / "run").returncode == 0


def test_marker_matches_the_one_isaacteleop_writes(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    old = os.umask(0o022)
    try:
        eula.accept(ours)
        assert isaacteleop_check(theirs / "run", accept=True).returncode == 0
    finally:
        os.umask(old)
    our_marker = ours / "run" / "eula_accepted"
    their_marker = theirs / "run" / "eula_accepted"
    assert our_marker.read_bytes() == their_marker.read_bytes() == b"accepted\n"
    assert stat.S_IMODE(our_marker.stat().st_mode) == stat.S_IMODE(their_marker.stat().st_mode)
    assert stat.S_IMODE((ours / "run").stat().st_mode) == 0o700
    assert stat.S_IMODE((theirs / "run").stat().st_mode) == 0o700
    assert eula.is_accepted(theirs), "a marker isaacteleop wrote counts for cxrd"


def test_accept_is_idempotent_and_leaves_no_temp_file(tmp_path: Path) -> None:
    install = tmp_path / "cloudxr"
    eula.accept(install)
    eula.accept(install)
    assert sorted(p.name for p in (install / "run").iterdir()) == ["eula_accepted"]
