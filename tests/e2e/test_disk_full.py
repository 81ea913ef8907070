"""A full disk surfaces as UNAVAILABLE with a clear message, loses nothing acknowledged, and recovers."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.internal import orchestrator_service_pb2_grpc as stubs
from google.protobuf import wrappers_pb2

from .conftest import EngineRuntime
from .helpers import DEADLINE_S, new_id, wait_until

pytestmark = pytest.mark.engine_only

FS_BYTES = 48 << 20
FILLER_BYTES = 36 << 20
PAYLOAD = '"' + "x" * (256 << 10) + '"'  # 256 KiB per instance fills the rest quickly


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs, most of it taken by a filler file the test can delete to free space."""
    mount_point = tmp_path / "fs"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FS_BYTES}", "tmpfs", str(mount_point)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        (mount_point / "filler").write_bytes(b"\0" * FILLER_BYTES)
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def start(stub: stubs.TaskHubSidecarServiceStub, instance_id: str) -> None:
    request = pb.CreateInstanceRequest(instanceId=instance_id, name="Waits", input=wrappers_pb2.StringValue(value=PAYLOAD))
    stub.StartInstance(request, timeout=5)


def test_disk_full_is_unavailable_then_recovers(small_disk: Path):
    runtime = EngineRuntime(small_disk / "data", partitions=2, extra_args=["--map-size-bytes", str(1 << 20)])
    runtime.start()
    channel = grpc.insecure_channel(runtime.address)
    stub = stubs.TaskHubSidecarServiceStub(channel)
    acknowledged: list[str] = []
    try:
        refusal = None
        for _ in range(200):  # bounded: the free space holds far fewer than 200 payloads
            instance_id = new_id("full")
            try:
                start(stub, instance_id)
                acknowledged.append(instance_id)
            except grpc.RpcError as exc:
                refusal = exc
                break
        assert refusal is not None, "the disk never filled up"
        assert refusal.code() == grpc.StatusCode.UNAVAILABLE, refusal
        assert "could not commit" in refusal.details() and "disk" in refusal.details(), refusal.details()
        assert acknowledged, "nothing was accepted before the disk filled"

        (small_disk / "filler").unlink()  # space returns

        def accepts() -> bool:
            try:
                start(stub, new_id("after"))
                return True
            except grpc.RpcError:
                return False

        wait_until(accepts, timeout=DEADLINE_S * 2, message="the runtime accepts work again once space returns")
        for instance_id in acknowledged:
            state = stub.GetInstance(pb.GetInstanceRequest(instanceId=instance_id, getInputsAndOutputs=True), timeout=5)
            assert state.exists, f"acknowledged instance {instance_id} was lost"
            assert state.orchestrationState.input.value == PAYLOAD
    finally:
        channel.close()
        runtime.close()
