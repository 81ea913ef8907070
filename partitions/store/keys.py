"""Every table name and key layout of a partition store, in one place.

Keys are big-endian and fixed-width where they carry numbers, so LMDB's byte order is the logical
order. Instance ids are UTF-8 and may not contain NUL, so `id + NUL` is a safe per-instance prefix.
"""

import re
import struct

TABLES = (
    "meta",  # name -> value: partition count, epoch, counters
    "instances",  # instance id -> msgpack instance record
    "history",  # id NUL u32 index -> HistoryEvent bytes
    "inbox",  # id NUL u64 seq -> HistoryEvent bytes not yet given to the orchestrator
    "orch_ready",  # u64 seq -> instance id with work to dispatch
    "act_ready",  # u64 seq -> msgpack activity request
    "timers",  # u64 fire_ms, u8 kind, id NUL, i32 timer id -> msgpack {execution id}
    "timer_idx",  # id NUL, u64 fire_ms, u8 kind, i32 timer id -> b"" (an orchestration's timers, to go with it)
    "outbox",  # u16 destination partition, u64 seq -> msgpack message
    "dedup",  # u16 sender partition -> u64 last applied seq
    "idx_created",  # u64 created_ms, id -> b"" (queries and purge by created time)
    "idx_status",  # u8 status, u64 created_ms, id -> b"" (queries by status)
    "idx_completed",  # u64 completed_ms, id -> u8 status (ListInstanceIds by completed time)
    "entities",  # entity id (@name@key) -> msgpack entity record; its queued operations live in inbox
    "ent_ready",  # u64 seq -> entity id with operations to dispatch
    "payloads",  # id NUL field -> a large input or custom status, kept out of the record every event rewrites
)

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I32 = struct.Struct(">i")
_TIMER_SUFFIX = struct.Struct(">i")

# LMDB keys are at most 511 bytes; the longest key built from an id adds 13 bytes (timer rows).
MAX_ID_BYTES = 480

# Timer rows by kind. The kind is part of the key, so an orchestrator's timer id (any int32 the worker
# sends) can never be mistaken for one of the engine's own timers.
TIMER_ORCHESTRATION = 0  # createTimer: becomes timerFired(timer id)
TIMER_RELEASE = 1  # releases a held instance: scheduled start, abandon backoff
TIMER_ACTIVITY = 2  # an abandoned activity goes back to the queue (id: task id)
TIMER_ENTITY_SIGNAL = 3  # a scheduled entity operation is delivered (id: a sequence number)
TIMER_ENTITY_RELEASE = 4  # an entity held after an abandoned batch is queued again (id: 0)
SCHEDULED_START_TIMER_ID = 0  # the id of TIMER_RELEASE rows
# The kinds that belong to an orchestration's execution: indexed by instance, and deleted when it ends, continues
# as new or is purged. (Entity timers carry operations still to be delivered.)
INSTANCE_TIMER_KINDS = frozenset((TIMER_ORCHESTRATION, TIMER_RELEASE, TIMER_ACTIVITY))

META_PARTITION_COUNT = b"partition_count"
META_PARTITION_INDEX = b"partition_index"
META_EPOCH = b"epoch"
META_SEQ = b"seq"
# The epoch at which a version that keeps the store's layout up to date last started. Each change of layout adds
# a key of its own: a version from before it writes the earlier keys at its start, but not the new one.
META_SCHEMA_EPOCH = b"schema_epoch"  # timer index, entity counts, lock sections
META_PAYLOADS_EPOCH = b"schema_epoch/payloads"  # large inputs and custom statuses beside the record
SCHEMA_MARKERS = (META_SCHEMA_EPOCH, META_PAYLOADS_EPOCH)
META_HUB_GENERATION = b"hub_generation"  # of the last DeleteTaskHub/CreateTaskHub(recreate) this partition applied


_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


def id_problem(instance_id: str) -> str | None:
    """Why `instance_id` cannot name an instance, or None. NUL separates store keys, so control
    characters are refused; LMDB keys are bounded, so the length is too."""
    if not instance_id:
        return "must not be empty"
    if _CONTROL_CHARACTER.search(instance_id):
        return "must not contain control characters"
    if len(instance_id.encode("utf-8")) > MAX_ID_BYTES:
        return f"is longer than {MAX_ID_BYTES} bytes in UTF-8"
    return None


def orchestration_id_problem(instance_id: str) -> str | None:
    """Why `instance_id` cannot name an orchestration, or None. Ids starting with '@' are entities': the two
    share the inbox table, so an orchestration with an entity's id would take that entity's operations."""
    problem = id_problem(instance_id)
    if problem is None and instance_id.startswith("@"):
        return "must not start with '@' (reserved for entities)"
    return problem


def entity_id_problem(entity_id: str) -> str | None:
    """Why `entity_id` cannot name an entity, or None. Entity ids read `@name@key`: the name is not empty and
    has no '@'; the key is not empty and may have one (the .NET SDK allows an e-mail address as a key; the
    Python SDK does not, so its workers cannot run such an entity)."""
    problem = id_problem(entity_id)
    if problem is not None:
        return problem
    name, at, key = entity_id[1:].partition("@")
    if not entity_id.startswith("@") or not at or not name or not key:
        return "must have the form @name@key, with a name (no '@') and a key, neither empty"
    return None


def instance_prefix(instance_id: str) -> bytes:
    return instance_id.encode("utf-8") + b"\x00"


def payload_key(instance_id: str, field: str) -> bytes:
    return instance_prefix(instance_id) + field.encode("ascii")


def history_key(instance_id: str, index: int) -> bytes:
    return instance_prefix(instance_id) + _U32.pack(index)


def inbox_key(instance_id: str, seq: int) -> bytes:
    return instance_prefix(instance_id) + _U64.pack(seq)


def seq_key(seq: int) -> bytes:
    return _U64.pack(seq)


def seq_from_key(key: bytes) -> int:
    return _U64.unpack(key)[0]


def timer_key(fire_ms: int, kind: int, instance_id: str, timer_id: int) -> bytes:
    return _U64.pack(fire_ms) + bytes((kind,)) + instance_prefix(instance_id) + _I32.pack(timer_id)


def parse_timer_key(key: bytes) -> tuple[int, int, str, int]:
    """(fire_ms, kind, instance id, timer id)."""
    fire_ms = _U64.unpack_from(key)[0]
    instance_id = key[9:-5].decode("utf-8")
    return fire_ms, key[8], instance_id, _I32.unpack_from(key, len(key) - 4)[0]


def timer_index_key(fire_ms: int, kind: int, instance_id: str, timer_id: int) -> bytes:
    return instance_prefix(instance_id) + _U64.pack(fire_ms) + bytes((kind,)) + _I32.pack(timer_id)


def index_key_of_timer(key: bytes) -> bytes | None:
    """The index row of a timer row, or None for a kind that is not an orchestration's (not indexed)."""
    fire_ms, kind, instance_id, timer_id = parse_timer_key(key)
    return timer_index_key(fire_ms, kind, instance_id, timer_id) if kind in INSTANCE_TIMER_KINDS else None


def timer_key_of_index(index_key: bytes, instance_id: str) -> bytes:
    """The timer row an index row of `instance_id` stands for."""
    suffix = index_key[len(instance_prefix(instance_id)):]
    return timer_key(_U64.unpack_from(suffix)[0], suffix[8], instance_id, _I32.unpack_from(suffix, 9)[0])


def outbox_key(destination: int, seq: int) -> bytes:
    return _U16.pack(destination) + _U64.pack(seq)


def parse_outbox_key(key: bytes) -> tuple[int, int]:
    return _U16.unpack_from(key)[0], _U64.unpack_from(key, 2)[0]


def partition_key(partition: int) -> bytes:
    return _U16.pack(partition)


def outbox_seq_meta_key(destination: int) -> bytes:
    return b"outbox_seq:" + _U16.pack(destination)


def pack_u64(value: int) -> bytes:
    return _U64.pack(value)


def unpack_u64(value: bytes) -> int:
    return _U64.unpack(value)[0]


def created_index_key(created_ms: int, instance_id: str) -> bytes:
    return _U64.pack(created_ms) + instance_id.encode("utf-8")


def status_index_key(status: int, created_ms: int, instance_id: str) -> bytes:
    return bytes((status,)) + _U64.pack(created_ms) + instance_id.encode("utf-8")


def completed_index_key(completed_ms: int, instance_id: str) -> bytes:
    return _U64.pack(completed_ms) + instance_id.encode("utf-8")


def parse_time_index_key(key: bytes, offset: int = 0) -> tuple[int, str]:
    """(ms, instance id) from a created, status (offset 1) or completed index key."""
    return _U64.unpack_from(key, offset)[0], key[offset + 8 :].decode("utf-8")
