"""Partition processes: each owns the instances that hash to it, in its own LMDB environment."""
