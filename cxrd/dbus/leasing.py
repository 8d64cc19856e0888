"""A lease as clients hold it, and what its block does around it (asyncio and blocking)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from cxrd.core.snapshot import Snapshot
from cxrd.errors import NotRunning

_log = logging.getLogger("cxrd.dbus.client")


@dataclass(frozen=True)
class Held:
    """A lease and the daemon (its unique bus name) that holds it."""

    id: str
    owner: str
    snapshot: Snapshot | None  # the runtime once ready; None before


@dataclass(frozen=True)
class LeaseInfo:
    """What ``lease()`` yields: the lease and the runtime it holds."""

    id: str
    snapshot: Snapshot

    @property
    def environment(self) -> Mapping[str, str]:
        return self.snapshot.environment


@contextlib.contextmanager
def environment_applied(env: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``env`` on top for the block, as it was after it."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def release_failure_logged(lease_id: str) -> Iterator[None]:
    """Wrap the Release that ends a lease whose block raised: log a failure, never raise it.

    The block's error is the one the caller must see. After a Busy retry the
    lease was the old daemon's, and the fresh one answers NoSuchLease.
    """
    try:
        yield
    except NotRunning:
        pass  # the daemon is gone, and the lease with it
    except Exception as err:
        _log.warning("could not release lease %s: %s", lease_id, err)
