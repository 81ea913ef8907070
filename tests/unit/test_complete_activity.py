"""CompleteActivityTask: taskCompleted / taskFailed into the orchestration's inbox; stale tokens rejected."""

from __future__ import annotations

import pytest

from partitions.state_machine import actions as act
from protos import orchestrator_service_pb2 as pb
from runtime.errors import StaleCompletionError
from tests.unit.conftest import (
    COMPLETED,
    CONTINUED_AS_NEW,
    complete,
    kinds,
    of_type,
    replies,
    schedule_task,
)


def _with_activity(core, instance_id="a", task_id=1):
    core.start(instance_id, x="x1")
    core.run_first(instance_id, [schedule_task(task_id, "Act", '"in"')])
    [(token, item)] = core.dispatch_act()
    return token, item


def test_activity_work_item_carries_the_scheduled_task(core):
    _, item = _with_activity(core, task_id=4)
    assert item.WhichOneof("request") == "activityRequest"
    request = item.activityRequest
    assert request.name == "Act"
    assert request.input.value == '"in"'
    assert request.taskId == 4
    assert request.orchestrationInstance.instanceId == "a"
    assert request.orchestrationInstance.executionId.value == "x1"
    assert item.completionToken


def test_result_becomes_task_completed_in_the_inbox(core):
    token, _ = _with_activity(core, task_id=4)

    actions = core.complete_act("a", 4, token, result='"ok"')

    assert len(replies(actions)) == 1
    assert of_type(actions, act.WorkAvailable)
    [done] = core.inbox("a")
    assert done.WhichOneof("eventType") == "taskCompleted"
    assert done.taskCompleted.taskScheduledId == 4
    assert done.taskCompleted.result.value == '"ok"'
    assert core.activities() == []
    assert core.state.act_leases == {}

    _, request = core.dispatch_one("a")
    assert kinds(request.pastEvents) == ["orchestratorStarted", "executionStarted", "taskScheduled"]
    assert kinds(request.newEvents) == ["orchestratorStarted", "taskCompleted"]


def test_failure_becomes_task_failed_with_failure_details(core):
    token, _ = _with_activity(core, task_id=2)
    failure = pb.TaskFailureDetails(errorType="IOError", errorMessage="disk")

    core.complete_act("a", 2, token, failure=failure)

    [failed] = core.inbox("a")
    assert failed.WhichOneof("eventType") == "taskFailed"
    assert failed.taskFailed.taskScheduledId == 2
    assert failed.taskFailed.failureDetails.errorType == "IOError"
    assert failed.taskFailed.failureDetails.errorMessage == "disk"


def test_stale_tokens_are_rejected_and_change_nothing(core):
    token, _ = _with_activity(core, task_id=1)

    with pytest.raises(StaleCompletionError):
        core.complete_act("a", 1, "0.1.12345")
    with pytest.raises(StaleCompletionError):
        core.complete_act("a", 2, token)  # right token, wrong task id
    with pytest.raises(StaleCompletionError):
        core.complete_act("b", 1, token)  # right token, wrong instance
    assert core.inbox("a") == []
    assert len(core.activities()) == 1

    core.complete_act("a", 1, token, result="1")
    with pytest.raises(StaleCompletionError):
        core.complete_act("a", 1, token, result="2")  # already completed
    assert len(core.inbox("a")) == 1


def test_orchestration_token_cannot_complete_an_activity(core):
    core.start("a")
    orch_token, _ = core.dispatch_one("a")
    with pytest.raises(StaleCompletionError):
        core.complete_act("a", 0, orch_token)


def test_result_for_an_old_execution_is_dropped(core):
    token, _ = _with_activity(core, task_id=1)
    core.request({"op": "raise", "i": "a", "n": "e"})
    core.run_first("a", [complete(0, CONTINUED_AS_NEW, '"next"')])
    inbox_before = core.inbox("a")

    actions = core.complete_act("a", 1, token, result='"late"')

    assert len(replies(actions)) == 1  # accepted, then dropped
    assert core.inbox("a") == inbox_before
    assert "taskCompleted" not in kinds(core.inbox("a"))
    assert core.activities() == []


def test_result_for_a_completed_instance_is_dropped(core):
    token, _ = _with_activity(core, task_id=1)
    core.request({"op": "raise", "i": "a", "n": "e"})
    core.run_first("a", [complete(0, COMPLETED)])

    core.complete_act("a", 1, token, result='"late"')

    assert core.status("a") == COMPLETED
    assert core.inbox("a") == []
    assert core.ready() == []
    assert core.activities() == []


def test_result_while_the_orchestration_is_in_flight_waits_for_the_next_item(core):
    token, _ = _with_activity(core, task_id=1)
    core.request({"op": "raise", "i": "a", "n": "e"})
    orch_token, request = core.dispatch_one("a")
    core.complete_act("a", 1, token, result='"r"')
    assert core.dispatch_orch() == []

    core.complete_orch("a", orch_token, [])

    _, request = core.dispatch_one("a")
    assert kinds(request.newEvents) == ["orchestratorStarted", "taskCompleted"]
