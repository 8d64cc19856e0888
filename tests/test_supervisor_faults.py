"""A port that fails in any way: a named failure of one child, never a wedge.

The host's ports raise what a full disk, a removed or read-only install dir or
a bug would; the supervisor runs its real code through the fakes.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from fakes import BACKOFF, STOP_TIMEOUT, Harness, base_config

from cxrd.core.states import ChildState, State
from cxrd.errors import GaveUp, StartFailed


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(base_config(tmp_path))
    yield harness
    harness.close()


def no_space(path: str = "/somewhere/.cloudxr.env.tmp") -> partial[OSError]:
    return partial(OSError, errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def test_a_full_disk_at_the_first_start_fails_naming_the_file_and_the_errno(h: Harness) -> None:
    h.world.broken["publish_environment"] = no_space()
    start = h.call(h.sup.launch)
    assert h.run(h.sup.wait_stopped()) == StartFailed.exit_code
    env_file = h.config.run_dir / "cloudxr.env"
    expected = f"cannot write {env_file}: no space left on device"
    assert isinstance(start.exception(), StartFailed)
    assert expected in str(start.exception())
    assert h.sup.state is State.FAILED and expected in h.sup.snapshot().last_error
    assert h.world.spawned == [] or h.world.latest("runtime") is None
    assert h.world.live == []
    assert not any(line == "READY=1" for line in h.world.notified)


def test_a_full_disk_during_a_restart_is_a_crash_and_the_restart_succeeds_once_it_clears(
    h: Harness,
) -> None:
    h.bring_up()
    h.world.broken["publish_environment"] = no_space()
    h.crash("runtime")
    h.settle(BACKOFF * 4)
    rt = h.sup._runtime
    assert rt.state is ChildState.BACKOFF and h.sup.state is State.RESTARTING
    assert rt.policy.recent_crashes >= 2, "the failed start counted as a crash"
    assert "no space left on device" in h.sup.snapshot().last_error
    del h.world.broken["publish_environment"]
    h.settle(BACKOFF * 8)
    assert h.ready("runtime")
    assert h.sup.state is State.READY
    assert h.stop_and_wait() == 0


def test_a_disk_that_stays_full_ends_in_give_up(h: Harness) -> None:
    h.bring_up()
    h.world.broken["claim_run_dir"] = partial(
        OSError, errno.EROFS, os.strerror(errno.EROFS), str(h.config.run_dir)
    )
    h.crash("runtime")
    h.settle(BACKOFF * 2**5)
    assert h.run(h.sup.wait_stopped()) == GaveUp.exit_code
    assert "read-only file system" in h.sup.snapshot().last_error
    assert h.world.live == []


def test_a_bug_in_a_port_is_a_failed_start_not_an_internal_error(h: Harness) -> None:
    h.world.broken["spawn"] = partial(RuntimeError, "a bug in the launcher")
    h.call(h.sup.launch)
    assert h.run(h.sup.wait_stopped()) == StartFailed.exit_code
    text = h.sup.snapshot().last_error
    assert "cannot start the runtime: RuntimeError: a bug in the launcher" in text
    assert "internal error" not in text


def test_a_failed_daemon_honours_a_stop_and_exits_in_time_even_if_a_stop_fails(
    h: Harness,
) -> None:
    h.bring_up()
    # Nothing can be stopped any more (the launcher's kill fails), then the daemon fails.
    h.world.broken["stop"] = partial(OSError, errno.EPERM, os.strerror(errno.EPERM))
    h.world.broken["record_failure"] = no_space()
    h.sup.fail(StartFailed("the bus name is taken"))
    h.settle()
    assert h.sup.state is State.FAILED
    began = time.monotonic()
    h.sup.request_stop("SIGTERM received")
    code = h.run(h.sup.wait_stopped(), timeout=STOP_TIMEOUT + 2)
    took = time.monotonic() - began
    assert code == StartFailed.exit_code
    assert took < STOP_TIMEOUT + 1 + 0.2, took
