"""Child process groups: real processes, real signals."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from fixtures_daemon import group_members, pid_alive
from support import TIMEOUT, wait_until

from cxrd.system.process import ChildSpec, ProcessLauncher, describe_exit


def spec(tmp_path: Path, script: str, name: str = "runtime") -> ChildSpec:
    return ChildSpec(
        name=name,
        argv=("sh", "-c", script),
        env=dict(os.environ, NOTIFY_SOCKET="/should/not/leak"),
        stderr=tmp_path / "logs" / "child.stderr",
    )


def run(coro: object) -> object:
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))  # type: ignore[arg-type]


def test_stop_reaches_grandchildren_in_the_group(tmp_path: Path) -> None:
    async def go() -> tuple[int, list[int], int]:
        launcher = ProcessLauncher()
        try:
            child = await launcher.spawn(spec(tmp_path, "sleep 60 & sleep 60 & wait"))
            await asyncio.sleep(0.2)
            members = group_members(child.pid)
            code = await child.stop(timeout=2.0)
            return child.pid, members, code
        finally:
            launcher.close()

    pgid, members, code = run(go())  # type: ignore[misc]
    assert len(members) == 3, "sh and two sleeps share the child's process group"
    assert code == -signal.SIGTERM
    wait_until(lambda: not group_members(pgid), what="the group to be empty")


def test_a_child_ignoring_sigterm_is_killed_after_stop_timeout(tmp_path: Path) -> None:
    async def go() -> tuple[int, float]:
        launcher = ProcessLauncher()
        try:
            child = await launcher.spawn(
                spec(tmp_path, "trap '' TERM; while :; do sleep 0.05; done")
            )
            await asyncio.sleep(0.2)
            began = time.monotonic()
            code = await child.stop(timeout=0.5)
            return code, time.monotonic() - began
        finally:
            launcher.close()

    code, took = run(go())  # type: ignore[misc]
    assert code == -signal.SIGKILL
    assert 0.5 <= took < 3.0


def test_stderr_flood_goes_to_the_file_and_never_blocks(tmp_path: Path) -> None:
    async def go() -> int:
        launcher = ProcessLauncher()
        try:
            child = await launcher.spawn(
                spec(tmp_path, "head -c 8000000 /dev/zero | tr '\\0' x >&2; echo done >&2")
            )
            return await child.wait()
        finally:
            launcher.close()

    assert run(go()) == 0
    log = tmp_path / "logs" / "child.stderr"
    assert log.stat().st_size == 8_000_000 + len("done\n")


def test_stdout_goes_to_dev_null_like_isaacteleops_runtime(tmp_path: Path) -> None:
    async def go() -> int:
        launcher = ProcessLauncher()
        try:
            child = await launcher.spawn(
                spec(
                    tmp_path,
                    "head -c 4000000 /dev/zero; out=$(readlink /proc/$$/fd/1); echo $out >&2",
                )
            )
            return await child.wait()
        finally:
            launcher.close()

    assert run(go()) == 0
    assert (tmp_path / "logs" / "child.stderr").read_text() == "/dev/null\n"


def test_daemon_only_variables_do_not_leak_to_children(tmp_path: Path) -> None:
    async def go() -> int:
        launcher = ProcessLauncher()
        try:
            child = await launcher.spawn(spec(tmp_path, 'echo "[${NOTIFY_SOCKET:-unset}]" >&2'))
            return await child.wait()
        finally:
            launcher.close()

    run(go())
    assert (tmp_path / "logs" / "child.stderr").read_text() == "[unset]\n"


def test_sigkilled_parent_leaves_no_child_or_grandchild(tmp_path: Path) -> None:
    """Outside systemd, the guard kills the groups of a parent that died by SIGKILL."""
    pids = tmp_path / "pids"
    parent = textwrap.dedent(
        f"""
        import asyncio, os
        from pathlib import Path
        from cxrd.system.process import ChildSpec, ProcessLauncher
        async def main():
            launcher = ProcessLauncher()
            child = await launcher.spawn(ChildSpec(
                name="runtime", argv=("sh", "-c", "sleep 60 & echo $! > {pids}; wait"),
                env=dict(os.environ), stderr=Path("{tmp_path}/stderr")))
            Path("{tmp_path}/child.tmp").write_text(str(child.pid))
            os.rename("{tmp_path}/child.tmp", "{tmp_path}/child")
            await asyncio.sleep(60)
        asyncio.run(main())
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", parent])
    try:
        child_file = tmp_path / "child"
        wait_until(
            lambda: pids.exists() and pids.read_text().strip() and child_file.exists(),
            what="the child and the grandchild",
        )
        child = int(child_file.read_text())
        grandchild = int(pids.read_text())
        assert pid_alive(child) and pid_alive(grandchild)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
        wait_until(
            lambda: not pid_alive(child) and not pid_alive(grandchild),
            timeout=2.0,
            what="child and grandchild to die within 2 s",
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_exit_descriptions_read_like_systemd() -> None:
    assert describe_exit(0) == "exited with code 0"
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-signal.SIGSEGV) == "killed by SIGSEGV"
