"""A lean TLS server layer: ``ssl.SSLObject`` over memory BIOs on a plain TCP transport.

asyncio's own TLS transport routes every record through a general state
machine; profiling the relay showed it cost about as much CPU as the kernel's
socket calls. This layer does only what a TLS server relaying WebSocket
traffic needs (handshake with a timeout, records in and out, flow control,
close_notify) and hands decrypted bytes straight to the application protocol,
through a :class:`TlsTransport` that looks like any asyncio transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import Any

log = logging.getLogger("cxrd.proxy")

# The TLS 1.2 suites the server accepts: AEAD with ECDHE only (Mozilla's "intermediate"
# list). What the headsets' browsers need is in it: the Meta Quest Browser (Chromium) and
# Safari on Apple Vision Pro speak TLS 1.3 (its suites, all AEAD, are set apart by
# OpenSSL and untouched here) and, at TLS 1.2, ECDHE-ECDSA/ECDHE-RSA with AES-GCM or
# ChaCha20-Poly1305. Dropped from OpenSSL's default: the CBC suites (ECDHE-*-AES*-SHA256/
# SHA384, DHE-RSA-AES*-SHA256) and finite-field DHE. ECDSA for a user's own EC pair.
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)

READ_SIZE = 64 * 1024  # per socket read; a TLS record carries at most 16 KiB
RECORD_READ = 32 * 1024  # per decrypt: one record's plaintext fits


class TlsServer(asyncio.BufferedProtocol):
    """The protocol of one accepted TCP connection; TLS server side."""

    def __init__(
        self,
        context: ssl.SSLContext,
        app_factory: Callable[[], asyncio.BaseProtocol],
        handshake_timeout: float,
    ) -> None:
        self._context = context
        self._app_factory = app_factory
        self._handshake_timeout = handshake_timeout
        self._app: Any = None  # the application protocol, once the handshake is done
        self._tcp: asyncio.Transport | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl: ssl.SSLObject | None = None
        self._buffer = memoryview(bytearray(READ_SIZE))
        self._open = False
        self._closing = False
        self._paused = False
        self._timer: asyncio.TimerHandle | None = None
        self.transport = TlsTransport(self)

    # TCP side ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._tcp = transport
        self._ssl = self._context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._handshake_timeout, self._handshake_timed_out)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self._incoming.write(self._buffer[:nbytes])
        if not self._open:
            self._handshake()
        if self._open and not self._paused:
            self._read_records()

    def eof_received(self) -> bool | None:
        # TCP closed without close_notify: report end of stream to the application.
        if self._open and not self._closing:
            self._app.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._closing = True
        if self._open:
            self._app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._open:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._open:
            self._app.resume_writing()

    # TLS -------------------------------------------------------------------------------

    def _handshake(self) -> None:
        assert self._ssl is not None and self._tcp is not None
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as exc:  # CertificateError is one too
            peer = self._tcp.get_extra_info("peername")
            log.debug("TLS handshake with %s failed: %s", peer, exc)
            self._flush()  # the alert, so the client sees why
            self._tcp.close()
            self._closing = True
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._flush()
        self._open = True
        self._app = self._app_factory()
        self._app.connection_made(self.transport)

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if not self._open and self._tcp is not None:
            self._tcp.abort()

    def _read_records(self) -> None:
        sslobj = self._ssl
        assert sslobj is not None
        incoming = self._incoming
        try:
            while not self._paused and not self._closing:
                data = sslobj.read(RECORD_READ)
                if not data:
                    # The peer's close_notify (SSLObject.read() returns b'' for it rather
                    # than raising): end of stream to the application, then ours back.
                    # Like asyncio's TLS transport, a True from eof_received cannot keep
                    # a TLS connection half open.
                    self._app.eof_received()
                    self.close()
                    return
                self._app.data_received(data)
                if not incoming.pending and not sslobj.pending():
                    break  # all consumed: skip the read that would only raise WantRead
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            log.debug("TLS error from %s: %s", self.get_extra_info("peername"), exc)
            self.abort()
        if self._outgoing.pending:
            self._flush()

    def _flush(self) -> None:
        if self._outgoing.pending and self._tcp is not None:
            self._tcp.write(self._outgoing.read())

    # Application side (through TlsTransport) ------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._ssl is None:
            return
        try:
            self._ssl.write(data)
        except ssl.SSLError as exc:
            log.debug("TLS write to %s failed: %s", self.get_extra_info("peername"), exc)
            self.abort()
            return
        self._flush()

    def close(self) -> None:
        if self._closing or self._tcp is None:
            return
        self._closing = True
        if self._ssl is not None and self._open:
            with contextlib.suppress(ssl.SSLError):
                self._ssl.unwrap()  # queues close_notify; not waiting for the peer's
            self._flush()
        self._tcp.close()

    def abort(self) -> None:
        self._closing = True
        if self._tcp is not None:
            self._tcp.abort()

    def is_closing(self) -> bool:
        return self._closing or self._tcp is None or self._tcp.is_closing()

    def pause_reading(self) -> None:
        if not self._paused and self._tcp is not None:
            self._paused = True
            self._tcp.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self._tcp is not None and not self._closing:
            self._paused = False
            self._tcp.resume_reading()
            # Records already decrypted into the BIO arrive without a new read event.
            asyncio.get_running_loop().call_soon(self._resume_records)

    def _resume_records(self) -> None:
        if self._open and not self._paused and not self._closing:
            self._read_records()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._ssl
        if name == "cipher" and self._ssl is not None:
            return self._ssl.cipher()
        if self._tcp is None:
            return default
        return self._tcp.get_extra_info(name, default)

    def set_app(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = protocol

    def get_app(self) -> asyncio.BaseProtocol:
        return self._app  # type: ignore[no-any-return]

    def get_write_buffer_size(self) -> int:
        return self._tcp.get_write_buffer_size() if self._tcp is not None else 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._tcp is not None:
            self._tcp.set_write_buffer_limits(high, low)


class TlsTransport(asyncio.Transport):
    """What the application protocol sees: plain bytes in and out."""

    def __init__(self, tls: TlsServer) -> None:
        super().__init__()
        self._tls = tls
        self.write = tls.write  # type: ignore[method-assign]  # hot path: no extra call

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._tls.write(data)

    def close(self) -> None:
        self._tls.close()

    def abort(self) -> None:
        self._tls.abort()

    def is_closing(self) -> bool:
        return self._tls.is_closing()

    def pause_reading(self) -> None:
        self._tls.pause_reading()

    def resume_reading(self) -> None:
        self._tls.resume_reading()

    def is_reading(self) -> bool:
        return not self._tls._paused

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._tls.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._tls.set_app(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._tls.get_app()

    def get_write_buffer_size(self) -> int:
        return self._tls.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._tls.set_write_buffer_limits(high, low)
