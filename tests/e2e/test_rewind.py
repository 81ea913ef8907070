"""RewindInstance: a FAILED instance replays without its failures, recursively across partitions."""

from __future__ import annotations

import grpc
import pytest
from durabletask import task
from durabletask.client import OrchestrationStatus

from .helpers import DEADLINE_S, id_not_on_partition, new_id, partition_of

pytestmark = pytest.mark.engine_only

# Activities fail until the test creates their "fixed" marker file; the path travels in the input.


def flaky_times_ten(ctx: task.ActivityContext, inp: dict) -> int:
    from pathlib import Path

    counter = Path(inp["marker"] + ".calls")
    counter.write_text(str(int(counter.read_text() or 0) + 1) if counter.exists() else "1")
    if not Path(inp["marker"]).exists():
        raise ValueError("not fixed yet")
    return inp["x"] * 10


def rewind_child(ctx: task.OrchestrationContext, inp: dict):
    return (yield ctx.call_activity(flaky_times_ten, input=inp))


def rewind_parent(ctx: task.OrchestrationContext, inp: dict):
    first = yield ctx.call_activity(flaky_times_ten, input={"marker": inp["ok_marker"], "x": 1})
    child = yield ctx.call_sub_orchestrator(rewind_child, input={"marker": inp["marker"], "x": 2},
                                            instance_id=inp["child_id"])
    return first + child


@pytest.fixture(scope="module", autouse=True)
def worker(worker_factory):
    return worker_factory([rewind_parent, rewind_child], [flaky_times_ten])


def test_rewind_failed_parent_and_child_on_another_partition(client, tmp_path):
    parent_id = new_id("rewind-parent")
    child_id = id_not_on_partition("rewind-child", partition_of(parent_id))
    ok_marker, marker = tmp_path / "ok", tmp_path / "broken"
    ok_marker.touch()
    inp = {"ok_marker": str(ok_marker), "marker": str(marker), "child_id": child_id}
    client.schedule_new_orchestration(rewind_parent, input=inp, instance_id=parent_id)
    failed = client.wait_for_orchestration_completion(parent_id, timeout=DEADLINE_S)
    assert failed.runtime_status == OrchestrationStatus.FAILED
    assert client.get_orchestration_state(child_id).runtime_status == OrchestrationStatus.FAILED

    marker.touch()
    client.rewind_orchestration(parent_id, reason="bug fixed")

    done = client.wait_for_orchestration_completion(parent_id, timeout=DEADLINE_S)
    assert done.runtime_status == OrchestrationStatus.COMPLETED
    assert done.get_output() == 10 + 20
    assert client.get_orchestration_state(child_id).runtime_status == OrchestrationStatus.COMPLETED
    # the activity that had succeeded is not run again; the failed one ran once more
    assert (tmp_path / "ok.calls").read_text() == "1"
    assert (tmp_path / "broken.calls").read_text() == "2"


def test_rewind_rejects_unknown_and_non_failed_instances(client, tmp_path):
    with pytest.raises(grpc.RpcError) as unknown:
        client.rewind_orchestration(new_id("rewind-missing"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    marker = tmp_path / "fine"
    marker.touch()
    iid = new_id("rewind-completed")
    client.schedule_new_orchestration(rewind_child, input={"marker": str(marker), "x": 1}, instance_id=iid)
    assert client.wait_for_orchestration_completion(iid, timeout=DEADLINE_S).get_output() == 10
    with pytest.raises(grpc.RpcError) as not_failed:
        client.rewind_orchestration(iid)
    assert not_failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "FAILED" in not_failed.value.details()
