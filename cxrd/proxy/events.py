"""What the proxy tells the daemon on its ready pipe. Pure: no I/O.

The pipe carries ``READY`` once the proxy serves, then one JSON line per
headset session (a WebSocket relayed to the runtime's signaling) that opens
or closes. The daemon owns the pipe's read end, so nothing on the bus or in
the network can forge these lines.
"""

from __future__ import annotations

import json

from cxrd.core.model import Closed, Opened, SessionEvent
from cxrd.core.snapshot import Headset

READY_LINE = b"READY\n"
MAX_LINE = 4096  # a line longer than this is not ours
MAX_USER_AGENT = 256  # what a status line shows; a header may be far longer


def encode(event: SessionEvent) -> bytes:
    if isinstance(event, Opened):
        h = event.headset
        data: dict[str, object] = {
            "event": "open",
            "id": h.id,
            "address": h.address,
            "user_agent": h.user_agent[:MAX_USER_AGENT],
            "path": h.path[:MAX_USER_AGENT],
            "since": h.since,
        }
    else:
        data = {"event": "close", "id": event.id, "seconds": event.seconds, "code": event.code}
    return json.dumps(data, ensure_ascii=True).encode() + b"\n"


def decode(line: bytes) -> SessionEvent | None:
    """One line back into an event; None for anything that is not one."""
    try:
        data = json.loads(line)
        if data["event"] == "open":
            return Opened(
                Headset(
                    id=str(data["id"]),
                    address=str(data["address"]),
                    user_agent=str(data["user_agent"]),
                    path=str(data["path"]),
                    since=float(data["since"]),
                )
            )
        if data["event"] == "close":
            seconds, code = float(data["seconds"]), int(data["code"])
            return Closed(id=str(data["id"]), seconds=seconds, code=code)
    except (ValueError, KeyError, TypeError):
        pass
    return None
