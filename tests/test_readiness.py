"""Readiness: a real file, a real inotify watch."""

from __future__ import annotations

import asyncio
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
