"""sd_notify through NOTIFY_SOCKET: the one home of that socket. A no-op without it."""

from __future__ import annotations

import logging
import os

import sdnotify

log = logging.getLogger(__name__)


class SdNotifier:
    """Sends sd_notify lines; silent when the daemon is not run by a service manager."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None

    def notify(self, *lines: str) -> None:
        if self._notifier is None:
            return
        # sdnotify encodes Latin-1 and drops what it cannot encode; systemd wants
        # UTF-8. Plain ASCII is safe for both.
        text = "\n".join(lines).encode("ascii", "replace").decode("ascii")
        self._notifier.notify(text)

    def watchdog_interval(self) -> float | None:
        """Half the watchdog period systemd asked for, or None when it asked for none."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2e6
