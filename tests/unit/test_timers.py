"""Durable timers: createTimer rows fire as timerFired at their time, and only for the live execution."""

from __future__ import annotations

from partitions.state_machine import actions as act
from protos import orchestrator_service_pb2 as pb
from tests.unit.conftest import (
    COMPLETED,
    CONTINUED_AS_NEW,
    FAILED,
    RUNNING,
    T0,
    Core,
    complete,
    create_timer,
    kinds,
    ms_of,
    of_type,
    schedule_task,
)


def test_timer_fires_at_fire_at_as_timer_fired_in_the_inbox(core):
    fire = T0 + 10_000
    core.start("a")
    core.run_first("a", [create_timer(2, fire)])

    assert core.apply({"op": "fire_timers"}, now=fire - 1) == []
    assert len(core.timers()) == 1
    assert core.inbox("a") == []

    actions = core.apply({"op": "fire_timers"}, now=fire)

    assert of_type(actions, act.WorkAvailable)
    assert core.timers() == []
    [fired] = core.inbox("a")
    assert fired.WhichOneof("eventType") == "timerFired"
    assert fired.timerFired.timerId == 2
    assert ms_of(fired.timerFired.fireAt) == fire
    assert ms_of(fired.timestamp) == fire

    _, request = core.dispatch_one("a")
    assert kinds(request.pastEvents) == ["orchestratorStarted", "executionStarted", "timerCreated"]
    assert kinds(request.newEvents) == ["orchestratorStarted", "timerFired"]


def test_due_timers_fire_in_time_order_and_later_ones_wait(core):
    core.start("a")
    core.run_first("a", [create_timer(1, T0 + 300), create_timer(2, T0 + 100), create_timer(3, T0 + 900)])

    core.apply({"op": "fire_timers"}, now=T0 + 500)

    assert [e.timerFired.timerId for e in core.inbox("a")] == [2, 1]
    assert [(f, t) for f, _, t, _ in core.timers()] == [(T0 + 900, 3)]


def test_fire_timers_honours_the_limit(core):
    core.start("a")
    core.run_first("a", [create_timer(1, T0 + 1), create_timer(2, T0 + 2)])
    core.apply({"op": "fire_timers", "limit": 1}, now=T0 + 10)
    assert [e.timerFired.timerId for e in core.inbox("a")] == [1]
    core.apply({"op": "fire_timers", "limit": 1}, now=T0 + 10)
    assert [e.timerFired.timerId for e in core.inbox("a")] == [1, 2]


WEEK_MS = 7 * 86_400_000


def _no_timers_left(core) -> bool:
    with core.read() as txn:
        return core.timers() == [] and txn.timer_index_count() == 0


def test_timer_of_a_completed_instance_goes_with_its_execution(core):
    """An approval that came before its timeout: the timer row once stayed until its fire time (a week, say),
    through a purge, for every such instance."""
    core.start("a")
    token, _ = core.dispatch_one("a")
    core.complete_orch("a", token, [create_timer(1, T0 + WEEK_MS)])
    core.request({"op": "raise", "i": "a", "n": "e"})
    core.run_first("a", [complete(0, COMPLETED)])

    assert _no_timers_left(core)
    assert core.apply({"op": "fire_timers"}, now=T0 + WEEK_MS) == []
    assert core.inbox("a") == []


def test_timer_of_an_earlier_execution_goes_at_continue_as_new(core):
    """An eternal monitor (wait for an event or a timeout, continue as new) left a row per generation."""
    core.start("a")
    core.run_first("a", [create_timer(1, T0 + WEEK_MS)])
    core.request({"op": "raise", "i": "a", "n": "e"})
    core.run_first("a", [complete(0, CONTINUED_AS_NEW, '"n"')])
    inbox = core.inbox("a")
    assert _no_timers_left(core)

    core.apply({"op": "fire_timers"}, now=T0 + WEEK_MS)
    assert core.inbox("a") == inbox  # no timerFired for the new execution


def test_a_timer_that_fires_leaves_nothing_behind(core):
    core.start("a")
    core.run_first("a", [create_timer(1, T0 + 5)])
    core.apply({"op": "fire_timers"}, now=T0 + 5)
    assert _no_timers_left(core)


def test_a_purged_or_replaced_instance_takes_its_timers_with_it(core):
    core.start("scheduled", ss=T0 + 30 * 86_400_000)  # its start is a timer row
    core.request({"op": "terminate", "i": "scheduled"})
    core.request({"op": "purge", "i": "scheduled"})
    core.start("running")
    core.run_first("running", [create_timer(1, T0 + WEEK_MS)])
    core.start("running", reuse=[RUNNING])  # replaced: a new execution with no timers
    assert _no_timers_left(core)


def test_timer_rows_of_an_earlier_version_still_fire_and_go(core):
    """Rows written before the index was kept are not found by instance: they go when they come due."""
    core.start("a")
    core.run_first("a", [create_timer(1, T0 + 5)])
    txn = core.store.begin(write=True)
    txn.txn.drop(core.store.dbs["timer_idx"], delete=False)
    txn.commit()
    core.request({"op": "raise", "i": "a", "n": "e"})
    core.run_first("a", [complete(0, COMPLETED)])
    assert len(core.timers()) == 1

    assert core.apply({"op": "fire_timers"}, now=T0 + 5) == []
    assert _no_timers_left(core)


def test_timer_survives_reopening_the_store(tmp_path):
    path = str(tmp_path / "p")
    core = Core(path)
    core.start("a")
    core.run_first("a", [create_timer(1, T0 + 5)])
    core.close()

    reopened = Core(path)
    reopened.apply({"op": "fire_timers"}, now=T0 + 5)
    assert [e.timerFired.timerId for e in reopened.inbox("a")] == [1]
    reopened.close()


def test_timer_ids_the_engine_uses_itself_are_still_plain_orchestrator_timers(core):
    """A worker may send any int32 as an action id; negative ones once collided with engine timer rows."""
    fire = T0 + 500
    core.start("a")
    core.run_first("a", [create_timer(-2, fire), create_timer(-1, fire), create_timer(-(2**31), fire)])

    core.apply({"op": "fire_timers"}, now=fire)

    assert core.timers() == []
    assert sorted(e.timerFired.timerId for e in core.inbox("a")) == [-(2**31), -2, -1]


def test_a_timer_row_that_cannot_fire_is_dropped_not_retried_forever(core):
    core.start("a")
    txn = core.store.begin(write=True)  # a row written by an older engine, or damaged: it lacks its payload
    txn.put_timer(T0 + 1, "a", 7, {})
    txn.commit()

    core.apply({"op": "fire_timers"}, now=T0 + 1)

    assert core.timers() == []


def test_a_timer_that_came_due_while_the_instance_was_failed_fires_after_a_rewind(core):
    fire = T0 + 10_000
    failure = pb.TaskFailureDetails(errorType="E", errorMessage="boom")
    core.start("a")
    core.run_first("a", [create_timer(1, fire), schedule_task(2, "Act")])
    token, _ = core.dispatch_act()[0]
    core.complete_act("a", 2, token, failure=failure)
    core.run_first("a", [complete(3, FAILED, failure=failure)])
    core.apply({"op": "fire_timers"}, now=fire + 10_000)  # due while FAILED: the row goes, nothing fires
    assert core.timers() == []

    core.request({"op": "rewind", "i": "a"})
    token, request = core.dispatch_one("a")
    assert "executionRewound" in kinds(request.newEvents)
    clean = [e for e in core.history("a") if e.WhichOneof("eventType") not in ("taskFailed", "executionCompleted")]
    core.complete_orch("a", token, [pb.OrchestratorAction(
        id=-1, rewindOrchestration=pb.RewindOrchestrationAction(newHistory=clean))])
    assert core.status("a") == RUNNING
    assert [(fire_ms, timer_id) for fire_ms, _, timer_id, _ in core.timers()] == [(fire, 1)]

    core.apply({"op": "fire_timers"}, now=fire + 20_000)
    assert [e.timerFired.timerId for e in core.inbox("a") if e.HasField("timerFired")] == [1]
