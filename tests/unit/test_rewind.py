"""Rewind of an instance whose work was still out when it failed. The SDK's rewound history names a new
execution (a fresh executionId in executionStarted) and drops the failed tasks, so the engine must let the
failed execution's other work report to the new one, and give back what the failed instance dropped."""

from __future__ import annotations

from protos import orchestrator_service_pb2 as pb
from tests.unit.conftest import (
    COMPLETED,
    FAILED,
    RUNNING,
    SUSPENDED,
    complete,
    create_sub,
    deliver,
    id_on,
    kinds,
    schedule_task,
    sv,
)

BOOM = pb.TaskFailureDetails(errorType="E", errorMessage="boom")


def rewind(core, instance_id: str, new_execution: str, while_out=lambda: None, status: int = RUNNING) -> None:
    """Rewind `instance_id` and answer its work item as the SDK does (see its _build_rewind_result);
    `while_out` runs while the rewind work item is at the worker."""
    core.request({"op": "rewind", "i": instance_id})
    token, request = core.dispatch_one(instance_id)
    while_out()
    assert "executionRewound" in kinds(request.newEvents)
    events = [*request.pastEvents, *request.newEvents]
    failed = {e.taskFailed.taskScheduledId for e in events if e.HasField("taskFailed")}
    clean = []
    for event in events:
        dropped = ("taskFailed", "subOrchestrationInstanceFailed", "executionCompleted")
        if event.WhichOneof("eventType") in dropped or (event.HasField("taskScheduled") and event.eventId in failed):
            continue
        if event.HasField("executionStarted"):
            event.executionStarted.orchestrationInstance.executionId.value = new_execution
        clean.append(event)
    core.complete_orch(instance_id, token, [pb.OrchestratorAction(
        id=-1, rewindOrchestration=pb.RewindOrchestrationAction(newHistory=clean))])
    assert core.status(instance_id) == status and core.record(instance_id)["x"] == new_execution


def fail_with_slow_activity_out(core):
    """'a' scheduled Slow (task 1) and Flaky (task 2); Flaky failed and so did 'a', with Slow still out."""
    core.start("a")
    core.run_first("a", [schedule_task(1, "Slow"), schedule_task(2, "Flaky")])
    (slow, _), (flaky, _) = core.dispatch_act()
    core.complete_act("a", 2, flaky, failure=BOOM)
    core.run_first("a", [complete(3, FAILED, failure=BOOM)])
    assert core.status("a") == FAILED
    return slow


def test_an_activity_running_across_a_rewind_reports_to_the_new_execution(core):
    slow = fail_with_slow_activity_out(core)
    rewind(core, "a", "x-rewound")
    core.complete_act("a", 1, slow, result='"slow"')
    assert [e.taskCompleted.result.value for e in core.inbox("a") if e.HasField("taskCompleted")] == ['"slow"']


def test_an_activity_that_finished_while_the_instance_was_failed_runs_again_after_a_rewind(core):
    slow = fail_with_slow_activity_out(core)
    core.complete_act("a", 1, slow, result='"slow"')  # dropped: the instance has failed
    rewind(core, "a", "x-rewound")
    assert [(a["t"], a["n"], a["x"]) for a in core.activities()] == [(1, "Slow", "x-rewound")]


def test_a_suspend_that_comes_while_the_rewind_is_out_holds_the_rewound_instance(core):
    """The rewound history went in as RUNNING whatever had happened meanwhile: the SDK then saw the queued
    executionSuspended and held its work back, while the engine, seeing RUNNING, dispatched it turn after turn
    (an activity ran ~1,000 times in 15 s) and ignored the resume, since the instance was not SUSPENDED."""
    fail_with_slow_activity_out(core)
    rewind(core, "a", "x-rewound", while_out=lambda: core.request({"op": "suspend", "i": "a"}), status=SUSPENDED)
    assert core.dispatch_orch() == []  # held until resumed

    core.request({"op": "resume", "i": "a"})
    assert core.status("a") == RUNNING
    _, request = core.dispatch_one("a")
    assert kinds(request.newEvents)[-2:] == ["executionSuspended", "executionResumed"]


def test_an_instance_that_failed_while_held_after_an_abandon_runs_again_after_a_rewind(core):
    """A worker abandoned its turn (the instance is held for the backoff, with a release timer); a terminate woke
    it through the hold and the turn failed it on an earlier event. Its end took the release timer with its
    other timers but left the hold: the rewound instance was never ready again."""
    core.start("a")
    core.run_first("a", [schedule_task(1, "Flaky")])
    [(activity, _)] = core.dispatch_act()
    core.complete_act("a", 1, activity, failure=BOOM)
    token, _ = core.dispatch_one("a")
    core.request({"op": "abandon", "tok": token})
    assert core.record("a")["hu"] > core.now
    core.request({"op": "terminate", "i": "a", "out": "stop"})
    token, _ = core.dispatch_one("a")
    core.complete_orch("a", token, [complete(2, FAILED, failure=BOOM)])  # raised before it saw the terminate

    core.request({"op": "rewind", "i": "a"})
    _, request = core.dispatch_one("a")
    assert "executionRewound" in kinds(request.newEvents)


def fail_with_child_out(pair) -> tuple[str, str]:
    """A parent on partition 0 started a child on partition 1 (task 1), then failed on Flaky (task 2)."""
    p0, p1 = pair
    parent, child = id_on(0, 2, "parent"), id_on(1, 2, "child")
    p0.start(parent)
    p0.run_first(parent, [create_sub(1, "C", child), schedule_task(2, "Flaky")])
    deliver(p0, p1)
    [(flaky, _)] = p0.dispatch_act()
    p0.complete_act(parent, 2, flaky, failure=BOOM)
    p0.run_first(parent, [complete(3, FAILED, failure=BOOM)])
    return parent, child


def test_a_child_that_completed_while_its_parent_was_failed_reports_again_after_a_rewind(pair):
    p0, p1 = pair
    parent, child = fail_with_child_out(pair)
    p1.run_first(child, [complete(0, COMPLETED, '"from child"')])
    deliver(p1, p0)  # dropped: the parent has failed
    rewind(p0, parent, "x-rewound")
    deliver(p0, p1)  # rewind_child: the child has completed, so it reports again, to the new execution
    deliver(p1, p0)
    [done] = [e.subOrchestrationInstanceCompleted for e in p0.inbox(parent)
              if e.HasField("subOrchestrationInstanceCompleted")]
    assert done.taskScheduledId == 1 and done.result.value == '"from child"'


def test_a_child_still_running_across_a_rewind_reports_to_the_new_execution(pair):
    p0, p1 = pair
    parent, child = fail_with_child_out(pair)
    rewind(p0, parent, "x-rewound")
    deliver(p0, p1)
    assert p1.record(child)["p"][1] == "x-rewound"
    p1.run_first(child, [complete(0, COMPLETED, '"late"')])
    deliver(p1, p0)
    assert any(e.HasField("subOrchestrationInstanceCompleted") for e in p0.inbox(parent))


ENTITY = "@counter@one"


def _lock(owner: str, section: str, action_id: int = 1) -> pb.OrchestratorAction:
    lock = pb.EntityLockRequestedEvent(criticalSectionId=section, lockSet=[ENTITY], position=0,
                                       parentInstanceId=sv(owner))
    return pb.OrchestratorAction(id=action_id, sendEntityMessage=pb.SendEntityMessageAction(entityLockRequested=lock))


def _unlock(owner: str, section: str, action_id: int) -> pb.OrchestratorAction:
    sent = pb.EntityUnlockSentEvent(criticalSectionId=section, parentInstanceId=sv(owner),
                                    targetInstanceId=sv(ENTITY))
    return pb.OrchestratorAction(id=action_id, sendEntityMessage=pb.SendEntityMessageAction(entityUnlockSent=sent))


def _locked_by(core) -> str | None:
    with core.read() as txn:
        record = txn.get_entity(ENTITY)
    return None if record is None else record["lo"]


def _failed_waiting_for_a_lock_the_holder_has(core) -> str:
    """'holder' holds the entity (its grant is out: the token is returned); 'a' asked for it too, and ran Flaky
    at once, which failed, and so did 'a', still waiting for the lock."""
    core.start("holder")
    core.run_first("holder", [_lock("holder", "cs-0")])
    holder_token, _ = core.dispatch_one("holder")  # its grant
    assert _locked_by(core) == "holder"
    core.start("a")
    core.run_first("a", [_lock("a", "cs-1"), schedule_task(2, "Flaky")])
    [(flaky, _)] = core.dispatch_act()
    core.complete_act("a", 2, flaky, failure=BOOM)
    core.run_first("a", [complete(3, FAILED, failure=BOOM)])
    return holder_token


def test_a_lock_granted_while_the_instance_was_failed_is_asked_for_again_by_the_rewound_one(core):
    """'a' asked for the entity, which another section held, and failed before the grant came; the grant found
    it FAILED and was released. The rewound replay waits for that grant: without a new request, for ever."""
    holder_token = _failed_waiting_for_a_lock_the_holder_has(core)
    core.complete_orch("holder", holder_token, [_unlock("holder", "cs-0", 2), complete(3, COMPLETED)])
    assert _locked_by(core) is None  # granted to the failed 'a', and released

    rewind(core, "a", "x-rewound")

    assert _locked_by(core) == "a"
    _, request = core.dispatch_one("a")
    granted = [e.entityLockGranted.criticalSectionId for e in request.newEvents if e.HasField("entityLockGranted")]
    assert granted == ["cs-1"]


def test_a_grant_still_on_its_way_goes_to_the_rewound_instance_without_a_second_request(core):
    holder_token = _failed_waiting_for_a_lock_the_holder_has(core)

    rewind(core, "a", "x-rewound")
    core.complete_orch("holder", holder_token, [_unlock("holder", "cs-0", 2), complete(3, COMPLETED)])

    assert _locked_by(core) == "a"
    _, request = core.dispatch_one("a")
    assert [e.entityLockGranted.criticalSectionId for e in request.newEvents if e.HasField("entityLockGranted")] == ["cs-1"]
    with core.read() as txn:
        queued = [pb.HistoryEvent.FromString(raw) for _, raw in txn.inbox(ENTITY)]
    assert not [e for e in queued if e.HasField("entityLockRequested")]  # asked for once only


def test_a_grant_that_comes_while_the_rewind_is_out_is_not_asked_for_again(core):
    """The grant waits in the inbox for the rewound execution. A second request would lock the entity again
    once the section ends, for an orchestration whose history already unlocked it: locked for good."""
    holder_token = _failed_waiting_for_a_lock_the_holder_has(core)

    rewind(core, "a", "x-rewound", while_out=lambda: core.complete_orch(
        "holder", holder_token, [_unlock("holder", "cs-0", 2), complete(3, COMPLETED)]))
    token, request = core.dispatch_one("a")
    assert [e.entityLockGranted.criticalSectionId for e in request.newEvents if e.HasField("entityLockGranted")] == ["cs-1"]
    core.complete_orch("a", token, [_unlock("a", "cs-1", 4), schedule_task(5, "After")])  # the section ends
    [(after, _)] = core.dispatch_act()
    core.complete_act("a", 5, after, result='"ok"')
    core.run_first("a", [complete(6, COMPLETED)])

    assert _locked_by(core) is None


def _call(owner: str, request_id: str, action_id: int = 1) -> pb.OrchestratorAction:
    called = pb.EntityOperationCalledEvent(requestId=request_id, operation="get", parentInstanceId=sv(owner),
                                           targetInstanceId=sv(ENTITY))
    return pb.OrchestratorAction(id=action_id, sendEntityMessage=pb.SendEntityMessageAction(entityOperationCalled=called))


def _entity_answers(core) -> None:
    [(batch, _)] = core.dispatch_ent()
    result = pb.OperationResult(success=pb.OperationResultSuccess(result=sv("42")))
    core.request({"op": "complete_ent", "tok": batch,
                  "resp": pb.EntityBatchResult(completionToken=batch, results=[result]).SerializeToString()})


def _failed_with_an_entity_call_out(core) -> None:
    """'a' called the entity and ran Flaky at once (a when_all); Flaky failed, and so did 'a', the call still out."""
    core.start("a")
    core.run_first("a", [_call("a", "req-1"), schedule_task(2, "Flaky")])
    [(flaky, _)] = core.dispatch_act()
    core.complete_act("a", 2, flaky, failure=BOOM)
    core.run_first("a", [complete(3, FAILED, failure=BOOM)])


def _answers_delivered(request: pb.OrchestratorRequest) -> list[str]:
    return [e.entityOperationCompleted.requestId for e in request.newEvents if e.HasField("entityOperationCompleted")]


def test_an_entity_answer_that_comes_after_the_rewind_reaches_the_rewound_execution(core):
    """The answer names the failed execution; the rewound one has another id, and its history still waits."""
    _failed_with_an_entity_call_out(core)
    rewind(core, "a", "x-rewound")
    core.dispatch_one("a")  # the replay's own turn, out at the worker

    _entity_answers(core)

    assert [e.entityOperationCompleted.requestId for e in core.inbox("a")] == ["req-1"]


def test_an_entity_answer_that_came_while_the_instance_was_failed_is_kept_for_the_rewind(core):
    """Asking the entity again would run the operation twice."""
    _failed_with_an_entity_call_out(core)
    _entity_answers(core)

    rewind(core, "a", "x-rewound")

    _, request = core.dispatch_one("a")
    assert _answers_delivered(request) == ["req-1"]
    assert core.inbox(ENTITY) == []


def test_an_entity_answer_that_came_while_the_failing_turn_was_out_is_kept_for_the_rewind(core):
    core.start("a")
    core.run_first("a", [_call("a", "req-1"), schedule_task(2, "Flaky")])
    [(flaky, _)] = core.dispatch_act()
    core.complete_act("a", 2, flaky, failure=BOOM)
    token, _ = core.dispatch_one("a")  # the turn that fails is out at the worker
    _entity_answers(core)
    core.complete_orch("a", token, [complete(3, FAILED, failure=BOOM)])

    rewind(core, "a", "x-rewound")

    _, request = core.dispatch_one("a")
    assert _answers_delivered(request) == ["req-1"]
