"""No runtime outlives a SIGKILLed cxrd, even one whose guard was killed first.

The guard (cxrd/data/guard.py) SIGKILLs the children's groups when cxrd dies;
cxrd replaces a guard that dies; and each child dies with cxrd by its
parent-death signal, should both go at once.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from fixtures_daemon import DaemonEnv, NotifySocket, pid_alive
from support import TIMEOUT, wait_until


def guards_of(pid: int) -> list[int]:
    """The guard processes that ``pid`` started."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"guard.py" in cmdline and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def processes_of(install_dir: Path) -> list[int]:
    """Live processes whose command line or environment names ``install_dir``."""
    needle = os.fsencode(install_dir)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            text = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in text and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def readies(notify: NotifySocket) -> int:
    return sum(1 for m in notify.messages if m.get("READY") == "1")


def test_a_killed_guard_is_replaced_and_a_sigkilled_cxrd_leaves_nothing_behind(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    daemon_env.write_config(sim="spawn_grandchild = true")
    proc = daemon_env.start()
    notify.wait_for(lambda m: m.get("READY") == "1")
    run_dir = daemon_env.run_dir
    wait_until(lambda: (run_dir / "sim_grandchild.pid").exists(), what="the sim's grandchild")
    (guard,) = guards_of(proc.pid)
    os.kill(guard, signal.SIGKILL)
    (second,) = wait_until(
        lambda: [pid for pid in guards_of(proc.pid) if pid != guard], what="a new guard"
    )
    wait_until(
        lambda: (
            f"the guard (pid {guard}) killed by SIGKILL; starting another"
            in daemon_env.daemon_log()
        ),
        what="the log to say the guard was replaced",
    )
    ours = processes_of(daemon_env.install_dir)
    assert len(ours) >= 3, f"runtime, proxy and grandchild: {ours}"
    assert (run_dir / "cloudxr.env").exists() and (run_dir / "runtime_started").exists()

    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)
    wait_until(
        lambda: not processes_of(daemon_env.install_dir),
        timeout=2.0,
        what=f"no process of {daemon_env.install_dir} within 2 s (were {ours})",
    )
    # What would tell a reader that a runtime serves here goes with it.
    wait_until(
        lambda: (
            not (run_dir / "cloudxr.env").exists() and not (run_dir / "runtime_started").exists()
        ),
        timeout=2.0,
        what="cloudxr.env and the sentinel to be removed by the guard",
    )
    wait_until(lambda: not pid_alive(second), what="the guard to finish its work")

    before = readies(notify)
    again = daemon_env.start()
    notify.wait_for(lambda m: m.get("READY") == "1" and readies(notify) > before)
    assert again.poll() is None
    assert "the previous cxrd" not in daemon_env.daemon_log(), "the guard left nothing to sweep"


def test_a_sigkilled_cxrd_leaves_files_that_the_next_start_removes(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    """Under systemd the guard dies with the unit's cgroup: the next start sweeps instead."""
    proc = daemon_env.start()
    notify.wait_for(lambda m: m.get("READY") == "1")
    (guard,) = guards_of(proc.pid)
    os.kill(proc.pid, signal.SIGSTOP)  # no replacement guard, no cleanup of its own
    os.kill(guard, signal.SIGKILL)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)
    run_dir = daemon_env.run_dir
    wait_until(
        lambda: not processes_of(daemon_env.install_dir),
        timeout=2.0,
        what="the runtime and proxy to die by their parent-death signal within 2 s",
    )
    assert (run_dir / "cloudxr.env").exists(), "nobody was left to remove it"

    before = readies(notify)
    daemon_env.start()
    notify.wait_for(lambda m: m.get("READY") == "1" and readies(notify) > before)
    swept = re.search(
        rf"the previous cxrd \(pid {proc.pid}\) ended without cleaning up: removed (.*) from",
        daemon_env.daemon_log(),
    )
    assert swept is not None, daemon_env.daemon_log()
    assert "cloudxr.env" in swept.group(1) and "runtime_started" in swept.group(1)


PARENT = textwrap.dedent(
    """
    import asyncio, os, sys
    from pathlib import Path
    from cxrd.core.model import ChildSpec
    from cxrd.system.process import ProcessLauncher
    async def main(out):
        launcher = ProcessLauncher()
        child = await launcher.spawn(ChildSpec(
            name="runtime", argv=("sleep", "60"), env=dict(os.environ),
            stderr=out / "stderr"))
        (out / "pids.tmp").write_text(f"{child.pid} {launcher.guard_pid}")
        os.rename(out / "pids.tmp", out / "pids")
        await asyncio.sleep(60)
    asyncio.run(main(Path(sys.argv[1])))
    """
)


def test_a_child_dies_with_its_parent_when_the_guard_is_gone(tmp_path: Path) -> None:
    """The parent-death signal alone: parent stopped, guard killed, then the parent."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)])
    try:
        pids = tmp_path / "pids"
        wait_until(pids.exists, what="the child to start")
        child, guard = map(int, pids.read_text().split())
        os.kill(parent.pid, signal.SIGSTOP)
        os.kill(guard, signal.SIGKILL)
        wait_until(lambda: not pid_alive(guard), what="the guard to die")
        assert pid_alive(child)
        parent.kill()
        parent.wait(timeout=TIMEOUT)
        wait_until(lambda: not pid_alive(child), timeout=2.0, what="the child to die within 2 s")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


GUARD = Path(__file__).resolve().parent.parent / "cxrd" / "data" / "guard.py"


def run_guard(lines: str) -> None:
    """The guard script itself, given ``lines`` and then end of file."""
    subprocess.run(
        [sys.executable, "-I", "-S", str(GUARD)],
        input=lines,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )


def test_the_guard_removes_the_files_only_after_a_cxrd_that_died_and_no_runtime_answers(
    tmp_path: Path,
) -> None:
    env_file, sock = tmp_path / "cloudxr.env", tmp_path / "ipc_cloudxr"
    files = f"f{env_file}\ns{sock}\n"
    env_file.write_text("export A=1\n")
    run_guard(files + ".\n")  # cxrd left in order: its files are its own business
    assert env_file.exists()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(os.fspath(sock))
        listener.listen()
        run_guard(files)  # cxrd died, but a runtime (not its) answers there
        assert env_file.exists()
    run_guard(files)  # cxrd died and nothing answers: the file would mislead a reader
    assert not env_file.exists()


def test_a_guard_ended_by_sigterm_is_replaced_like_a_killed_one(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    # cxrd holds SIGTERM, SIGINT and SIGHUP from its first line; its first guard,
    # started then, must not keep them held (a stray SIGTERM would be ignored).
    daemon_env.write_config()
    proc = daemon_env.start()
    notify.wait_for(lambda m: m.get("READY") == "1")
    (guard,) = guards_of(proc.pid)
    os.kill(guard, signal.SIGTERM)
    wait_until(
        lambda: (
            f"the guard (pid {guard}) killed by SIGTERM; starting another"
            in daemon_env.daemon_log()
        ),
        what="the log to say the guard ended by SIGTERM was replaced",
    )
    wait_until(lambda: [pid for pid in guards_of(proc.pid) if pid != guard], what="a new guard")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=TIMEOUT) == 0
