"""Claims on directories (runtime/locks.py): one node per data directory, one process per partition store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from partitions.process import PartitionBusyError, claim_store
from runtime import locks
from runtime.config import Config


def test_a_held_claim_refuses_a_second_one_and_names_the_holder(tmp_path: Path) -> None:
    path = str(tmp_path / "claim")
    fd = locks.claim(path)
    with pytest.raises(locks.ClaimHeld) as held:
        locks.claim(path)  # flock is per open file: a second open is refused even in this process
    assert held.value.holder == os.getpid()
    os.close(fd)
    os.close(locks.claim(path))  # released with its descriptor


def test_a_claim_ends_when_its_process_is_killed(tmp_path: Path) -> None:
    path = str(tmp_path / "claim")
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys, runtime.locks as l; l.claim({path!r}); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(locks.ClaimHeld) as held:
            locks.claim(path)
        assert held.value.holder == holder.pid
    finally:
        holder.kill()
        holder.wait(timeout=10)
    os.close(locks.claim(path))  # SIGKILL left no stale claim


def test_a_partition_store_has_one_process_at_a_time(tmp_path: Path) -> None:
    config = Config(data_dir=str(tmp_path / "data"), partitions=2)
    fd = claim_store(config, 1)
    with pytest.raises(PartitionBusyError, match=r"partition 1: its store .* is in use by pid \d+"):
        claim_store(config, 1)
    os.close(claim_store(config, 0))  # another partition's store is another claim
    os.close(fd)
