"""CompleteOrchestratorTask: delivered events and the orchestrator's actions are committed to history."""

from __future__ import annotations

import pytest

from partitions.state_machine import actions as act
from protos import orchestrator_service_pb2 as pb
from runtime.errors import StaleCompletionError
from tests.unit.conftest import (
    COMPLETED,
    CONTINUED_AS_NEW,
    FAILED,
    PENDING,
    RUNNING,
    SUSPENDED,
    T0,
    TERMINATED,
    Core,
    complete,
    create_sub,
    create_timer,
    id_on,
    kinds,
    ms_of,
    of_type,
    raised_event,
    replies,
    schedule_task,
    send_event,
    sv,
    ts,
)


def test_first_completion_commits_delivered_events_and_sets_running(core):
    core.start("a", name="Orch", data='"x"')
    token, _ = core.dispatch_one("a")

    actions = core.complete_orch("a", token, [schedule_task(1, "Act", '"in"')], custom_status='"cs"')

    assert len(replies(actions)) == 1
    assert act.StatusChanged("a") in actions
    record = core.record("a")
    assert record["s"] == RUNNING
    assert record["cs"] == '"cs"'
    assert record["hl"] == 3
    assert kinds(core.history("a")) == ["orchestratorStarted", "executionStarted", "taskScheduled"]
    assert core.inbox("a") == []
    assert core.ready() == []  # nothing new arrived: not ready again


def test_schedule_task_confirms_with_task_scheduled_and_queues_the_activity(core):
    core.start("a", x="x1")
    core.run_first("a", [schedule_task(7, "Greet", '"Tokyo"'), schedule_task(8, "Greet", '"Paris"')])

    scheduled = core.history("a")[2:]
    assert kinds(scheduled) == ["taskScheduled", "taskScheduled"]
    assert [e.eventId for e in scheduled] == [7, 8]
    assert scheduled[0].taskScheduled.name == "Greet"
    assert scheduled[0].taskScheduled.input.value == '"Tokyo"'

    queued = core.activities()
    assert [(q["i"], q["x"], q["t"], q["n"], q["in"]) for q in queued] == [
        ("a", "x1", 7, "Greet", '"Tokyo"'),
        ("a", "x1", 8, "Greet", '"Paris"'),
    ]
    assert core.demand() == {"o": 0, "a": 2, "e": 0}


def test_create_timer_confirms_with_timer_created_and_stores_a_timer_row(core):
    fire = T0 + 60_000
    core.start("a", x="x1")
    core.run_first("a", [create_timer(3, fire)])

    created = core.history("a")[-1]
    assert created.WhichOneof("eventType") == "timerCreated"
    assert created.eventId == 3
    assert ms_of(created.timerCreated.fireAt) == fire
    assert core.timers() == [(fire, "a", 3, {"x": "x1", "fa": [fire // 1000, (fire % 1000) * 1_000_000]})]


def test_a_response_without_custom_status_clears_it(core):
    """The SDK sends the orchestrator's current custom status with every response; after
    set_custom_status(None) it sends none, and the status must read as cleared."""
    core.start("a")
    token, _ = core.dispatch_one("a")
    core.complete_orch("a", token, [], custom_status='"busy"')
    assert core.record("a")["cs"] == '"busy"'
    core.request({"op": "raise", "i": "a", "n": "e"})
    token, _ = core.dispatch_one("a")
    core.complete_orch("a", token, [])
    assert core.record("a")["cs"] is None


def test_a_timer_fires_with_its_exact_fire_at_never_early(core):
    """The SDK compares timerFired.fireAt with the time it asked for, to the nanosecond: a long timer it splits
    into chunks goes on until they match. Due at the first whole millisecond not before fireAt."""
    fire_at = ts(T0 + 60_000)
    fire_at.nanos += 500_123  # 60.000500123 s after T0
    core.start("a")
    core.run_first("a", [pb.OrchestratorAction(id=1, createTimer=pb.CreateTimerAction(fireAt=fire_at))])
    assert [t[0] for t in core.timers()] == [T0 + 60_001]

    core.apply({"op": "fire_timers"}, now=T0 + 60_000)
    assert core.dispatch_orch() == []  # not yet: that would be early
    core.apply({"op": "fire_timers"}, now=T0 + 60_001)
    _, request = core.dispatch_one("a")
    [fired] = [e.timerFired for e in request.newEvents if e.HasField("timerFired")]
    assert fired.timerId == 1
    assert (fired.fireAt.seconds, fired.fireAt.nanos) == (fire_at.seconds, fire_at.nanos)


def test_create_sub_orchestration_on_the_same_partition_creates_the_child_in_the_same_txn(core):
    core.start("parent", name="P", x="px")
    actions = core.run_first("parent", [create_sub(3, "Child", data='"c"')])

    child_id = "parent:0003"  # the default child id: <parentId>:<actionId as 4 hex digits>
    created = core.history("parent")[-1]
    assert created.WhichOneof("eventType") == "subOrchestrationInstanceCreated"
    assert created.eventId == 3
    assert created.subOrchestrationInstanceCreated.instanceId == child_id
    assert created.subOrchestrationInstanceCreated.name == "Child"

    assert not of_type(actions, act.SendToPartition)
    assert core.record("parent")["ch"] == [child_id]
    child = core.record(child_id)
    assert child["s"] == PENDING
    assert child["p"] == ["parent", "px", 3, "P", None]
    [started] = core.inbox(child_id)
    parent_info = started.executionStarted.parentInstance
    assert parent_info.taskScheduledId == 3
    assert parent_info.name.value == "P"
    assert parent_info.orchestrationInstance.instanceId == "parent"
    assert parent_info.orchestrationInstance.executionId.value == "px"
    assert started.executionStarted.input.value == '"c"'
    assert child_id in core.ready()


def test_create_sub_orchestration_on_another_partition_writes_an_outbox_row(pair):
    p0, p1 = pair
    parent = id_on(0, 2, "parent")
    child = id_on(1, 2, "child")
    p0.start(parent, name="P", x="px")
    actions = p0.run_first(parent, [create_sub(5, "Child", instance_id=child, data='"c"')])

    assert act.SendToPartition(1) in actions
    assert p0.record(child) is None
    [(seq, message)] = p0.outbox(1)
    assert seq == 1
    assert message["op"] == "start_child"
    assert message["i"] == child
    assert message["n"] == "Child"
    assert message["in"] == '"c"'
    assert message["p"] == [parent, "px", 5, "P", None]
    assert p0.outbox(0) == []
    assert p0.record(parent)["ch"] == [child]
    history = p0.history(parent)
    assert history[-1].subOrchestrationInstanceCreated.instanceId == child
    assert history[-1].eventId == 5


def test_send_event_confirms_with_event_sent_and_raises_on_the_target(core):
    core.start("target")
    core.start("a")
    token = core.dispatch_tokens()["a"]  # both leased; only "a" is completed below
    core.complete_orch("a", token, [send_event(4, "target", "Ping", '"p"')])

    sent = core.history("a")[-1]
    assert sent.WhichOneof("eventType") == "eventSent"
    assert sent.eventId == 4
    assert sent.eventSent.instanceId == "target"
    assert sent.eventSent.name == "Ping"
    assert sent.eventSent.input.value == '"p"'
    assert kinds(core.inbox("target")) == ["executionStarted", "eventRaised"]
    raised = core.inbox("target")[1].eventRaised
    assert (raised.name, raised.input.value) == ("Ping", '"p"')


def test_send_event_to_another_partition_writes_a_quiet_raise_message(pair):
    p0, _ = pair
    sender, target = id_on(0, 2, "s"), id_on(1, 2, "t")
    p0.start(sender)
    actions = p0.run_first(sender, [send_event(1, target, "Ping", '"p"')])
    assert act.SendToPartition(1) in actions
    [(_, message)] = p0.outbox(1)
    assert message == {"op": "raise", "i": target, "n": "Ping", "in": '"p"', "quiet": True}


def test_send_event_to_a_missing_instance_is_dropped(core):
    core.start("a")
    core.run_first("a", [send_event(1, "nobody", "Ping")])
    assert kinds(core.history("a"))[-1] == "eventSent"
    assert core.record("nobody") is None


def test_sub_orchestration_id_already_running_on_the_same_partition_fails_the_task(core):
    core.start("kid")
    core.start("par")
    token = core.dispatch_tokens()["par"]

    core.complete_orch("par", token, [create_sub(1, "C", "kid")])

    [failed] = core.inbox("par")
    assert failed.subOrchestrationInstanceFailed.taskScheduledId == 1
    assert failed.subOrchestrationInstanceFailed.failureDetails.errorType == "InstanceAlreadyExists"
    assert "par" in core.ready()
    record = core.record("par")
    assert record["s"] == RUNNING
    assert record["hl"] == len(core.history("par")) == 3
    assert kinds(core.inbox("kid")) == ["executionStarted"]  # the running instance is untouched


def test_complete_completed_records_output_and_execution_completed(core):
    core.start("a")
    core.now += 100
    actions = core.run_first("a", [schedule_task(0, "x"), complete(1, COMPLETED, '"out"')])

    assert act.StatusChanged("a") in actions
    record = core.record("a")
    assert record["s"] == COMPLETED
    assert record["out"] == '"out"'
    assert record["fd"] is None
    assert record["d"] == T0 + 100
    history = core.history("a")
    assert kinds(history) == [
        "orchestratorStarted",
        "executionStarted",
        "taskScheduled",
        "executionCompleted",
    ]
    done = history[-1]
    assert done.eventId == 1
    assert done.executionCompleted.orchestrationStatus == COMPLETED
    assert done.executionCompleted.result.value == '"out"'
    assert core.ready() == []
    assert core.inbox("a") == []


def test_complete_failed_records_failure_details(core):
    failure = pb.TaskFailureDetails(errorType="ValueError", errorMessage="boom", stackTrace=sv("tb"))
    core.start("a")
    core.run_first("a", [complete(0, FAILED, failure=failure)])

    record = core.record("a")
    assert record["s"] == FAILED
    assert record["out"] is None
    stored = pb.TaskFailureDetails.FromString(record["fd"])
    assert (stored.errorType, stored.errorMessage) == ("ValueError", "boom")
    done = core.history("a")[-1].executionCompleted
    assert done.orchestrationStatus == FAILED
    assert done.failureDetails.errorType == "ValueError"


def test_completion_drops_events_that_arrived_meanwhile(core):
    core.start("a")
    token, _ = core.dispatch_one("a")
    core.request({"op": "raise", "i": "a", "n": "late"})
    core.complete_orch("a", token, [complete(0, COMPLETED)])
    assert core.inbox("a") == []
    assert core.ready() == []
    assert core.dispatch_orch() == []


def test_child_completion_notifies_a_parent_on_the_same_partition(core):
    core.start("parent", x="px")
    core.run_first("parent", [create_sub(2, "Child")])
    child = "parent:0002"
    token = core.dispatch_tokens()[child]
    core.complete_orch(child, token, [complete(0, COMPLETED, '"r"')])

    assert core.status(child) == COMPLETED
    [done] = core.inbox("parent")
    assert done.WhichOneof("eventType") == "subOrchestrationInstanceCompleted"
    assert done.subOrchestrationInstanceCompleted.taskScheduledId == 2
    assert done.subOrchestrationInstanceCompleted.result.value == '"r"'
    assert "parent" in core.ready()


def test_failed_child_sends_child_done_to_a_parent_on_another_partition(pair):
    p0, p1 = pair
    parent, child = id_on(0, 2, "parent"), id_on(1, 2, "child")
    start_child = {"op": "start_child", "i": child, "n": "Child", "tg": {}, "p": [parent, "px", 9, "P", None]}
    p1.apply({"op": "deliver", "from": 0, "msgs": [[1, start_child]]})
    failure = pb.TaskFailureDetails(errorType="E", errorMessage="bad")
    actions = p1.run_first(child, [complete(0, FAILED, failure=failure)])

    assert act.SendToPartition(0) in actions
    [(seq, message)] = p1.outbox(0)
    assert seq == 1
    assert message["op"] == "child_done"
    assert message["i"] == parent
    assert (message["x"], message["t"], message["s"]) == ("px", 9, FAILED)
    assert pb.TaskFailureDetails.FromString(message["fd"]).errorMessage == "bad"


def test_continue_as_new_resets_history_and_next_item_has_carryover_then_arrivals(core):
    core.start("a", data='"0"')
    core.run_first("a")
    core.request({"op": "raise", "i": "a", "n": "go"})
    token, _ = core.dispatch_one("a")
    old_x = core.record("a")["x"]
    core.request({"op": "raise", "i": "a", "n": "arrived", "in": '"m"'})  # arrives while in flight
    core.now += 50

    actions = core.complete_orch(
        "a", token, [complete(0, CONTINUED_AS_NEW, '"1"', carryover=[raised_event("carried", '"c"')])]
    )

    assert not of_type(actions, act.StatusChanged)  # waiters for completion are not woken
    record = core.record("a")
    assert record["s"] == RUNNING
    assert record["x"] != old_x
    assert record["in"] == '"1"'
    assert record["hl"] == 0
    assert core.history("a") == []
    assert core.inbox("a")  # the next work item's new events wait in the inbox

    token2, request = core.dispatch_one("a")
    assert list(request.pastEvents) == []
    assert request.executionId.value == record["x"]
    assert kinds(request.newEvents) == [
        "orchestratorStarted",
        "executionStarted",
        "eventRaised",
        "eventRaised",
    ]
    started = request.newEvents[1].executionStarted
    assert started.input.value == '"1"'
    assert started.orchestrationInstance.executionId.value == record["x"]
    assert [e.eventRaised.name for e in request.newEvents[2:]] == ["carried", "arrived"]


def test_continue_as_new_carries_events_but_not_the_old_executions_results(core):
    """An activity result and a fired timer of the old execution that arrive while the turn continuing as new is
    out stay with the old execution. The new one numbers its tasks from 0 again, and the SDK would take such a
    result for one of its own tasks (a reviewer's loop got generation N's results in generation N+1)."""
    core.start("a")
    core.run_first("a", [schedule_task(0, "Slow"), create_timer(1, T0 + 5)])
    [(activity_token, _)] = core.dispatch_act()
    core.request({"op": "raise", "i": "a", "n": "go"})
    token, _ = core.dispatch_one("a")  # the turn that will continue as new is out
    core.complete_act("a", 0, activity_token, result='"old"')
    core.apply({"op": "fire_timers"}, now=T0 + 5)
    core.request({"op": "raise", "i": "a", "n": "later", "in": '"m"'})
    assert {"taskCompleted", "timerFired", "eventRaised"} <= set(kinds(core.inbox("a")))

    core.complete_orch("a", token, [complete(0, CONTINUED_AS_NEW, '"next"')])

    _, request = core.dispatch_one("a")
    assert kinds(request.newEvents) == ["orchestratorStarted", "executionStarted", "eventRaised"]
    assert request.newEvents[2].eventRaised.name == "later"


def test_continue_as_new_does_not_wake_completion_waiters(core):
    core.start("a")
    core.run_first("a")
    core.apply({"op": "wait", "i": "a", "k": "done", "rid": 1, "_from": b"g"})
    core.request({"op": "raise", "i": "a", "n": "e"})
    actions = core.run_first("a", [complete(0, CONTINUED_AS_NEW, '"n"')])
    assert not of_type(actions, act.StatusChanged)
    assert core.status("a") == RUNNING
    assert len(core.state.waiters["a"]) == 1


def test_empty_actions_still_commit_the_delivered_events(core):
    core.start("a")
    core.run_first("a")
    core.request({"op": "raise", "i": "a", "n": "e1"})
    token, request = core.dispatch_one("a")
    assert kinds(request.pastEvents) == ["orchestratorStarted", "executionStarted"]

    core.complete_orch("a", token, [])

    assert kinds(core.history("a")) == [
        "orchestratorStarted",
        "executionStarted",
        "orchestratorStarted",
        "eventRaised",
    ]
    assert core.inbox("a") == []
    assert core.status("a") == RUNNING


def test_events_arriving_in_flight_wait_for_the_next_work_item(core):
    core.start("a")
    token, request = core.dispatch_one("a")
    core.request({"op": "raise", "i": "a", "n": "during"})
    assert core.dispatch_orch() == []  # in flight: not dispatched twice

    actions = core.complete_orch("a", token, [])

    assert kinds(core.history("a")) == ["orchestratorStarted", "executionStarted"]
    assert of_type(actions, act.WorkAvailable)
    token2, request2 = core.dispatch_one("a")
    assert kinds(request2.pastEvents) == ["orchestratorStarted", "executionStarted"]
    assert kinds(request2.newEvents) == ["orchestratorStarted", "eventRaised"]
    assert request2.newEvents[1].eventRaised.name == "during"


def test_stale_or_reused_token_is_rejected(core):
    core.start("a")
    token, _ = core.dispatch_one("a")
    with pytest.raises(StaleCompletionError):
        core.complete_orch("a", "0.1.999", [])
    with pytest.raises(StaleCompletionError):
        core.complete_orch("b", token, [])  # token of another instance
    core.complete_orch("a", token, [])
    history = core.history("a")
    with pytest.raises(StaleCompletionError):
        core.complete_orch("a", token, [complete(0, COMPLETED)])
    assert core.history("a") == history
    assert core.status("a") == RUNNING


def test_unknown_action_fails_the_instance_and_applies_no_action(core):
    core.start("a")
    empty = pb.OrchestratorAction(id=2)  # no action type set
    core.run_first("a", [schedule_task(1, "Act"), empty])

    record = core.record("a")
    assert record["s"] == FAILED
    assert pb.TaskFailureDetails.FromString(record["fd"]).errorType == "InvalidAction"
    assert core.activities() == []
    assert "taskScheduled" not in kinds(core.history("a"))


def test_suspended_instance_completion_keeps_it_suspended(core):
    core.start("a")
    token, _ = core.dispatch_one("a")
    core.request({"op": "suspend", "i": "a"})
    core.complete_orch("a", token, [])
    assert core.status("a") == SUSPENDED
    assert core.dispatch_orch() == []  # the suspend event waits for resume


def test_history_limit_counts_each_event_once(tmp_path):
    core = Core(str(tmp_path / "p"))
    core.state.max_history_events = 4
    core.start("a")
    core.run_first("a", [schedule_task(1, "Act")])  # 3 events stored, limit 4
    assert len(core.history("a")) == 3
    assert core.status("a") == RUNNING
    core.close()


def test_complete_with_non_terminal_status_fails_naming_the_given_status(core):
    core.start("a")
    core.run_first("a", [complete(0, RUNNING)])
    record = core.record("a")
    assert record["s"] == FAILED
    failure = pb.TaskFailureDetails.FromString(record["fd"])
    assert failure.errorType == "InvalidStatus"
    assert "status 0" in failure.errorMessage or "RUNNING" in failure.errorMessage
    done = core.history("a")[-1].executionCompleted
    assert done.failureDetails.errorType == "InvalidStatus"


def test_continue_as_new_keeps_a_suspend_that_arrived_in_flight(core):
    core.start("a")
    token, _ = core.dispatch_one("a")
    core.request({"op": "suspend", "i": "a"})
    core.complete_orch("a", token, [complete(0, CONTINUED_AS_NEW, '"n"')])
    assert core.status("a") == SUSPENDED
    core.request({"op": "resume", "i": "a"})
    _, request = core.dispatch_one("a")
    assert "executionResumed" in kinds(request.newEvents)


def test_a_terminate_delivered_with_a_continue_as_new_ends_the_instance(core):
    """The SDK ignores a terminate once the orchestrator has completed, here by continuing as new on an earlier
    event of the same work item; the terminate was accepted, so the instance still ends TERMINATED."""
    core.start("a")
    core.run_first("a")
    core.request({"op": "raise", "i": "a", "n": "tick"})
    core.request({"op": "terminate", "i": "a", "out": '"stop"'})
    token, request = core.dispatch_one("a")
    assert kinds(request.newEvents)[1:] == ["eventRaised", "executionTerminated"]
    core.complete_orch("a", token, [complete(0, CONTINUED_AS_NEW, '"next"')])

    record = core.record("a")
    assert record["s"] == TERMINATED and record["out"] == '"stop"'
    assert core.inbox("a") == []
    assert core.dispatch_orch() == []
    assert core.history("a")[-1].executionCompleted.orchestrationStatus == TERMINATED


def test_a_suspend_delivered_with_a_continue_as_new_suspends_the_new_execution(core):
    core.start("a")
    core.run_first("a")
    core.request({"op": "raise", "i": "a", "n": "go"})
    token, _ = core.dispatch_one("a")  # in flight: [eventRaised]
    core.request({"op": "raise", "i": "a", "n": "more"})
    core.apply({"op": "abandon", "tok": token, "quiet": True})
    core.request({"op": "suspend", "i": "a"})
    core.request({"op": "resume", "i": "a"})
    core.request({"op": "suspend", "i": "a"})
    token, request = core.dispatch_one("a")  # delivered together: the SDK continues as new on "go"
    assert kinds(request.newEvents)[1:] == [
        "eventRaised", "eventRaised", "executionSuspended", "executionResumed", "executionSuspended"]
    core.complete_orch("a", token, [complete(0, CONTINUED_AS_NEW, '"next"')])

    assert core.status("a") == SUSPENDED
    assert kinds(core.inbox("a")) == ["executionStarted", "executionSuspended"]  # the new execution's own
    assert core.dispatch_orch() == []
    core.request({"op": "resume", "i": "a"})
    _, request = core.dispatch_one("a")
    assert kinds(request.newEvents)[1:] == ["executionStarted", "executionSuspended", "executionResumed"]


def test_a_resume_whose_suspend_went_to_the_old_execution_is_not_carried_over(core):
    core.start("a")
    core.run_first("a")
    core.request({"op": "raise", "i": "a", "n": "go"})
    core.request({"op": "suspend", "i": "a"})
    token, request = core.dispatch_one("a")
    assert kinds(request.newEvents)[1:] == ["eventRaised", "executionSuspended"]
    core.request({"op": "resume", "i": "a"})  # arrives while that work item is in flight
    core.complete_orch("a", token, [complete(0, CONTINUED_AS_NEW, '"next"')])

    assert core.status("a") == RUNNING
    assert kinds(core.inbox("a")) == ["executionStarted"]  # no stray executionResumed for the SDK to fail on


def test_an_entity_call_names_the_calling_execution(pair):
    """The SDK leaves parentExecutionId out of entityOperationCalled; the engine fills it in, so the entity's
    answer names the execution that asked, and one that arrives after a continue-as-new is dropped."""
    p0, _ = pair
    caller, entity = id_on(0, 2, "caller"), id_on(1, 2, "@counter@k")
    p0.start(caller)
    called = pb.EntityOperationCalledEvent(requestId="r1", operation="get", parentInstanceId=sv(caller),
                                           targetInstanceId=sv(entity))
    p0.run_first(caller, [pb.OrchestratorAction(id=1, sendEntityMessage=pb.SendEntityMessageAction(
        entityOperationCalled=called))])
    execution = p0.record(caller)["x"]
    [(_, message)] = p0.outbox(1)
    sent = pb.HistoryEvent.FromString(message["ev"]).entityOperationCalled
    assert sent.parentExecutionId.value == execution and sent.requestId == "r1"
