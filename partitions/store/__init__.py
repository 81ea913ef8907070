"""Partition storage: one LMDB environment per partition, one named database per table."""

from partitions.store.lmdb_store import LmdbStore, StoreTxn

__all__ = ["LmdbStore", "StoreTxn"]
