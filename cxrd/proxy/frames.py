"""WebSocket frame pieces the relay needs (RFC 6455 §5); pure, no I/O.

The relay never decodes data frames: with no extension negotiated on either
leg, a client's masked frame is valid as is toward the backend, and the
backend's unmasked frame is valid as is toward the client. It only reads
frame headers (to find boundaries, sizes and close frames) and writes the few
control frames the proxy itself originates.
"""

from __future__ import annotations

import os
import struct

from cxrd.core import model

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

# Close codes (RFC 6455 §7.4.1 and the IANA registry).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005
CLOSE_ABNORMAL = model.CLOSE_ABNORMAL  # the core reports it for a proxy that died
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013

MAX_CONTROL_PAYLOAD = 125


def encode_frame(opcode: int, payload: bytes, *, mask: bool) -> bytes:
    """One final frame; masked with a fresh random key when sent as a client."""
    length = len(payload)
    first = 0x80 | opcode
    mask_bit = 0x80 if mask else 0
    if length < 126:
        header = struct.pack("!BB", first, mask_bit | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, length)
    if not mask:
        return header + payload
    key = os.urandom(4)
    return header + key + apply_mask(payload, key)


def apply_mask(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return b""
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        len(payload), "big"
    )


def close_payload(code: int, reason: str) -> bytes:
    """Code and reason, the reason cut (on a character boundary) to fit a control frame."""
    data = reason.encode()
    while len(data) > MAX_CONTROL_PAYLOAD - 2:
        reason = reason[:-1]
        data = reason.encode()
    return struct.pack("!H", code) + data


def close_frame(code: int, reason: str, *, mask: bool) -> bytes:
    return encode_frame(OP_CLOSE, close_payload(code, reason), mask=mask)


def parse_close(payload: bytes) -> tuple[int, str]:
    """(code, reason) of an unmasked close payload; 1005 when it carries no code."""
    if len(payload) < 2:
        return CLOSE_NO_STATUS, ""
    (code,) = struct.unpack("!H", payload[:2])
    return code, payload[2:].decode("utf-8", "replace")
