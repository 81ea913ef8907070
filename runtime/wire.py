"""Protobuf wire-format helpers for assembling messages from already-serialized parts."""


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
