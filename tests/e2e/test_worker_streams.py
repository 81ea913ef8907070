"""Worker streams seen from a raw protocol worker, with no SDK worker competing for the items. Engine only.

- An idle stream gets a healthPing work item after each silent interval (30 s by default;
  `--health-ping-interval-s` here), and pings do not get in the way of real work items.
- A completion token is good once: reused, or used after its item was abandoned, it gets FAILED_PRECONDITION
  with a clear message and changes nothing. An abandoned item comes back with a new token.
- An entity batch in flight on a stream that ends comes back on the next stream; abandoned, it comes back too.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.internal import orchestrator_service_pb2_grpc as stubs
from google.protobuf import timestamp_pb2, wrappers_pb2

from runtime.hashing import partition_for

from .conftest import EngineRuntime
from .faults_workload import gateway_pid
from .helpers import DEADLINE_S, RawStream, new_id, wait_until

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


def assert_stale(call: Any) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, f"{err.value.code()}: {err.value.details()}"
    assert "is not the current lease" in err.value.details(), err.value.details()


def test_a_used_or_abandoned_token_is_stale_and_changes_nothing(pinging_runtime):
    with grpc.insecure_channel(pinging_runtime.address) as channel:
        stub = stubs.TaskHubSidecarServiceStub(channel)
        stream = RawStream(channel, pb.GetWorkItemsRequest())
        try:
            instance_id = new_id("stale")
            stub.StartInstance(pb.CreateInstanceRequest(instanceId=instance_id, name="staled"), timeout=DEADLINE_S)
            first = next_of_kind(stream, "orchestratorRequest", [])
            schedule = pb.OrchestratorResponse(
                instanceId=instance_id, completionToken=first.completionToken,
                actions=[pb.OrchestratorAction(id=1, scheduleTask=pb.ScheduleTaskAction(name="act"))])
            stub.CompleteOrchestratorTask(schedule, timeout=DEADLINE_S)
            assert_stale(lambda: stub.CompleteOrchestratorTask(schedule, timeout=DEADLINE_S))

            activity = next_of_kind(stream, "activityRequest", [])
            assert activity.activityRequest.taskId == 1

            def result(value: str) -> pb.ActivityResponse:
                return pb.ActivityResponse(instanceId=instance_id, taskId=1, completionToken=activity.completionToken,
                                           result=wrappers_pb2.StringValue(value=value))

            stub.CompleteActivityTask(result('"first"'), timeout=DEADLINE_S)
            assert_stale(lambda: stub.CompleteActivityTask(result('"second"'), timeout=DEADLINE_S))

            replay = next_of_kind(stream, "orchestratorRequest", [])
            results = [e.taskCompleted.result.value for e in replay.orchestratorRequest.newEvents
                       if e.HasField("taskCompleted")]
            assert results == ['"first"'], replay.orchestratorRequest.newEvents

            stub.AbandonTaskOrchestratorWorkItem(
                pb.AbandonOrchestrationTaskRequest(completionToken=replay.completionToken), timeout=DEADLINE_S)
            finish = pb.OrchestratorResponse(
                instanceId=instance_id, completionToken=replay.completionToken,
                actions=[pb.OrchestratorAction(id=2, completeOrchestration=pb.CompleteOrchestrationAction(
                    orchestrationStatus=pb.ORCHESTRATION_STATUS_COMPLETED,
                    result=wrappers_pb2.StringValue(value='"done"')))])
            assert_stale(lambda: stub.CompleteOrchestratorTask(finish, timeout=DEADLINE_S))
            state = stub.GetInstance(pb.GetInstanceRequest(instanceId=instance_id), timeout=DEADLINE_S)
            assert state.orchestrationState.orchestrationStatus == pb.ORCHESTRATION_STATUS_RUNNING

            again = next_of_kind(stream, "orchestratorRequest", [])  # the abandoned item, after a short backoff
            assert again.completionToken != replay.completionToken
            results = [e.taskCompleted.result.value
                       for e in [*again.orchestratorRequest.pastEvents, *again.orchestratorRequest.newEvents]
                       if e.HasField("taskCompleted")]
            assert results == ['"first"'], again.orchestratorRequest
            finish.completionToken = again.completionToken
            stub.CompleteOrchestratorTask(finish, timeout=DEADLINE_S)
            done = stub.WaitForInstanceCompletion(
                pb.GetInstanceRequest(instanceId=instance_id, getInputsAndOutputs=True), timeout=DEADLINE_S)
            assert done.orchestrationState.orchestrationStatus == pb.ORCHESTRATION_STATUS_COMPLETED
            assert done.orchestrationState.output.value == '"done"'
        finally:
            stream.close()


def test_an_entity_batch_held_by_a_closed_stream_or_abandoned_comes_back(pinging_runtime):
    """A stream that ends with an entity batch in flight hands it back (this once took its partition down), and so
    does an explicit abandon."""
    entity_id = f"@counter@{new_id('closed')}"
    with grpc.insecure_channel(pinging_runtime.address) as channel:
        stub = stubs.TaskHubSidecarServiceStub(channel)
        first = RawStream(channel, pb.GetWorkItemsRequest())
        try:
            stub.SignalEntity(pb.SignalEntityRequest(instanceId=entity_id, name="add", requestId="r1",
                                                     input=wrappers_pb2.StringValue(value="5")), timeout=DEADLINE_S)
            held = next_of_kind(first, "entityRequestV2", [])
            assert held.entityRequestV2.instanceId == entity_id
        finally:
            first.close()

        second = RawStream(channel, pb.GetWorkItemsRequest())
        try:
            again = next_of_kind(second, "entityRequestV2", [])
            assert again.completionToken != held.completionToken
            assert [e.entityOperationSignaled.operation for e in again.entityRequestV2.operationRequests] == ["add"]
            # An explicit abandon holds the entity (about a second), then the batch comes back once more.
            stub.AbandonTaskEntityWorkItem(pb.AbandonEntityTaskRequest(completionToken=again.completionToken),
                                           timeout=DEADLINE_S)
            last = next_of_kind(second, "entityRequestV2", [])
            assert last.completionToken not in (held.completionToken, again.completionToken)
            assert [e.entityOperationSignaled.operation for e in last.entityRequestV2.operationRequests] == ["add"]
            stub.CompleteEntityTask(pb.EntityBatchResult(
                completionToken=last.completionToken, entityState=wrappers_pb2.StringValue(value="5"),
                results=[pb.OperationResult(success=pb.OperationResultSuccess())]), timeout=DEADLINE_S)
        finally:
            second.close()
        got = stub.GetEntity(pb.GetEntityRequest(instanceId=entity_id, includeState=True), timeout=DEADLINE_S)
        assert got.exists and got.entity.serializedState.value == "5", got
    log = pinging_runtime.log_path.read_text(errors="replace")
    assert "exited with" not in log, pinging_runtime.log_tail()


def complete(stub: Any, item: Any, *actions: pb.OrchestratorAction) -> None:
    stub.CompleteOrchestratorTask(pb.OrchestratorResponse(
        instanceId=item.orchestratorRequest.instanceId, completionToken=item.completionToken, actions=actions),
        timeout=DEADLINE_S)


DONE = pb.OrchestratorAction(id=0, completeOrchestration=pb.CompleteOrchestrationAction(
    orchestrationStatus=pb.ORCHESTRATION_STATUS_COMPLETED))


@contextlib.contextmanager
def runtime_with_stream(tmp_path: Path, request: pb.GetWorkItemsRequest, *flags: str) -> Iterator[tuple[Any, RawStream]]:
    """A runtime of the test's own (started with `flags`), a stub and one raw worker stream on it."""
    rt = EngineRuntime(tmp_path / "data", extra_args=list(flags))
    rt.start()
    try:
        with grpc.insecure_channel(rt.address) as channel:
            stream = RawStream(channel, request)
            try:
                yield stubs.TaskHubSidecarServiceStub(channel), stream
            finally:
                stream.close()
    finally:
        rt.close()


def start_with_one_activity(stub: Any, stream: RawStream, instance_id: str, activity: str) -> Any:
    """Start `instance_id`, answer its first turn with scheduleTask(`activity`) as task 1: the activity work item."""
    stub.StartInstance(pb.CreateInstanceRequest(instanceId=instance_id, name=instance_id), timeout=DEADLINE_S)
    complete(stub, stream.next(), pb.OrchestratorAction(id=1, scheduleTask=pb.ScheduleTaskAction(name=activity)))
    item = stream.next()
    assert item.activityRequest.name == activity, item
    return item


def test_a_lease_that_expires_while_its_gateway_stalls_frees_the_slot_and_refuses_the_late_completion(tmp_path: Path):
    """The gateway stalls (SIGSTOP) for longer than --lease-timeout-s but not --gateway-timeout-s, so its
    heartbeats stop renewing the item its stream holds. The lease runs out and the item goes back to the queue;
    the partition tells the gateway, which frees the stream's one slot, so the stream gets work again instead of
    being one slot short for as long as it lives. The stalled item's late completion is refused and changes
    nothing."""
    rt = EngineRuntime(tmp_path / "data", extra_args=[
        "--lease-timeout-s", "1", "--heartbeat-interval-s", "0.1", "--gateway-timeout-s", "60"])
    rt.start()
    try:
        with grpc.insecure_channel(rt.address) as channel:
            stub = stubs.TaskHubSidecarServiceStub(channel)
            stream = RawStream(channel, pb.GetWorkItemsRequest(maxConcurrentOrchestrationWorkItems=1))
            try:
                ids = {new_id("held"), new_id("held")}
                for instance_id in ids:
                    stub.StartInstance(pb.CreateInstanceRequest(instanceId=instance_id, name="held"),
                                       timeout=DEADLINE_S)
                first = stream.next()  # the one slot is taken
                gateway = gateway_pid(rt)
                assert gateway is not None
                os.kill(gateway, signal.SIGSTOP)
                try:
                    wait_until(lambda: f"lease {first.completionToken} expired" in rt.log_path.read_text(
                        errors="replace"), message="the stalled item's lease to expire")
                finally:
                    os.kill(gateway, signal.SIGCONT)
                second = stream.next()  # arrives only because the expiry freed the slot
                assert second.orchestratorRequest.instanceId in ids
                assert second.completionToken != first.completionToken
                with pytest.raises(grpc.RpcError) as late:
                    complete(stub, first, DONE)
                assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION, late.value
                complete(stub, second, DONE)
                state = stub.GetInstance(pb.GetInstanceRequest(instanceId=second.orchestratorRequest.instanceId),
                                         timeout=DEADLINE_S)
                assert state.orchestrationState.orchestrationStatus == pb.ORCHESTRATION_STATUS_COMPLETED, state
            finally:
                stream.close()
    finally:
        rt.close()


def test_work_items_of_every_kind_held_by_a_stream_outlive_their_lease_timeout(tmp_path: Path):
    """Heartbeats renew the leases the gateway's streams hold (their tokens listed, partition by partition), so
    an activity, an entity batch or an orchestrator turn lasts as long as its stream holds it: with a 1 s lease
    timeout, none is sent again while a 2.5 s durable timer of another instance runs out, and their completions
    are then accepted. (The SDK queues every kind of item behind one small thread pool, so a turn can wait there
    behind slow activities for longer than any lease; it was once sent again each time its lease ran out.)"""
    request = pb.GetWorkItemsRequest(maxConcurrentOrchestrationWorkItems=10, maxConcurrentActivityWorkItems=10,
                                     maxConcurrentEntityWorkItems=10)
    flags = ("--lease-timeout-s", "1", "--heartbeat-interval-s", "0.1")
    with runtime_with_stream(tmp_path, request, *flags) as (stub, stream):
        held, turn, clock = new_id("held"), new_id("turn"), new_id("clock")
        entity_id = f"@counter@{new_id('held')}"
        activity = start_with_one_activity(stub, stream, held, "slow")
        stub.SignalEntity(pb.SignalEntityRequest(instanceId=entity_id, name="add", requestId="r1",
                                                 input=wrappers_pb2.StringValue(value="5")), timeout=DEADLINE_S)
        batch = stream.next()
        assert batch.entityRequestV2.instanceId == entity_id, batch
        stub.StartInstance(pb.CreateInstanceRequest(instanceId=turn, name="turn"), timeout=DEADLINE_S)
        held_turn = stream.next()
        assert held_turn.orchestratorRequest.instanceId == turn, held_turn

        stub.StartInstance(pb.CreateInstanceRequest(instanceId=clock, name="clock"), timeout=DEADLINE_S)
        fire_at = timestamp_pb2.Timestamp()
        fire_at.FromMilliseconds(int(time.time() * 1000) + 2_500)
        complete(stub, stream.next(), pb.OrchestratorAction(id=1, createTimer=pb.CreateTimerAction(fireAt=fire_at)))
        fired = stream.next()  # only the timer's turn comes: neither is sent again meanwhile
        assert fired.orchestratorRequest.instanceId == clock, fired
        assert any(e.HasField("timerFired") for e in fired.orchestratorRequest.newEvents)
        complete(stub, fired, DONE)

        complete(stub, held_turn, DONE)
        state = stub.GetInstance(pb.GetInstanceRequest(instanceId=turn), timeout=DEADLINE_S)
        assert state.orchestrationState.orchestrationStatus == pb.ORCHESTRATION_STATUS_COMPLETED, state

        stub.CompleteEntityTask(pb.EntityBatchResult(
            completionToken=batch.completionToken, entityState=wrappers_pb2.StringValue(value="5"),
            results=[pb.OperationResult(success=pb.OperationResultSuccess())]), timeout=DEADLINE_S)
        got = stub.GetEntity(pb.GetEntityRequest(instanceId=entity_id, includeState=True), timeout=DEADLINE_S)
        assert got.entity.serializedState.value == "5", got

        stub.CompleteActivityTask(pb.ActivityResponse(
            instanceId=held, taskId=1, completionToken=activity.completionToken,
            result=wrappers_pb2.StringValue(value='"done"')), timeout=DEADLINE_S)
        turn = stream.next()
        assert [e.taskCompleted.result.value for e in turn.orchestratorRequest.newEvents
                if e.HasField("taskCompleted")] == ['"done"']
        complete(stub, turn, DONE)


def test_a_refused_completion_leaves_its_item_to_expire_and_run_again(tmp_path: Path):
    """A completion the gateway refuses as malformed (here: no instance id, a real token) applies nothing, and
    the stream no longer holds its item: heartbeats stop renewing it, so it runs again once its lease runs out
    instead of staying leased for as long as the stream lives."""
    request = pb.GetWorkItemsRequest(maxConcurrentOrchestrationWorkItems=1)
    with runtime_with_stream(tmp_path, request, "--lease-timeout-s", "1", "--heartbeat-interval-s", "0.1") as (
            stub, stream):
        instance_id = new_id("refused")
        stub.StartInstance(pb.CreateInstanceRequest(instanceId=instance_id, name="refused"), timeout=DEADLINE_S)
        first = stream.next()
        with pytest.raises(grpc.RpcError) as refused:
            stub.CompleteOrchestratorTask(pb.OrchestratorResponse(
                completionToken=first.completionToken, actions=[DONE]), timeout=DEADLINE_S)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
        again = stream.next()
        assert again.orchestratorRequest.instanceId == instance_id, again
        assert again.completionToken != first.completionToken
        complete(stub, again, DONE)
        state = stub.GetInstance(pb.GetInstanceRequest(instanceId=instance_id), timeout=DEADLINE_S)
        assert state.orchestrationState.orchestrationStatus == pb.ORCHESTRATION_STATUS_COMPLETED, state


def test_an_activity_result_of_65_mib_fails_its_task_instead_of_hanging(tmp_path: Path):
    """The transport reads a completion of any size, so it reaches the servicer, which turns a result above
    --max-request-bytes into a task failure. (The transport once refused completions above 64 MiB itself:
    the stream then held the item and the gateway's heartbeats renewed its lease for ever.)"""
    request = pb.GetWorkItemsRequest(maxConcurrentOrchestrationWorkItems=10, maxConcurrentActivityWorkItems=10)
    with runtime_with_stream(tmp_path, request) as (stub, stream):
        iid = new_id("huge")
        activity = start_with_one_activity(stub, stream, iid, "huge")
        huge = '"' + "x" * ((65 << 20) - 2) + '"'
        stub.CompleteActivityTask(pb.ActivityResponse(
            instanceId=iid, taskId=1, completionToken=activity.completionToken,
            result=wrappers_pb2.StringValue(value=huge)), timeout=DEADLINE_S)
        del huge
        turn = stream.next()
        [failed] = [e.taskFailed for e in turn.orchestratorRequest.newEvents if e.HasField("taskFailed")]
        assert failed.taskScheduledId == 1
        assert failed.failureDetails.errorType == "ActivityResultTooLarge"
        size = re.search(r"result was (\d+) bytes; the limit is 4194304", failed.failureDetails.errorMessage)
        assert size is not None and int(size.group(1)) > 65 << 20, failed.failureDetails.errorMessage
        complete(stub, turn, DONE)


def one_instance_per_partition(partitions: int) -> list[str]:
    """New instance ids, one hashed to each partition."""
    ids: dict[int, str] = {}
    for _ in range(1000 * partitions):
        instance_id = new_id("probe")
        ids.setdefault(partition_for(instance_id, partitions), instance_id)
        if len(ids) == partitions:
            return list(ids.values())
    raise AssertionError(f"no instance id for some of the {partitions} partitions")


def test_a_gateway_dropped_after_a_silence_gets_its_streams_full_share_again(tmp_path: Path):
    """The gateway stalls (SIGSTOP) for longer than --gateway-timeout-s, so the partitions drop it, with the
    standing credits they held for it. When they hear from it again they say so, and it starts its accounting
    over. So when every partition has more activities ready than the stream's limit, the stream gets its whole
    limit at once, not the limit minus the credits the partitions dropped."""
    rt = EngineRuntime(tmp_path / "data", extra_args=["--gateway-timeout-s", "2"])
    limit = 8 * rt.partitions  # each partition's standing share, limit // (4 * partitions), is then 2
    rt.start()
    try:
        with grpc.insecure_channel(rt.address) as channel:
            stub = stubs.TaskHubSidecarServiceStub(channel)
            stream = RawStream(channel, pb.GetWorkItemsRequest(
                maxConcurrentOrchestrationWorkItems=limit, maxConcurrentActivityWorkItems=limit))

            def run_one_instance_per_partition() -> None:
                for instance_id in one_instance_per_partition(rt.partitions):
                    stub.StartInstance(pb.CreateInstanceRequest(instanceId=instance_id, name="probe"),
                                       timeout=DEADLINE_S)
                    complete(stub, stream.next(), DONE)

            try:
                run_one_instance_per_partition()  # every partition now holds its standing credits
                gateway = gateway_pid(rt)
                assert gateway is not None
                os.kill(gateway, signal.SIGSTOP)
                try:
                    wait_until(lambda: rt.log_path.read_text(errors="replace").count(
                        "silent; releasing its work items") >= rt.partitions,
                        message="every partition to drop the silent gateway")
                finally:
                    os.kill(gateway, signal.SIGCONT)
                # A partition answers the first message it gets from the gateway after the silence before anything
                # else, on the same socket: once an instance has run on every partition, every one has told it.
                run_one_instance_per_partition()

                fan_out = [pb.OrchestratorAction(id=n, scheduleTask=pb.ScheduleTaskAction(name="act"))
                           for n in range(limit)]
                for instance_id in one_instance_per_partition(rt.partitions):
                    stub.StartInstance(pb.CreateInstanceRequest(instanceId=instance_id, name="fan"),
                                       timeout=DEADLINE_S)
                held: set[str] = set()  # activity tokens, none of them completed
                while len(held) < limit:
                    item = stream.next()
                    if item.HasField("orchestratorRequest"):
                        complete(stub, item, *fan_out)
                    else:
                        held.add(item.completionToken)
            finally:
                stream.close()
    finally:
        rt.close()
