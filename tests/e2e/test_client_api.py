"""The SDK client surface: ids, id reuse, scheduled starts, waits, queries and purge."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from durabletask import task
from durabletask.client import OrchestrationQuery, OrchestrationStatus
from durabletask.internal import orchestrator_service_pb2 as pb

from .helpers import DEADLINE_S, id_not_on_partition, new_id, partition_of, wait_until


# ---------------------------------------------------------------------------------------------------------
# functions
# ---------------------------------------------------------------------------------------------------------
def plus_one(ctx: task.ActivityContext, n: int) -> int:
    return n + 1


def add_one(ctx: task.OrchestrationContext, n: int):
    result = yield ctx.call_activity(plus_one, input=n)
    return result


def report_start_time(ctx: task.OrchestrationContext, _):
    started = ctx.current_utc_datetime
    yield ctx.call_activity(plus_one, input=0)
    return started.replace(tzinfo=UTC).isoformat()


def wait_for_go(ctx: task.OrchestrationContext, _):
    value = yield ctx.wait_for_external_event("go")
    return value


def parent_of_add_one(ctx: task.OrchestrationContext, inp: dict):
    result = yield ctx.call_sub_orchestrator(add_one, input=inp["n"], instance_id=inp["child_id"])
    return result


def parent_that_does_not_wait(ctx: task.OrchestrationContext, child_id: str):
    ctx.call_sub_orchestrator(wait_for_go, instance_id=child_id)  # not awaited: the parent finishes first
    return "left"


ORCHESTRATORS = [add_one, report_start_time, wait_for_go, parent_of_add_one, parent_that_does_not_wait]
ACTIVITIES = [plus_one]


@pytest.fixture(scope="module", autouse=True)
def worker(worker_factory):
    return worker_factory(ORCHESTRATORS, ACTIVITIES)


def finish(client, iid, status=OrchestrationStatus.COMPLETED):
    state = client.wait_for_orchestration_completion(iid, timeout=DEADLINE_S)
    assert state is not None
    assert state.runtime_status == status, (state.runtime_status, state.failure_details)
    return state


# ---------------------------------------------------------------------------------------------------------
# starting instances
# ---------------------------------------------------------------------------------------------------------
def test_explicit_instance_id_is_used(client):
    wanted = new_id("explicit")
    assert client.schedule_new_orchestration(add_one, input=1, instance_id=wanted) == wanted
    state = finish(client, wanted)
    assert state.instance_id == wanted
    assert state.get_output() == 2
    assert state.created_at <= state.last_updated_at


def test_generated_instance_id(client):
    iid = client.schedule_new_orchestration(add_one, input=41)
    assert iid
    assert finish(client, iid).get_output() == 42


def test_duplicate_instance_id_is_rejected(client):
    iid = client.schedule_new_orchestration(wait_for_go, instance_id=new_id("dup"))
    with pytest.raises(grpc.RpcError) as err:
        client.schedule_new_orchestration(wait_for_go, instance_id=iid)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # The original instance is untouched.
    client.raise_orchestration_event(iid, "go", data="original")
    assert finish(client, iid).get_output() == "original"


def test_reuse_id_policy_replaces_completed_instance(client):
    iid = client.schedule_new_orchestration(add_one, input=1, instance_id=new_id("reuse"))
    assert finish(client, iid).get_output() == 2
    policy = pb.OrchestrationIdReusePolicy(replaceableStatus=[pb.ORCHESTRATION_STATUS_COMPLETED])
    assert client.schedule_new_orchestration(add_one, input=100, instance_id=iid, reuse_id_policy=policy) == iid
    state = finish(client, iid)
    assert state.get_output() == 101
    assert state.get_input() == 100


def test_reuse_id_policy_does_not_replace_running_instance(client):
    iid = client.schedule_new_orchestration(wait_for_go, instance_id=new_id("reuse-running"))
    client.wait_for_orchestration_start(iid, timeout=DEADLINE_S)
    policy = pb.OrchestrationIdReusePolicy(replaceableStatus=[pb.ORCHESTRATION_STATUS_COMPLETED])
    with pytest.raises(grpc.RpcError) as err:
        client.schedule_new_orchestration(wait_for_go, instance_id=iid, reuse_id_policy=policy)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    client.raise_orchestration_event(iid, "go", data=1)
    assert finish(client, iid).get_output() == 1


@pytest.mark.engine_only  # the in-memory backend dispatches scheduled instances immediately
def test_scheduled_start_time_in_the_future(client):
    start_at = datetime.now(UTC) + timedelta(seconds=2)
    iid = client.schedule_new_orchestration(report_start_time, instance_id=new_id("later"), start_at=start_at)
    # PENDING (and not dispatched) until shortly before the start time; checked repeatedly, with a deadline.
    while datetime.now(UTC) < start_at - timedelta(milliseconds=300):
        assert client.get_orchestration_state(iid).runtime_status == OrchestrationStatus.PENDING
        time.sleep(0.1)
    state = finish(client, iid)
    started = datetime.fromisoformat(state.get_output())
    assert started >= start_at - timedelta(milliseconds=50), (started, start_at)
    assert datetime.now(UTC) >= start_at


# ---------------------------------------------------------------------------------------------------------
# reading state and waiting
# ---------------------------------------------------------------------------------------------------------
def test_get_state_of_unknown_instance_is_none(client):
    assert client.get_orchestration_state(new_id("missing")) is None


def test_get_state_without_payloads(client):
    iid = client.schedule_new_orchestration(add_one, input=5, instance_id=new_id())
    finish(client, iid)
    state = client.get_orchestration_state(iid, fetch_payloads=False)
    assert state.runtime_status == OrchestrationStatus.COMPLETED
    assert state.name == "add_one"


def test_wait_for_orchestration_start(client):
    iid = client.schedule_new_orchestration(wait_for_go, instance_id=new_id())
    state = client.wait_for_orchestration_start(iid, timeout=DEADLINE_S)
    assert state is not None
    assert state.instance_id == iid
    assert state.runtime_status == OrchestrationStatus.RUNNING
    client.raise_orchestration_event(iid, "go", data="x")
    finish(client, iid)


@pytest.mark.engine_only  # the in-memory backend answers exists=false at its deadline, racing the caller's
def test_a_wait_for_an_instance_that_does_not_exist_waits_for_its_deadline(client):
    with pytest.raises(TimeoutError):
        client.wait_for_orchestration_start(new_id("missing"), timeout=1)


def test_a_wait_sent_before_its_instance_is_started_returns_the_finished_instance(client):
    """One client waits for the instance another one is about to start."""
    from concurrent.futures import ThreadPoolExecutor

    iid = new_id()
    with ThreadPoolExecutor(max_workers=1) as pool:
        waited = pool.submit(client.wait_for_orchestration_completion, iid, timeout=DEADLINE_S)
        client.schedule_new_orchestration(add_one, input=1, instance_id=iid)
        state = waited.result(timeout=DEADLINE_S + 5)
    assert state is not None and state.runtime_status == OrchestrationStatus.COMPLETED
    assert state.serialized_output == "2"


def test_wait_for_completion_times_out(client):
    iid = client.schedule_new_orchestration(wait_for_go, instance_id=new_id())
    with pytest.raises(TimeoutError):
        client.wait_for_orchestration_completion(iid, timeout=1)
    # The wait did not disturb the instance.
    assert client.get_orchestration_state(iid).runtime_status in (
        OrchestrationStatus.RUNNING, OrchestrationStatus.PENDING)
    client.terminate_orchestration(iid)
    finish(client, iid, OrchestrationStatus.TERMINATED)


@pytest.mark.engine_only  # the message and the log are the engine's
def test_waits_that_time_out_get_the_servers_deadline_exceeded_and_log_no_error(runtime, client):
    """A wait ends a little before its caller's deadline, so the engine's own DEADLINE_EXCEEDED reaches the caller.
    At the deadline itself gRPC had ended the call first, and every wait that timed out logged an error with a
    traceback (ExecuteBatchError) in the gateway."""
    import asyncio

    from durabletask.internal import orchestrator_service_pb2_grpc as stubs

    iid = client.schedule_new_orchestration(wait_for_go, instance_id=new_id())

    async def waits() -> list[grpc.aio.AioRpcError]:
        """One after the other: nothing else keeps the gateway's loop busy when a wait's time is up."""
        async with grpc.aio.insecure_channel(runtime.address) as channel:
            stub = stubs.TaskHubSidecarServiceStub(channel)
            errors = []
            for _ in range(5):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.WaitForInstanceCompletion(pb.GetInstanceRequest(instanceId=iid), timeout=0.5)
                errors.append(err.value)
            return errors

    errors = asyncio.run(waits())
    assert {(e.code(), e.details()) for e in errors} == {
        (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while waiting")}, errors[0]
    assert "ExecuteBatchError" not in runtime.log_path.read_text(errors="replace"), runtime.log_tail()
    client.terminate_orchestration(iid)
    finish(client, iid, OrchestrationStatus.TERMINATED)


def test_wait_for_completion_of_already_completed_instance(client):
    iid = client.schedule_new_orchestration(add_one, input=0, instance_id=new_id())
    finish(client, iid)
    assert finish(client, iid).get_output() == 1


def test_query_instances_by_prefix(client):
    prefix = new_id("query") + "-"
    ids = [client.schedule_new_orchestration(add_one, input=i, instance_id=f"{prefix}{i}") for i in range(4)]
    for iid in ids:
        finish(client, iid)
    query = OrchestrationQuery(instance_id_prefix=prefix, fetch_inputs_and_outputs=True)
    states = client.get_all_orchestration_states(query)
    assert sorted(s.instance_id for s in states) == sorted(ids)
    assert sorted(s.get_output() for s in states) == [1, 2, 3, 4]
    assert all(s.runtime_status == OrchestrationStatus.COMPLETED for s in states)


# ---------------------------------------------------------------------------------------------------------
# purge
# ---------------------------------------------------------------------------------------------------------
def test_purge_completed_instance(client):
    iid = client.schedule_new_orchestration(add_one, input=1, instance_id=new_id("purge"))
    finish(client, iid)
    result = client.purge_orchestration(iid)
    assert result.deleted_instance_count == 1
    assert client.get_orchestration_state(iid) is None
    # The id is free again.
    assert client.schedule_new_orchestration(add_one, input=7, instance_id=iid) == iid
    assert finish(client, iid).get_output() == 8


def test_purge_unknown_instance_deletes_nothing(client):
    result = client.purge_orchestration(new_id("never-existed"))
    assert result.deleted_instance_count == 0


def test_purge_running_instance_is_refused_or_noop(client):
    iid = client.schedule_new_orchestration(wait_for_go, instance_id=new_id("purge-running"))
    client.wait_for_orchestration_start(iid, timeout=DEADLINE_S)
    try:
        result = client.purge_orchestration(iid)
        assert result.deleted_instance_count == 0
    except grpc.RpcError as e:
        assert e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)
    assert client.get_orchestration_state(iid).runtime_status == OrchestrationStatus.RUNNING
    client.raise_orchestration_event(iid, "go", data=1)
    finish(client, iid)


@pytest.mark.engine_only  # the in-memory backend purges only the named instance
def test_recursive_purge_removes_child_on_other_partition(client):
    parent_id = new_id("purge-parent")
    child_id = id_not_on_partition("purge-child", partition_of(parent_id))
    client.schedule_new_orchestration(parent_of_add_one, input={"n": 1, "child_id": child_id}, instance_id=parent_id)
    assert finish(client, parent_id).get_output() == 2
    finish(client, child_id)
    result = client.purge_orchestration(parent_id, recursive=True)
    assert result.deleted_instance_count == 2
    assert client.get_orchestration_state(parent_id) is None
    wait_until(lambda: client.get_orchestration_state(child_id) is None, message="child purged")


@pytest.mark.engine_only  # the in-memory backend purges only the named instance
def test_a_recursive_purge_leaves_a_tree_alone_while_a_child_still_runs(client):
    """Purging the finished parent would leave its running child where no recursive purge reaches it, and drop
    its result: the tree is left as it is, and the purge says it is not whole."""
    parent_id = new_id("purge-early-parent")
    child_id = id_not_on_partition("purge-late-child", partition_of(parent_id))
    client.schedule_new_orchestration(parent_that_does_not_wait, input=child_id, instance_id=parent_id)
    finish(client, parent_id)
    client.wait_for_orchestration_start(child_id, timeout=DEADLINE_S)
    wait_until(lambda: client.get_orchestration_state(child_id).runtime_status == OrchestrationStatus.RUNNING,
               message="child running")

    result = client.purge_orchestration(parent_id, recursive=True)
    assert (result.deleted_instance_count, result.is_complete) == (0, False)
    assert client.get_orchestration_state(parent_id) is not None

    client.raise_orchestration_event(child_id, "go", data=1)
    finish(client, child_id)
    result = client.purge_orchestration(parent_id, recursive=True)
    assert (result.deleted_instance_count, result.is_complete) == (2, True)
    assert client.get_orchestration_state(child_id) is None


# ---------------------------------------------------------------------------------------------------------
# tags (the SDK's OrchestrationState has no tags, so read them through the raw GetInstance response)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.engine_only  # the in-memory backend does not return tags in GetInstance
def test_tags_round_trip(client, raw_stub):
    iid = client.schedule_new_orchestration(add_one, input=1, instance_id=new_id("tags"),
                                            tags={"team": "e2e", "priority": "high"})
    finish(client, iid)
    res = raw_stub.GetInstance(pb.GetInstanceRequest(instanceId=iid, getInputsAndOutputs=True), timeout=DEADLINE_S)
    assert res.exists
    assert dict(res.orchestrationState.tags) == {"team": "e2e", "priority": "high"}


@pytest.mark.engine_only
def test_a_query_with_large_payloads_comes_in_pages_the_client_can_receive(client):
    """Twelve pending instances with 0.5 MB inputs are 6 MB of payloads, more than the SDK client receives in one
    message (4 MiB): the engine cuts the page by size and the client follows the continuation token."""
    prefix = new_id("big-query") + "-"
    payload = "x" * (512 << 10)
    ids = {client.schedule_new_orchestration("not_registered_anywhere", input=payload, instance_id=f"{prefix}{n:02d}",
                                             start_at=datetime.now(UTC) + timedelta(hours=1)) for n in range(12)}
    try:
        states = client.get_all_orchestration_states(
            OrchestrationQuery(instance_id_prefix=prefix, fetch_inputs_and_outputs=True))
        assert {s.instance_id for s in states} == ids
        assert all(len(s.serialized_input) > len(payload) for s in states)
    finally:
        for instance_id in ids:
            client.terminate_orchestration(instance_id)
