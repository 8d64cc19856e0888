"""The simulator's WebSocket signaling endpoint (the real runtime listens on 49100).

Protocol, so tests of the WSS proxy can see what reached the backend:

* On open the server sends one JSON text message, the hello::

    {"type": "hello", "server": "cxrd-sim", "simulated": true, "path": "/x?y",
     "subprotocol": "p1" | null, "device_profile": "Quest3",
     "headers": [["Host", "..."], ...],
     "runtime_env": {"NV_CXR_SERVER_PORT": "49100", ...}}

  ``runtime_env`` holds the ports, GPU index and install dir the sim was
  given, so a client can tell which runtime (which instance) it reached.

* Every later text or binary message is echoed back unchanged, except
* a text message ``close:<code>:<reason>`` (``close`` alone means 1000), which
  makes the server close the connection with that code and reason. An invalid
  code is answered with a text message starting ``error:``.

The first subprotocol the client offers is accepted; responses carry
``Server: cxrd-sim``. Imported only once the sim runs, so it may pull in
``websockets``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

SERVER_HEADER = "cxrd-sim"
CLOSE_COMMAND = "close"
# Messages the proxy forwards may be large; the sim must not be the limit tested.
_MAX_MESSAGE = 256 * 1024 * 1024


def _first_offered(
    connection: ServerConnection, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    return offered[0] if offered else None


def _parse_close(message: str) -> tuple[int, str] | None:
    """``close:4001:why`` -> (4001, "why"); None when it is not a close command."""
    command, _, rest = message.partition(":")
    if command != CLOSE_COMMAND:
        return None
    code_text, _, reason = rest.partition(":")
    return (int(code_text) if code_text else 1000), reason


async def _handle(
    connection: ServerConnection,
    device_profile: str,
    runtime_env: Mapping[str, str],
    note: Callable[[str], None],
) -> None:
    request = connection.request
    path = request.path if request is not None else ""
    headers = [[k, v] for k, v in request.headers.raw_items()] if request is not None else []
    note(f"signaling: client connected, path {path!r}, subprotocol {connection.subprotocol!r}")
    hello = {
        "type": "hello",
        "server": SERVER_HEADER,
        "simulated": True,
        "path": path,
        "subprotocol": connection.subprotocol,
        "device_profile": device_profile,
        "headers": headers,
        "runtime_env": dict(runtime_env),
    }
    try:
        await connection.send(json.dumps(hello))
        async for message in connection:
            command = None
            if isinstance(message, str):
                try:
                    command = _parse_close(message)
                except ValueError:
                    await connection.send(f"error: bad close code in {message!r}")
                    continue
            if command is None:
                await connection.send(message)
                continue
            code, reason = command
            try:
                await connection.close(code, reason)
            except ValueError as exc:  # websockets rejects codes a peer may not send
                await connection.send(f"error: {exc}")
                continue
            note(f"signaling: closed a connection with code {code} as asked")
            return
    except ConnectionClosed:
        pass
    note(f"signaling: client on {path!r} went away (code {connection.close_code})")


async def start_signaling(
    host: str,
    port: int,
    device_profile: str,
    runtime_env: Mapping[str, str],
    note: Callable[[str], None],
) -> Server:
    """Listen on ``host:port``; raises :class:`OSError` when the port is taken."""

    async def handler(connection: ServerConnection) -> None:
        await _handle(connection, device_profile, runtime_env, note)

    return await serve(
        handler,
        host,
        port,
        select_subprotocol=_first_offered,
        server_header=SERVER_HEADER,
        compression=None,
        max_size=_MAX_MESSAGE,
        close_timeout=1.0,
        logger=logging.getLogger("cxrd.sim.signaling"),
    )
