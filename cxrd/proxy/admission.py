"""Who may hold a connection to the proxy, decided at ``accept()``, before any TLS byte. Pure.

What the proxy does with a peer it has just accepted, as the servers that
face the open internet do it:

- a peer outside ``proxy.allow`` is closed at once (HAProxy's ``tcp-request
  connection reject``): it never costs a TLS handshake;
- connections that are not yet a relay session (in their TLS handshake,
  their request head, or an HTTP answer) are bounded apart from the sessions
  (OpenSSH's ``MaxStartups``): at most ``max_pending``, each under a
  handshake and a head deadline (nginx's ``client_header_timeout``);
- one address holds at most ``max_per_address`` connections, sessions
  included (nginx's ``limit_conn`` per address);
- when the pending table is full, a newcomer takes the slot of the oldest
  connection still in its handshake or head from the address holding the
  most pending ones, if that address holds at least two more than the
  newcomer's, else (by the same rule) of its oldest answer: max-min
  fairness, so a flood from a few hosts, even of downloads they never read,
  cannot keep a headset out.

:class:`Admission` keeps the tables; :mod:`cxrd.proxy.acceptor` does the
accepting and closes what this module turns away or evicts.
"""

from __future__ import annotations

import collections
import enum
import ipaddress
import math
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

from cxrd.config_proxy import Network

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

REFUSAL_LOG_INTERVAL = 10.0  # seconds between two log lines about refusals of one kind


class Phase(enum.Enum):
    HANDSHAKE = "handshake"  # accepted; TLS handshake not done
    HEAD = "head"  # TLS done; the request head not whole yet
    ANSWER = "answer"  # an HTTP answer, or the backend leg being opened
    SESSION = "session"  # a relay session (counted by proxy.max_connections, not here)


EVICTABLE = frozenset({Phase.HANDSHAKE, Phase.HEAD})
ANSWERING = frozenset({Phase.ANSWER})  # evicted only when no half-open one may be


class Refusal(enum.Enum):
    NOT_ALLOWED = "not in proxy.allow"
    ADDRESS_FULL = "proxy.max_per_address reached for this address"
    PENDING_FULL = "proxy.max_pending reached"


def peer_address(peer: object) -> Address | None:
    """The IP of a socket address tuple; an IPv4-mapped IPv6 peer as its IPv4 address."""
    if not isinstance(peer, tuple) or not peer:
        return None
    try:
        ip = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def format_address(address: object) -> str:
    """A socket address as a log shows it: ``host:port``, ``[v6]:port``."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


@dataclass(eq=False)
class Ticket:
    """One admitted connection's place in the tables, until :meth:`release`."""

    ip: Address
    _admission: Admission
    phase: Phase = Phase.HANDSHAKE
    held: bool = True  # in the tables; False once released (or evicted)
    evicted: bool = False
    _abort: Callable[[], None] | None = field(default=None, repr=False)

    def bind(self, abort: Callable[[], None]) -> None:
        """How to drop this connection, once its transport exists (now, if already evicted)."""
        self._abort = abort
        if self.evicted:
            abort()

    def enter(self, phase: Phase) -> None:
        self._admission._move(self, phase)

    def release(self) -> None:
        """The connection is closed; idempotent."""
        self._admission._release(self)

    def _evict(self) -> None:
        self.evicted = True
        if self._abort is not None:
            self._abort()


class Admission:
    """The tables: pending connections in accept order, and every connection per address."""

    def __init__(self, allow: Iterable[Network], max_pending: int, max_per_address: int) -> None:
        self.allow = tuple(allow)
        self.max_pending = max_pending
        self.max_per_address = max_per_address
        self._pending: dict[Ticket, None] = {}  # insertion order: oldest first
        self._pending_of: collections.Counter[Address] = collections.Counter()
        self._all_of: collections.Counter[Address] = collections.Counter()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def allows(self, ip: Address) -> bool:
        return not self.allow or any(ip in network for network in self.allow)

    def admit(self, ip: Address) -> Ticket | Refusal:
        """A ticket for a connection just accepted from ``ip``, or why it must be closed."""
        if not self.allows(ip):
            return Refusal.NOT_ALLOWED
        if self._all_of[ip] >= self.max_per_address:
            return Refusal.ADDRESS_FULL
        if len(self._pending) >= self.max_pending:
            victim = self._victim(self._pending_of[ip])
            if victim is None:
                return Refusal.PENDING_FULL
            self._release(victim)
            victim._evict()
        ticket = Ticket(ip, self)
        self._pending[ticket] = None
        self._pending_of[ip] += 1
        self._all_of[ip] += 1
        return ticket

    def _victim(self, own: int) -> Ticket | None:
        """The oldest half-open ticket of the busiest address holding at least two more
        pending than the newcomer's (``own``; no churn between equal shares), else its
        oldest answer: a few hosts holding answers they never read must not keep a
        headset out either."""
        for phases in (EVICTABLE, ANSWERING):
            candidates = [
                t for t in self._pending if t.phase in phases and self._pending_of[t.ip] > own + 1
            ]
            if candidates:  # max() keeps the first, the oldest, of the busiest
                return max(candidates, key=lambda t: self._pending_of[t.ip])
        return None

    def _move(self, ticket: Ticket, phase: Phase) -> None:
        ticket.phase = phase
        if phase is Phase.SESSION and ticket in self._pending:
            self._unpend(ticket)

    def _release(self, ticket: Ticket) -> None:
        if not ticket.held:
            return
        ticket.held = False
        if ticket in self._pending:
            self._unpend(ticket)
        self._all_of[ticket.ip] -= 1
        if not self._all_of[ticket.ip]:
            del self._all_of[ticket.ip]

    def _unpend(self, ticket: Ticket) -> None:
        del self._pending[ticket]
        self._pending_of[ticket.ip] -= 1
        if not self._pending_of[ticket.ip]:
            del self._pending_of[ticket.ip]


class RefusalLog:
    """One log line per kind of refusal at most every ``interval`` seconds, with a count.

    A flood must not fill the log (nginx logs a limit once per event, not per
    connection; this keeps one line per kind and says how many it stands for).
    The proxy keeps one: its refusals at accept (each :class:`Refusal`) and of
    web pages by their ``Origin`` are kinds of it.
    """

    def __init__(
        self,
        interval: float = REFUSAL_LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval = interval
        self._clock = clock
        self._next: dict[Hashable, float] = {}
        self._held: collections.Counter[Hashable] = collections.Counter()

    def more(self, kind: Hashable) -> str | None:
        """None to hold back the line for this refusal now (it is counted into the next
        one); else how that line ends: ``""``, or how many it stands for."""
        now = self._clock()
        if now < self._next.get(kind, -math.inf):
            self._held[kind] += 1
            return None
        self._next[kind] = now + self._interval
        held = self._held.pop(kind, 0)
        return f" (and {held} more since the last such line)" if held else ""

    def line(self, why: Refusal, peer: str) -> str | None:
        """The line to log for this refusal at accept now, or None (see :meth:`more`)."""
        more = self.more(why)
        return None if more is None else f"client={peer} refused at accept: {why.value}{more}"
