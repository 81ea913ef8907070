"""Two nodes on one host that would share a data directory or ZeroMQ ports: the second one is refused with a
clear message (exit 2) before it starts anything, and the first keeps serving, untouched. Engine only.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.internal import orchestrator_service_pb2_grpc as stubs

from .conftest import EngineRuntime, free_port, free_port_range
from .helpers import DEADLINE_S, new_id

pytestmark = pytest.mark.engine_only


def start_second_node(first: EngineRuntime, data_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """The same command as `first`'s, on its own gRPC port, with `data_dir` and `extra` instead."""
    return first.run_refused({"--port": str(free_port()), "--data-dir": str(data_dir)}, *extra)


def assert_serves(node: EngineRuntime) -> None:
    """The node answers and stores a new instance."""
    with grpc.insecure_channel(node.address) as channel:
        stub = stubs.TaskHubSidecarServiceStub(channel)
        instance_id = new_id("first")
        stub.StartInstance(pb.CreateInstanceRequest(instanceId=instance_id, name="kept"), timeout=DEADLINE_S)
        got = stub.GetInstance(pb.GetInstanceRequest(instanceId=instance_id), timeout=DEADLINE_S)
        assert got.exists and got.orchestrationState.orchestrationStatus == pb.ORCHESTRATION_STATUS_PENDING


def assert_serves_untouched(node: EngineRuntime) -> None:
    """The node serves, and none of its processes was restarted or replaced (no partition in a new epoch)."""
    assert_serves(node)
    log = node.log_path.read_text(errors="replace")
    assert "exited with" not in log and "(epoch 2)" not in log, node.log_tail()


def test_a_second_node_on_the_same_data_dir_is_refused(tmp_path: Path):
    first = EngineRuntime(tmp_path / "data")
    try:
        first.start()
        refused = start_second_node(first, first.data_dir)
        assert refused.returncode == 2, (refused.returncode, refused.stdout, refused.stderr)
        assert (f"{first.data_dir} is in use by another durable-runtime node (supervisor pid {first.proc.pid})"
                in refused.stderr), refused.stderr
        assert_serves_untouched(first)
    finally:
        first.close()

    first.start()  # the claim ended with the node: the same directory starts again
    try:
        assert_serves(first)
    finally:
        first.close()


def test_a_second_node_on_the_same_zmq_ports_is_refused(tmp_path: Path):
    base = free_port_range(3)
    first = EngineRuntime(tmp_path / "first", partitions=3,
                          extra_args=["--zmq-transport", "tcp", "--zmq-base-port", str(base)])
    try:
        first.start()
        refused = start_second_node(first, tmp_path / "second")
        assert refused.returncode == 2, (refused.returncode, refused.stdout, refused.stderr)
        assert f"partition 0's ZeroMQ port 127.0.0.1:{base} is not free" in refused.stderr, refused.stderr
        assert "--zmq-base-port" in refused.stderr, refused.stderr
        assert_serves_untouched(first)
    finally:
        first.close()
