"""StartInstance: a PENDING record with executionStarted in its inbox; ALREADY_EXISTS, reuse, scheduled start."""

from __future__ import annotations

import pytest

from partitions.state_machine import actions as act
from partitions.store.keys import SCHEDULED_START_TIMER_ID
from protos import orchestrator_service_pb2 as pb
from runtime.errors import (
    InstanceAlreadyExistsError,
    InstanceNotCompletedError,
    InstanceNotFoundError,
    StaleCompletionError,
)
from tests.unit.conftest import (
    COMPLETED,
    FAILED,
    PENDING,
    RUNNING,
    T0,
    Core,
    complete,
    create_sub,
    deliver,
    id_on,
    kinds,
    ms_of,
    of_type,
    replies,
)


def test_start_creates_pending_instance_with_execution_started_in_inbox(core):
    actions = core.start("a", name="Hello", data='"in"', v="1.0", tg={"k": "v"}, x="exec-1")

    [reply] = replies(actions)
    assert reply.result == {"i": "a"}
    assert reply.error is None
    assert of_type(actions, act.WorkAvailable)

    record = core.record("a")
    assert record["s"] == PENDING
    assert record["n"] == "Hello"
    assert record["x"] == "exec-1"
    assert record["c"] == T0
    assert core.history("a") == []

    [started] = core.inbox("a")
    assert kinds([started]) == ["executionStarted"]
    es = started.executionStarted
    assert es.name == "Hello"
    assert es.version.value == "1.0"
    assert es.input.value == '"in"'
    assert es.orchestrationInstance.instanceId == "a"
    assert es.orchestrationInstance.executionId.value == "exec-1"
    assert dict(es.tags) == {"k": "v"}
    assert not es.HasField("parentInstance")
    assert not es.HasField("scheduledStartTimestamp")
    assert ms_of(started.timestamp) == T0

    assert core.ready() == ["a"]
    assert core.meta_seq() == core.state.seq > 0  # counters were saved in the same transaction


def test_start_without_execution_id_derives_one_deterministically(tmp_path):
    ids = []
    for n in range(2):
        c = Core(str(tmp_path / f"s{n}"))
        c.start("same")
        ids.append(c.record("same")["x"])
        c.close()
    assert ids[0] and ids[0] == ids[1]


def test_start_existing_id_raises_already_exists_and_changes_nothing(core):
    core.start("a", data="1")
    before = (core.record("a"), core.inbox("a"), core.ready())

    with pytest.raises(InstanceAlreadyExistsError, match="'a' already exists"):
        core.start("a", data="2")

    assert (core.record("a"), core.inbox("a"), core.ready()) == before


def test_reuse_policy_not_listing_the_status_still_raises(core):
    core.start("a")
    core.run_first("a", [complete(0, COMPLETED, '"done"')])
    with pytest.raises(InstanceAlreadyExistsError):
        core.start("a", reuse=[FAILED])
    assert core.status("a") == COMPLETED


def test_reuse_policy_replaces_a_completed_instance(core):
    core.start("a", data='"first"', x="x1")
    core.run_first("a", [complete(0, COMPLETED, '"done"')])
    assert core.status("a") == COMPLETED
    assert core.history("a")

    core.now += 10
    actions = core.start("a", data='"second"', x="x2", reuse=[COMPLETED])

    assert replies(actions)[0].result == {"i": "a"}
    record = core.record("a")
    assert record["s"] == PENDING
    assert record["x"] == "x2"
    assert record.get("out") is None
    assert core.history("a") == []
    [started] = core.inbox("a")
    assert started.executionStarted.input.value == '"second"'
    assert started.executionStarted.orchestrationInstance.executionId.value == "x2"
    token, request = core.dispatch_one("a")
    assert list(request.pastEvents) == []
    assert kinds(request.newEvents) == ["orchestratorStarted", "executionStarted"]


def test_reuse_policy_replaces_a_running_instance_and_voids_its_lease(core):
    core.start("a", x="x1")
    token, _ = core.dispatch_one("a")
    core.start("a", x="x2", reuse=[RUNNING, PENDING])

    assert core.record("a")["x"] == "x2"
    with pytest.raises(StaleCompletionError):
        core.complete_orch("a", token, [complete(0, COMPLETED)])
    assert core.status("a") == PENDING
    new_token, request = core.dispatch_one("a")
    assert new_token != token
    assert request.executionId.value == "x2"


def test_scheduled_start_holds_until_fire_timers_at_the_scheduled_time(core):
    at = T0 + 5_000
    actions = core.start("a", ss=at)

    assert not of_type(actions, act.WorkAvailable)
    record = core.record("a")
    assert record["s"] == PENDING
    assert record["hu"] == at
    assert core.ready() == []
    assert core.dispatch_orch() == []
    assert [(f, i, t) for f, i, t, _ in core.timers()] == [(at, "a", SCHEDULED_START_TIMER_ID)]

    # an event raised before the start time does not make it run early
    core.request({"op": "raise", "i": "a", "n": "e"})
    assert core.dispatch_orch() == []

    assert core.apply({"op": "fire_timers"}, now=at - 1) == []
    assert core.dispatch_orch(now=at - 1) == []
    assert len(core.timers()) == 1

    actions = core.apply({"op": "fire_timers"}, now=at)
    assert of_type(actions, act.WorkAvailable)
    assert core.timers() == []
    assert core.record("a")["hu"] == 0

    token, request = core.dispatch_one("a")
    assert kinds(request.newEvents) == ["orchestratorStarted", "executionStarted", "eventRaised"]
    assert ms_of(request.newEvents[1].executionStarted.scheduledStartTimestamp) == at


def test_scheduled_start_in_the_past_is_ready_at_once(core):
    core.start("a", ss=T0 - 1)
    assert core.timers() == []
    assert core.ready() == ["a"]


def test_trace_context_is_passed_to_execution_started(core):
    tc = pb.TraceContext(traceParent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    core.start("a", tc=tc.SerializeToString())
    [started] = core.inbox("a")
    assert started.executionStarted.parentTraceContext.traceParent == tc.traceParent


def test_replacing_a_running_sub_orchestration_tells_its_parent(pair):
    """A client replaces a running child (a reuse policy listing RUNNING): the parent, on the other partition,
    gets the child's failure instead of waiting for ever for an execution that is gone."""
    p0, p1 = pair
    parent, child = id_on(0, 2, "parent"), id_on(1, 2, "child")
    p0.start(parent)
    p0.run_first(parent, [create_sub(1, "C", child)])
    deliver(p0, p1)
    p1.run_first(child)
    p1.start(child, reuse=[RUNNING, PENDING])
    deliver(p1, p0)

    [failed] = [e.subOrchestrationInstanceFailed for e in p0.inbox(parent)
                if e.HasField("subOrchestrationInstanceFailed")]
    assert failed.taskScheduledId == 1
    assert failed.failureDetails.errorType == "OrchestrationReplaced"
    assert p1.record(child)["p"] is None  # the new instance is the client's, not the parent's child


def test_a_restart_checks_and_starts_in_one_command(core):
    """The gateway read the status, then started: of concurrent restarts, losers got ALREADY_EXISTS or
    FAILED_PRECONDITION by timing, and a restart racing a purge could bring the purged instance back."""
    core.start("a", name="Orch", data='"in"', tg={"team": "t"})
    core.run_first("a", [complete(0, COMPLETED, '"out"')])
    first = core.record("a")["x"]

    core.request({"op": "restart", "i": "a", "x": "x-2"})
    record = core.record("a")
    assert (record["s"], record["x"], record["n"], record["in"], record["tg"]) == (PENDING, "x-2", "Orch", '"in"',
                                                                                 {"team": "t"})
    assert first != "x-2"
    with pytest.raises(InstanceNotCompletedError, match="not in a terminal state"):
        core.request({"op": "restart", "i": "a", "x": "x-3"})  # the concurrent one: refused, not a third start
    assert core.record("a")["x"] == "x-2"

    core.request({"op": "force_terminate", "i": "a"})
    core.request({"op": "purge", "i": "a"})
    with pytest.raises(InstanceNotFoundError):
        core.request({"op": "restart", "i": "a", "x": "x-4"})  # after the purge: nothing comes back
    assert core.record("a") is None
