"""The relay of one WebSocket connection after both handshakes: a frame-aware splice.

Neither leg negotiates an extension, so frames can pass unchanged: a client's
masked frame is valid toward the backend, the backend's unmasked frame is
valid toward the client. Each direction (:class:`Half`) forwards every chunk
it reads with one ``write`` and only reads frame headers, to know where frames
end (the proxy may insert a frame only there), to bound message sizes, to
check masking and to see close frames. Close frames pass through, so close
codes and reasons reach the other side unchanged. The proxy writes frames of
its own only to ping the client, to answer the client's pings (they never
reach the runtime: a client cannot make the proxy feed it a ping flood, and
pongs go back at most one per :data:`PONG_INTERVAL`, to the latest ping, as
RFC 6455 §5.5.3 allows) and to close a side (backend gone, oversize message,
shutdown).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from cxrd.proxy import frames as F

log = logging.getLogger("cxrd.proxy")

PONG_INTERVAL = 0.1  # at most ten pongs a second to one client
PONG_BUFFER_LIMIT = 64 * 1024  # a client this far behind in reading gets no pong now


class Half(asyncio.Protocol):
    """One direction; the protocol of its source transport, writing to ``out``."""

    __slots__ = (
        "_capture",
        "_capture_key",
        "close_code",
        "close_forwarded",
        "close_reason",
        "forward",
        "from_client",
        "head",
        "max_size",
        "msg_len",
        "nbytes",
        "out",
        "pending",
        "remaining",
        "session",
        "src",
        "stop_after_pending",
        "swallow",
    )

    def __init__(
        self,
        session: Session,
        src: asyncio.BaseTransport | None,
        out: asyncio.Transport | None,
        *,
        from_client: bool,
        max_size: int | None,
    ) -> None:
        self.session = session
        self.src = src
        self.out = out
        self.forward = out is not None
        self.from_client = from_client  # client frames are masked, backend frames are not
        self.max_size = max_size
        self.remaining = 0  # payload bytes of the current frame still to pass
        self.head = b""  # start of a frame header split across reads, not yet written
        self.msg_len = 0
        self.nbytes = 0
        self.pending: list[bytes] = []  # proxy frames waiting for a frame boundary
        self.stop_after_pending = False
        self.close_code: int | None = None
        self.close_reason = ""
        self.close_forwarded = False
        self._capture: bytearray | None = None
        self._capture_key = b""
        self.swallow = False  # the captured frame (a client's ping) is not forwarded

    # asyncio.Protocol ------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.nbytes += len(data)
        if self.head:
            data = self.head + data
            self.head = b""
        rem = self.remaining
        if rem >= len(data) and self._capture is None:
            # Inside one frame's payload: the common case for large messages.
            self.remaining = rem - len(data)
            if self.forward:
                self.out.write(data)  # type: ignore[union-attr]
            if not self.remaining and self.pending and self.out is not None:
                self._flush_pending()
            return
        self._scan(data)

    def eof_received(self) -> bool | None:
        return None  # let the transport close; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.lost(self, exc)

    def pause_writing(self) -> None:
        # Our source's send buffer is full of what the other direction wrote:
        # stop reading that other direction's source until it drains.
        if self.out is not None:
            self.out.pause_reading()

    def resume_writing(self) -> None:
        if self.out is not None and not self.out.is_closing():
            self.out.resume_reading()

    # Proxy-originated frames ----------------------------------------------

    @property
    def at_boundary(self) -> bool:
        return self.remaining == 0

    def inject(self, frame: bytes, *, then_stop: bool = False) -> None:
        """Write a frame of the proxy's own at the next frame boundary of this direction.

        With ``then_stop``, nothing more is forwarded after it (a close frame).
        """
        if self.out is None or self.stop_after_pending:
            return  # destination gone, or a close is already on its way: nothing may follow
        self.pending.append(frame)
        self.stop_after_pending = self.stop_after_pending or then_stop
        if self.remaining == 0:
            self._flush_pending()

    def detach(self) -> None:
        """The destination is gone: write nothing more."""
        self.out = None
        self.forward = False
        self.pending.clear()

    def _flush_pending(self) -> None:
        out = self.out
        assert out is not None
        for frame in self.pending:
            out.write(frame)
        self.pending.clear()
        if self.stop_after_pending:
            self.forward = False

    # Scanning ---------------------------------------------------------------

    def _scan(self, data: bytes) -> None:
        n = len(data)
        pos = 0  # next byte to look at
        start = 0  # first byte not written yet
        rem = self.remaining
        while True:
            if rem:
                if pos + rem > n:
                    if self._capture is not None:
                        self._capture += data[pos:]
                    if self.swallow:
                        start = n
                    rem -= n - pos
                    pos = n
                    break
                if self._capture is not None:
                    self._capture += data[pos : pos + rem]
                pos += rem
                rem = 0
                start = self._frame_end(data, start, pos)
            if pos >= n:
                break
            avail = n - pos
            if avail < 2:
                self.head = data[pos:]
                n = pos
                break
            b0 = data[pos]
            b1 = data[pos + 1]
            length = b1 & 0x7F
            hlen = 2
            if length == 126:
                hlen = 4
                if avail >= 4:
                    length = int.from_bytes(data[pos + 2 : pos + 4], "big")
            elif length == 127:
                hlen = 10
                if avail >= 10:
                    length = int.from_bytes(data[pos + 2 : pos + 10], "big")
            masked = b1 & 0x80
            if masked:
                hlen += 4
            if avail < hlen:
                self.head = data[pos:]
                n = pos
                break
            opcode = b0 & 0x0F
            problem = ""
            if bool(masked) != self.from_client:
                problem = "unmasked client frame" if self.from_client else "masked backend frame"
            elif b0 & 0x70:
                problem = "reserved bits set (no extension was negotiated)"
            elif opcode <= F.OP_BINARY:
                if self.max_size is not None and self.forward:
                    self.msg_len = self.msg_len + length if opcode == F.OP_CONTINUATION else length
                    if self.msg_len > self.max_size:
                        start = self._stop(data, start, pos)
                        self.remaining = 0
                        self.session.oversize(self, self.msg_len)
            elif F.OP_CLOSE <= opcode <= F.OP_PONG:
                if length > F.MAX_CONTROL_PAYLOAD or not b0 & 0x80:
                    problem = "fragmented or oversized control frame"
                elif opcode == F.OP_CLOSE or (opcode == F.OP_PING and self.from_client):
                    if opcode == F.OP_PING:
                        start = self._stop(data, start, pos)
                        self.swallow = True
                    self._capture = bytearray()
                    self._capture_key = data[pos + hlen - 4 : pos + hlen] if masked else b""
            else:
                problem = f"reserved opcode {opcode:#x}"
            if problem:
                self._stop(data, start, pos)
                self.remaining = 0
                self.session.protocol_error(self, problem)
                return
            pos += hlen
            rem = length
            if not rem:
                start = self._frame_end(data, start, pos)
        self.remaining = rem
        if self.forward and start < n:
            self.out.write(data[start:n] if start or n < len(data) else data)  # type: ignore[union-attr]
        if not rem and self.pending and self.out is not None:
            self._flush_pending()

    def _stop(self, data: bytes, start: int, pos: int) -> int:
        """Write what precedes ``pos``; the frame starting there will not pass."""
        if self.forward and start < pos:
            self.out.write(data[start:pos])  # type: ignore[union-attr]
        return pos

    def _frame_end(self, data: bytes, start: int, pos: int) -> int:
        """A frame ended at ``pos``; returns the new first unwritten byte."""
        capture = self._capture
        if capture is None and not self.pending:
            return start
        if self.forward and start < pos and not self.swallow:
            self.out.write(data[start:pos])  # type: ignore[union-attr]
        start = pos
        if capture is not None:
            self._capture = None
            payload = bytes(capture)
            if self._capture_key:
                payload = F.apply_mask(payload, self._capture_key)
            if self.swallow:
                self.swallow = False
                self.session.client_ping(payload)
            elif self.close_code is None:
                self.close_code, self.close_reason = F.parse_close(payload)
                self.close_forwarded = self.forward
                self.session.close_seen(self)
        if self.pending and self.out is not None:
            self._flush_pending()
        return start


class Session:
    """One client's relayed connection: both halves, closing, keepalive, the log line."""

    def __init__(
        self,
        *,
        client: asyncio.Transport,
        peer: str,
        path: str,
        max_size: int | None,
        close_timeout: float,
        on_done: Callable[[Session], None],
    ) -> None:
        self.client = client
        self.backend: asyncio.Transport | None = None
        self.peer = peer
        self.path = path
        self.started = time.monotonic()
        self.close_timeout = close_timeout
        self.on_done = on_done
        self.code: int | None = None  # the close code the log reports
        self.reason = ""
        self.error = ""
        self.client_open = True
        self.backend_open = False
        self.done = False
        self.c2b = Half(self, client, None, from_client=True, max_size=max_size)
        self.b2c = Half(self, None, client, from_client=False, max_size=None)
        self._timer: asyncio.TimerHandle | None = None
        self._ping: asyncio.TimerHandle | None = None
        self._pong: asyncio.TimerHandle | None = None
        self._pong_payload: bytes | None = None  # the latest client ping not yet answered
        self._pong_next = 0.0  # loop time before which no pong goes out

    def attach_backend(self, backend: asyncio.Transport) -> None:
        self.backend = backend
        self.backend_open = True
        self.c2b.out = backend
        self.c2b.forward = True
        self.b2c.src = backend

    # Events from the halves --------------------------------------------------

    def close_seen(self, half: Half) -> None:
        if self.code is None:
            self.code, self.reason = half.close_code, half.close_reason
        if half is self.c2b and not half.close_forwarded and self.client_open:
            # The client answered a close the proxy sent: the server side ends TCP.
            self.client.close()
        self._arm_close_timer()

    def oversize(self, half: Half, size: int) -> None:
        self.error = f"client message of {size} bytes or more exceeds the limit of {half.max_size}"
        self.fail(F.CLOSE_TOO_BIG, "message too big", backend_reason="client message too big")

    def protocol_error(self, half: Half, problem: str) -> None:
        self.error = ("client: " if half.from_client else "backend: ") + problem
        if half.from_client:
            self.fail(F.CLOSE_PROTOCOL_ERROR, "protocol error", backend_reason="client error")
            self.client.close()  # failing a connection ends its TCP at once (RFC 6455 §7.1.7)
        else:
            self.fail(F.CLOSE_INTERNAL_ERROR, "backend protocol error")
            if self.backend is not None:
                self.backend.abort()

    def lost(self, half: Half, exc: Exception | None) -> None:
        if half is self.c2b:
            self.client_open = False
            self.b2c.detach()
            if self.backend_open:
                if self.c2b.close_code is None:
                    if self.code is None:
                        self.code = F.CLOSE_ABNORMAL
                    self._close_side(
                        self.c2b, F.CLOSE_GOING_AWAY, "client went away", source_alive=False
                    )
                self._arm_close_timer()
        else:
            self.backend_open = False
            self.c2b.detach()
            if self.client_open:
                if self.b2c.close_code is not None:
                    self.client.close()
                else:
                    if not self.error:
                        self.error = "backend connection lost" + (f": {exc}" if exc else "")
                    self.fail(F.CLOSE_INTERNAL_ERROR, "backend went away")
        if not self.client_open and not self.backend_open:
            self._finish()

    def client_ping(self, payload: bytes) -> None:
        """A client's ping: answered here, the latest one only, at most one per PONG_INTERVAL."""
        self._pong_payload = payload
        if self._pong is None:
            self._send_pong()

    def _send_pong(self) -> None:
        self._pong = None
        if self._pong_payload is None or not self.client_open or self.b2c.stop_after_pending:
            return
        loop = asyncio.get_running_loop()
        wait = self._pong_next - loop.time()
        if wait > 0:
            self._pong = loop.call_later(wait, self._send_pong)
        elif self.client.get_write_buffer_size() <= PONG_BUFFER_LIMIT:
            self._pong_next = loop.time() + PONG_INTERVAL
            payload, self._pong_payload = self._pong_payload, None
            self.b2c.inject(F.encode_frame(F.OP_PONG, payload, mask=False))

    # Closing -----------------------------------------------------------------

    def fail(
        self,
        code: int,
        reason: str,
        *,
        backend_code: int = F.CLOSE_GOING_AWAY,
        backend_reason: str = "",
    ) -> None:
        """Close both sides from the proxy: ``code`` to the client, ``backend_code`` to backend."""
        if self.code is None:
            self.code, self.reason = code, reason
        if self.backend_open and self.c2b.close_code is None and not self.c2b.stop_after_pending:
            self._close_side(
                self.c2b, backend_code, backend_reason or reason, source_alive=self.client_open
            )
        if self.client_open and self.b2c.close_code is None and not self.b2c.stop_after_pending:
            self._close_side(self.b2c, code, reason, source_alive=self.backend_open)
        self._arm_close_timer()
        if not self.client_open and not self.backend_open:
            self._finish()

    def _close_side(self, half: Half, code: int, reason: str, *, source_alive: bool) -> None:
        """Send a close frame through ``half`` (to its destination) and forward nothing after."""
        if half.out is None:
            return
        if half.at_boundary or source_alive:
            half.inject(F.close_frame(code, reason, mask=half.from_client), then_stop=True)
        else:
            half.out.abort()  # cut mid-frame for good: no valid close frame can follow

    def _arm_close_timer(self) -> None:
        if self._timer is None and not self.done:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.close_timeout, self._close_timed_out)

    def _close_timed_out(self) -> None:
        self._timer = None
        if not self.error:
            self.error = "closing handshake timed out"
        for transport in (self.client, self.backend):
            if transport is not None:
                transport.abort()

    # Keepalive -----------------------------------------------------------------

    def start_keepalive(self, interval: float, timeout: float) -> None:
        loop = asyncio.get_running_loop()

        def ping() -> None:
            if self.done or not self.client_open or self._timer is not None:
                return  # closing (the close timer runs): no more pings
            mark = self.c2b.nbytes
            self.b2c.inject(F.encode_frame(F.OP_PING, b"cxrd", mask=False))
            loop.call_later(timeout, check, mark)
            self._ping = loop.call_later(interval, ping)

        def check(mark: int) -> None:
            if self.done or not self.client_open or self.c2b.nbytes != mark:
                return
            self.error = f"client keepalive timed out (no pong within {timeout:g} s)"
            if self.code is None:
                self.code = F.CLOSE_ABNORMAL
            self.client.abort()

        self._ping = loop.call_later(interval, ping)

    # End -----------------------------------------------------------------------

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        for handle in (self._timer, self._ping, self._pong):
            if handle is not None:
                handle.cancel()
        self.on_done(self)

    def summary(self) -> str:
        code = self.code if self.code is not None else F.CLOSE_ABNORMAL
        duration = time.monotonic() - self.started
        line = (
            f"client={self.peer} path={self.path!r} duration={duration:.3f}s "
            f"bytes_in={self.c2b.nbytes} bytes_out={self.b2c.nbytes} close={code}"
        )
        if self.reason:
            line += f" reason={self.reason!r}"
        if self.error:
            line += f" error={self.error!r}"
        return line
