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

import pytest
from fixtures_daemon import group_members, pid_alive
from support import TIMEOUT, free_port, wait_until

from cxrd import constants as C
from cxrd.core.model import ChildSpec, describe_exit
from cxrd.sim import faults as F
from cxrd.system import process
from cxrd.system.process import ProcessLauncher
from cxrd.system.readiness import wait_for_file


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


def timed_stop(tmp_path: Path, script: str, timeout: float) -> tuple[int, float, int]:
    """Spawn ``sh -c script``, stop it: the code, how long the stop took, the group's live count."""

    async def go() -> tuple[int, float, int]:
        launcher = ProcessLauncher()
        try:
            child = await launcher.spawn(spec(tmp_path, script))
            wait_until(lambda: (tmp_path / "started").exists(), what="the grandchild")
            began = time.monotonic()
            code = await child.stop(timeout=timeout)
            return code, time.monotonic() - began, len(group_members(child.pid))
        finally:
            launcher.close()

    return run(go())  # type: ignore[return-value]


def test_a_grandchild_gets_the_stop_timeout_to_exit_on_sigterm(tmp_path: Path) -> None:
    done = tmp_path / "done"
    grandchild = (
        f"(trap 'sleep 0.5; echo clean > {done}; exit 0' TERM; touch {tmp_path}/started; "
        "while :; do sleep 0.05; done) & wait"
    )
    code, took, left = timed_stop(tmp_path, grandchild, timeout=TIMEOUT)
    assert code == -signal.SIGTERM  # the leader's own end
    assert done.read_text() == "clean\n", "the grandchild finished its SIGTERM handler"
    assert 0.5 <= took < TIMEOUT
    assert left == 0, "stop() returns once the whole group is gone"


def test_a_grandchild_ignoring_sigterm_is_killed_at_the_stop_timeout(tmp_path: Path) -> None:
    grandchild = f"(trap '' TERM; touch {tmp_path}/started; while :; do sleep 0.05; done) & wait"
    code, took, left = timed_stop(tmp_path, grandchild, timeout=0.5)
    assert code == -signal.SIGTERM
    assert 0.5 <= took < 0.5 + TIMEOUT / 2
    assert left == 0


def sim_spec(tmp_path: Path, **faults: str) -> ChildSpec:
    install = tmp_path / "cloudxr"
    (install / C.RUN_DIR).mkdir(parents=True, mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith(F.PREFIX)}
    env.update(
        {
            "XR_RUNTIME_JSON": str(install / "openxr_cloudxr.json"),
            "NV_CXR_RUNTIME_DIR": str(install / C.RUN_DIR),
            "CXR_INSTALL_DIR": str(install),
            F.SIGNALING_PORT: str(free_port()),
            F.SPAWN_GRANDCHILD: "1",
            **faults,
        }
    )
    return ChildSpec(
        name="runtime",
        argv=(sys.executable, "-m", "cxrd.sim"),
        env=env,
        stderr=tmp_path / "logs" / "sim.stderr",
    )


def sim_grandchild(tmp_path: Path) -> int:
    return int((tmp_path / "cloudxr" / C.RUN_DIR / F.GRANDCHILD_PID_FILE).read_text())


def test_the_sim_ignoring_sigterm_is_killed_with_its_grandchild_at_the_stop_timeout(
    tmp_path: Path,
) -> None:
    async def go() -> tuple[int, float, int, int]:
        launcher = ProcessLauncher()
        try:
            child = await launcher.spawn(sim_spec(tmp_path, **{F.IGNORE_SIGTERM: "1"}))
            await wait_for_file(tmp_path / "cloudxr" / C.RUN_DIR / C.SENTINEL_FILE)
            began = time.monotonic()
            code = await child.stop(timeout=1.0)
            return code, time.monotonic() - began, len(group_members(child.pid)), child.pid
        finally:
            launcher.close()

    code, took, left, pid = run(go())  # type: ignore[misc]
    assert code == -signal.SIGKILL
    assert 1.0 <= took < 1.0 + TIMEOUT / 2
    assert left == 0 and not pid_alive(sim_grandchild(tmp_path)) and not pid_alive(pid)


def test_a_crashed_sims_grandchild_gets_sigterm_and_wait_resolves_once_it_is_gone(
    tmp_path: Path,
) -> None:
    async def go() -> tuple[int, float, int]:
        launcher = ProcessLauncher()
        try:
            child = await launcher.spawn(sim_spec(tmp_path, **{F.CRASH_AFTER: "0.3"}))
            began = time.monotonic()
            code = await child.wait()
            assert child.returncode == code
            return code, time.monotonic() - began, len(group_members(child.pid))
        finally:
            launcher.close()

    code, took, left = run(go())  # type: ignore[misc]
    assert code == -signal.SIGSEGV
    assert left == 0 and not pid_alive(sim_grandchild(tmp_path))
    assert took < process.LEFTOVER_GRACE, "SIGTERM ended it: no wait for the SIGKILL"


def test_leftovers_of_a_leader_that_exited_get_sigterm_then_sigkill_after_the_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process, "LEFTOVER_GRACE", 0.5)
    done = tmp_path / "done"
    script = (
        f"(trap 'echo clean > {done}; exit 0' TERM; while :; do sleep 0.05; done) & "
        "(trap '' TERM; while :; do sleep 0.05; done) & sleep 0.2; exit 3"
    )

    async def go() -> tuple[int, float, int]:
        launcher = ProcessLauncher()
        try:
            child = await launcher.spawn(spec(tmp_path, script))
            began = time.monotonic()
            code = await child.wait()
            return code, time.monotonic() - began, len(group_members(child.pid))
        finally:
            launcher.close()

    code, took, left = run(go())  # type: ignore[misc]
    assert code == 3
    assert done.read_text() == "clean\n", "the leftover that honours SIGTERM ended by itself"
    assert 0.2 + 0.5 <= took < TIMEOUT, "the one ignoring SIGTERM was killed after the grace"
    assert left == 0


def test_stop_is_idempotent_and_every_caller_gets_the_same_code(tmp_path: Path) -> None:
    async def go() -> list[int]:
        launcher = ProcessLauncher()
        try:
            child = await launcher.spawn(spec(tmp_path, "sleep 60 & wait"))
            codes = await asyncio.gather(child.stop(2.0), child.stop(2.0), child.wait())
            return [*codes, await child.stop(2.0), child.returncode]  # type: ignore[list-item]
        finally:
            launcher.close()

    assert run(go()) == [-signal.SIGTERM] * 5


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
        from cxrd.core.model import ChildSpec
        from cxrd.system.process import ProcessLauncher
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
