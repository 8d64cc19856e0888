"""run/cloudxr.env put back when another program changes it: real files, inotify, a real cxrd."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from fixtures_dbus import BusDaemon
from support import TIMEOUT, wait_until

from cxrd.client import CloudXRClient
from cxrd.system import envguard
from cxrd.system.envfile import format_env, read_env_file
from cxrd.system.envguard import EnvGuard

OURS = {"NV_DEVICE_PROFILE": "Quest3", "NV_CXR_SERVER_PORT": "49100", "XRT_NO_STDIN": "true"}
THEIRS = {"NV_DEVICE_PROFILE": "auto-webrtc", "NV_CXR_SERVER_PORT": "49100", "CXR_X": "1"}
# Long enough for a check the guard would make (SETTLE) to have been made, for "nothing happened".
QUIET_SPELL = 10 * envguard.SETTLE


def isaacteleop_write(path: Path, env: dict[str, str]) -> None:
    """What isaacteleop 1.4's EnvConfig does: truncate in place, write, close."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        for key in sorted(env):
            out.write(f"export {key}={shlex.quote(env[key])}\n")


class Restores(logging.Handler):
    """The guard's log lines, and an event per line (each restore, or failure, logs one)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.logged = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.logged.set()

    def at(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]

    async def until(self, done: Callable[[], bool]) -> None:
        """Wait for log lines until ``done()``; bounded by TIMEOUT."""
        async with asyncio.timeout(TIMEOUT):
            while not done():
                await self.logged.wait()
                self.logged.clear()


class Guarded:
    """One scenario's guard, its file and what it told: log lines, on_event calls."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.log = Restores()
        self.events = 0
        self.guard = EnvGuard(on_event=self._on_event)

    def _on_event(self) -> None:
        self.events += 1

    def warnings(self) -> list[str]:
        return self.log.at(logging.WARNING)

    def holds(self, env: dict[str, str]) -> bool:
        return self.path.exists() and self.path.read_text() == format_env(env)

    async def restored(self) -> None:
        """Until the file is OURS again (a restore logs a line)."""
        await self.log.until(lambda: self.holds(OURS))

    async def nothing_happens(self) -> None:
        """A spell in which the guard would have acted; it must not have."""
        await asyncio.sleep(QUIET_SPELL)
        assert self.log.records == [], [r.getMessage() for r in self.log.records]


Scenario = Callable[[Guarded], Awaitable[None]]


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[Callable[[Scenario], None]]:
    """Run a scenario with a guard on tmp/run/cloudxr.env holding OURS, its log captured."""
    logger = logging.getLogger(envguard.__name__)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    handlers: list[Restores] = []

    def run(scenario: Scenario) -> None:
        async def go() -> None:
            run_dir = tmp_path / "run"
            run_dir.mkdir(mode=0o700, exist_ok=True)
            g = Guarded(run_dir / "cloudxr.env")
            handlers.append(g.log)
            logger.addHandler(g.log)
            g.guard.publish(g.path, OURS)
            try:
                await scenario(g)
            finally:
                g.guard.stop()

        asyncio.run(go())

    yield run
    for handler in handlers:
        logger.removeHandler(handler)
    logger.setLevel(old_level)


def test_an_in_place_rewrite_is_restored_with_one_warning_naming_the_keys(
    guarded: Callable[[Scenario], None],
) -> None:
    async def scenario(g: Guarded) -> None:
        isaacteleop_write(g.path, THEIRS)
        await g.restored()
        (warning,) = g.warnings()
        assert warning == (
            f"{g.path} was rewritten by another program (NV_DEVICE_PROFILE differed; "
            "added: CXR_X; removed: XRT_NO_STDIN); restored"
        )
        assert re.fullmatch(
            r"rewritten by another program at \d\d:\d\d:\d\d, restored", g.guard.last_event()
        )
        assert g.events == 1
        assert g.path.stat().st_mode & 0o777 == 0o600

    guarded(scenario)


def test_a_removed_file_is_restored(guarded: Callable[[Scenario], None]) -> None:
    async def scenario(g: Guarded) -> None:
        g.path.unlink()
        await g.restored()
        assert g.warnings() == [f"{g.path} was removed by another program; restored"]
        assert g.guard.last_event().startswith("removed by another program at ")
        assert g.events == 1

    guarded(scenario)


def test_a_file_renamed_over_it_is_restored(guarded: Callable[[Scenario], None]) -> None:
    async def scenario(g: Guarded) -> None:
        other = g.path.parent / "theirs.tmp"
        other.write_text(format_env({**OURS, "NV_CXR_SERVER_PORT": "1"}))
        other.chmod(0o644)
        os.rename(other, g.path)
        await g.restored()
        (warning,) = g.warnings()
        assert "(NV_CXR_SERVER_PORT differed)" in warning
        assert g.path.stat().st_mode & 0o777 == 0o600

    guarded(scenario)


def test_its_own_writes_are_neither_warned_about_nor_restored(
    guarded: Callable[[Scenario], None],
) -> None:
    async def scenario(g: Guarded) -> None:
        new = {**OURS, "NV_DEVICE_PROFILE": "AppleVisionPro"}
        g.guard.publish(g.path, new)  # a restart with another profile
        inode = g.path.stat().st_ino
        await g.nothing_happens()
        assert g.holds(new) and g.path.stat().st_ino == inode and g.events == 0
        # Still guarding, and guarding the new content.
        isaacteleop_write(g.path, THEIRS)
        await g.log.until(lambda: g.holds(new))
        assert len(g.warnings()) == 1

    guarded(scenario)


def test_a_burst_of_foreign_writes_is_one_warning_and_ends_with_ours(
    guarded: Callable[[Scenario], None],
) -> None:
    async def scenario(g: Guarded) -> None:
        for n in range(20):
            isaacteleop_write(g.path, {**THEIRS, "N": str(n)})
            await asyncio.sleep(envguard.SETTLE / 4)  # the guard sees them, and acts, between
        await g.restored()
        assert len(g.warnings()) == 1, g.warnings()
        assert g.events == 1
        # The guard did act inside the burst (INFO lines), not only after it.
        assert g.log.at(logging.INFO), "the burst ended before the guard looked"

    guarded(scenario)


def test_stop_ends_the_watch(guarded: Callable[[Scenario], None]) -> None:
    async def scenario(g: Guarded) -> None:
        isaacteleop_write(g.path, THEIRS)
        await g.restored()  # it was guarding
        g.guard.stop()
        g.guard.stop()  # idempotent
        g.log.records.clear()
        isaacteleop_write(g.path, THEIRS)
        await g.nothing_happens()
        assert g.holds(THEIRS)

    guarded(scenario)


def test_a_run_dir_removed_is_an_error_then_restored_when_it_returns(
    guarded: Callable[[Scenario], None],
) -> None:
    async def scenario(g: Guarded) -> None:
        shutil.rmtree(g.path.parent)
        await g.log.until(lambda: bool(g.log.at(logging.ERROR)))
        assert "cannot restore it" in g.log.at(logging.ERROR)[0]
        assert "not restored" in g.guard.last_event()
        g.path.parent.mkdir(mode=0o700)
        await g.restored()
        assert g.guard.last_event().endswith(", restored")
        assert g.events == 2

    guarded(scenario)


def test_the_daemon_restores_what_isaacteleop_overwrites_and_status_says_so(
    ready_daemon: BusDaemon,
) -> None:
    env_file = ready_daemon.denv.run_dir / "cloudxr.env"
    ours = env_file.read_bytes()
    # isaacteleop's defaults, where cxrd's differ: its profile and its port.
    theirs = read_env_file(env_file)
    port = "49100" if theirs["NV_CXR_SERVER_PORT"] != "49100" else "49101"
    theirs.update(NV_DEVICE_PROFILE="auto-webrtc", NV_CXR_SERVER_PORT=port)
    started = time.monotonic()
    isaacteleop_write(env_file, theirs)
    wait_until(lambda: env_file.read_bytes() == ours, "cxrd to restore cloudxr.env", interval=0.001)
    took = time.monotonic() - started
    print(f"cloudxr.env restored {took * 1000:.1f} ms after the foreign write")

    def warnings() -> list[str]:
        log = ready_daemon.denv.daemon_log().splitlines()
        return [line for line in log if " WARNING " in line and str(env_file) in line]

    # Logged just after the restore.
    wait_until(warnings, "the daemon's warning")
    assert "(NV_CXR_SERVER_PORT, NV_DEVICE_PROFILE differed); restored" in warnings()[0]

    with CloudXRClient(ready_daemon.address) as client:
        wait_until(lambda: client.status().env_file_event, "Status() to show the event")
    shown = cxrctl(ready_daemon, "status")
    assert shown.returncode == 0, shown.stderr
    line = next(line for line in shown.stdout.splitlines() if "by another program" in line)
    assert re.search(r": rewritten by another program at \d\d:\d\d:\d\d, restored$", line)
    data = json.loads(cxrctl(ready_daemon, "status", "--json").stdout)
    assert data["env_file_event"].startswith("rewritten by another program at ")
    install = str(ready_daemon.denv.install_dir)
    doctor = cxrctl(ready_daemon, "doctor", "--install-dir", install).stdout.splitlines()
    (verdict,) = [line for line in doctor if line.split(":")[0].endswith(" env file")]
    assert verdict.startswith("warn") and "matches the daemon's environment" in verdict, doctor
    assert "rewritten by another program at " in verdict
    # cxrd's own rewrite (a restart with another profile) is no foreign change.
    with CloudXRClient(ready_daemon.address) as client:
        client.restart(timeout=TIMEOUT, device_profile="AppleVisionPro")
        assert read_env_file(env_file) == client.environment()
    assert read_env_file(env_file)["NV_DEVICE_PROFILE"] == "AppleVisionPro"
    time.sleep(QUIET_SPELL)  # a restore of its own write would be logged by now
    assert len(warnings()) == 1, warnings()


def cxrctl(daemon: BusDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cxrd.cli", *args],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=4 * TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
