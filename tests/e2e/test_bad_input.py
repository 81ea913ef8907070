"""Malformed and hostile requests sent with a raw gRPC stub: the right status codes, and the server keeps serving."""

from __future__ import annotations

import grpc
import pytest
from durabletask import task
from durabletask.client import OrchestrationStatus
from durabletask.internal import helpers as ph
from durabletask.internal import orchestrator_service_pb2 as pb
from google.protobuf import empty_pb2, wrappers_pb2

from .helpers import DEADLINE_S, new_id

RPC_TIMEOUT_S = 10


def ping(ctx: task.ActivityContext, n: int) -> int:
    return n


def ping_orchestrator(ctx: task.OrchestrationContext, n: int):
    value = yield ctx.call_activity(ping, input=n)
    return value


def waiter(ctx: task.OrchestrationContext, _):
    value = yield ctx.wait_for_external_event("go")
    return value


@pytest.fixture(scope="module", autouse=True)
def worker(worker_factory):
    return worker_factory([ping_orchestrator, waiter], [ping])


def assert_code(call, *codes: grpc.StatusCode):
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() in codes, f"{err.value.code()}: {err.value.details()}"
    return err.value


def assert_still_serving(raw_stub, client):
    raw_stub.Hello(empty_pb2.Empty(), timeout=RPC_TIMEOUT_S)
    iid = client.schedule_new_orchestration(ping_orchestrator, input=5, instance_id=new_id("alive"))
    state = client.wait_for_orchestration_completion(iid, timeout=DEADLINE_S)
    assert state.runtime_status == OrchestrationStatus.COMPLETED, state.failure_details
    assert state.get_output() == 5


# ---------------------------------------------------------------------------------------------------------
# missing / empty / oversized instance ids
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.engine_only  # the in-memory backend answers NOT_FOUND
def test_raise_event_with_empty_instance_id(raw_stub):
    assert_code(lambda: raw_stub.RaiseEvent(pb.RaiseEventRequest(instanceId="", name="x"), timeout=RPC_TIMEOUT_S),
                grpc.StatusCode.INVALID_ARGUMENT)


@pytest.mark.engine_only  # the in-memory backend accepts them
@pytest.mark.parametrize("entity_id", ["@@", "@counter@", "@@key", "@counter", "counter@a"])
def test_signal_to_an_entity_id_the_sdks_cannot_parse_is_refused(raw_stub, entity_id):
    """The SDKs need `@name@key` with a name (no '@') and a key, neither empty. Such a signal was accepted, and
    its batch then came back to the worker, which abandoned it, for as long as it ran."""
    err = assert_code(lambda: raw_stub.SignalEntity(pb.SignalEntityRequest(
        instanceId=entity_id, name="add", requestId=new_id("r")), timeout=RPC_TIMEOUT_S),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert "@name@key" in err.details(), err.details()


@pytest.mark.engine_only  # the in-memory backend hands the timestamp back as it came
def test_a_start_time_past_year_9999_comes_back_as_a_timestamp_sdks_can_read(raw_stub):
    """A Timestamp may name no time after 9999-12-31. A later scheduled start is clamped to that on the way in,
    instead of coming back out of range (the .NET and Java SDKs throw on such a value)."""
    from google.protobuf import timestamp_pb2

    instance_id = new_id("far")
    raw_stub.StartInstance(pb.CreateInstanceRequest(
        instanceId=instance_id, name="far", scheduledStartTimestamp=timestamp_pb2.Timestamp(seconds=2**40)),
        timeout=RPC_TIMEOUT_S)
    got = raw_stub.GetInstance(pb.GetInstanceRequest(instanceId=instance_id), timeout=RPC_TIMEOUT_S)
    start = got.orchestrationState.scheduledStartTimestamp
    assert start.ToDatetime().year == 9999, start  # ToDatetime raises on a value out of range
    raw_stub.TerminateInstance(pb.TerminateRequest(instanceId=instance_id), timeout=RPC_TIMEOUT_S)


@pytest.mark.engine_only  # the in-memory backend silently accepts
def test_terminate_with_empty_instance_id(raw_stub):
    assert_code(lambda: raw_stub.TerminateInstance(pb.TerminateRequest(instanceId=""), timeout=RPC_TIMEOUT_S),
                grpc.StatusCode.INVALID_ARGUMENT)


def test_raise_event_on_unknown_instance(raw_stub):
    req = pb.RaiseEventRequest(instanceId=new_id("unknown"), name="x")
    assert_code(lambda: raw_stub.RaiseEvent(req, timeout=RPC_TIMEOUT_S), grpc.StatusCode.NOT_FOUND)


def test_raise_event_on_unknown_instance_via_sdk_client(client):
    err = assert_code(lambda: client.raise_orchestration_event(new_id("unknown"), "x", data=1),
                      grpc.StatusCode.NOT_FOUND)
    assert isinstance(err, grpc.RpcError)


@pytest.mark.engine_only  # the in-memory backend silently accepts
def test_terminate_unknown_instance(raw_stub):
    req = pb.TerminateRequest(instanceId=new_id("unknown"), recursive=True)
    assert_code(lambda: raw_stub.TerminateInstance(req, timeout=RPC_TIMEOUT_S), grpc.StatusCode.NOT_FOUND)


def test_suspend_unknown_instance(raw_stub):
    req = pb.SuspendRequest(instanceId=new_id("unknown"))
    assert_code(lambda: raw_stub.SuspendInstance(req, timeout=RPC_TIMEOUT_S), grpc.StatusCode.NOT_FOUND)


def test_resume_unknown_instance(raw_stub):
    req = pb.ResumeRequest(instanceId=new_id("unknown"))
    assert_code(lambda: raw_stub.ResumeInstance(req, timeout=RPC_TIMEOUT_S), grpc.StatusCode.NOT_FOUND)


@pytest.mark.engine_only  # the in-memory backend has no instance id limit
def test_oversized_instance_id_is_rejected(raw_stub, client):
    huge = "x" * 10_000
    req = pb.CreateInstanceRequest(instanceId=huge, name="ping_orchestrator",
                                   input=wrappers_pb2.StringValue(value="1"))
    assert_code(lambda: raw_stub.StartInstance(req, timeout=RPC_TIMEOUT_S), grpc.StatusCode.INVALID_ARGUMENT)
    # Looking a huge id up is answered too: either "no such instance" or INVALID_ARGUMENT.
    try:
        assert client.get_orchestration_state(huge) is None
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
    assert_still_serving(raw_stub, client)


# ---------------------------------------------------------------------------------------------------------
# forged work-item completions
# ---------------------------------------------------------------------------------------------------------
BOGUS_TOKEN_CODES = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)


def _orchestrator_response(instance_id: str, token: str) -> pb.OrchestratorResponse:
    return pb.OrchestratorResponse(
        instanceId=instance_id,
        completionToken=token,
        actions=[ph.new_complete_orchestration_action(1, pb.ORCHESTRATION_STATUS_COMPLETED, '"forged"')],
    )


@pytest.mark.engine_only  # the in-memory backend ignores stale tokens with an OK
def test_complete_orchestrator_task_with_bogus_token(raw_stub, client):
    assert_code(lambda: raw_stub.CompleteOrchestratorTask(
        _orchestrator_response(new_id("nobody"), "bogus-token"), timeout=RPC_TIMEOUT_S), *BOGUS_TOKEN_CODES)

    # A forged completion for a real, running instance must be refused and must not complete it.
    iid = client.schedule_new_orchestration(waiter, instance_id=new_id("victim"))
    client.wait_for_orchestration_start(iid, timeout=DEADLINE_S)
    assert_code(lambda: raw_stub.CompleteOrchestratorTask(
        _orchestrator_response(iid, "not-a-real-token"), timeout=RPC_TIMEOUT_S), *BOGUS_TOKEN_CODES)
    assert client.get_orchestration_state(iid).runtime_status == OrchestrationStatus.RUNNING
    client.raise_orchestration_event(iid, "go", data="genuine")
    state = client.wait_for_orchestration_completion(iid, timeout=DEADLINE_S)
    assert state.get_output() == "genuine"
    assert_still_serving(raw_stub, client)


@pytest.mark.engine_only  # the in-memory backend accepts any activity completion
def test_complete_activity_task_with_bogus_token(raw_stub, client):
    res = pb.ActivityResponse(instanceId=new_id("nobody"), taskId=1, completionToken="bogus-token",
                              result=wrappers_pb2.StringValue(value="1"))
    assert_code(lambda: raw_stub.CompleteActivityTask(res, timeout=RPC_TIMEOUT_S), *BOGUS_TOKEN_CODES)

    iid = client.schedule_new_orchestration(waiter, instance_id=new_id("victim"))
    client.wait_for_orchestration_start(iid, timeout=DEADLINE_S)
    forged = pb.ActivityResponse(instanceId=iid, taskId=1, completionToken="bogus",
                                 result=wrappers_pb2.StringValue(value="999"))
    assert_code(lambda: raw_stub.CompleteActivityTask(forged, timeout=RPC_TIMEOUT_S), *BOGUS_TOKEN_CODES)
    client.raise_orchestration_event(iid, "go", data="genuine")
    state = client.wait_for_orchestration_completion(iid, timeout=DEADLINE_S)
    assert state.runtime_status == OrchestrationStatus.COMPLETED
    assert state.get_output() == "genuine"
    assert_still_serving(raw_stub, client)


# ---------------------------------------------------------------------------------------------------------
# undecodable bytes
# ---------------------------------------------------------------------------------------------------------
GARBAGE = [
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",  # endless varint
    b"\x0a\xff\xff\xff\xff\x0f",  # field 1, length-delimited, absurd length
    b"\x0a\x05ab",  # truncated string
]


@pytest.mark.parametrize("method", ["StartInstance", "RaiseEvent", "TerminateInstance", "GetInstance",
                                    "CompleteOrchestratorTask", "CompleteActivityTask", "PurgeInstances"])
def test_garbage_bytes_are_rejected(raw_channel, raw_stub, client, method):
    call = raw_channel.unary_unary(f"/TaskHubSidecarService/{method}")  # no (de)serializers: raw bytes
    for payload in GARBAGE:
        assert_code(lambda payload=payload: call(payload, timeout=RPC_TIMEOUT_S),
                    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL)
    assert_still_serving(raw_stub, client)


def test_garbage_bytes_on_work_item_stream(raw_channel, raw_stub, client):
    call = raw_channel.unary_stream("/TaskHubSidecarService/GetWorkItems")
    with pytest.raises(grpc.RpcError) as err:
        for _ in call(GARBAGE[0], timeout=RPC_TIMEOUT_S):
            pass
    assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL)
    assert_still_serving(raw_stub, client)


@pytest.mark.engine_only  # the in-memory backend ignores the limits
def test_a_work_item_stream_with_a_negative_limit_is_refused(raw_stub, client):
    """A negative maxConcurrent* once opened a stream that quietly never got work."""
    with pytest.raises(grpc.RpcError) as err:
        for _ in raw_stub.GetWorkItems(pb.GetWorkItemsRequest(maxConcurrentActivityWorkItems=-1),
                                       timeout=RPC_TIMEOUT_S):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert "must not be negative" in err.value.details(), err.value.details()
    assert_still_serving(raw_stub, client)
