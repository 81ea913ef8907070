"""Claims on directories (runtime/locks.py): one node per data directory, one process per partition store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from partitions.process import PartitionBusyError, PartitionDataError, claim_store
from runtime import locks
from runtime.config import Config
from runtime.supervisor import StartupError, check_zmq_ports, claim_data_dir


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


def test_a_store_that_cannot_be_claimed_stops_the_partition_for_good(tmp_path: Path) -> None:
    # A file where the partition's directory should be: no restart would help, so it is not PartitionBusyError.
    data = tmp_path / "data"
    data.mkdir()
    (data / "partition-000").write_text("not a directory")
    with pytest.raises(PartitionDataError, match=r"partition 0: cannot claim its store .*partition-000"):
        claim_store(Config(data_dir=str(data), partitions=1), 0)


def test_a_data_dir_that_cannot_be_claimed_is_a_startup_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StartupError, match=r"cannot use .*file/data as the data directory"):
        claim_data_dir(Config(data_dir=str(tmp_path / "file" / "data")))


def test_the_holder_is_named_even_over_a_longer_old_record(tmp_path: Path) -> None:
    path = tmp_path / "claim"
    path.write_text("99999999\nleft over\n")  # a previous holder's record, longer than ours
    fd = locks.claim(str(path))
    try:
        assert path.read_text() == f"{os.getpid()}\n"
        with pytest.raises(locks.ClaimHeld) as held:
            locks.claim(str(path))
        assert held.value.holder == os.getpid()
    finally:
        os.close(fd)


def test_a_zmq_address_that_is_not_on_this_host_is_not_blamed_on_another_node() -> None:
    # 192.0.2.1 (TEST-NET-1) is assigned to no interface here: binding fails at once and sends nothing.
    config = Config(zmq_transport="tcp", zmq_host="192.0.2.1", zmq_base_port=5600, partitions=1)
    with pytest.raises(StartupError) as refused:
        check_zmq_ports(config)
    assert "cannot bind partition 0's ZeroMQ address 192.0.2.1:5600" in str(refused.value)
    assert "another durable-runtime node" not in str(refused.value)
