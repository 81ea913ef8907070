"""Bringing a store written (or last written) by an earlier version of the engine up to date, at start.

This version keeps an index of an orchestration's timers (the timer_idx table), and counts in its records
that save reading a queue or a history through: a locked entity's queued calls from its owner and whether the
section's unlock is queued ("oq", "uq"), and the lock sections an orchestration's execution asked for ("lr",
"lh"). An earlier version neither fills the index nor keeps the counts: records it wrote carry none, and every
reader falls back to reading the queue or history through. But if it ran on a store this version had written
(a rollback, then a redeploy), the counts it left behind are stale, and an entity would wait for ever on a
call its count says is not there.

The store records the epoch this version last started at, under one key per change of layout (keys.SCHEMA_MARKERS:
a version from before a change writes the keys it knows, not the later ones). Every start moves the epoch on by
one, so when a recorded one is not the previous epoch, another version has started in between (or this version
never has):
the index is built afresh from the timer rows, the entities' counts are dropped (they are taken afresh from the
queue when needed), each unfinished orchestration's lock sections are listed afresh from its history, and a
payload an earlier version wrote into a record wins over the one this version kept beside it.
"""

from __future__ import annotations

import logging

from partitions.state_machine import events as ev
from partitions.store import keys
from partitions.store.lmdb_store import StoreTxn

log = logging.getLogger(__name__)

ENTITY_COUNTS = ("lq", "oq", "uq")


def bring_up_to_date(txn: StoreTxn, epoch: int, path: str) -> None:
    marks = [txn.get_meta(marker) for marker in keys.SCHEMA_MARKERS]
    if any(raw is None or keys.unpack_u64(raw) != epoch - 1 for raw in marks):
        indexed = txn.rebuild_timer_index()
        forgotten = txn.forget_entity_fields(ENTITY_COUNTS)
        listed = _list_lock_sections(txn)
        reconciled = _reconcile_payloads(txn)
        if indexed or forgotten or listed or reconciled:
            log.info("%s: brought up to date after another version (%d timers indexed, %d entities' counts dropped,"
                     " %d orchestrations' lock requests listed, %d records' payloads taken back)",
                     path, indexed, forgotten, listed, reconciled)
    for marker in keys.SCHEMA_MARKERS:
        txn.put_meta(marker, keys.pack_u64(epoch))


def _reconcile_payloads(txn: StoreTxn) -> int:
    """This version keeps a large input or custom status beside the record ("pa" names it) and never also in it.
    An earlier version knows nothing of that: one that ran meanwhile wrote the value into the record (a custom
    status every turn, an input at continue-as-new), and left "pa" as it was. The record's value is then the
    newer one; the row beside it goes. So do rows of records it purged or replaced."""
    changed: list[tuple[str, dict]] = []
    for instance_id, record in txn.scan_instances():
        aside = record.get("pa") or {}
        overwritten = [field for field in aside if field in record]
        if not overwritten:
            continue
        for field in overwritten:
            del aside[field]
            txn.delete_payload(instance_id, field)
        if not aside:
            record.pop("pa", None)
        changed.append((instance_id, record))
    for instance_id, record in changed:
        txn.put_instance(instance_id, record)
    orphans = 0
    for instance_id, field in txn.payload_fields():
        record = txn.get_instance(instance_id)
        if record is None or field not in (record.get("pa") or {}):
            txn.delete_payload(instance_id, field)
            orphans += 1
    return len(changed) + orphans


def _list_lock_sections(txn: StoreTxn) -> int:
    """Each unfinished orchestration's lock sections, from its history: an earlier version may not have listed
    them, or listed a later one's. (Dropping the list instead would hand a replaced execution's grant to the
    new one; a stale one would refuse the grant the execution waits for.)"""
    from partitions.state_machine.entities import execution_events, lock_sections  # (the core, at call time)

    changed: list[tuple[str, dict]] = []  # written after the walk over the table; only these are kept
    for instance_id, record in txn.scan_instances():
        if record.get("s") in ev.TERMINAL:
            continue
        try:
            events = execution_events(txn, instance_id)
        except Exception as exc:  # a corrupt row: that instance fails when it is next read, not the partition now
            log.error("%s: cannot read its history to list its lock requests (%s); left as it is", instance_id, exc)
            continue
        pending, asked = lock_sections(events)
        if record.get("lr") != pending or record.get("lh") != int(asked):
            record["lr"], record["lh"] = pending, int(asked)
            changed.append((instance_id, record))
    for instance_id, record in changed:
        txn.put_instance(instance_id, record)
    return len(changed)
