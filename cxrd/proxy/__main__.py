"""``python -m cxrd.proxy``: the WSS proxy as a child of cxrd (or on its own).

Under cxrd it inherits a listening socket (``--listen-fd``) that the daemon
keeps for its whole life, so clients queue in the kernel while the proxy
restarts; it tells the daemon it serves by writing ``READY`` to
``--ready-fd``, then goes on writing there one line per headset session that
opens or closes (:mod:`cxrd.proxy.events`). It dies with its parent
(parent-death signal), and on SIGTERM closes every client with 1001 and
exits 0. It never imports the supervisor.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import socket
import ssl
import sys
from pathlib import Path

from cxrd import constants as C
from cxrd.config import LogsConfig
from cxrd.config_proxy import Network, allow_network, origin_entry
from cxrd.core.model import SessionEvent
from cxrd.errors import CxrdError, StartFailed
from cxrd.proxy.acceptor import raise_fd_limit
from cxrd.proxy.events import READY_LINE, encode
from cxrd.proxy.server import ProxyOptions, ProxyServer, server_tls_context
from cxrd.system.listeners import bind_listener
from cxrd.system.logfiles import rotating_handler

PR_SET_PDEATHSIG = 1

log = logging.getLogger("cxrd.proxy")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = ProxyOptions()
    parser = argparse.ArgumentParser(
        prog="python -m cxrd.proxy",
        description="TLS WebSocket proxy in front of the CloudXR runtime's signaling port.",
    )
    listen = parser.add_mutually_exclusive_group(required=True)
    listen.add_argument("--listen-fd", type=int, help="inherited, already listening TCP socket")
    listen.add_argument("--port", type=int, help="port to bind (with --host)")
    parser.add_argument("--host", default="0.0.0.0", help="address to bind with --port")
    parser.add_argument("--backend-host", default=defaults.backend_host)
    parser.add_argument("--backend-port", type=int, default=C.DEFAULT_BACKEND_PORT)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--log", type=Path, help="connection log, appended (default: stderr)")
    limits = LogsConfig()
    parser.add_argument(
        "--log-max-bytes",
        type=_positive_int,
        default=limits.max_bytes,
        help="rotate --log before it passes this size",
    )
    parser.add_argument(
        "--log-keep", type=_positive_int, default=limits.keep, help="rotated logs kept"
    )
    parser.add_argument(
        "--ready-fd", type=int, help="write READY here once serving, then session events"
    )
    parser.add_argument("--parent-pid", type=int, help="exit at once if the parent is not this pid")
    parser.add_argument("--max-message-size", type=_positive_int, default=defaults.max_message_size)
    parser.add_argument("--max-connections", type=_positive_int, default=defaults.max_connections)
    parser.add_argument(
        "--max-pending",
        type=_positive_int,
        default=defaults.max_pending,
        help="connections in their TLS handshake, request head or an HTTP answer",
    )
    parser.add_argument(
        "--max-per-address",
        type=_positive_int,
        default=defaults.max_per_address,
        help="connections from one address, sessions included",
    )
    parser.add_argument(
        "--handshake-timeout", type=_positive_float, default=defaults.handshake_timeout
    )
    parser.add_argument("--head-timeout", type=_positive_float, default=defaults.head_timeout)
    parser.add_argument(
        "--send-timeout",
        type=_positive_float,
        default=defaults.send_timeout,
        help="drop a client that takes none of an answer for this many seconds",
    )
    parser.add_argument("--ping-interval", type=_positive_float, default=defaults.ping_interval)
    parser.add_argument("--ping-timeout", type=_positive_float, default=defaults.ping_timeout)
    parser.add_argument("--client-dir", type=Path, help="serve the web client from here")
    parser.add_argument(
        "--origin",
        action="append",
        default=[],
        type=_origin,
        help="a web page origin that may connect besides the proxy's own pages and "
        "https://nvidia.github.io (repeatable; * for any)",
    )
    parser.add_argument(
        "--allow",
        action="append",
        default=[],
        type=_network,
        help="an address or CIDR network that may connect (repeatable; default: everyone)",
    )
    return parser.parse_args(argv)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def _network(text: str) -> Network:
    try:
        return allow_network(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _origin(text: str) -> str:
    try:
        return origin_entry(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def die_with_parent(expected_parent: int | None, *, supervised: bool) -> None:
    """SIGTERM when the parent dies; exit now if it already has.

    The parent-death signal is lost if the parent died before it was set, so
    a supervised proxy also checks its parent: ``expected_parent`` when given
    (cxrd passes its pid, which may be 1 in a container), else "not init".
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("cannot set the parent-death signal: %s", os.strerror(ctypes.get_errno()))
    parent = os.getppid()
    if expected_parent is not None:
        orphaned = parent != expected_parent
    else:
        orphaned = supervised and parent == 1
    if orphaned:
        log.error("parent process is gone; exiting")
        sys.exit(1)


def setup_logging(path: Path | None, limits: LogsConfig) -> None:
    handler: logging.Handler = (
        logging.StreamHandler(sys.stderr) if path is None else rotating_handler(path, limits)
    )
    if os.environ.get("JOURNAL_STREAM") and path is None:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("websockets").setLevel(logging.WARNING)


def inherited_listener(fd: int) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise StartFailed(f"--listen-fd {fd}: not a socket: {exc.strerror or exc}") from None
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.type != socket.SOCK_STREAM or not listening:
        sock.detach()
        raise StartFailed(f"--listen-fd {fd}: not a listening TCP socket")
    return sock


class Reporter:
    """The ready pipe's writing end: READY once, then one line per session event.

    Never blocks the loop: a line the pipe cannot take now is dropped with a
    warning (the daemon reads as they come; a full pipe means it is stuck).
    """

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        if fd is not None:
            os.set_blocking(fd, False)

    def ready(self) -> None:
        self._write(READY_LINE)

    def event(self, event: SessionEvent) -> None:
        self._write(encode(event))

    def _write(self, line: bytes) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, line)
        except BlockingIOError:
            log.warning("the daemon is not reading session events; one was dropped")
        except OSError:  # the daemon closed its end: it is going away
            os.close(self.fd)
            self.fd = None


async def run(args: argparse.Namespace, sock: socket.socket, tls: ssl.SSLContext) -> None:
    options = ProxyOptions(
        backend_host=args.backend_host,
        backend_port=args.backend_port,
        max_message_size=args.max_message_size,
        max_connections=args.max_connections,
        max_pending=args.max_pending,
        max_per_address=args.max_per_address,
        handshake_timeout=args.handshake_timeout,
        head_timeout=args.head_timeout,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        client_dir=args.client_dir,
        send_timeout=args.send_timeout,
        origins=tuple(args.origin),
        allow=tuple(args.allow),
    )
    reporter = Reporter(args.ready_fd)
    server = ProxyServer(sock, tls, options, reporter.event)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, server.close)
    await server.serve(on_listening=reporter.ready)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        setup_logging(args.log, LogsConfig(max_bytes=args.log_max_bytes, keep=args.log_keep))
    except CxrdError as exc:  # wss.log is a link or another user's file
        print(f"cxrd.proxy: {exc}", file=sys.stderr)
        return exc.exit_code
    die_with_parent(args.parent_pid, supervised=args.listen_fd is not None)
    try:
        try:
            tls = server_tls_context(args.cert, args.key)
        except (OSError, ssl.SSLError) as exc:
            raise StartFailed(f"{args.cert}, {args.key}: cannot load the TLS pair: {exc}") from None
        raise_fd_limit(args.max_pending, args.max_connections)
        if args.listen_fd is not None:
            sock = inherited_listener(args.listen_fd)
        else:
            sock = bind_listener(args.host, args.port)
    except CxrdError as exc:
        log.error("%s", exc)
        if args.log is not None:  # the supervisor shows the child's stderr when a start fails
            print(f"cxrd.proxy: {exc}", file=sys.stderr)
        return exc.exit_code
    asyncio.run(run(args, sock, tls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
