"""CreateTaskHub / DeleteTaskHub and SkipGracefulOrchestrationTerminations."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from durabletask import client as dt_client
from durabletask import task
from durabletask.client import OrchestrationStatus
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.internal import orchestrator_service_pb2_grpc as stubs
from google.protobuf import wrappers_pb2

from .conftest import EngineRuntime
from .helpers import DEADLINE_S, new_id, running_worker

pytestmark = pytest.mark.engine_only


def wait_forever(ctx: task.OrchestrationContext, _):
    return (yield ctx.wait_for_external_event("never"))


def add_one(ctx: task.OrchestrationContext, n: int):
    return n + 1


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[tuple[EngineRuntime, dt_client.TaskHubGrpcClient, stubs.TaskHubSidecarServiceStub]]:
    """A private runtime that permits task hub deletion."""
    runtime = EngineRuntime(tmp_path / "data", extra_args=["--allow-task-hub-deletion", "true"])
    runtime.start()
    channel = grpc.insecure_channel(runtime.address)
    client = dt_client.TaskHubGrpcClient(host_address=runtime.address)
    try:
        yield runtime, client, stubs.TaskHubSidecarServiceStub(channel)
    finally:
        client.close()
        channel.close()
        runtime.close()


def test_delete_task_hub_is_refused_unless_permitted(raw_stub):
    with pytest.raises(grpc.RpcError) as refused:
        raw_stub.DeleteTaskHub(pb.DeleteTaskHubRequest(), timeout=DEADLINE_S)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--allow-task-hub-deletion" in refused.value.details()
    with pytest.raises(grpc.RpcError) as recreate:
        raw_stub.CreateTaskHub(pb.CreateTaskHubRequest(recreateIfExists=True), timeout=DEADLINE_S)
    assert recreate.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    raw_stub.CreateTaskHub(pb.CreateTaskHubRequest(), timeout=DEADLINE_S)  # it exists: a no-op


def test_delete_task_hub_wipes_every_partition_and_the_hub_keeps_working(hub):
    runtime, client, stub = hub
    with running_worker(runtime.address, [add_one, wait_forever]):
        done = [client.schedule_new_orchestration(add_one, input=i, instance_id=new_id("wipe")) for i in range(6)]
        for iid in done:
            client.wait_for_orchestration_completion(iid, timeout=DEADLINE_S)
        waiting = client.schedule_new_orchestration(wait_forever, instance_id=new_id("wipe-wait"))
        client.wait_for_orchestration_start(waiting, timeout=DEADLINE_S)

        stub.DeleteTaskHub(pb.DeleteTaskHubRequest(), timeout=DEADLINE_S)

        assert all(client.get_orchestration_state(iid) is None for iid in done + [waiting])
        assert list(client.get_all_orchestration_states()) == []
        again = client.schedule_new_orchestration(add_one, input=41, instance_id=done[0])
        assert client.wait_for_orchestration_completion(again, timeout=DEADLINE_S).get_output() == 42


def test_skip_graceful_terminations_ends_instances_without_a_worker(client, raw_stub):
    running = client.schedule_new_orchestration(wait_forever, instance_id=new_id("skip"))  # no worker here
    finished = client.schedule_new_orchestration(wait_forever, instance_id=new_id("skip-done"))
    client.terminate_orchestration(finished)
    raw_stub.SkipGracefulOrchestrationTerminations(
        pb.SkipGracefulOrchestrationTerminationsRequest(instanceBatch=pb.InstanceBatch(instanceIds=[finished])),
        timeout=DEADLINE_S,
    )  # `finished` has a pending terminate event but no worker: forcing it ends it

    response = raw_stub.SkipGracefulOrchestrationTerminations(
        pb.SkipGracefulOrchestrationTerminationsRequest(
            instanceBatch=pb.InstanceBatch(instanceIds=[running, finished, "skip-nobody"]),
            reason=wrappers_pb2.StringValue(value='"maintenance"'),
        ),
        timeout=DEADLINE_S,
    )

    assert sorted(response.unterminatedInstanceIds) == sorted([finished, "skip-nobody"])
    state = client.get_orchestration_state(running)
    assert state.runtime_status == OrchestrationStatus.TERMINATED
    assert state.get_output() == "maintenance"


def test_skip_graceful_terminations_names_an_instance_once_however_often_it_is_listed(client, raw_stub):
    running = client.schedule_new_orchestration(wait_forever, instance_id=new_id("skip-twice"))  # no worker here

    response = raw_stub.SkipGracefulOrchestrationTerminations(
        pb.SkipGracefulOrchestrationTerminationsRequest(instanceBatch=pb.InstanceBatch(instanceIds=[running, running])),
        timeout=DEADLINE_S,
    )

    assert list(response.unterminatedInstanceIds) == []
    assert client.get_orchestration_state(running).runtime_status == OrchestrationStatus.TERMINATED
