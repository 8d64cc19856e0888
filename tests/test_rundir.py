"""The run dir on a real file system: ownership, links, modes, read-only mounts, socket paths."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fixtures_daemon import DaemonEnv, NotifySocket
from support import TIMEOUT, mode

from cxrd.constants import MAX_SOCKET_PATH
from cxrd.errors import InvalidConfig, StartFailed
from cxrd.system.rundir import (
    InstallLock,
    ensure_run_dir,
    live_runtime_pid,
    lock_holder,
)


def test_the_run_dir_is_made_private_and_a_loose_mode_of_ours_is_put_right(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "install" / "run"
    lock = InstallLock(run_dir)
    try:
        assert mode(run_dir) == 0o700
        assert (run_dir / "cxrd.lock").read_text() == f"{os.getpid()}\n"
    finally:
        lock.release()
    os.chmod(run_dir, 0o755)
    ensure_run_dir(run_dir)
    assert mode(run_dir) == 0o700


def test_a_symlinked_run_dir_is_refused_and_nothing_is_written_through_it(
    tmp_path: Path,
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    install = tmp_path / "install"
    install.mkdir()
    (install / "run").symlink_to(elsewhere)
    with pytest.raises(InvalidConfig) as refused:
        InstallLock(install / "run")
    message = str(refused.value)
    assert f"{install / 'run'} is a symbolic link" in message
    assert "remove the link" in message and "install_dir" in message
    assert list(elsewhere.iterdir()) == [] and mode(elsewhere) == 0o755


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_run_dir_of_another_user_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    run_dir = tmp_path / "install" / "run"
    run_dir.mkdir(parents=True, mode=0o755)
    os.chown(run_dir, 4242, 4242)
    with pytest.raises(InvalidConfig) as refused:
        InstallLock(run_dir)
    message = str(refused.value)
    assert f"{run_dir} belongs to uid 4242, not to " in message
    assert "remove it" in message and "install_dir" in message
    assert mode(run_dir) == 0o755 and list(run_dir.iterdir()) == []


def test_an_install_dir_below_a_file_is_a_named_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory\n")
    run_dir = tmp_path / "file" / "install" / "run"
    with pytest.raises(InvalidConfig) as refused:
        InstallLock(run_dir)
    message = str(refused.value)
    assert f"cannot make the run directory {run_dir}: Not a directory" in message
    assert "install_dir" in message


def test_a_file_named_run_is_a_named_error(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("")
    with pytest.raises(InvalidConfig, match=r"run: cannot use it as the run directory: Not a"):
        ensure_run_dir(tmp_path / "run")


def in_mount_namespace(
    setup: str, command: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """COMMAND run after the shell SETUP in a mount namespace of its own (so its mounts need
    no undoing); skipped where that cannot be had here (no unshare, or SETUP exits 77)."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{setup}; exec "$@"',
         "sh", *command],
        env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    if out.returncode == 77 or "unshare failed" in out.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    return out


FILL = "cat /dev/zero 2>/dev/null >"  # a file filling its file system (cat then fails: ENOSPC)


READ_ONLY_PROBE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from cxrd.errors import CxrdError
    from cxrd.system.rundir import InstallLock
    for run_dir in sys.argv[1:]:
        try:
            InstallLock(Path(run_dir))
        except CxrdError as err:
            print(type(err).__name__, err)
        else:
            print("locked", run_dir)
    """
)


def test_a_read_only_install_dir_is_a_named_error(tmp_path: Path) -> None:
    """Root ignores modes, not a read-only mount: a tmpfs remounted ro, in a mount namespace."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    setup = (
        f'mount -t tmpfs -o size=1m tmpfs "{mnt}" && mkdir -m 0700 "{mnt}/old" "{mnt}/old/run" '
        f'&& mount -o remount,ro "{mnt}" || exit 77'
    )
    cmd = [sys.executable, "-c", READ_ONLY_PROBE, f"{mnt}/new/run", f"{mnt}/old/run"]
    out = in_mount_namespace(setup, cmd)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    fresh, existing = out.stdout.splitlines()
    assert fresh.startswith(f"InvalidConfig {mnt}/new: cannot make the run directory")
    assert "Read-only file system" in fresh and "install_dir" in fresh
    assert existing.startswith(f"InvalidConfig {mnt}/old/run/cxrd.lock: cannot open the install")
    assert "Read-only file system" in existing and "install_dir" in existing


def install_dir_with_socket_path_of(tmp_path: Path, size: int) -> Path:
    """An install dir whose ``run/ipc_cloudxr`` is exactly ``size`` bytes long."""
    fixed = len(os.fsencode(tmp_path / "x" / "run" / "ipc_cloudxr"))
    install = tmp_path / ("x" * (1 + size - fixed))
    assert len(os.fsencode(install / "run" / "ipc_cloudxr")) == size
    return install


def test_a_socket_path_that_fits_is_probed_for_a_live_runtime(tmp_path: Path) -> None:
    run_dir = install_dir_with_socket_path_of(tmp_path, MAX_SOCKET_PATH) / "run"
    ensure_run_dir(run_dir)
    assert live_runtime_pid(run_dir) is None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(os.fspath(run_dir / "ipc_cloudxr"))
        listener.listen()
        assert live_runtime_pid(run_dir) == os.getpid()


def test_a_socket_path_too_long_is_named_not_taken_for_a_live_runtime(tmp_path: Path) -> None:
    install = install_dir_with_socket_path_of(tmp_path, MAX_SOCKET_PATH + 1)
    ensure_run_dir(install / "run")
    with pytest.raises(InvalidConfig) as refused:
        live_runtime_pid(install / "run")
    message = str(refused.value)
    limit = len(os.fsencode(install)) - 1
    assert f"{install}/run/ipc_cloudxr: {MAX_SOCKET_PATH + 1} bytes, too long" in message
    assert f"install_dir (--install-dir) to a path of at most {limit} bytes" in message


def leave_a_dead_runtime(run_dir: Path, holder: str) -> None:
    ensure_run_dir(run_dir)
    (run_dir / "cxrd.lock").write_text(holder)
    for name in ("cloudxr.env", "runtime_started", "cloudxr.pid"):
        (run_dir / name).write_text("stale\n")


def test_the_lock_of_a_cxrd_that_died_sweeps_its_runtime_files(tmp_path: Path) -> None:
    run_dir = tmp_path / "install" / "run"
    leave_a_dead_runtime(run_dir, "424242\n")
    lock = InstallLock(run_dir)
    lock.release()
    assert sorted(p.name for p in run_dir.iterdir()) == ["cxrd.lock"]
    # Released in order (an empty lock file): the next holder touches nothing.
    (run_dir / "cloudxr.env").write_text("a runtime not ours\n")
    InstallLock(run_dir).release()
    assert (run_dir / "cloudxr.env").exists()


def test_the_files_of_a_runtime_that_answers_are_left_to_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "install" / "run"
    leave_a_dead_runtime(run_dir, "424242\n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(os.fspath(run_dir / "ipc_cloudxr"))
        listener.listen()
        InstallLock(run_dir).release()
    assert (run_dir / "cloudxr.env").exists() and (run_dir / "runtime_started").exists()


def test_lock_holder_names_the_pid_holding_the_install_lock(tmp_path: Path) -> None:
    run_dir = tmp_path / "install" / "run"
    assert lock_holder(run_dir) is None
    lock = InstallLock(run_dir)
    try:
        assert lock_holder(run_dir) == os.getpid()
    finally:
        lock.release()
    assert lock_holder(run_dir) is None


FULL_DISK_PROBE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from cxrd.errors import CxrdError
    from cxrd.system.rundir import InstallLock
    try:
        InstallLock(Path(sys.argv[1]))
    except CxrdError as err:
        print(type(err).__name__, err.exit_code, err)
    """
)


def test_a_full_disk_at_the_first_start_is_a_named_start_failure(tmp_path: Path) -> None:
    """A tmpfs filled up (in a mount namespace of its own): the lock's pid cannot be written."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    setup = f'mount -t tmpfs -o size=64k tmpfs "{mnt}" || exit 77; {FILL} "{mnt}/fill"'
    out = in_mount_namespace(setup, [sys.executable, "-c", FULL_DISK_PROBE, f"{mnt}/install/run"])
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert out.stdout.strip() == (
        f"StartFailed 10 cannot write {mnt}/install/run/cxrd.lock: No space left on device (ENOSPC)"
    )


def test_cxrd_on_a_full_disk_exits_with_the_named_error(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    install = daemon_env.install_dir
    install.mkdir()
    setup = f'mount -t tmpfs -o size=64k tmpfs "{install}" || exit 77; {FILL} "{install}/fill"'
    cxrd = [sys.executable, "-m", "cxrd", "--config", str(daemon_env.config_path)]
    out = in_mount_namespace(setup, cxrd, env=daemon_env.env)
    assert out.returncode == StartFailed.exit_code, out.stderr
    assert "Traceback" not in out.stderr
    said = f"cannot write {install}/run/cxrd.lock: No space left on device (ENOSPC)"
    assert said in out.stderr
    notify.wait_for(lambda m: said in m.get("STATUS", ""))
