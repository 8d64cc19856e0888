"""Whatever a port raised, as a named failure of what the core was doing. Pure.

A port may fail in any way: a full disk, a removed or read-only install dir,
a bug. The core names what it was doing (``cannot write .../cloudxr.env``)
and turns the exception into a :class:`~cxrd.errors.CxrdError`, so a failure
of the machine is one child's failed start, counted by the restart policy,
never an exception that leaves the supervisor half-way through a change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from cxrd.errors import CxrdError, StartFailed

log = logging.getLogger(__name__)

_T = TypeVar("_T")


def named_failure(doing: str, exc: BaseException) -> CxrdError:
    """``exc`` as a CxrdError saying ``doing`` ("cannot write /x/run/cloudxr.env") and why."""
    if isinstance(exc, CxrdError):
        return exc
    if isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror[:1].lower() + exc.strerror[1:]
        path = exc.filename
        if path is not None and str(path) not in doing:
            reason += f" ({path})"
        return StartFailed(f"{doing}: {reason}")
    log.error("%s: unexpected %s", doing, type(exc).__name__, exc_info=exc)
    return StartFailed(f"{doing}: {type(exc).__name__}: {exc}")


def attempt(doing: str, call: Callable[[], _T]) -> _T:
    """``call()``, or raise its exception as :func:`named_failure` names it."""
    try:
        return call()
    except Exception as exc:
        raise named_failure(doing, exc) from exc


def quietly(doing: str, call: Callable[[], _T], default: _T) -> _T:
    """``call()``, or ``default`` with a warning: for ports whose failure changes nothing."""
    try:
        return call()
    except Exception as exc:
        log.warning("%s", named_failure(doing, exc))
        return default
