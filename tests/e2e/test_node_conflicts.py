"""Two nodes on one host that would share a data directory or ZeroMQ ports: the second one is refused with a
clear message (exit 2) before it starts anything, and the first keeps serving, untouched. A port taken later,
while a partition restarts, stops the node that lost it. Engine only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.internal import orchestrator_service_pb2_grpc as stubs

from runtime.hashing import partition_for

from .conftest import SHUTDOWN_DEADLINE_S, EngineRuntime, free_port, free_port_range
from .faults_workload import partition_pid
from .helpers import DEADLINE_S, new_id, wait_until

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


@pytest.mark.parametrize("gateways", ["1", "2"])
def test_a_second_node_on_the_same_grpc_port_is_refused(tmp_path: Path, gateways: str):
    """With several gateways the port is shared (SO_REUSEPORT), so another node's gateways could bind it too and
    take half the connections, to their own data; with one, the second node's gateway would be restarted for
    ever. The second node is refused before it starts anything."""
    first = EngineRuntime(tmp_path / "first", extra_args=["--gateways", gateways])
    try:
        first.start()
        refused = first.run_refused({"--data-dir": str(tmp_path / "second")})
        assert refused.returncode == 2, (refused.returncode, refused.stdout, refused.stderr)
        assert f"port 127.0.0.1:{first.port} is taken" in refused.stderr, refused.stderr
        assert_serves_untouched(first)
    finally:
        first.close()


def test_a_tls_key_that_does_not_go_with_its_certificate_is_refused(tmp_path: Path):
    """gRPC would only find out when the gateway binds its port, and say no more than 'failed to bind'."""
    pems = []
    for name in ("one", "two"):
        key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.crt"
        made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                               "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"], capture_output=True)
        if made.returncode != 0:
            pytest.skip(f"openssl cannot make a test certificate: {made.stderr!r}")
        pems.append((key, cert))
    (key_one, _), (_, cert_two) = pems
    node = EngineRuntime(tmp_path / "data")
    refused = node.run_refused({}, "--tls-cert-file", str(cert_two), "--tls-key-file", str(key_one))
    assert refused.returncode == 2, (refused.returncode, refused.stdout, refused.stderr)
    assert "does not go with --tls-cert-file" in refused.stderr, refused.stderr


def grab_port(port: int, gave_up: Callable[[], bool]) -> socket.socket | None:
    """Listen on 127.0.0.1:`port` as soon as it is free; None once `gave_up()` (or after DEADLINE_S)."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        grabbed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        grabbed.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the old connections' TIME_WAIT
        try:
            grabbed.bind(("127.0.0.1", port))
            grabbed.listen()
            return grabbed
        except OSError:
            grabbed.close()
        if gave_up():
            return None
        time.sleep(0.001)
    return None


def test_a_partition_port_taken_while_it_restarts_stops_the_node(tmp_path: Path):
    """Another process takes a partition's tcp port between the partition's death and its restart. Retrying
    the bind for ever would leave this node's gateway talking to whatever holds the port, so the node stops,
    with a message that names the port."""
    base = free_port_range(2)
    node = EngineRuntime(tmp_path / "data", partitions=2,
                         extra_args=["--zmq-transport", "tcp", "--zmq-base-port", str(base)])
    port = base + 1
    grabbed = None
    try:
        node.start()
        for _ in range(5):  # the grab has to land in the restart backoff (0.1 s, then longer): retry if it did not
            old = wait_until(lambda: partition_pid(node, 1), message="partition 1 running")
            os.kill(old, signal.SIGKILL)
            grabbed = grab_port(port, gave_up=lambda old=old: partition_pid(node, 1) not in (None, old))
            if grabbed is not None:
                break
        assert grabbed is not None, "the supervisor restarted partition 1 before its port could be taken"
        assert node.proc.wait(timeout=SHUTDOWN_DEADLINE_S) == 78, node.log_tail()
        log = node.log_path.read_text(errors="replace")
        assert (f"partition 1 cannot bind tcp://127.0.0.1:{port} (Address already in use); stopping the node."
                " Give each node on a host its own --zmq-base-port" in log), node.log_tail()
        assert "partition-1 cannot run with this data directory or configuration" in log, node.log_tail()
    finally:
        if grabbed is not None:
            grabbed.close()
        node.close()


def test_requests_sent_while_their_partition_restarts_are_applied_once_and_answered(tmp_path: Path):
    """A StartInstance sent while its partition is down waits in the gateway's socket and reaches the restarted
    partition, behind heartbeats (sent every 50 ms here). The new process refuses it unapplied, since it names the
    old epoch, and the gateway sends it again: the caller gets OK and the instance exists once. What the caller
    is told must match what happened: OK and applied once, or UNAVAILABLE and not applied. (Before, the gateway
    failed it with UNAVAILABLE as soon as a heartbeat showed the new epoch, while the queued copy was applied
    anyway: a retry then found ALREADY_EXISTS, and a retried RaiseEvent was raised twice.)"""
    node = EngineRuntime(tmp_path / "data", partitions=2, extra_args=["--heartbeat-interval-s", "0.05"])
    try:
        node.start()
        with grpc.insecure_channel(node.address) as channel:
            stub = stubs.TaskHubSidecarServiceStub(channel)
            assert_serves(node)  # the gateway knows both partitions' epochs
            sent_while_down = 0
            for _ in range(20):  # bounded: each round needs its request to leave before the restart
                old = wait_until(lambda: partition_pid(node, 1), message="partition 1 running")
                instance_id = next(i for i in (new_id("late") for _ in range(1000)) if partition_for(i, 2) == 1)
                os.kill(old, signal.SIGKILL)
                wait_until(lambda old=old: partition_pid(node, 1) != old, message="partition 1 gone")
                down = partition_pid(node, 1) is None
                start = pb.CreateInstanceRequest(instanceId=instance_id, name="late")
                try:
                    stub.StartInstance(start, timeout=DEADLINE_S)
                    answered = True
                except grpc.RpcError as exc:
                    # Written into the old process's socket just before the gateway's side noticed it had closed:
                    # lost with it. Unknown to the gateway, so UNAVAILABLE; it must then not have been applied.
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                    assert "may not have taken effect" in (exc.details() or ""), exc
                    answered = False
                got = wait_until(lambda i=instance_id: _get_when_up(stub, i), message="partition 1 back")
                assert got.exists == answered, (answered, got)
                if answered:  # applied once: a retry finds it
                    with pytest.raises(grpc.RpcError) as again:
                        stub.StartInstance(start, timeout=DEADLINE_S)
                    assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS
                sent_while_down += down
                if sent_while_down == 3:
                    break
            assert sent_while_down == 3, f"only {sent_while_down} requests left while partition 1 was down"
    finally:
        node.close()


def _get_when_up(stub: stubs.TaskHubSidecarServiceStub, instance_id: str) -> pb.GetInstanceResponse | None:
    """The instance as its partition has it, or None while the partition cannot answer."""
    try:
        return stub.GetInstance(pb.GetInstanceRequest(instanceId=instance_id), timeout=DEADLINE_S)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            return None
        raise
