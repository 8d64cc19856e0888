"""Bounded logs: rotation and pruning, and a real flood followed by a real `cxrctl logs -f`."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fixtures_daemon import DaemonEnv, NotifySocket
from support import TIMEOUT, wait_until

from cxrd.config import LogsConfig
from cxrd.system.logfiles import Relay, ensure_logs_dir, prune, rotate

FLOOD = re.compile(rb"cxrd-sim: flood line (\d{9}) ")


def test_prune_keeps_the_newest_server_logs(tmp_path: Path) -> None:
    for age in range(7):
        log = tmp_path / f"cxr_server.2024-01-0{age + 1}T000000.000000Z.log"
        log.write_text("x")
        os.utime(log, (1_700_000_000 + age, 1_700_000_000 + age))
    (tmp_path / "runtime_stderr.log").write_text("not a server log")

    removed = prune(tmp_path, "cxr_server.*.log", 3)

    left = sorted(p.name for p in tmp_path.glob("cxr_server.*.log"))
    assert left == [f"cxr_server.2024-01-0{day}T000000.000000Z.log" for day in (5, 6, 7)]
    assert len(removed) == 4
    assert (tmp_path / "runtime_stderr.log").exists()


def test_rotate_shifts_names_and_drops_past_keep(tmp_path: Path) -> None:
    log = tmp_path / "wss.log"
    for run in range(4):
        log.write_text(f"run {run}\n")
        rotate(log, 2)
    (tmp_path / "wss.log.7").write_text("from a larger keep")
    log.write_text("run 4\n")
    rotate(log, 2)

    assert not log.exists()
    assert (tmp_path / "wss.log.1").read_text() == "run 4\n"
    assert (tmp_path / "wss.log.2").read_text() == "run 3\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wss.log.1", "wss.log.2"]


def test_a_stderr_flood_rotates_and_a_follower_sees_every_line(
    daemon_env: DaemonEnv, notify: NotifySocket
) -> None:
    max_bytes, keep, flood = 1024 * 1024, 2, 5 * 1024 * 1024
    daemon_env.write_config(
        f"\n[logs]\nmax_bytes = {max_bytes}\nkeep = {keep}\n", sim=f"flood_stderr = {flood}"
    )
    stderr_log = daemon_env.logs_dir / "runtime_stderr.log"
    daemon_env.logs_dir.mkdir(parents=True)
    stderr_log.write_bytes(b"")
    cli = (sys.executable, "-m", "cxrd.cli", "--config", str(daemon_env.config_path))
    follower = subprocess.Popen(
        [*cli, "logs", "-f", "--runtime", "-n", "0"],
        env=daemon_env.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    seen: list[int] = []
    done = threading.Event()

    def read() -> None:
        assert follower.stdout is not None
        for line in follower.stdout:
            match = FLOOD.match(line)
            if match:
                seen.append(int(match[1]))
        done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        _wait_for_follower(follower)
        daemon_env.start()
        notify.wait_for(lambda msg: msg.get("READY") == "1")  # the sim floods before ready
        expected = _lines_in(daemon_env.logs_dir)
        wait_until(lambda: len(seen) >= expected, f"the follower to see {expected} lines")
    finally:
        follower.terminate()
        follower.wait(timeout=TIMEOUT)
        done.wait(timeout=TIMEOUT)
        assert follower.stdout is not None
        follower.stdout.close()

    assert seen == list(range(len(seen))), "a line was lost, doubled or reordered"
    print(f"follower saw {len(seen)} lines; on disk: {sizes_of(daemon_env.logs_dir)}")
    assert len(seen) * 80 >= flood
    sizes = sizes_of(daemon_env.logs_dir)
    assert sorted(sizes) == ["runtime_stderr.log", "runtime_stderr.log.1", "runtime_stderr.log.2"]
    assert all(size <= max_bytes for size in sizes.values()), sizes
    assert sum(sizes.values()) <= (keep + 1) * max_bytes


def _wait_for_follower(follower: subprocess.Popen[bytes]) -> None:
    """`tail -F` reached the file: it holds it open (no event says so; /proc does)."""
    fd_dir = Path(f"/proc/{follower.pid}/fd")

    def following() -> bool:
        try:
            return any(
                os.readlink(fd_dir / fd).endswith("runtime_stderr.log") for fd in os.listdir(fd_dir)
            )
        except OSError:
            return False

    wait_until(following, "cxrctl logs -f to open the log")


def _lines_in(logs: Path) -> int:
    """The last flood line's number + 1, as the files on disk have it."""
    data = (logs / "runtime_stderr.log").read_bytes()
    numbers = FLOOD.findall(data)
    return int(numbers[-1]) + 1


def sizes_of(logs: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in logs.glob("runtime_stderr.log*")}


# The stderr relay: a failed reopen, a planted link ---------------------------------------------

# A child that writes each line of its stdin to its stderr: the relay's writer, which the
# test drives line by line and which never restarts.
ECHO = "import sys\nfor line in sys.stdin:\n    sys.stderr.write(line)\n    sys.stderr.flush()\n"


class EchoChild:
    """A real child whose stderr is a :class:`Relay`'s pipe."""

    def __init__(self, path: Path, limits: LogsConfig) -> None:
        self.relay = Relay(path, limits)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ECHO],
            stdin=subprocess.PIPE,
            stderr=self.relay.write_fd,
            text=True,
        )
        self.relay.start()

    def say(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    async def end(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            assert self.proc.wait(TIMEOUT) == 0
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        await self.relay.drained(TIMEOUT)


def text_of(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def test_the_relay_writes_again_after_a_failed_reopen_without_a_child_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cxrd.system.logfiles")
    logs = tmp_path / "logs"
    ensure_logs_dir(logs)
    path = logs / "runtime_stderr.log"
    first, second = "one " * 150, "two " * 150  # 601 bytes each with the newline: two pass 1000

    async def scenario() -> None:
        child = EchoChild(path, LogsConfig(max_bytes=1000, keep=2))
        try:
            child.say(first)
            wait_until(lambda: text_of(path) == first + "\n", "the first line in the file")
            # The log dir replaced by a file: the rotation the second line needs fails,
            # and so does the reopen after it (for root too: ENOTDIR).
            logs.rename(tmp_path / "away")
            logs.write_text("")
            child.say(second)
            wait_until(lambda: f"cannot write {path}" in caplog.text, "the relay to report it")
            logs.unlink()
            (tmp_path / "away").rename(logs)
            child.say("three")  # the same child, which never restarted
            wait_until(lambda: "three" in text_of(path), "the relay to write again")
        finally:
            await child.end()

    asyncio.run(scenario())
    assert path.read_text() == first + "\nthree\n"  # what came during the fault is dropped
    assert f"writing {path} again" in caplog.text


def test_the_relay_never_follows_a_link_planted_at_its_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    logs = tmp_path / "logs"
    ensure_logs_dir(logs)
    path = logs / "runtime_stderr.log"
    path.symlink_to(victim)

    async def scenario() -> None:
        child = EchoChild(path, LogsConfig())
        try:
            child.say("from the child")
            wait_until(lambda: "is a symbolic link" in caplog.text, "the relay to refuse it")
        finally:
            await child.end()

    asyncio.run(scenario())
    assert victim.read_text() == "precious\n"
    assert f"{path} is a symbolic link" in caplog.text and "remove the link" in caplog.text
