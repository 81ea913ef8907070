"""Protobuf helpers: assembling messages from already-serialized parts, and timestamps as milliseconds."""

from typing import Any

MAX_MS = (1 << 63) - 1  # the largest millisecond value timer and index keys hold


def timestamp_ms(ts: Any) -> int:
    """A google.protobuf.Timestamp in ms since the epoch, clamped to [0, MAX_MS]: timestamps are input."""
    return min(max(ts.seconds * 1000 + ts.nanos // 1_000_000, 0), MAX_MS)


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(field_number: int, payload: bytes) -> bytes:
    """One length-delimited field (a message, string or bytes); repeated fields are just concatenated."""
    return varint(field_number << 3 | 2) + varint(len(payload)) + payload
