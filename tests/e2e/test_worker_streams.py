"""Idle worker streams: the engine sends a healthPing work item after each silent interval (30 s by default;
`--health-ping-interval-s` here), and pings do not get in the way of real work items. Engine only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.internal import orchestrator_service_pb2_grpc as stubs

from .conftest import EngineRuntime
from .helpers import DEADLINE_S, RawStream, new_id

pytestmark = pytest.mark.engine_only

PING_INTERVAL_S = 0.2


@pytest.fixture
def pinging_runtime(tmp_path: Path) -> Iterator[EngineRuntime]:
    rt = EngineRuntime(tmp_path / "data", extra_args=["--health-ping-interval-s", str(PING_INTERVAL_S)])
    rt.start()
    try:
        yield rt
    finally:
        rt.close()


def next_of_kind(stream: RawStream, wanted: str, skipped: list[str]) -> Any:
    """The stream's next item whose `request` is `wanted`; the kinds of the items before it go to `skipped`."""
    while len(skipped) < 100:
        item = stream.next()
        kind = item.WhichOneof("request")
        if kind == wanted:
            return item
        skipped.append(kind)
    raise AssertionError(f"no {wanted} item among the first {len(skipped)}: {skipped}")


def test_idle_stream_gets_repeated_health_pings_and_work_still_flows(pinging_runtime):
    with grpc.insecure_channel(pinging_runtime.address) as channel:
        stub = stubs.TaskHubSidecarServiceStub(channel)
        stream = RawStream(channel, pb.GetWorkItemsRequest(), keep_pings=True)
        try:
            skipped: list[str] = []
            for _ in range(3):  # not just one: a ping follows every silent interval
                ping = next_of_kind(stream, "healthPing", skipped)
                assert ping.completionToken == "", ping
            assert skipped == [], f"an idle stream got work items: {skipped}"

            instance_id = new_id("ping")
            stub.StartInstance(pb.CreateInstanceRequest(instanceId=instance_id, name="pinged"), timeout=DEADLINE_S)
            work = next_of_kind(stream, "orchestratorRequest", skipped)
            assert work.orchestratorRequest.instanceId == instance_id
            stub.CompleteOrchestratorTask(pb.OrchestratorResponse(
                instanceId=instance_id, completionToken=work.completionToken,
                actions=[pb.OrchestratorAction(id=0, completeOrchestration=pb.CompleteOrchestrationAction(
                    orchestrationStatus=pb.ORCHESTRATION_STATUS_COMPLETED))]), timeout=DEADLINE_S)
            done = stub.WaitForInstanceCompletion(pb.GetInstanceRequest(instanceId=instance_id), timeout=DEADLINE_S)
            assert done.orchestrationState.orchestrationStatus == pb.ORCHESTRATION_STATUS_COMPLETED

            after: list[str] = []
            next_of_kind(stream, "healthPing", after)  # idle again: the pings resume
            assert after == [], f"unexpected items after the instance completed: {after}"
        finally:
            stream.close()
