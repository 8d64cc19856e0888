"""Faults of the machine under a real cxrd: a full run dir, a read-only, removed or
replaced install dir, while ready and during the restart that follows a crash.

The daemon names each failure (the path and the errno), counts it like a
crash, recovers once the fault is gone or exits with a named code, and always
honours SIGTERM. Needs root (a tmpfs, a bind mount); every mount is undone in
a finally.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_daemon import DaemonEnv, NotifySocket
from support import TIMEOUT

from cxrd import constants as C
from cxrd import errors

STOP_TIMEOUT = 2.0  # fixtures_daemon's runtime.stop_timeout


def ready(m: dict[str, str]) -> bool:
    return m.get("READY") == "1"


def runtime_pid(env: DaemonEnv) -> int:
    return int(re.findall(r"started runtime: pid (\d+)", env.daemon_log())[-1])


@contextlib.contextmanager
def tmpfs(where: Path, size: str = "1m") -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a tmpfs")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def fill(directory: Path, name: str = "filler") -> Path:
    """Take every free byte of ``directory``'s file system."""
    path = directory / name
    with open(path, "ab", buffering=0) as out:
        for _ in range(100_000):
            try:
                out.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                return path
    raise AssertionError(f"{directory} never filled up")


def crash_and_wait(env: DaemonEnv, notify: NotifySocket, words: str) -> str:
    os.kill(runtime_pid(env), signal.SIGKILL)
    return notify.wait_for(lambda m: words in m.get("STATUS", ""))["STATUS"]


def test_a_full_run_dir_fails_the_restart_by_name_and_it_succeeds_once_space_is_back(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    daemon_env.write_config(restart="max_restarts = 50")
    with tmpfs(daemon_env.run_dir, "256k") as run:
        proc = daemon_env.start()
        notify.wait_for(ready)
        filler = fill(run)
        # What the restart removes first (the dead runtime's files) would make room again.
        for name in C.STALE_RUN_FILES:
            with contextlib.suppress(FileNotFoundError):
                (run / name).unlink()
        fill(run, "filler2")
        status = crash_and_wait(daemon_env, notify, "no space left on device")
        assert f"cannot write {run / C.ENV_FILE}: no space left on device" in status
        assert proc.poll() is None, "a full disk is a crash to recover from"
        filler.unlink()
        notify.wait_for(lambda m: ready(m) and "back after a restart" in m.get("STATUS", ""))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 0


def test_a_read_only_install_dir_fails_the_restart_by_name_and_sigterm_still_ends_it(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    daemon_env.write_config(restart="max_restarts = 50")
    proc = daemon_env.start()
    notify.wait_for(ready)
    install = str(daemon_env.install_dir)
    # Root ignores modes: a read-only bind mount over the install dir (the files cxrd
    # holds open stay writable through the mount below, as after a remount that waits).
    if os.geteuid() != 0 or subprocess.run(["mount", "--bind", install, install]).returncode:
        pytest.skip("needs root for a read-only bind mount")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", install], check=True)
        status = crash_and_wait(daemon_env, notify, "read-only file system")
        assert f"cannot claim {daemon_env.run_dir}: read-only file system" in status
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 0
        assert time.monotonic() - began < STOP_TIMEOUT + 1
    finally:
        subprocess.run(["umount", "-l", install], check=True)


@pytest.mark.parametrize(
    ("fault", "words"), [("removed", "no such file or directory"), ("a file", "not a directory")]
)
def test_an_install_dir_gone_fails_each_restart_by_name_then_gives_up(
    daemon_env: DaemonEnv, notify: NotifySocket, fault: str, words: str
) -> None:
    daemon_env.write_config(restart="max_restarts = 2")
    proc = daemon_env.start()
    notify.wait_for(ready)
    shutil.rmtree(daemon_env.install_dir)
    if fault == "a file":
        daemon_env.install_dir.write_text("not a directory")
    status = crash_and_wait(daemon_env, notify, words)
    assert f"cannot claim {daemon_env.run_dir}: {words}" in status
    assert proc.wait(timeout=TIMEOUT) == errors.GaveUp.exit_code
    final = notify.statuses()[-1]
    assert final.startswith("Failed") and words in final and "giving up" in final
