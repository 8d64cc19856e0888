"""TCP listeners: bind one with an error a person can act on, and name who holds a port.

``port_holder`` reads ``/proc/net/tcp{,6}`` for the socket inode bound to the
port and then ``/proc/*/fd`` for the process owning that inode, so a taken
port is reported as "taken by pid 1234 (python3)" rather than EADDRINUSE.
Processes of other users cannot be inspected without privileges; then the
holder is simply unknown.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from cxrd.errors import StartFailed

LISTEN_BACKLOG = 128
_TCP_LISTEN = "0A"
_TCP_TIME_WAIT = "06"
_PROC = Path("/proc")


def bind_listener(host: str, port: int) -> socket.socket:
    """A bound, listening, non-inheritable TCP socket, or StartFailed naming the port."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        why = exc.strerror
        raise StartFailed(f"cannot listen on {host}:{port}: unknown address ({why})") from None
    family, kind, proto, _canon, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host in ("::", ""):
            # Dual stack: "::" also accepts IPv4 clients, like 0.0.0.0 does.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise _bind_error(host, port, exc) from None
    sock.set_inheritable(False)
    return sock


def _bind_error(host: str, port: int, exc: OSError) -> StartFailed:
    where = f"port {port} on {host or '*'}"
    if exc.errno == errno.EADDRINUSE:
        holder = port_holder(port)
        if holder is None:
            return StartFailed(f"{where} is taken (by a process cxrd cannot see)")
        pid, name = holder
        return StartFailed(f"{where} is taken by pid {pid} ({name})")
    if exc.errno == errno.EACCES:
        return StartFailed(
            f"{where}: permission denied (ports below 1024 need privileges; pick another port)"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return StartFailed(f"{where}: {host} is not an address of this machine")
    return StartFailed(f"{where}: cannot listen: {exc.strerror or exc}")


def port_holder(port: int) -> tuple[int, str] | None:
    """(pid, process name) of a process holding TCP ``port``, listeners first; None if unknown."""
    inodes = _socket_inodes(port)
    if not inodes:
        return None
    found: dict[str, int] = {}
    try:
        entries = list(_PROC.iterdir())
    except OSError:
        return None
    wanted = {f"socket:[{inode}]": rank for rank, inode in enumerate(inodes)}
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue  # gone, or not ours to read
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            rank = wanted.get(target)
            if rank is not None and (target not in found or int(entry.name) < found[target]):
                found[target] = int(entry.name)
    for target in sorted(found, key=lambda t: wanted[t]):
        pid = found[target]
        return pid, _process_name(pid)
    return None


def _socket_inodes(port: int) -> list[str]:
    """Inodes of TCP sockets whose local port is ``port``, listening ones first."""
    listening: list[str] = []
    others: list[str] = []
    for table in ("tcp", "tcp6"):
        try:
            lines = (_PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            local, state, inode = fields[1], fields[3], fields[9]
            if inode == "0" or state == _TCP_TIME_WAIT:
                continue
            try:
                local_port = int(local.rsplit(":", 1)[1], 16)
            except (IndexError, ValueError):
                continue
            if local_port != port:
                continue
            (listening if state == _TCP_LISTEN else others).append(inode)
    return listening + others


def _process_name(pid: int) -> str:
    try:
        return (_PROC / str(pid) / "comm").read_text().strip() or "?"
    except OSError:
        return "?"
