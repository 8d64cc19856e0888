"""Readiness: a real file, a real inotify watch."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from support import TIMEOUT

from cxrd.system.readiness import wait_for_file


def test_returns_when_the_file_appears(tmp_path: Path) -> None:
    target = tmp_path / "runtime_started"

    async def go() -> bool:
        waiter = asyncio.ensure_future(wait_for_file(target))
        await asyncio.sleep(0.1)
        early = waiter.done()
        (tmp_path / "other").touch()
        await asyncio.sleep(0.05)
        other = waiter.done()
        target.touch()
        await asyncio.wait_for(waiter, TIMEOUT)
        return early or other

    assert asyncio.run(go()) is False, "it must not return before the file exists"


def test_returns_at_once_when_the_file_already_exists(tmp_path: Path) -> None:
    target = tmp_path / "runtime_started"
    target.touch()
    asyncio.run(asyncio.wait_for(wait_for_file(target), TIMEOUT))


def test_a_file_renamed_into_place_counts(tmp_path: Path) -> None:
    target = tmp_path / "runtime_started"

    async def go() -> None:
        waiter = asyncio.ensure_future(wait_for_file(target))
        await asyncio.sleep(0.05)
        (tmp_path / "tmp").touch()
        (tmp_path / "tmp").rename(target)
        await asyncio.wait_for(waiter, TIMEOUT)

    asyncio.run(go())


def test_a_missing_directory_is_an_error_not_a_hang(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        asyncio.run(asyncio.wait_for(wait_for_file(tmp_path / "no" / "file"), TIMEOUT))


def wait_after(target: Path, *steps: Callable[[], object]) -> None:
    """Start waiting for ``target``, then run each step with the loop running in between."""

    async def go() -> None:
        waiter = asyncio.ensure_future(wait_for_file(target))
        for step in steps:
            await asyncio.sleep(0.05)
            assert not waiter.done(), "it must not return before the file exists"
            step()
        await asyncio.wait_for(waiter, TIMEOUT)

    asyncio.run(go())


def test_a_directory_removed_then_made_again_is_watched_again(tmp_path: Path) -> None:
    run_dir = tmp_path / "install" / "run"
    run_dir.mkdir(parents=True)
    target = run_dir / "runtime_started"
    wait_after(
        target,
        run_dir.rmdir,
        (tmp_path / "install").rmdir,  # two levels gone: the watch climbs to tmp_path
        lambda: run_dir.mkdir(parents=True),
        target.touch,
    )


def test_a_directory_moved_away_and_replaced_is_watched_again(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    target = run_dir / "runtime_started"

    def replace() -> None:
        run_dir.rename(tmp_path / "run.old")
        run_dir.mkdir()

    wait_after(target, replace, target.touch)
    assert not (tmp_path / "run.old" / "runtime_started").exists()


def test_a_file_whose_event_is_lost_in_a_queue_overflow_is_still_seen(tmp_path: Path) -> None:
    queued = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if queued > 100_000:
        pytest.skip(f"max_queued_events is {queued}: too many files to make")
    target = tmp_path / "runtime_started"

    def flood_then_create() -> None:
        # The loop does not read while this runs: the queue overflows and the
        # target's own event is dropped; only IN_Q_OVERFLOW says something happened.
        for n in range(queued + 1):
            os.close(os.open(tmp_path / f"f{n}", os.O_CREAT | os.O_WRONLY, 0o600))
        target.touch()

    wait_after(target, flood_then_create)
