"""Instance placement: a stable hash of the instance id picks the owning partition."""

import functools

_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


def fnv1a_32(data: bytes) -> int:
    """FNV-1a, 32 bit. Stable across processes and machines, unlike Python's salted hash()."""
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return h


@functools.lru_cache(maxsize=1 << 16)  # an instance's id is hashed once per request about it
def partition_for(instance_id: str, partition_count: int) -> int:
    """The partition that owns `instance_id` (entities hash their `@name@key` id the same way)."""
    return fnv1a_32(instance_id.encode("utf-8")) % partition_count
