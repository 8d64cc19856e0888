"""Where the session bus is: shared by the daemon, the client and the CLI.

The order is the one libdbus and sd-bus use: ``$DBUS_SESSION_BUS_ADDRESS``,
then the per-user socket ``$XDG_RUNTIME_DIR/bus`` (``/run/user/<uid>/bus``
when the variable is unset), which is where systemd's user bus lives.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from cxrd.errors import NotRunning


def session_bus_address(env: Mapping[str, str] | None = None) -> str | None:
    """The session bus address, or None when this user has no session bus."""
    env = os.environ if env is None else env
    address = env.get("DBUS_SESSION_BUS_ADDRESS", "").strip()
    if address:
        return address
    runtime_dir = env.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    socket_path = Path(runtime_dir) / "bus"
    try:
        if stat.S_ISSOCK(socket_path.stat().st_mode):
            return f"unix:path={socket_path}"
    except OSError:
        pass
    return None


def require_session_bus(env: Mapping[str, str] | None = None) -> str:
    """Like :func:`session_bus_address`, but no bus at all is :class:`NotRunning`."""
    address = session_bus_address(env)
    if address is None:
        raise NotRunning(
            "there is no session bus (DBUS_SESSION_BUS_ADDRESS is unset and there is "
            "no $XDG_RUNTIME_DIR/bus), so cxrd cannot be reached"
        )
    return address
