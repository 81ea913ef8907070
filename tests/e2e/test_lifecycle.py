"""Instance lifecycle: custom status, terminate, suspend/resume, continue-as-new, deterministic new_uuid."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from durabletask import task
from durabletask.client import OrchestrationStatus

from .helpers import DEADLINE_S, id_not_on_partition, new_id, partition_of, wait_until


# ---------------------------------------------------------------------------------------------------------
# activities
# ---------------------------------------------------------------------------------------------------------
def identity(ctx: task.ActivityContext, value):
    return value


# ---------------------------------------------------------------------------------------------------------
# orchestrators
# ---------------------------------------------------------------------------------------------------------
def custom_status_steps(ctx: task.OrchestrationContext, _):
    ctx.set_custom_status({"step": "waiting", "progress": 0.5})
    value = yield ctx.wait_for_external_event("proceed")
    ctx.set_custom_status("done")
    return value


def custom_status_cleared(ctx: task.OrchestrationContext, _):
    ctx.set_custom_status("busy")
    yield ctx.wait_for_external_event("proceed")
    ctx.set_custom_status(None)
    return "done"


def wait_forever(ctx: task.OrchestrationContext, _):
    yield ctx.wait_for_external_event("never")
    return "not reached"


def parent_of_waiting_child(ctx: task.OrchestrationContext, child_id: str):
    yield ctx.call_sub_orchestrator(wait_forever, instance_id=child_id)
    return "not reached"


def two_step_events(ctx: task.OrchestrationContext, _):
    ctx.set_custom_status("waiting-go")
    first = yield ctx.wait_for_external_event("go")
    ctx.set_custom_status("got-go")
    second = yield ctx.wait_for_external_event("go2")
    return [first, second]


def counter_loop(ctx: task.OrchestrationContext, state: dict):
    n = state["n"] + 1
    if n < state["target"]:
        ctx.continue_as_new({"n": n, "target": state["target"]})
        return None
    value = yield ctx.call_activity(identity, input=n)
    return value


def collect_events_loop(ctx: task.OrchestrationContext, state: dict):
    item = yield ctx.wait_for_external_event("item")
    items = [*state["items"], item]
    if len(items) < state["target"]:
        ctx.continue_as_new({"items": items, "target": state["target"]}, save_events=True)
        return None
    return items


def uuid_orchestrator(ctx: task.OrchestrationContext, _):
    u1 = ctx.new_uuid()
    u2 = ctx.new_uuid()
    echoed = yield ctx.call_activity(identity, input=[u1, u2])
    yield ctx.create_timer(timedelta(milliseconds=100))
    u3 = ctx.new_uuid()
    echoed3 = yield ctx.call_activity(identity, input=u3)
    # u1/u2 are recomputed on every replay; the activity saw the values of the first execution.
    return {"first": [u1, u2], "echoed": echoed, "later": u3, "echoed_later": echoed3}


def orchestrator_raises(ctx: task.OrchestrationContext, message: str):
    yield ctx.call_activity(identity, input=1)
    raise ValueError(message)


def orchestrator_without_yield(ctx: task.OrchestrationContext, value):
    return {"plain": value}


ORCHESTRATORS = [orchestrator_raises, orchestrator_without_yield, custom_status_steps, custom_status_cleared, wait_forever, parent_of_waiting_child, two_step_events, counter_loop,
                 collect_events_loop, uuid_orchestrator]
ACTIVITIES = [identity]


@pytest.fixture(scope="module", autouse=True)
def worker(worker_factory):
    return worker_factory(ORCHESTRATORS, ACTIVITIES)


def finish(client, iid, status=OrchestrationStatus.COMPLETED):
    state = client.wait_for_orchestration_completion(iid, timeout=DEADLINE_S)
    assert state is not None
    assert state.runtime_status == status, (state.runtime_status, state.failure_details)
    return state


def state_matches(client, iid, status=None, custom_status=...):
    def check():
        st = client.get_orchestration_state(iid)
        if st is None:
            return None
        if status is not None and st.runtime_status != status:
            return None
        if custom_status is not ... and st.get_custom_status() != custom_status:
            return None
        return st
    return check


# ---------------------------------------------------------------------------------------------------------
# outcomes
# ---------------------------------------------------------------------------------------------------------
def test_orchestrator_exception_fails_instance(client):
    iid = client.schedule_new_orchestration(orchestrator_raises, input="orchestrator broke", instance_id=new_id())
    state = finish(client, iid, OrchestrationStatus.FAILED)
    assert state.failure_details.error_type == "builtins.ValueError"
    assert "orchestrator broke" in state.failure_details.message
    assert state.get_output() is None


def test_non_generator_orchestrator_completes(client):
    iid = client.schedule_new_orchestration(orchestrator_without_yield, input=[1, "a"], instance_id=new_id())
    assert finish(client, iid).get_output() == {"plain": [1, "a"]}


# ---------------------------------------------------------------------------------------------------------
# custom status
# ---------------------------------------------------------------------------------------------------------
def test_custom_status_visible_while_running_and_after_completion(client):
    iid = client.schedule_new_orchestration(custom_status_steps, instance_id=new_id())
    st = wait_until(state_matches(client, iid, OrchestrationStatus.RUNNING, {"step": "waiting", "progress": 0.5}),
                    message="custom status while waiting")
    assert st.serialized_custom_status is not None
    client.raise_orchestration_event(iid, "proceed", data="ok")
    state = finish(client, iid)
    assert state.get_output() == "ok"
    assert state.get_custom_status() == "done"


def test_custom_status_cleared_by_the_orchestrator_reads_as_none(client):
    iid = client.schedule_new_orchestration(custom_status_cleared, instance_id=new_id())
    wait_until(state_matches(client, iid, OrchestrationStatus.RUNNING, "busy"), message="custom status set")
    client.raise_orchestration_event(iid, "proceed")
    state = finish(client, iid)
    assert state.serialized_custom_status is None


# ---------------------------------------------------------------------------------------------------------
# terminate
# ---------------------------------------------------------------------------------------------------------
def test_terminate_waiting_instance_with_output(client):
    iid = client.schedule_new_orchestration(wait_forever, instance_id=new_id())
    client.wait_for_orchestration_start(iid, timeout=DEADLINE_S)
    client.terminate_orchestration(iid, output={"reason": "test says stop"})
    state = finish(client, iid, OrchestrationStatus.TERMINATED)
    assert state.get_output() == {"reason": "test says stop"}
    # Terminating again is harmless and does not change the outcome.
    client.terminate_orchestration(iid, output="again")
    assert client.get_orchestration_state(iid).get_output() == {"reason": "test says stop"}


def test_terminate_pending_instance_before_it_runs(client):
    iid = client.schedule_new_orchestration(wait_forever, instance_id=new_id())
    client.terminate_orchestration(iid, output="early")
    state = finish(client, iid, OrchestrationStatus.TERMINATED)
    assert state.get_output() == "early"


@pytest.mark.engine_only  # the in-memory backend ignores recursive=True
def test_recursive_terminate_reaches_child_on_other_partition(client):
    parent_id = new_id("term-parent")
    child_id = id_not_on_partition("term-child", partition_of(parent_id))
    client.schedule_new_orchestration(parent_of_waiting_child, input=child_id, instance_id=parent_id)
    wait_until(state_matches(client, child_id, OrchestrationStatus.RUNNING), message="child running")
    client.terminate_orchestration(parent_id, output="stop all", recursive=True)
    finish(client, parent_id, OrchestrationStatus.TERMINATED)
    child = finish(client, child_id, OrchestrationStatus.TERMINATED)
    assert child.runtime_status == OrchestrationStatus.TERMINATED


def test_non_recursive_terminate_leaves_child_running(client):
    parent_id = new_id("term-parent")
    child_id = id_not_on_partition("term-child", partition_of(parent_id))
    client.schedule_new_orchestration(parent_of_waiting_child, input=child_id, instance_id=parent_id)
    wait_until(state_matches(client, child_id, OrchestrationStatus.RUNNING), message="child running")
    client.terminate_orchestration(parent_id, recursive=False)
    finish(client, parent_id, OrchestrationStatus.TERMINATED)
    assert client.get_orchestration_state(child_id).runtime_status == OrchestrationStatus.RUNNING
    client.terminate_orchestration(child_id)  # clean up
    finish(client, child_id, OrchestrationStatus.TERMINATED)


# ---------------------------------------------------------------------------------------------------------
# suspend / resume
# ---------------------------------------------------------------------------------------------------------
def test_suspend_blocks_progress_until_resume(client):
    iid = client.schedule_new_orchestration(two_step_events, instance_id=new_id())
    wait_until(state_matches(client, iid, OrchestrationStatus.RUNNING, "waiting-go"), message="running")

    client.suspend_orchestration(iid, reason="maintenance")
    wait_until(state_matches(client, iid, OrchestrationStatus.SUSPENDED), message="suspended")

    client.raise_orchestration_event(iid, "go", data=1)
    client.raise_orchestration_event(iid, "go2", data=2)
    # While suspended the events are held back: the instance cannot complete.
    with pytest.raises(TimeoutError):
        client.wait_for_orchestration_completion(iid, timeout=1.5)
    st = client.get_orchestration_state(iid)
    assert st.runtime_status == OrchestrationStatus.SUSPENDED
    assert st.get_custom_status() == "waiting-go"

    client.resume_orchestration(iid, reason="back")
    assert finish(client, iid).get_output() == [1, 2]


def test_suspend_resume_status_transitions(client):
    iid = client.schedule_new_orchestration(two_step_events, instance_id=new_id())
    wait_until(state_matches(client, iid, OrchestrationStatus.RUNNING, "waiting-go"), message="running")
    client.suspend_orchestration(iid)
    wait_until(state_matches(client, iid, OrchestrationStatus.SUSPENDED), message="suspended")
    client.raise_orchestration_event(iid, "go", data="a")
    client.resume_orchestration(iid)
    # The held event is processed after resume: RUNNING with the next custom status.
    wait_until(state_matches(client, iid, OrchestrationStatus.RUNNING, "got-go"), message="resumed and progressed")
    client.raise_orchestration_event(iid, "go2", data="b")
    assert finish(client, iid).get_output() == ["a", "b"]


def test_an_instance_suspended_before_its_scheduled_start_is_pending_again_after_resume(client):
    start_at = datetime.now(UTC) + timedelta(hours=1)
    iid = client.schedule_new_orchestration(wait_forever, instance_id=new_id(), start_at=start_at)
    assert client.get_orchestration_state(iid).runtime_status == OrchestrationStatus.PENDING
    client.suspend_orchestration(iid)
    assert client.get_orchestration_state(iid).runtime_status == OrchestrationStatus.SUSPENDED
    client.resume_orchestration(iid)
    assert client.get_orchestration_state(iid).runtime_status == OrchestrationStatus.PENDING
    client.terminate_orchestration(iid)
    finish(client, iid, OrchestrationStatus.TERMINATED)


def test_terminate_suspended_instance(client):
    iid = client.schedule_new_orchestration(wait_forever, instance_id=new_id())
    client.wait_for_orchestration_start(iid, timeout=DEADLINE_S)
    client.suspend_orchestration(iid)
    wait_until(state_matches(client, iid, OrchestrationStatus.SUSPENDED), message="suspended")
    client.terminate_orchestration(iid, output="bye")
    assert finish(client, iid, OrchestrationStatus.TERMINATED).get_output() == "bye"


# ---------------------------------------------------------------------------------------------------------
# continue-as-new
# ---------------------------------------------------------------------------------------------------------
def test_continue_as_new_counter_loop(client):
    iid = client.schedule_new_orchestration(counter_loop, input={"n": 0, "target": 10}, instance_id=new_id())
    state = finish(client, iid)
    assert state.get_output() == 10
    assert state.get_input() == {"n": 9, "target": 10}  # the input of the last generation


def test_continue_as_new_save_events_carries_buffered_events(client):
    iid = client.schedule_new_orchestration(collect_events_loop, input={"items": [], "target": 5},
                                            instance_id=new_id())
    # All five raised at once: most arrive while an earlier generation is running and must be carried over.
    for i in range(5):
        client.raise_orchestration_event(iid, "item", data=i)
    assert finish(client, iid).get_output() == [0, 1, 2, 3, 4]


def test_continue_as_new_events_raised_between_generations(client):
    iid = client.schedule_new_orchestration(collect_events_loop, input={"items": [], "target": 3},
                                            instance_id=new_id())
    for i in range(3):
        wait_until(state_matches(client, iid, OrchestrationStatus.RUNNING), message="running")
        client.raise_orchestration_event(iid, "item", data=f"e{i}")
    assert finish(client, iid).get_output() == ["e0", "e1", "e2"]


# ---------------------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------------------
def test_new_uuid_is_deterministic_across_replays(client):
    iid = client.schedule_new_orchestration(uuid_orchestrator, instance_id=new_id())
    out = finish(client, iid).get_output()
    u1, u2 = out["first"]
    for u in (u1, u2, out["later"]):
        assert str(uuid.UUID(u)) == u
    assert u1 != u2 and out["later"] not in (u1, u2)
    assert out["echoed"] == [u1, u2], "values computed on replay differ from the first execution"
    assert out["echoed_later"] == out["later"]

    other = client.schedule_new_orchestration(uuid_orchestrator, instance_id=new_id())
    other_out = finish(client, other).get_output()
    assert set(other_out["first"]).isdisjoint({u1, u2})
