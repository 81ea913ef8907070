"""In-memory state of a partition's core: leases of dispatched work items, waiters and counters.

Everything here can be rebuilt from LMDB after a crash: leases start empty (all stored work is
ready again), waiters are re-registered by the gateways, and counters are persisted in `meta`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from partitions.store import keys
from partitions.store.lmdb_store import StoreTxn


@dataclass
class Lease:
    """A dispatched work item: who holds it, until when, and what it was given."""

    token: str
    kind: str  # "o" orchestration, "a" activity, "e" entity
    key: str | int  # instance id for orchestrations and entities, queue seq for activities
    gateway: bytes
    expires_ms: int
    started_event: bytes = b""  # orchestratorStarted given as the first new event
    inbox_keys: list[bytes] = field(default_factory=list)
    execution_id: str = ""


@dataclass
class Waiter:
    """A WaitForInstanceStart/Completion request parked until the instance reaches its condition."""

    sender: bytes
    request_id: int
    kind: str  # "start" or "done"
    deadline_ms: int
    with_payloads: bool


@dataclass
class CoreState:
    partition: int
    partition_count: int
    epoch: int
    max_history_events: int = 100_000
    max_work_item_bytes: int = 4 << 20  # what an SDK worker receives by default (gRPC's 4 MiB)
    # Work dispatch found too large for any work item (dispatch.py), keyed by (kind, instance or entity id): the
    # command the process applies in its next batch, which fails the instance (fail_too_large) or refuses the
    # entity's operation (refuse_operation).
    oversized: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    seq: int = 0  # last used value of the partition-wide sequence (ready rows, inbox rows, activities)
    outbox_seq: dict[int, int] = field(default_factory=dict)
    orch_leases: dict[str, Lease] = field(default_factory=dict)
    act_leases: dict[int, Lease] = field(default_factory=dict)
    ent_leases: dict[str, Lease] = field(default_factory=dict)
    leases_by_token: dict[str, Lease] = field(default_factory=dict)
    orch_cursor: int = 0  # orch_ready rows at or before this seq have been dispatched
    scan_resume: dict[tuple[str, int], int] = field(default_factory=dict)  # where a filtered walk goes on (dispatch._Walk)
    act_cursor: int = 0
    ent_cursor: int = 0
    next_token: int = 0
    hub_generation: int = 0  # see task_hub.py: deliveries from an older generation are acknowledged, not applied
    waiters: dict[str, list[Waiter]] = field(default_factory=dict)
    dirty_counters: bool = False

    def next_seq(self) -> int:
        self.seq += 1
        self.dirty_counters = True
        return self.seq

    def next_outbox_seq(self, destination: int) -> int:
        value = self.outbox_seq.get(destination, 0) + 1
        self.outbox_seq[destination] = value
        self.dirty_counters = True
        return value

    def snapshot_counters(self) -> tuple[int, dict[int, int]]:
        return self.seq, dict(self.outbox_seq)

    def restore_counters(self, snapshot: tuple[int, dict[int, int]]) -> None:
        self.seq, self.outbox_seq = snapshot[0], dict(snapshot[1])

    def save_counters(self, txn: StoreTxn) -> None:
        if not self.dirty_counters:
            return
        txn.put_meta(keys.META_SEQ, keys.pack_u64(self.seq))
        for destination, value in self.outbox_seq.items():
            txn.put_meta(keys.outbox_seq_meta_key(destination), keys.pack_u64(value))
        self.dirty_counters = False

    def load_counters(self, txn: StoreTxn) -> None:
        raw = txn.get_meta(keys.META_SEQ)
        self.seq = keys.unpack_u64(raw) if raw else 0
        for destination in range(self.partition_count):
            raw = txn.get_meta(keys.outbox_seq_meta_key(destination))
            if raw:
                self.outbox_seq[destination] = keys.unpack_u64(raw)

    def leases_of(self, kind: str) -> dict:  # type: ignore[type-arg]
        return {"o": self.orch_leases, "a": self.act_leases, "e": self.ent_leases}[kind]

    def add_lease(self, lease: Lease) -> None:
        self.leases_by_token[lease.token] = lease
        self.leases_of(lease.kind)[lease.key] = lease

    def release(self, lease: Lease) -> None:
        self.leases_by_token.pop(lease.token, None)
        self.leases_of(lease.kind).pop(lease.key, None)
