"""Durable timers and external events (raised by clients or sent by other orchestrations)."""

from __future__ import annotations

import contextlib
import time
from datetime import timedelta

import grpc
import pytest
from durabletask import task
from durabletask.client import OrchestrationStatus

from .helpers import DEADLINE_S, PARTITIONS, id_not_on_partition, id_on_partition, new_id, partition_of


# ---------------------------------------------------------------------------------------------------------
# activities
# ---------------------------------------------------------------------------------------------------------
def shout(ctx: task.ActivityContext, text: str) -> str:
    return text.upper()


# ---------------------------------------------------------------------------------------------------------
# orchestrators
# ---------------------------------------------------------------------------------------------------------
def one_second_timer(ctx: task.OrchestrationContext, _):
    before = ctx.current_utc_datetime
    yield ctx.create_timer(timedelta(seconds=1))
    after = ctx.current_utc_datetime
    return {"elapsed": (after - before).total_seconds()}


def parallel_timers(ctx: task.OrchestrationContext, _):
    start = ctx.current_utc_datetime
    timers = [ctx.create_timer(timedelta(milliseconds=ms)) for ms in (300, 600, 900)]
    yield task.when_all(timers)
    return (ctx.current_utc_datetime - start).total_seconds()


def timer_at_absolute_time(ctx: task.OrchestrationContext, _):
    fire_at = ctx.current_utc_datetime + timedelta(milliseconds=500)
    yield ctx.create_timer(fire_at)
    return ctx.current_utc_datetime >= fire_at


def wait_for_approval(ctx: task.OrchestrationContext, _):
    value = yield ctx.wait_for_external_event("approval")
    return {"approval": value}


def event_or_timeout(ctx: task.OrchestrationContext, timeout_s: float):
    event = ctx.wait_for_external_event("answer")
    timer = ctx.create_timer(timedelta(seconds=timeout_s))
    winner = yield task.when_any([event, timer])
    if winner == event:
        return {"winner": "event", "value": event.get_result()}
    return {"winner": "timer"}


def activity_then_event(ctx: task.OrchestrationContext, _):
    shouted = yield ctx.call_activity(shout, input="first")
    value = yield ctx.wait_for_external_event("late")
    return [shouted, value]


def case_insensitive_event(ctx: task.OrchestrationContext, _):
    value = yield ctx.wait_for_external_event("MixedCase_Event")
    return value


def three_events_in_order(ctx: task.OrchestrationContext, _):
    values = []
    for _ in range(3):
        v = yield ctx.wait_for_external_event("item")
        values.append(v)
    return values


def event_fan_in(ctx: task.OrchestrationContext, names: list):
    values = yield task.when_all([ctx.wait_for_external_event(n) for n in names])
    return values


def sender(ctx: task.OrchestrationContext, inp: dict):
    ctx.send_event(inp["target"], inp["event"], data=inp["data"])
    done = yield ctx.call_activity(shout, input="sent")
    return done


def receiver(ctx: task.OrchestrationContext, _):
    value = yield ctx.wait_for_external_event("ping")
    return {"got": value}


ORCHESTRATORS = [one_second_timer, parallel_timers, timer_at_absolute_time, wait_for_approval, event_or_timeout,
                 activity_then_event, case_insensitive_event, three_events_in_order, event_fan_in, sender,
                 receiver]
ACTIVITIES = [shout]


@pytest.fixture(scope="module", autouse=True)
def worker(worker_factory):
    return worker_factory(ORCHESTRATORS, ACTIVITIES)


def start(client, orchestrator, inp=None, instance_id=None):
    return client.schedule_new_orchestration(orchestrator, input=inp, instance_id=instance_id or new_id())


def complete(client, iid, timeout=DEADLINE_S):
    state = client.wait_for_orchestration_completion(iid, timeout=timeout)
    assert state is not None
    assert state.runtime_status == OrchestrationStatus.COMPLETED, (state.runtime_status, state.failure_details)
    return state.get_output()


# ---------------------------------------------------------------------------------------------------------
# timers
# ---------------------------------------------------------------------------------------------------------
def test_durable_timer_one_second(client):
    t0 = time.monotonic()
    out = complete(client, start(client, one_second_timer))
    assert time.monotonic() - t0 >= 0.95
    # The replay clock (orchestratorStarted timestamps) must have moved past the fire time.
    assert out["elapsed"] >= 0.99


def test_parallel_timers(client):
    elapsed = complete(client, start(client, parallel_timers))
    assert elapsed >= 0.89


def test_timer_with_absolute_fire_time(client):
    assert complete(client, start(client, timer_at_absolute_time)) is True


# ---------------------------------------------------------------------------------------------------------
# external events
# ---------------------------------------------------------------------------------------------------------
def test_wait_for_external_event(client):
    iid = start(client, wait_for_approval)
    state = client.wait_for_orchestration_start(iid, timeout=DEADLINE_S)
    assert state.runtime_status in (OrchestrationStatus.RUNNING, OrchestrationStatus.PENDING)
    client.raise_orchestration_event(iid, "approval", data={"by": "alice", "ok": True})
    assert complete(client, iid) == {"approval": {"by": "alice", "ok": True}}


def test_event_without_payload(client):
    iid = start(client, wait_for_approval)
    client.raise_orchestration_event(iid, "approval")
    assert complete(client, iid) == {"approval": None}


def test_when_any_event_wins_over_timer(client):
    iid = start(client, event_or_timeout, 20)
    client.wait_for_orchestration_start(iid, timeout=DEADLINE_S)
    client.raise_orchestration_event(iid, "answer", data=42)
    t0 = time.monotonic()
    assert complete(client, iid) == {"winner": "event", "value": 42}
    assert time.monotonic() - t0 < 15, "the pending 20 s timer must not delay completion"


def test_when_any_timer_wins_without_event(client):
    iid = start(client, event_or_timeout, 1)
    assert complete(client, iid) == {"winner": "timer"}


def test_when_any_late_event_after_timer_is_ignored(client):
    iid = start(client, event_or_timeout, 0.5)
    assert complete(client, iid) == {"winner": "timer"}
    # Raising to a completed instance is accepted or rejected, but never changes the outcome.
    with contextlib.suppress(grpc.RpcError):  # a NOT_FOUND / FAILED_PRECONDITION style rejection is fine
        client.raise_orchestration_event(iid, "answer", data="too late")
    state = client.get_orchestration_state(iid)
    assert state.runtime_status == OrchestrationStatus.COMPLETED
    assert state.get_output() == {"winner": "timer"}


def test_buffered_event_raised_before_wait(client):
    iid = start(client, activity_then_event)
    # Raised right after start: the orchestrator is not waiting yet (it runs an activity first).
    client.raise_orchestration_event(iid, "late", data="early bird")
    assert complete(client, iid) == ["FIRST", "early bird"]


def test_event_names_are_case_insensitive(client):
    iid = start(client, case_insensitive_event)
    client.wait_for_orchestration_start(iid, timeout=DEADLINE_S)
    client.raise_orchestration_event(iid, "mixedcase_EVENT", data="matched")
    assert complete(client, iid) == "matched"


def test_events_with_same_name_delivered_in_order(client):
    iid = start(client, three_events_in_order)
    for v in ("one", "two", "three"):
        client.raise_orchestration_event(iid, "item", data=v)
    assert complete(client, iid) == ["one", "two", "three"]


def test_when_all_of_events(client):
    iid = start(client, event_fan_in, ["a", "b", "c"])
    client.raise_orchestration_event(iid, "c", data=3)
    client.raise_orchestration_event(iid, "a", data=1)
    client.raise_orchestration_event(iid, "b", data=2)
    assert complete(client, iid) == [1, 2, 3]


# ---------------------------------------------------------------------------------------------------------
# orchestration-to-orchestration events
# ---------------------------------------------------------------------------------------------------------
def test_send_event_to_instance_on_another_partition(client):
    receiver_id = new_id("recv")
    sender_id = id_not_on_partition("send", partition_of(receiver_id))
    start(client, receiver, instance_id=receiver_id)
    client.wait_for_orchestration_start(receiver_id, timeout=DEADLINE_S)
    start(client, sender, {"target": receiver_id, "event": "ping", "data": {"from": sender_id}},
          instance_id=sender_id)
    assert complete(client, sender_id) == "SENT"
    assert complete(client, receiver_id) == {"got": {"from": sender_id}}


def test_send_event_before_receiver_waits_is_buffered(client):
    receiver_id = new_id("recv")
    sender_id = id_not_on_partition("send", partition_of(receiver_id))
    # Start both at once: the event may arrive before the receiver has run at all.
    start(client, receiver, instance_id=receiver_id)
    start(client, sender, {"target": receiver_id, "event": "PING", "data": 7}, instance_id=sender_id)
    assert complete(client, receiver_id) == {"got": 7}
    assert complete(client, sender_id) == "SENT"


def test_send_event_to_missing_instance_does_not_fail_sender(client):
    missing = new_id("nobody-home")
    iid = start(client, sender, {"target": missing, "event": "ping", "data": 1})
    assert complete(client, iid) == "SENT"
    assert client.get_orchestration_state(missing) is None


def test_send_event_to_completed_instance_is_dropped(client):
    done_id = new_id("done")
    start(client, receiver, instance_id=done_id)
    client.raise_orchestration_event(done_id, "ping", data=1)
    assert complete(client, done_id) == {"got": 1}

    home, away = partition_of(done_id), (partition_of(done_id) + 1) % PARTITIONS
    late = start(client, sender, {"target": done_id, "event": "ping", "data": 2},
                 instance_id=id_on_partition("late", away))
    assert complete(client, late) == "SENT"
    # One partition's deliveries to another are applied in its outbox order: once a later event from the
    # same partition has reached a probe beside the completed instance, the late event has been handled.
    probe = start(client, receiver, instance_id=id_on_partition("probe", home))
    after = start(client, sender, {"target": probe, "event": "ping", "data": 3},
                  instance_id=id_on_partition("after", away))
    assert complete(client, after) == "SENT"
    assert complete(client, probe) == {"got": 3}

    state = client.get_orchestration_state(done_id)
    assert state.runtime_status == OrchestrationStatus.COMPLETED
    assert state.get_output() == {"got": 1}


def test_raise_event_many_instances(client):
    ids = [start(client, wait_for_approval) for _ in range(10)]
    for n, iid in enumerate(ids):
        client.raise_orchestration_event(iid, "approval", data=n)
    for n, iid in enumerate(ids):
        assert complete(client, iid) == {"approval": n}
