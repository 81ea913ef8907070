"""Sub-orchestrations, with parent and child deliberately placed on different partitions."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
from durabletask import task
from durabletask.client import OrchestrationStatus

from .helpers import (
    DEADLINE_S,
    INMEMORY,
    PARTITIONS,
    id_not_on_partition,
    ids_on_different_partitions,
    new_id,
    parent_id_with_remote_default_child,
    partition_of,
)

_counter_lock = threading.Lock()


# ---------------------------------------------------------------------------------------------------------
# activities
# ---------------------------------------------------------------------------------------------------------
def double(ctx: task.ActivityContext, n: int) -> int:
    return 2 * n


def bump_counter(ctx: task.ActivityContext, path: str) -> int:
    p = Path(path)
    with _counter_lock:
        n = (int(p.read_text()) if p.exists() else 0) + 1
        p.write_text(str(n))
    return n


# ---------------------------------------------------------------------------------------------------------
# orchestrators
# ---------------------------------------------------------------------------------------------------------
def child_doubles(ctx: task.OrchestrationContext, n: int):
    d = yield ctx.call_activity(double, input=n)
    return {"id": ctx.instance_id, "parent": ctx.parent_instance_id, "value": d}


def child_fails(ctx: task.OrchestrationContext, message: str):
    yield ctx.call_activity(double, input=1)
    raise ValueError(message)


def child_fails_first_time(ctx: task.OrchestrationContext, counter_path: str):
    attempt = yield ctx.call_activity(bump_counter, input=counter_path)
    if attempt < 2:
        raise RuntimeError(f"child attempt {attempt} failed on purpose")
    return {"id": ctx.instance_id, "attempt": attempt}


def parent_with_child(ctx: task.OrchestrationContext, inp: dict):
    result = yield ctx.call_sub_orchestrator(child_doubles, input=inp["n"], instance_id=inp.get("child_id"))
    own = yield ctx.call_activity(double, input=result["value"])
    return {"child": result, "own": own}


def parent_default_child_id(ctx: task.OrchestrationContext, n: int):
    result = yield ctx.call_sub_orchestrator(child_doubles, input=n)
    return result


def parent_catches_child_failure(ctx: task.OrchestrationContext, inp: dict):
    try:
        yield ctx.call_sub_orchestrator(child_fails, input=inp["message"], instance_id=inp["child_id"])
    except task.TaskFailedError as e:
        return {"caught": True, "message": e.details.message, "error_type": e.details.error_type}
    return {"caught": False}


def parent_uncaught_child_failure(ctx: task.OrchestrationContext, inp: dict):
    yield ctx.call_sub_orchestrator(child_fails, input=inp["message"], instance_id=inp["child_id"])
    return "not reached"


def parent_retries_child(ctx: task.OrchestrationContext, inp: dict):
    policy = task.RetryPolicy(first_retry_interval=timedelta(milliseconds=200), max_number_of_attempts=3)
    result = yield ctx.call_sub_orchestrator(
        child_fails_first_time, input=inp["counter"], instance_id=inp["child_id"], retry_policy=policy)
    return result


def parent_fans_out_children(ctx: task.OrchestrationContext, child_ids: list):
    tasks = [ctx.call_sub_orchestrator(child_doubles, input=i, instance_id=cid) for i, cid in enumerate(child_ids)]
    results = yield task.when_all(tasks)
    return [r["value"] for r in results]


def grandparent(ctx: task.OrchestrationContext, inp: dict):
    result = yield ctx.call_sub_orchestrator(parent_with_child, input={"n": inp["n"]}, instance_id=inp["mid_id"])
    return result


ORCHESTRATORS = [child_doubles, child_fails, child_fails_first_time, parent_with_child, parent_default_child_id,
                 parent_catches_child_failure, parent_uncaught_child_failure, parent_retries_child,
                 parent_fans_out_children, grandparent]
ACTIVITIES = [double, bump_counter]


@pytest.fixture(scope="module", autouse=True)
def worker(worker_factory):
    return worker_factory(ORCHESTRATORS, ACTIVITIES)


def finish(client, iid, status=OrchestrationStatus.COMPLETED):
    state = client.wait_for_orchestration_completion(iid, timeout=DEADLINE_S)
    assert state is not None
    assert state.runtime_status == status, (state.runtime_status, state.failure_details)
    return state


# ---------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------
def test_sub_orchestration_on_other_partition_returns_result(client):
    parent_id, child_id = ids_on_different_partitions("parent", "child")
    assert partition_of(parent_id) != partition_of(child_id)
    client.schedule_new_orchestration(parent_with_child, input={"n": 5, "child_id": child_id}, instance_id=parent_id)
    out = finish(client, parent_id).get_output()
    assert out["child"]["id"] == child_id
    assert out["child"]["value"] == 10
    assert out["own"] == 20
    if not INMEMORY:  # the in-memory backend does not fill executionStarted.parentInstance
        assert out["child"]["parent"] == parent_id
    child_state = finish(client, child_id)
    assert child_state.get_output()["value"] == 10
    assert child_state.name == "child_doubles"


def test_sub_orchestration_default_instance_id(client):
    # The SDK names an anonymous child f"{parent_id}:{task_id:04x}"; the first action has task id 1.
    parent_id = parent_id_with_remote_default_child("parent")
    expected_child = f"{parent_id}:0001"
    assert partition_of(parent_id) != partition_of(expected_child)
    client.schedule_new_orchestration(parent_default_child_id, input=4, instance_id=parent_id)
    out = finish(client, parent_id).get_output()
    assert out["id"] == expected_child
    assert out["value"] == 8
    assert finish(client, expected_child).get_output()["value"] == 8


def test_child_failure_is_delivered_as_task_failed_error(client):
    parent_id, child_id = ids_on_different_partitions("parent", "child")
    client.schedule_new_orchestration(
        parent_catches_child_failure, input={"message": "child went wrong", "child_id": child_id},
        instance_id=parent_id)
    out = finish(client, parent_id).get_output()
    assert out["caught"] is True
    assert "child went wrong" in out["message"]
    if not INMEMORY:  # the in-memory backend re-wraps the child failure as builtins.Exception
        assert out["error_type"] == "builtins.ValueError"
    child = finish(client, child_id, OrchestrationStatus.FAILED)
    assert "child went wrong" in child.failure_details.message
    assert child.failure_details.error_type == "builtins.ValueError"


def test_uncaught_child_failure_fails_parent(client):
    parent_id, child_id = ids_on_different_partitions("parent", "child")
    client.schedule_new_orchestration(
        parent_uncaught_child_failure, input={"message": "unhandled child error", "child_id": child_id},
        instance_id=parent_id)
    state = finish(client, parent_id, OrchestrationStatus.FAILED)
    assert "unhandled child error" in state.failure_details.message


def test_sub_orchestration_retry_reuses_child_id(client, tmp_path):
    parent_id, child_id = ids_on_different_partitions("parent", "child")
    counter = tmp_path / "child-attempts.txt"
    client.schedule_new_orchestration(
        parent_retries_child, input={"counter": str(counter), "child_id": child_id}, instance_id=parent_id)
    out = finish(client, parent_id).get_output()
    # The retry re-creates the child under the same instance id after its first execution FAILED.
    assert out == {"id": child_id, "attempt": 2}
    assert counter.read_text() == "2"
    assert finish(client, child_id).get_output() == {"id": child_id, "attempt": 2}


def test_fan_out_children_across_all_partitions(client):
    parent_id = new_id("fan-parent")
    child_ids = [f"{parent_id}-c{i}" for i in range(2 * PARTITIONS + 2)]
    assert len({partition_of(c) for c in child_ids} | {partition_of(parent_id)}) > 1
    client.schedule_new_orchestration(parent_fans_out_children, input=child_ids, instance_id=parent_id)
    assert finish(client, parent_id).get_output() == [2 * i for i in range(len(child_ids))]
    for i, cid in enumerate(child_ids):
        assert finish(client, cid).get_output()["value"] == 2 * i


def test_nested_sub_orchestrations(client):
    root_id = new_id("root")
    mid_id = id_not_on_partition("mid", partition_of(root_id))
    client.schedule_new_orchestration(grandparent, input={"n": 3, "mid_id": mid_id}, instance_id=root_id)
    out = finish(client, root_id).get_output()
    assert out["child"]["value"] == 6
    assert out["own"] == 12
    assert out["child"]["id"] == f"{mid_id}:0001"
