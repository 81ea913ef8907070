"""Bringing a store written (or last written) by an earlier version of the engine up to date, at start.

This version keeps an index of an orchestration's timers (the timer_idx table), and counts in its records
that save reading a queue or a history through: a locked entity's queued calls from its owner and whether the
section's unlock is queued ("oq", "uq"), and the lock sections an orchestration's execution asked for ("lr",
"lh"). An earlier version neither fills the index nor keeps the counts: records it wrote carry none, and every
reader falls back to reading the queue or history through. But if it ran on a store this version had written
(a rollback, then a redeploy), the counts it left behind are stale, and an entity would wait for ever on a
call its count says is not there.

The store records the epoch this version last started at. Every start moves the epoch on by one, so when the
recorded one is not the previous epoch, another version has started in between (or this version never has):
the index is built afresh from the timer rows, and the counts are dropped, to be taken afresh when needed.
"""

from __future__ import annotations

import logging

from partitions.store import keys
from partitions.store.lmdb_store import StoreTxn

log = logging.getLogger(__name__)

COUNTED_FIELDS = ("oq", "uq", "lr", "lh")


def bring_up_to_date(txn: StoreTxn, epoch: int, path: str) -> None:
    raw = txn.get_meta(keys.META_SCHEMA_EPOCH)
    if raw is None or keys.unpack_u64(raw) != epoch - 1:
        indexed = txn.rebuild_timer_index()
        forgotten = txn.forget_record_fields(COUNTED_FIELDS) if raw is not None else 0
        if indexed or forgotten:
            log.info("%s: written by another version; brought up to date (%d timers indexed, %d records' counts"
                     " dropped)", path, indexed, forgotten)
    txn.put_meta(keys.META_SCHEMA_EPOCH, keys.pack_u64(epoch))
