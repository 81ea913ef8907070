"""The LMDB store of one partition: the environment, its tables, and a typed write transaction."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator
from typing import Any

import lmdb
import msgpack

from partitions.store import keys

log = logging.getLogger(__name__)

_GROW_WHEN_USED = 0.5  # double the map before a batch once half of it is in use


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


class LmdbStore:
    """Opens (or creates) a partition's environment. The owning partition process is its only writer."""

    def __init__(self, path: str, map_size_bytes: int) -> None:
        os.makedirs(path, exist_ok=True)
        self.path = path
        self.env = lmdb.open(
            path,
            map_size=map_size_bytes,
            max_dbs=len(keys.TABLES) + 4,
            sync=True,
            metasync=True,
            readahead=False,
            max_readers=64,
        )
        self.dbs = {name: self.env.open_db(name.encode()) for name in keys.TABLES}

    def used_bytes(self, info: dict[str, Any] | None = None) -> int:
        return ((info or self.env.info())["last_pgno"] + 1) * self.env.stat()["psize"]

    def ensure_room(self, headroom_bytes: int) -> None:
        """Grow the map before a write batch so that LMDB never reports MapFullError mid-batch."""
        info = self.env.info()  # once: this runs before every batch
        used = self.used_bytes(info)
        size = info["map_size"]
        if used + headroom_bytes > size * _GROW_WHEN_USED:
            new_size = max(size * 2, (used + headroom_bytes) * 2)
            log.info("growing LMDB map of %s from %d to %d bytes", self.path, size, new_size)
            self.env.set_mapsize(new_size)

    def begin(self, write: bool = False) -> StoreTxn:
        return StoreTxn(self.env.begin(write=write), self.dbs, self.env)

    def close(self) -> None:
        self.env.close()


class StoreTxn:
    """Typed access to the tables inside one LMDB transaction."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, Any], env: lmdb.Environment) -> None:
        self.txn = txn
        self.env = env
        self._meta = dbs["meta"]
        self._instances = dbs["instances"]
        self._history = dbs["history"]
        self._inbox = dbs["inbox"]
        self._orch_ready = dbs["orch_ready"]
        self._act_ready = dbs["act_ready"]
        self._timers = dbs["timers"]
        self._timer_idx = dbs["timer_idx"]
        self._outbox = dbs["outbox"]
        self._dedup = dbs["dedup"]
        self._idx_created = dbs["idx_created"]
        self._idx_status = dbs["idx_status"]
        self._idx_completed = dbs["idx_completed"]
        self._entities = dbs["entities"]
        self._ent_ready = dbs["ent_ready"]
        self._payloads = dbs["payloads"]
        self.dbs = dbs

    def child(self) -> StoreTxn:
        """A nested write transaction: a failed command rolls back alone."""
        return StoreTxn(self.env.begin(write=True, parent=self.txn), self.dbs, self.env)

    def commit(self) -> None:
        self.txn.commit()

    def abort(self) -> None:
        self.txn.abort()

    def drop_table(self, name: str) -> None:
        """Delete every row of table `name` (the table itself stays)."""
        self.txn.drop(self.dbs[name], delete=False)

    # meta
    def get_meta(self, name: bytes) -> bytes | None:
        return self.txn.get(name, db=self._meta)

    def put_meta(self, name: bytes, value: bytes) -> None:
        self.txn.put(name, value, db=self._meta)

    # instances
    def get_instance(self, instance_id: str) -> dict[str, Any] | None:
        raw = self.txn.get(instance_id.encode("utf-8"), db=self._instances)
        return None if raw is None else unpack(raw)

    def put_instance(self, instance_id: str, record: dict[str, Any]) -> None:
        self.txn.put(instance_id.encode("utf-8"), pack(record), db=self._instances)

    def delete_instance(self, instance_id: str) -> None:
        self.txn.delete(instance_id.encode("utf-8"), db=self._instances)

    def instance_count(self) -> int:
        return self.txn.stat(self._instances)["entries"]

    def scan_instances(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for key, value in self._items_from(self._instances, b""):
            yield key.decode("utf-8"), unpack(value)

    def forget_entity_fields(self, fields: tuple[str, ...]) -> int:
        """Drop `fields` from every entity record that has them; how many records changed."""
        stale = [(key, record) for key, record in ((k, unpack(v)) for k, v in self._items_from(self._entities, b""))
                 if any(field in record for field in fields)]
        for key, record in stale:
            for field in fields:
                record.pop(field, None)
            self.txn.put(key, pack(record), db=self._entities)
        return len(stale)

    # payloads kept beside their instance record
    def get_payload(self, instance_id: str, field: str) -> str | None:
        raw = self.txn.get(keys.payload_key(instance_id, field), db=self._payloads)
        return None if raw is None else bytes(raw).decode("utf-8")

    def put_payload(self, instance_id: str, field: str, value: str) -> None:
        self.txn.put(keys.payload_key(instance_id, field), value.encode("utf-8"), db=self._payloads)

    def delete_payload(self, instance_id: str, field: str) -> None:
        self.txn.delete(keys.payload_key(instance_id, field), db=self._payloads)

    def delete_payloads(self, instance_id: str) -> None:
        self._delete_prefix(self._payloads, keys.instance_prefix(instance_id))

    def payload_fields(self) -> list[tuple[str, str]]:
        """(instance id, field) of every payload row."""
        cur = self.txn.cursor(db=self._payloads)
        rows = []
        for key in cur.iternext(keys=True, values=False):
            instance_id, _, field = bytes(key).partition(b"\x00")
            rows.append((instance_id.decode("utf-8"), field.decode("ascii")))
        return rows

    # history
    def history(self, instance_id: str) -> list[bytes]:
        return list(self._values_with_prefix(self._history, keys.instance_prefix(instance_id)))

    def put_history(self, instance_id: str, index: int, event: bytes) -> None:
        self.txn.put(keys.history_key(instance_id, index), event, db=self._history)

    def delete_history(self, instance_id: str) -> None:
        self._delete_prefix(self._history, keys.instance_prefix(instance_id))

    # inbox
    def inbox(self, instance_id: str, limit: int | None = None) -> list[tuple[bytes, bytes]]:
        """(key, event) pairs in arrival order; the first `limit` of them when given."""
        return list(itertools.islice(self.inbox_iter(instance_id), limit))

    def inbox_iter(self, instance_id: str) -> Iterator[tuple[bytes, bytes]]:
        """(key, event) pairs in arrival order, read as they are taken: for a reader that may stop early. Do not
        write to the inbox while it is being read."""
        prefix = keys.instance_prefix(instance_id)
        cur = self.txn.cursor(db=self._inbox)
        if cur.set_range(prefix):
            for key, value in cur:
                if not key.startswith(prefix):
                    break
                yield key, value

    def has_inbox(self, instance_id: str) -> bool:
        return next(self.inbox_iter(instance_id), None) is not None

    def put_inbox(self, instance_id: str, seq: int, event: bytes) -> None:
        self.txn.put(keys.inbox_key(instance_id, seq), event, db=self._inbox)

    def get_inbox_key(self, key: bytes) -> bytes | None:
        return self.txn.get(key, db=self._inbox)

    def delete_inbox_key(self, key: bytes) -> None:
        self.txn.delete(key, db=self._inbox)

    def delete_inbox(self, instance_id: str) -> None:
        self._delete_prefix(self._inbox, keys.instance_prefix(instance_id))

    # ready queues
    def put_orch_ready(self, seq: int, instance_id: str) -> None:
        self.txn.put(keys.seq_key(seq), instance_id.encode("utf-8"), db=self._orch_ready)

    def delete_orch_ready(self, seq: int) -> None:
        self.txn.delete(keys.seq_key(seq), db=self._orch_ready)

    def orch_ready_after(self, seq: int) -> Iterator[tuple[int, str]]:
        for key, value in self._items_from(self._orch_ready, keys.seq_key(seq + 1)):
            yield keys.seq_from_key(key), value.decode("utf-8")

    def orch_ready_count(self) -> int:
        return self.txn.stat(self._orch_ready)["entries"]

    def put_activity(self, seq: int, activity: dict[str, Any]) -> None:
        self.txn.put(keys.seq_key(seq), pack(activity), db=self._act_ready)

    def get_activity(self, seq: int) -> dict[str, Any] | None:
        raw = self.txn.get(keys.seq_key(seq), db=self._act_ready)
        return None if raw is None else unpack(raw)

    def delete_activity(self, seq: int) -> None:
        self.txn.delete(keys.seq_key(seq), db=self._act_ready)

    def activities_after(self, seq: int) -> Iterator[tuple[int, dict[str, Any]]]:
        for key, value in self._items_from(self._act_ready, keys.seq_key(seq + 1)):
            yield keys.seq_from_key(key), unpack(value)

    def activity_count(self) -> int:
        return self.txn.stat(self._act_ready)["entries"]

    # timers
    def put_timer(
        self, fire_ms: int, instance_id: str, timer_id: int, record: dict[str, Any], kind: int = keys.TIMER_ORCHESTRATION
    ) -> None:
        key = keys.timer_key(fire_ms, kind, instance_id, timer_id)
        self.txn.put(key, pack(record), db=self._timers)
        index_key = keys.index_key_of_timer(key)
        if index_key is not None:
            self.txn.put(index_key, b"", db=self._timer_idx)

    def due_timers(self, now_ms: int, limit: int) -> list[tuple[bytes, int, int, str, int, dict[str, Any]]]:
        """(key, fire_ms, kind, instance id, timer id, row) of timers due at `now_ms`, earliest first."""
        out = []
        for key, value in self._items_from(self._timers, b""):
            fire_ms, kind, instance_id, timer_id = keys.parse_timer_key(key)
            if fire_ms > now_ms or len(out) >= limit:
                break
            out.append((key, fire_ms, kind, instance_id, timer_id, unpack(value)))
        return out

    def next_timer_ms(self) -> int | None:
        cur = self.txn.cursor(db=self._timers)
        return keys.parse_timer_key(cur.key())[0] if cur.first() else None

    def delete_timer_key(self, key: bytes) -> None:
        self.txn.delete(key, db=self._timers)
        index_key = keys.index_key_of_timer(key)
        if index_key is not None:
            self.txn.delete(index_key, db=self._timer_idx)

    def delete_instance_timers(self, instance_id: str) -> None:
        """Every timer of the instance's orchestration kinds, due or not. (Rows written before the index was kept
        are not found here; they fire, find their execution gone, and go then.)"""
        prefix = keys.instance_prefix(instance_id)
        for index_key, _ in self._items_from(self._timer_idx, prefix):
            if not index_key.startswith(prefix):
                break
            self.txn.delete(keys.timer_key_of_index(index_key, instance_id), db=self._timers)
        self._delete_prefix(self._timer_idx, prefix)

    def rebuild_timer_index(self) -> int:
        """The index from the timer rows themselves (rows written by a version that kept none); how many."""
        self.txn.drop(self._timer_idx, delete=False)
        count = 0
        for key, _ in self._items_from(self._timers, b""):
            index_key = keys.index_key_of_timer(key)
            if index_key is not None:
                self.txn.put(index_key, b"", db=self._timer_idx)
                count += 1
        return count

    def timer_index_count(self) -> int:
        return self.txn.stat(self._timer_idx)["entries"]

    # outbox and dedup
    def put_outbox(self, destination: int, seq: int, message: dict[str, Any]) -> None:
        self.txn.put(keys.outbox_key(destination, seq), pack(message), db=self._outbox)

    def outbox_from(self, destination: int, after_seq: int, limit: int) -> list[tuple[int, dict[str, Any]]]:
        out = []
        for key, value in self._items_from(self._outbox, keys.outbox_key(destination, after_seq + 1)):
            dest, seq = keys.parse_outbox_key(key)
            if dest != destination or len(out) >= limit:
                break
            out.append((seq, unpack(value)))
        return out

    def delete_outbox_through(self, destination: int, seq: int) -> int:
        removed = 0
        cur = self.txn.cursor(db=self._outbox)
        if not cur.set_range(keys.outbox_key(destination, 0)):
            return 0
        while cur.key():  # an empty key: the cursor ran off the end of the table
            dest, row_seq = keys.parse_outbox_key(cur.key())
            if dest != destination or row_seq > seq:
                break
            removed += 1
            if not cur.delete():
                break
        return removed

    def outbox_destinations(self) -> set[int]:
        dests = set()
        cur = self.txn.cursor(db=self._outbox)
        if not cur.first():
            return dests
        while True:
            dest, _ = keys.parse_outbox_key(cur.key())
            dests.add(dest)
            if not cur.set_range(keys.outbox_key(dest + 1, 0)):
                return dests

    def get_dedup(self, sender: int) -> int:
        raw = self.txn.get(keys.partition_key(sender), db=self._dedup)
        return 0 if raw is None else keys.unpack_u64(raw)

    def put_dedup(self, sender: int, seq: int) -> None:
        self.txn.put(keys.partition_key(sender), keys.pack_u64(seq), db=self._dedup)

    # entities
    def get_entity(self, entity_id: str) -> dict[str, Any] | None:
        raw = self.txn.get(entity_id.encode("utf-8"), db=self._entities)
        return None if raw is None else unpack(raw)

    def put_entity(self, entity_id: str, record: dict[str, Any]) -> None:
        self.txn.put(entity_id.encode("utf-8"), pack(record), db=self._entities)

    def delete_entity(self, entity_id: str) -> None:
        self.txn.delete(entity_id.encode("utf-8"), db=self._entities)

    def scan_entities(self, prefix: str, after: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(id, record) in id order, for ids starting with `prefix` and greater than `after`."""
        raw_prefix = prefix.encode("utf-8")
        start = max(raw_prefix, after.encode("utf-8") + b"\x00") if after else raw_prefix
        for key, value in self._items_from(self._entities, start):
            if not key.startswith(raw_prefix):
                return
            yield key.decode("utf-8"), unpack(value)

    def put_ent_ready(self, seq: int, entity_id: str) -> None:
        self.txn.put(keys.seq_key(seq), entity_id.encode("utf-8"), db=self._ent_ready)

    def delete_ent_ready(self, seq: int) -> None:
        self.txn.delete(keys.seq_key(seq), db=self._ent_ready)

    def ent_ready_after(self, seq: int) -> Iterator[tuple[int, str]]:
        for key, value in self._items_from(self._ent_ready, keys.seq_key(seq + 1)):
            yield keys.seq_from_key(key), value.decode("utf-8")

    def ent_ready_count(self) -> int:
        return self.txn.stat(self._ent_ready)["entries"]

    def inbox_count(self, instance_id: str) -> int:
        return sum(1 for _ in self._values_with_prefix(self._inbox, keys.instance_prefix(instance_id)))

    # secondary indexes
    def index_instance(self, instance_id: str, old: list[int] | None, new: list[int] | None) -> None:
        """Move the instance's index rows from `old` to `new` ([status, created_ms, completed_ms])."""
        if old == new:
            return
        if old:
            status, created, completed = old
            self.txn.delete(keys.created_index_key(created, instance_id), db=self._idx_created)
            self.txn.delete(keys.status_index_key(status, created, instance_id), db=self._idx_status)
            if completed:
                self.txn.delete(keys.completed_index_key(completed, instance_id), db=self._idx_completed)
        if new:
            status, created, completed = new
            self.txn.put(keys.created_index_key(created, instance_id), b"", db=self._idx_created)
            self.txn.put(keys.status_index_key(status, created, instance_id), b"", db=self._idx_status)
            if completed:
                self.txn.put(
                    keys.completed_index_key(completed, instance_id), bytes((status,)), db=self._idx_completed
                )

    def scan_created(self, from_ms: int, to_ms: int) -> Iterator[tuple[int, str]]:
        """(created_ms, id) in order, for created_ms in [from_ms, to_ms)."""
        for key, _ in self._items_from(self._idx_created, keys.pack_u64(from_ms)):
            created, instance_id = keys.parse_time_index_key(key)
            if created >= to_ms:
                return
            yield created, instance_id

    def scan_status(self, status: int, from_ms: int, to_ms: int) -> Iterator[tuple[int, str]]:
        prefix = bytes((status,))
        for key, _ in self._items_from(self._idx_status, prefix + keys.pack_u64(from_ms)):
            if not key.startswith(prefix):
                return
            created, instance_id = keys.parse_time_index_key(key, 1)
            if created >= to_ms:
                return
            yield created, instance_id

    def scan_completed(self, from_ms: int, to_ms: int) -> Iterator[tuple[int, str, int]]:
        """(completed_ms, id, status) in order, for completed_ms in [from_ms, to_ms)."""
        for key, value in self._items_from(self._idx_completed, keys.pack_u64(from_ms)):
            completed, instance_id = keys.parse_time_index_key(key)
            if completed >= to_ms:
                return
            yield completed, instance_id, value[0]

    def scan_instance_ids(self, prefix: str) -> Iterator[str]:
        raw = prefix.encode("utf-8")
        for key, _ in self._items_from(self._instances, raw):
            if not key.startswith(raw):
                return
            yield key.decode("utf-8")

    # helpers
    def _items_from(self, db: Any, start: bytes) -> Iterator[tuple[bytes, bytes]]:
        cur = self.txn.cursor(db=db)
        if not cur.set_range(start):
            return
        yield from cur

    def _values_with_prefix(self, db: Any, prefix: bytes) -> Iterator[bytes]:
        for key, value in self._items_from(db, prefix):
            if not key.startswith(prefix):
                return
            yield value

    def _delete_prefix(self, db: Any, prefix: bytes) -> None:
        cur = self.txn.cursor(db=db)
        if not cur.set_range(prefix):
            return
        while cur.key().startswith(prefix):
            if not cur.delete():
                break
