"""Restart policy: exponential backoff and the crash window. Pure: time is passed in."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class RestartPolicy:
    """Counts crashes in a sliding window; says how long to wait, or to give up.

    More than ``max_restarts`` crashes within ``window`` seconds means give up,
    so a broken GPU or driver ends in ``failed`` instead of a restart loop.
    """

    max_restarts: int
    window: float
    backoff_initial: float
    backoff_max: float
    backoff_factor: float = 2.0
    _crashes: deque[float] = field(default_factory=deque, init=False, repr=False)

    def record_crash(self, now: float) -> float | None:
        """Record a crash at ``now``; return the delay before restarting, or None to give up."""
        self._crashes.append(now)
        while self._crashes and self._crashes[0] < now - self.window:
            self._crashes.popleft()
        if len(self._crashes) > self.max_restarts:
            return None
        attempt = len(self._crashes) - 1
        return float(min(self.backoff_max, self.backoff_initial * self.backoff_factor**attempt))

    @property
    def recent_crashes(self) -> int:
        return len(self._crashes)

    def reconfigure(self, max_restarts: int, window: float, initial: float, maximum: float) -> None:
        """New limits from a reload; the crashes already counted stay counted."""
        self.max_restarts = max_restarts
        self.window = window
        self.backoff_initial = initial
        self.backoff_max = maximum
