"""Protobuf helpers: assembling messages from already-serialized parts, and timestamps as milliseconds."""

from typing import Any

from google.protobuf import timestamp_pb2

# The last millisecond a google.protobuf.Timestamp may name (9999-12-31T23:59:59.999Z). Later times are clamped to
# it on the way in and on the way out, so every timestamp the engine hands back is one that any SDK can read.
MAX_MS = 253_402_300_799_999


def timestamp_ms(ts: Any) -> int:
    """A google.protobuf.Timestamp in ms since the epoch, clamped to [0, MAX_MS]: timestamps are input."""
    return min(max(ts.seconds * 1000 + ts.nanos // 1_000_000, 0), MAX_MS)


def ms_timestamp(ms: int) -> timestamp_pb2.Timestamp:
    """Milliseconds since the epoch as a Timestamp; clamped too, for values stored before the clamp on input."""
    ms = min(max(ms, 0), MAX_MS)
    return timestamp_pb2.Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


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
