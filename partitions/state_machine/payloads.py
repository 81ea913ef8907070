"""An instance's input and custom status, kept beside its record when they are large.

Every event an instance takes rewrites its record. An input of a few megabytes kept in the record would be
written again with every activity result, timer and raised event, and read again with every load. So a value
larger than PAYLOAD_ASIDE_BYTES lives in the "payloads" table instead, written when it is set and changed, and
the record keeps only a digest of it ("pa": field -> digest); small values stay in the record.
"""

from __future__ import annotations

import hashlib

from partitions.state_machine.context import Record
from partitions.store.lmdb_store import StoreTxn

PAYLOAD_ASIDE_BYTES = 1024  # applies to the input ("in") and the custom status ("cs")


def set_payload(txn: StoreTxn, instance_id: str, record: Record, field: str, value: str | None) -> None:
    aside = record.get("pa") or {}
    if value is not None and len(value) > PAYLOAD_ASIDE_BYTES:
        digest = hashlib.blake2b(value.encode("utf-8"), digest_size=16).digest()
        if aside.get(field) != digest:
            txn.put_payload(instance_id, field, value)
            aside[field] = digest
        record.pop(field, None)
        record["pa"] = aside
        return
    record[field] = value
    if aside.pop(field, None) is not None:
        txn.delete_payload(instance_id, field)
        if aside:
            record["pa"] = aside
        else:
            record.pop("pa", None)


def payload_of(txn: StoreTxn, instance_id: str, record: Record, field: str) -> str | None:
    if field in (record.get("pa") or {}):
        return txn.get_payload(instance_id, field)
    return record.get(field)
