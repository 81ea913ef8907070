"""RaiseEvent, SuspendInstance / ResumeInstance and TerminateInstance."""

from __future__ import annotations

import pytest

from partitions.state_machine import actions as act
from runtime.errors import InstanceNotFoundError
from tests.unit.conftest import (
    COMPLETED,
    CONTINUED_AS_NEW,
    PENDING,
    RUNNING,
    SUSPENDED,
    T0,
    TERMINATED,
    complete,
    create_sub,
    deliver,
    id_on,
    kinds,
    of_type,
    replies,
)


def _running(core, instance_id="a"):
    core.start(instance_id)
    core.run_first(instance_id)
    assert core.status(instance_id) == RUNNING
    assert core.ready() == []


# raise event


def test_raise_event_puts_event_raised_into_the_inbox_and_readies_the_instance(core):
    _running(core)
    actions = core.request({"op": "raise", "i": "a", "n": "Approval", "in": '"yes"'})

    assert len(replies(actions)) == 1
    assert of_type(actions, act.WorkAvailable)
    [raised] = core.inbox("a")
    assert (raised.eventRaised.name, raised.eventRaised.input.value) == ("Approval", '"yes"')
    _, request = core.dispatch_one("a")
    assert kinds(request.newEvents) == ["orchestratorStarted", "eventRaised"]


def test_raise_event_on_unknown_instance_raises_not_found(core):
    with pytest.raises(InstanceNotFoundError):
        core.request({"op": "raise", "i": "nobody", "n": "e"})
    assert core.record("nobody") is None


def test_quiet_raise_on_unknown_instance_is_dropped(core):
    actions = core.apply({"op": "raise", "i": "nobody", "n": "e", "quiet": True})
    assert actions == []
    assert core.record("nobody") is None
    assert core.inbox("nobody") == []


def test_event_for_a_completed_instance_is_dropped(core):
    core.start("a")
    core.run_first("a", [complete(0, COMPLETED)])
    actions = core.request({"op": "raise", "i": "a", "n": "e"})
    assert len(replies(actions)) == 1
    assert core.inbox("a") == []
    assert core.ready() == []


# suspend and resume


def test_suspend_sets_suspended_and_holds_dispatch_until_resume(core):
    _running(core)
    actions = core.request({"op": "suspend", "i": "a", "reason": "maintenance"})

    assert act.StatusChanged("a") in actions
    assert core.status("a") == SUSPENDED
    [suspended] = core.inbox("a")
    assert suspended.executionSuspended.input.value == "maintenance"
    assert core.dispatch_orch() == []

    core.request({"op": "raise", "i": "a", "n": "e"})
    assert core.dispatch_orch() == []  # held: events queue up while suspended

    actions = core.request({"op": "resume", "i": "a", "reason": "done"})
    assert act.StatusChanged("a") in actions
    assert core.status("a") == RUNNING
    _, request = core.dispatch_one("a")
    assert kinds(request.newEvents) == [
        "orchestratorStarted",
        "executionSuspended",
        "eventRaised",
        "executionResumed",
    ]
    assert request.newEvents[-1].executionResumed.input.value == "done"


def test_resume_of_a_running_instance_adds_no_event(core):
    _running(core)
    actions = core.request({"op": "resume", "i": "a"})
    assert len(replies(actions)) == 1
    assert not of_type(actions, act.StatusChanged)
    assert core.inbox("a") == []
    assert core.dispatch_orch() == []


def test_duplicate_suspend_adds_no_second_event(core):
    _running(core)
    core.request({"op": "suspend", "i": "a"})
    actions = core.request({"op": "suspend", "i": "a"})
    assert not of_type(actions, act.StatusChanged)
    assert kinds(core.inbox("a")) == ["executionSuspended"]


def test_suspend_of_a_completed_instance_changes_nothing(core):
    core.start("a")
    core.run_first("a", [complete(0, COMPLETED)])
    core.request({"op": "suspend", "i": "a"})
    core.request({"op": "resume", "i": "a"})
    assert core.status("a") == COMPLETED
    assert core.inbox("a") == []


@pytest.mark.parametrize("op", ["suspend", "resume", "terminate"])
def test_unknown_instance_raises_not_found(core, op):
    with pytest.raises(InstanceNotFoundError):
        core.request({"op": op, "i": "nobody"})


# terminate


def test_terminate_adds_execution_terminated_and_sdk_answer_finishes_it(core):
    _running(core)
    actions = core.request({"op": "terminate", "i": "a", "out": '"stop"'})

    assert len(replies(actions)) == 1
    [terminated] = core.inbox("a")
    assert terminated.executionTerminated.input.value == '"stop"'
    assert terminated.executionTerminated.recurse is False
    assert core.status("a") == RUNNING  # the SDK confirms it

    token, request = core.dispatch_one("a")
    assert kinds(request.newEvents) == ["orchestratorStarted", "executionTerminated"]
    actions = core.complete_orch("a", token, [complete(0, TERMINATED, '"stop"')])
    assert act.StatusChanged("a") in actions
    record = core.record("a")
    assert record["s"] == TERMINATED
    assert record["out"] == '"stop"'
    assert kinds(core.history("a"))[-1] == "executionCompleted"


def test_terminate_without_completion_action_still_terminates(core):
    _running(core)
    core.request({"op": "terminate", "i": "a"})
    core.run_first("a", [])
    assert core.status("a") == TERMINATED


def test_terminate_reaches_a_suspended_instance(core):
    _running(core)
    core.request({"op": "suspend", "i": "a"})
    core.request({"op": "terminate", "i": "a"})
    _, request = core.dispatch_one("a")
    assert kinds(request.newEvents) == ["orchestratorStarted", "executionSuspended", "executionTerminated"]


def test_terminate_of_a_completed_instance_adds_nothing(core):
    core.start("a")
    core.run_first("a", [complete(0, COMPLETED)])
    actions = core.request({"op": "terminate", "i": "a"})
    assert len(replies(actions)) == 1
    assert core.inbox("a") == []


def test_recursive_terminate_sends_terminate_to_children_once_the_parent_takes_it(pair):
    p0, p1 = pair
    parent = id_on(0, 2, "parent")
    local_child, remote_child = id_on(0, 2, "lc"), id_on(1, 2, "rc")
    p0.start(parent)
    p0.run_first(parent, [create_sub(1, "C", local_child), create_sub(2, "C", remote_child)])
    start_rows = len(p0.outbox(1))

    p0.request({"op": "terminate", "i": parent, "out": '"why"', "r": True})
    assert p0.inbox(parent)[-1].executionTerminated.recurse is True
    assert kinds(p0.inbox(local_child)) == ["executionStarted"]  # not yet: the parent has not taken it
    assert p0.outbox(1)[start_rows:] == []

    actions = p0.complete_orch(parent, p0.dispatch_tokens()[parent], [complete(3, TERMINATED, '"why"')])
    # the local child gets executionTerminated in the same transaction
    assert kinds(p0.inbox(local_child)) == ["executionStarted", "executionTerminated"]
    assert p0.inbox(local_child)[-1].executionTerminated.input.value == '"why"'
    # the remote child gets a terminate message through the outbox
    assert act.SendToPartition(1) in actions
    rows = p0.outbox(1)[start_rows:]
    assert [m for _, m in rows] == [
        {"op": "terminate", "i": remote_child, "out": '"why"', "r": True, "quiet": True, "via": [parent]}
    ]


def test_a_recursive_terminate_that_a_turn_in_flight_completes_first_leaves_the_children_alone(pair):
    """The only serial orders: terminate first (parent and children TERMINATED), or the completion first (the
    parent COMPLETED, the terminate moot, the children running on). Telling the children as soon as the
    terminate came gave a third: the parent COMPLETED with its children TERMINATED."""
    p0, p1 = pair
    parent, child = id_on(0, 2, "parent"), id_on(1, 2, "child")
    p0.start(parent)
    p0.run_first(parent, [create_sub(1, "C", child)])
    deliver(p0, p1)
    p0.request({"op": "raise", "i": parent, "n": "go"})
    token, _ = p0.dispatch_one(parent)
    p0.request({"op": "terminate", "i": parent, "r": True})
    p0.complete_orch(parent, token, [complete(2, COMPLETED, '"done"')])
    deliver(p0, p1)

    assert p0.status(parent) == COMPLETED
    assert not _terminated(p1, child)


def test_non_recursive_terminate_leaves_children_alone(core):
    core.start("parent")
    core.run_first("parent", [create_sub(1, "C")])
    core.request({"op": "terminate", "i": "parent"})
    assert kinds(core.inbox("parent:0001")) == ["executionStarted"]


def test_resume_does_not_start_a_scheduled_instance_early(core):
    at = T0 + 10_000
    core.start("a", ss=at)
    core.request({"op": "suspend", "i": "a"})
    assert core.status("a") == SUSPENDED
    core.request({"op": "resume", "i": "a"})
    assert core.status("a") == PENDING  # it has not started: resume does not make it RUNNING

    assert core.dispatch_orch() == []
    core.apply({"op": "fire_timers"}, now=at)
    token, request = core.dispatch_one("a")
    assert kinds(request.newEvents)[:2] == ["orchestratorStarted", "executionStarted"]
    core.complete_orch("a", token, [])
    assert core.status("a") == RUNNING


def test_an_instance_that_ran_while_suspended_resumes_running(core):
    core.start("a")
    token, _ = core.dispatch_one("a")  # its first turn is in flight...
    core.request({"op": "suspend", "i": "a"})  # ...while it is still PENDING
    core.complete_orch("a", token, [])
    assert core.status("a") == SUSPENDED
    core.request({"op": "resume", "i": "a"})
    assert core.status("a") == RUNNING


def test_a_pending_instance_suspended_and_terminated_stays_terminated_after_resume(core):
    core.start("a", ss=T0 + 10_000)
    core.request({"op": "suspend", "i": "a"})
    core.request({"op": "terminate", "i": "a"})
    assert core.status("a") == TERMINATED and core.dispatch_orch() == []
    core.request({"op": "resume", "i": "a"})
    assert core.status("a") == TERMINATED
    assert "sp" not in core.record("a")


def test_an_instance_no_worker_has_started_is_terminated_at_once(core):
    """Handed to a worker with its start, the terminate came second, so an orchestration that completes on its
    first turn ended COMPLETED: a start scheduled for next month, terminated today, ran today."""
    core.start("a", ss=T0 + 30 * 86_400_000)
    core.request({"op": "terminate", "i": "a", "out": '"not needed"'})
    assert core.status("a") == TERMINATED and core.record("a")["out"] == '"not needed"'
    assert core.dispatch_orch() == []


def test_an_instance_whose_first_turn_is_out_takes_the_terminate_from_its_worker(core):
    core.start("a")
    token, _ = core.dispatch_one("a")
    core.request({"op": "terminate", "i": "a"})
    assert core.status("a") == PENDING
    core.complete_orch("a", token, [])
    token, request = core.dispatch_one("a")
    assert kinds(request.newEvents)[-1] == "executionTerminated"


def _terminations(core, instance_id) -> int:
    return kinds(core.inbox(instance_id)).count("executionTerminated")


def _terminated(core, instance_id) -> bool:
    """Told to terminate: ended at once if it had not run yet, else with the event for its worker."""
    return core.status(instance_id) == TERMINATED or _terminations(core, instance_id) > 0


def test_a_child_started_by_a_work_item_in_flight_during_a_recursive_terminate_is_terminated_too(pair):
    p0, p1 = pair
    parent, first, second = id_on(0, 2, "parent"), id_on(1, 2, "first"), id_on(1, 2, "second")
    p0.start(parent)
    p0.run_first(parent, [create_sub(1, "C", first)])
    deliver(p0, p1)
    p0.request({"op": "raise", "i": parent, "n": "go"})
    token, _ = p0.dispatch_one(parent)  # in flight when the terminate arrives...
    p0.request({"op": "terminate", "i": parent, "r": True})
    p0.complete_orch(parent, token, [create_sub(2, "C", second)])  # ...and it starts another child
    token, request = p0.dispatch_one(parent)
    assert "executionTerminated" in kinds(request.newEvents)
    p0.complete_orch(parent, token, [complete(3, TERMINATED)])
    deliver(p0, p1)

    assert p0.status(parent) == TERMINATED
    assert _terminated(p1, first) and _terminated(p1, second)


def test_a_sub_orchestration_id_taken_by_a_running_instance_is_not_the_parents_child(core):
    # Its own id, or another running instance's: the start fails, and neither becomes a child that a recursive
    # terminate (or purge) would reach. Before, terminating "a" recursed on itself until the stack ran out.
    _running(core, "other")
    core.start("a")
    core.run_first("a", [create_sub(1, "C", "a"), create_sub(2, "C", "other")])
    assert core.record("a")["ch"] == []

    core.request({"op": "terminate", "i": "a", "r": True})
    assert _terminations(core, "a") == 1
    assert _terminations(core, "other") == 0


def test_a_recursive_terminate_does_not_go_round_a_child_list_that_leads_back(pair):
    # B (on p1) tries to start A, its own parent: until the failure comes back to B, B's child list names A.
    p0, p1 = pair
    a, b = id_on(0, 2, "A"), id_on(1, 2, "B")
    p0.start(a)
    p0.run_first(a, [create_sub(1, "C", b)])
    deliver(p0, p1)
    p1.run_first(b, [create_sub(1, "C", a)])
    assert p1.record(b)["ch"] == [a]
    p0.request({"op": "terminate", "i": a, "r": True})
    deliver(p1, p0)  # the start of A finds A running: refused
    p0.run_first(a, [complete(2, TERMINATED)])  # A takes the terminate, and tells B
    deliver(p0, p1)
    p1.run_first(b, [complete(2, TERMINATED)])
    for _ in range(3):  # nothing more goes round
        deliver(p1, p0)
        deliver(p0, p1)

    assert p0.status(a) == TERMINATED and p1.status(b) == TERMINATED
    assert p0.inbox(a) == [] and p1.inbox(b) == []


def test_continue_as_new_starts_with_no_children_but_a_recursive_terminate_in_flight_still_reaches_them(pair):
    p0, p1 = pair
    parent, old, late = id_on(0, 2, "eternal"), id_on(1, 2, "old"), id_on(1, 2, "late")
    p0.start(parent)
    p0.run_first(parent, [create_sub(1, "C", old)])
    p0.request({"op": "raise", "i": parent, "n": "go"})
    token, _ = p0.dispatch_one(parent)
    p0.complete_orch(parent, token, [complete(2, CONTINUED_AS_NEW, '"next"')])
    assert p0.record(parent)["ch"] == []  # the list does not grow with every generation

    # A recursive terminate that arrives while the generation's last work item is in flight is carried into the
    # next generation; the children that work item started hear of it all the same.
    p0.request({"op": "raise", "i": parent, "n": "go"})
    token, _ = p0.dispatch_one(parent)
    p0.request({"op": "terminate", "i": parent, "r": True})
    p0.complete_orch(parent, token, [create_sub(1, "C", late), complete(2, CONTINUED_AS_NEW, '"again"')])
    deliver(p0, p1)
    assert _terminated(p1, late)
    assert not _terminated(p1, old)  # a child of an earlier generation is its own


def test_a_recursive_terminate_does_not_reach_an_instance_whose_id_a_child_could_not_take(pair):
    """The child's id is taken by an unrelated running instance on the other partition, and the terminate comes
    before the failed start is reported back: the cascade reaches that instance, which its parent did not
    start, and leaves it alone. The failed start then takes the id off the finished parent's child list."""
    p0, p1 = pair
    parent, stranger = id_on(0, 2, "parent"), id_on(1, 2, "stranger")
    _running(p1, stranger)
    p0.start(parent)
    p0.run_first(parent, [create_sub(1, "C", stranger)])
    p0.request({"op": "terminate", "i": parent, "r": True})
    deliver(p0, p1)  # the child's start (refused: the id is taken), then the cascade

    assert _terminations(p1, stranger) == 0
    assert p1.status(stranger) == RUNNING
    token, _ = p0.dispatch_one(parent)
    p0.complete_orch(parent, token, [complete(1, TERMINATED)])
    deliver(p1, p0)  # "did not start" reaches the parent after it has ended
    assert stranger not in p0.record(parent).get("ch", [])


def _parent_with_a_running_child(pair) -> tuple[str, str]:
    p0, p1 = pair
    parent, child = id_on(0, 2, "parent"), id_on(1, 2, "kid")
    p0.start(parent)
    p0.run_first(parent, [create_sub(1, "C", child)])
    deliver(p0, p1)
    p1.run_first(child, [])  # it runs: it takes a terminate from its worker
    return parent, child


def _told(core, instance_id: str) -> list[str | None]:
    return [e.executionTerminated.input.value if e.executionTerminated.HasField("input") else None
            for e in core.inbox(instance_id) if e.HasField("executionTerminated")]


@pytest.mark.parametrize("ends_it", ["forced terminate", "replaced by a start with a reuse policy"])
def test_a_recursive_terminate_queued_when_the_engine_ends_the_parent_still_reaches_the_children(pair, ends_it):
    """With the cascade moved to when the instance takes the terminate, an end without a worker's turn (the
    usual way out when no worker takes it) deleted the queued terminate with the inbox: the children ran on."""
    p0, p1 = pair
    parent, child = _parent_with_a_running_child(pair)
    p0.request({"op": "terminate", "i": parent, "out": '"stop"', "r": True})
    if ends_it == "forced terminate":
        p0.request({"op": "force_terminate", "i": parent, "out": '"forced"'})
    else:
        p0.start(parent, reuse=[RUNNING])
    deliver(p0, p1)
    assert _told(p1, child) == ['"stop"']


def test_a_recursive_terminate_that_comes_while_a_continue_as_new_is_out_reaches_the_children_with_its_reason(pair):
    p0, p1 = pair
    parent, child = _parent_with_a_running_child(pair)
    p0.request({"op": "raise", "i": parent, "n": "go"})
    token, _ = p0.dispatch_one(parent)
    p0.request({"op": "terminate", "i": parent, "out": '"shutdown"', "r": True})
    p0.complete_orch(parent, token, [complete(2, CONTINUED_AS_NEW, '"next"')])
    deliver(p0, p1)
    assert _told(p1, child) == ['"shutdown"']
    token, _ = p0.dispatch_one(parent)  # the new execution's first turn carries the terminate
    p0.complete_orch(parent, token, [complete(1, COMPLETED, '"ran"')])
    assert p0.status(parent) == TERMINATED and p0.record(parent)["out"] == '"shutdown"'


@pytest.mark.parametrize("answer", ["terminated", "continued as new first"])
def test_a_second_recursive_terminate_queued_behind_the_one_a_turn_delivers_does_not_cascade_again(pair, answer):
    """The first one ends the parent, and the second came after it: the children hear once, with the first's
    reason (they were told twice, the second's reason first)."""
    p0, p1 = pair
    parent, child = _parent_with_a_running_child(pair)
    p0.request({"op": "terminate", "i": parent, "out": '"first"', "r": True})
    token, _ = p0.dispatch_one(parent)
    p0.request({"op": "terminate", "i": parent, "out": '"second"', "r": True})
    status = TERMINATED if answer == "terminated" else CONTINUED_AS_NEW
    p0.complete_orch(parent, token, [complete(2, status, '"first"')])
    deliver(p0, p1)
    assert p0.status(parent) == TERMINATED
    assert _told(p1, child) == ['"first"']


@pytest.mark.parametrize("how", ["delivered first, recursive one queued", "both delivered",
                                 "both left over at a continue-as-new"])
def test_a_recursive_terminate_behind_a_plain_one_does_not_reach_the_children(pair, how):
    """The first terminate ends the parent; one that comes after is for an instance already ended and changes
    nothing, so a plain terminate followed by a recursive one leaves the children running."""
    p0, p1 = pair
    parent, child = _parent_with_a_running_child(pair)
    plain = {"op": "terminate", "i": parent, "out": '"first"'}
    recursive = {"op": "terminate", "i": parent, "out": '"second"', "r": True}
    if how == "both left over at a continue-as-new":
        p0.request({"op": "raise", "i": parent, "n": "go"})
        token, _ = p0.dispatch_one(parent)
        p0.request(plain)
        p0.request(recursive)
        p0.complete_orch(parent, token, [complete(2, CONTINUED_AS_NEW, '"next"')])
        token, _ = p0.dispatch_one(parent)  # the new execution's first turn carries both
        p0.complete_orch(parent, token, [complete(1, COMPLETED, '"ran"')])
    else:
        p0.request(plain)
        if how == "both delivered":
            p0.request(recursive)
        token, _ = p0.dispatch_one(parent)
        if how != "both delivered":
            p0.request(recursive)
        p0.complete_orch(parent, token, [complete(2, TERMINATED, '"first"')])
    deliver(p0, p1)
    assert p0.status(parent) == TERMINATED and p0.record(parent)["out"] == '"first"'
    assert _told(p1, child) == []
