"""The simulator's knobs: ``CXRD_SIM_*`` environment variables, parsed. Pure: no I/O.

The daemon (``cxrd.runtimes.sim``) writes these into the sim's environment and
the sim (``python -m cxrd.sim``) reads them back with :func:`parse_faults`, so
both sides share one spelling and one parser; a value the sim would reject is
rejected by the daemon before it spawns anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, TypeVar

from cxrd.constants import DEFAULT_BACKEND_PORT, SERVER_PORT_ENV

_T = TypeVar("_T")

PREFIX: Final = "CXRD_SIM_"
STARTUP_DELAY: Final = "CXRD_SIM_STARTUP_DELAY"
EXIT_BEFORE_READY: Final = "CXRD_SIM_EXIT_BEFORE_READY"
NEVER_READY: Final = "CXRD_SIM_NEVER_READY"
CRASH_AFTER: Final = "CXRD_SIM_CRASH_AFTER"
IGNORE_SIGTERM: Final = "CXRD_SIM_IGNORE_SIGTERM"
SPAWN_GRANDCHILD: Final = "CXRD_SIM_SPAWN_GRANDCHILD"
ORPHAN_GRANDCHILD: Final = "CXRD_SIM_ORPHAN_GRANDCHILD"
FLOOD_STDERR: Final = "CXRD_SIM_FLOOD_STDERR"
SIGNALING_PORT: Final = SERVER_PORT_ENV  # the runtime's own variable, as cxrd sets it
SIGNALING_HOST: Final = "CXRD_SIM_SIGNALING_HOST"

#: Every variable the sim reads; anything else with the prefix is a typo.
KNOWN: Final = frozenset(
    {
        STARTUP_DELAY,
        EXIT_BEFORE_READY,
        NEVER_READY,
        CRASH_AFTER,
        IGNORE_SIGTERM,
        SPAWN_GRANDCHILD,
        ORPHAN_GRANDCHILD,
        FLOOD_STDERR,
        SIGNALING_PORT,
        SIGNALING_HOST,
    }
)

#: File in the run dir holding the pid of the grandchild ``SPAWN_GRANDCHILD`` starts.
GRANDCHILD_PID_FILE: Final = "sim_grandchild.pid"
#: File in the run dir holding the pid of the orphan ``ORPHAN_GRANDCHILD`` leaves.
ORPHAN_PID_FILE: Final = "sim_orphan.pid"
#: How long that orphan lives after its parent has exited: it dies re-parented.
ORPHAN_LIFETIME: Final = 0.2

DEFAULT_STARTUP_DELAY: Final = 0.0
DEFAULT_SIGNALING_HOST: Final = "127.0.0.1"
DEFAULT_SIGNALING_PORT: Final = DEFAULT_BACKEND_PORT

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


@dataclass(frozen=True)
class Faults:
    """What the sim does besides behaving; the defaults behave perfectly."""

    startup_delay: float = DEFAULT_STARTUP_DELAY
    exit_before_ready: int | None = None
    never_ready: bool = False
    crash_after: float | None = None
    ignore_sigterm: bool = False
    spawn_grandchild: bool = False
    orphan_grandchild: bool = False
    flood_stderr: int = 0
    signaling_host: str = DEFAULT_SIGNALING_HOST
    signaling_port: int = DEFAULT_SIGNALING_PORT

    def describe(self) -> str:
        """One line naming the faults that are on, for the sim's log."""
        on = []
        if self.startup_delay:
            on.append(f"startup_delay={self.startup_delay:g}s")
        if self.exit_before_ready is not None:
            on.append(f"exit_before_ready={self.exit_before_ready}")
        if self.never_ready:
            on.append("never_ready")
        if self.crash_after is not None:
            on.append(f"crash_after={self.crash_after:g}s")
        if self.ignore_sigterm:
            on.append("ignore_sigterm")
        if self.spawn_grandchild:
            on.append("spawn_grandchild")
        if self.orphan_grandchild:
            on.append("orphan_grandchild")
        if self.flood_stderr:
            on.append(f"flood_stderr={self.flood_stderr}B")
        return ", ".join(on) if on else "none"


def parse_faults(env: Mapping[str, str]) -> Faults:
    """Read the ``CXRD_SIM_*`` variables of ``env``.

    Raises :class:`ValueError` naming the variable for a value the sim cannot
    use, or for an unknown ``CXRD_SIM_`` name (a typo would otherwise silently
    turn a fault off).
    """
    for name in env:
        if name.startswith(PREFIX) and name not in KNOWN:
            known = ", ".join(sorted(KNOWN))
            raise ValueError(f"{name}: unknown simulator variable (known: {known})")
    exit_code = _optional(env, EXIT_BEFORE_READY, _exit_code)
    crash_after = _optional(env, CRASH_AFTER, _positive_seconds)
    return Faults(
        startup_delay=_optional(env, STARTUP_DELAY, _seconds) or DEFAULT_STARTUP_DELAY,
        exit_before_ready=exit_code,
        never_ready=_flag(env, NEVER_READY),
        crash_after=crash_after,
        ignore_sigterm=_flag(env, IGNORE_SIGTERM),
        spawn_grandchild=_flag(env, SPAWN_GRANDCHILD),
        orphan_grandchild=_flag(env, ORPHAN_GRANDCHILD),
        flood_stderr=_optional(env, FLOOD_STDERR, _byte_count) or 0,
        signaling_host=env.get(SIGNALING_HOST) or DEFAULT_SIGNALING_HOST,
        signaling_port=_optional(env, SIGNALING_PORT, _port) or DEFAULT_SIGNALING_PORT,
    )


def _optional(env: Mapping[str, str], name: str, convert: Callable[[str], _T]) -> _T | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        return convert(raw)
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r}: {exc}") from None


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"{name}={env[name]!r}: expected 1/0, true/false, yes/no or on/off")


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("expected a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError("expected a number of seconds, 0 or more")
    return value


def _positive_seconds(raw: str) -> float:
    value = _seconds(raw)
    if value == 0:
        raise ValueError("expected a number of seconds greater than 0")
    return value


def _exit_code(raw: str) -> int:
    value = _int(raw)
    if not 0 <= value <= 255:
        raise ValueError("expected an exit code from 0 to 255")
    return value


def _byte_count(raw: str) -> int:
    value = _int(raw)
    if value < 0:
        raise ValueError("expected a number of bytes, 0 or more")
    return value


def _port(raw: str) -> int:
    value = _int(raw)
    if not 0 < value < 65536:
        raise ValueError("expected a TCP port from 1 to 65535")
    return value


def _int(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError("expected a whole number") from None
