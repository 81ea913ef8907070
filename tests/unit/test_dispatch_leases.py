"""Work-item dispatch and leases: WorkItem shape (DESIGN.md §5), tokens, abandon, expiry, gateway release."""

from __future__ import annotations

import pytest
from google.protobuf import wrappers_pb2

from partitions import dispatch
from partitions.state_machine import actions as act
from partitions.state_machine import entities
from partitions.store.lmdb_store import StoreTxn
from protos import orchestrator_service_pb2 as pb
from runtime.errors import StaleCompletionError
from tests.unit.conftest import (
    COMPLETED,
    CONTINUED_AS_NEW,
    FAILED,
    GATEWAY,
    LEASE_MS,
    RUNNING,
    T0,
    TERMINATED,
    complete,
    create_timer,
    deliver,
    id_on,
    kinds,
    ms_of,
    of_type,
    replies,
    schedule_task,
)


def test_first_work_item_is_started_plus_execution_started_with_no_past_events(core):
    core.start("a", name="Orch", data='"in"', x="x1")
    core.now += 7

    [(token, item)] = core.dispatch_orch()

    raw = item.SerializeToString()
    parsed = pb.WorkItem.FromString(raw)  # the bytes are a valid WorkItem
    assert parsed.WhichOneof("request") == "orchestratorRequest"
    assert parsed.completionToken == token == f"{core.state.partition}.{core.state.epoch}.1"
    request = parsed.orchestratorRequest
    assert request.instanceId == "a"
    assert request.executionId.value == "x1"
    assert list(request.pastEvents) == []
    assert kinds(request.newEvents) == ["orchestratorStarted", "executionStarted"]
    assert ms_of(request.newEvents[0].timestamp) == T0 + 7
    started = request.newEvents[1].executionStarted
    assert (started.name, started.input.value) == ("Orch", '"in"')

    lease = core.state.leases_by_token[token]
    assert (lease.kind, lease.key, lease.gateway) == ("o", "a", GATEWAY)
    assert lease.expires_ms == T0 + 7 + LEASE_MS
    assert lease.execution_id == "x1"


def test_past_events_are_the_full_committed_history_in_order(core):
    core.start("a")
    core.run_first("a", [schedule_task(1, "Act")])
    core.request({"op": "raise", "i": "a", "n": "e"})
    core.now += 1

    _, request = core.dispatch_one("a")

    assert [e.SerializeToString() for e in request.pastEvents] == [
        e.SerializeToString() for e in core.history("a")
    ]
    assert kinds(request.pastEvents) == ["orchestratorStarted", "executionStarted", "taskScheduled"]
    assert kinds(request.newEvents) == ["orchestratorStarted", "eventRaised"]
    assert ms_of(request.newEvents[0].timestamp) == core.now


def test_an_in_flight_instance_is_not_dispatched_twice(core):
    core.start("a")
    core.dispatch_one("a")
    core.request({"op": "raise", "i": "a", "n": "e"})
    assert core.dispatch_orch() == []
    assert core.demand()["o"] == 0


def test_dispatch_respects_the_limit_oldest_first(core):
    for name in ("c", "a", "b"):
        core.start(name)
    assert core.demand() == {"o": 3, "a": 0, "e": 0}

    first = core.dispatch_orch(limit=2)
    assert [i.orchestratorRequest.instanceId for _, i in first] == ["c", "a"]
    assert core.demand() == {"o": 1, "a": 0, "e": 0}
    rest = core.dispatch_orch(limit=2)
    assert [i.orchestratorRequest.instanceId for _, i in rest] == ["b"]
    assert len({t for t, _ in first + rest}) == 3  # distinct tokens


def test_stale_token_is_rejected_and_nothing_is_committed(core):
    core.start("a")
    token, _ = core.dispatch_one("a")
    with pytest.raises(StaleCompletionError):
        core.complete_orch("a", token + "0", [schedule_task(1, "Act")])
    assert core.history("a") == []
    assert core.activities() == []
    assert token in core.state.leases_by_token  # the real lease is untouched


def test_abandon_requeues_and_voids_the_old_token(core):
    """A quiet abandon (the worker's stream ended) requeues at once."""
    core.start("a")
    token, first = core.dispatch_one("a")

    actions = core.request({"op": "abandon", "tok": token, "quiet": True})

    assert len(replies(actions)) == 1
    assert of_type(actions, act.WorkAvailable)
    assert core.state.leases_by_token == {}
    core.now += 5
    token2, again = core.dispatch_one("a")
    assert token2 != token
    assert list(again.pastEvents) == []
    assert kinds(again.newEvents) == ["orchestratorStarted", "executionStarted"]
    assert again.newEvents[1] == first.newEvents[1]
    assert ms_of(again.newEvents[0].timestamp) == core.now
    with pytest.raises(StaleCompletionError):
        core.complete_orch("a", token, [])
    core.complete_orch("a", token2, [])
    assert core.status("a") == RUNNING


def test_abandon_keeps_events_that_arrived_in_flight(core):
    core.start("a")
    token, _ = core.dispatch_one("a")
    core.request({"op": "raise", "i": "a", "n": "e"})
    core.request({"op": "abandon", "tok": token, "quiet": True})
    _, request = core.dispatch_one("a")
    assert kinds(request.newEvents) == ["orchestratorStarted", "executionStarted", "eventRaised"]


def test_abandon_with_unknown_token(core):
    with pytest.raises(StaleCompletionError):
        core.request({"op": "abandon", "tok": "0.1.77"})
    assert core.apply({"op": "abandon", "tok": "0.1.77", "quiet": True}) == []


def test_expired_lease_is_requeued(core):
    """The process turns an expired lease into a quiet abandon on its tick; the item is dispatched again."""
    core.start("a")
    token, _ = core.dispatch_one("a")
    deadline = core.state.leases_by_token[token].expires_ms

    def expired(now):  # the process's housekeeping rule
        return [lease.token for lease in core.state.leases_by_token.values() if lease.expires_ms < now]

    assert expired(deadline) == []
    assert expired(deadline + 1) == [token]
    core.apply({"op": "abandon", "tok": token, "quiet": True}, now=deadline + 1)

    token2, request = core.dispatch_one("a")
    assert token2 != token
    assert kinds(request.newEvents) == ["orchestratorStarted", "executionStarted"]
    with pytest.raises(StaleCompletionError):
        core.complete_orch("a", token, [])


def test_activity_abandon_requeues_the_activity(core):
    core.start("a", x="x1")
    core.run_first("a", [schedule_task(3, "Act", '"i"')])
    [(token, item)] = core.dispatch_act()
    assert core.dispatch_act() == []

    core.request({"op": "abandon", "tok": token, "quiet": True})

    [(token2, again)] = core.dispatch_act()
    assert token2 != token
    assert again.activityRequest == item.activityRequest
    with pytest.raises(StaleCompletionError):
        core.complete_act("a", 3, token, result="1")
    core.complete_act("a", 3, token2, result="1")
    assert kinds(core.inbox("a")) == ["taskCompleted"]


def test_release_gateway_requeues_everything_it_held(core):
    core.start("a")
    core.run_first("a", [schedule_task(1, "Act")])
    core.start("b")
    core.dispatch_orch()
    core.dispatch_act()
    assert len(core.state.leases_by_token) == 2

    core.apply({"op": "release_gateway", "g": GATEWAY})

    assert core.state.leases_by_token == {}
    assert [i.orchestratorRequest.instanceId for _, i in core.dispatch_orch()] == ["b"]
    assert [i.activityRequest.taskId for _, i in core.dispatch_act()] == [1]


def test_release_of_another_gateway_keeps_the_leases(core):
    core.start("a")
    core.dispatch_orch()
    core.apply({"op": "release_gateway", "g": b"someone-else"})
    assert len(core.state.leases_by_token) == 1


def test_explicit_abandon_holds_the_orchestration_with_a_doubling_backoff(core):
    """AbandonTaskOrchestratorWorkItem (e.g. a version the worker rejects) must not bounce straight back."""
    core.start("a")
    token, _ = core.dispatch_one("a")

    core.request({"op": "abandon", "tok": token})

    assert core.dispatch_orch() == []
    core.apply({"op": "fire_timers"}, now=core.now + 999)
    assert core.dispatch_orch(now=core.now + 999) == []
    core.apply({"op": "fire_timers"}, now=core.now + 1000)
    [(token2, _)] = core.dispatch_orch(now=core.now + 1000)

    core.now += 1000
    core.request({"op": "abandon", "tok": token2})  # the second abandon waits twice as long
    core.apply({"op": "fire_timers"}, now=core.now + 1999)
    assert core.dispatch_orch(now=core.now + 1999) == []
    core.apply({"op": "fire_timers"}, now=core.now + 2000)
    assert len(core.dispatch_orch(now=core.now + 2000)) == 1


def test_explicit_activity_abandon_requeues_after_the_backoff(core):
    core.start("a", x="x1")
    core.run_first("a", [schedule_task(3, "Act", '"i"')])
    [(token, item)] = core.dispatch_act()

    core.request({"op": "abandon", "tok": token})

    assert core.activities() == []
    assert core.dispatch_act() == []
    core.apply({"op": "fire_timers"}, now=core.now + 1000)
    [(token2, again)] = core.dispatch_act(now=core.now + 1000)
    assert token2 != token
    assert again.activityRequest == item.activityRequest


# ---------------------------------------------------------------------------------------------------------
# entity batches: a closed stream, an expired lease or a gone gateway puts them back; an explicit abandon
# holds the entity first
# ---------------------------------------------------------------------------------------------------------
ENTITY = "@counter@one"


def signal(core, operation: str) -> None:
    core.request({"op": "signal_entity", "i": ENTITY, "n": operation, "req": f"req-{operation}"})


def operations(item: pb.WorkItem) -> list[str]:
    assert item.WhichOneof("request") == "entityRequestV2"
    return [event.entityOperationSignaled.operation for event in item.entityRequestV2.operationRequests]


def complete_batch(core, token: str, count: int, state: str) -> list[act.Reply]:
    result = pb.EntityBatchResult(
        completionToken=token, entityState=wrappers_pb2.StringValue(value=state),
        results=[pb.OperationResult(success=pb.OperationResultSuccess()) for _ in range(count)])
    return replies(core.request({"op": "complete_ent", "tok": token, "resp": result.SerializeToString()}))


def test_entity_batch_of_a_closed_stream_runs_again(core):
    signal(core, "add")
    signal(core, "reset")
    [(token, item)] = core.dispatch_ent()
    assert operations(item) == ["add", "reset"]
    assert core.dispatch_ent() == []

    core.request({"op": "abandon", "tok": token, "quiet": True})  # what the gateway sends for a closed stream

    [(token2, again)] = core.dispatch_ent()
    assert token2 != token
    assert operations(again) == ["add", "reset"]
    with pytest.raises(StaleCompletionError):
        complete_batch(core, token, 2, "stale")
    assert len(complete_batch(core, token2, 2, "1")) == 1
    assert core.dispatch_ent() == []
    with core.read() as txn:
        assert txn.get_entity(ENTITY)["st"] == "1"


def test_release_gateway_and_expired_lease_requeue_an_entity_batch(core):
    signal(core, "add")
    core.dispatch_ent()
    core.apply({"op": "release_gateway", "g": GATEWAY})
    [(token, item)] = core.dispatch_ent()
    assert operations(item) == ["add"]

    core.request({"op": "abandon", "tok": token, "quiet": True}, now=core.now + LEASE_MS + 1)  # the expiry path
    assert [operations(i) for _, i in core.dispatch_ent(now=core.now + LEASE_MS + 1)] == [["add"]]


def test_explicit_entity_abandon_holds_the_entity_with_a_backoff(core):
    signal(core, "add")
    [(token, _)] = core.dispatch_ent()

    core.request({"op": "abandon", "tok": token})

    assert core.dispatch_ent() == []
    signal(core, "add-more")  # new work does not cut the hold short
    assert core.dispatch_ent() == []
    core.apply({"op": "fire_timers"}, now=core.now + 999)
    assert core.dispatch_ent(now=core.now + 999) == []
    core.apply({"op": "fire_timers"}, now=core.now + 1000)
    [(token2, item)] = core.dispatch_ent(now=core.now + 1000)
    assert operations(item) == ["add", "add-more"]

    core.now += 1000
    core.request({"op": "abandon", "tok": token2})  # the second abandon in a row waits twice as long
    core.apply({"op": "fire_timers"}, now=core.now + 1999)
    assert core.dispatch_ent(now=core.now + 1999) == []
    core.apply({"op": "fire_timers"}, now=core.now + 2000)
    [(token3, _)] = core.dispatch_ent(now=core.now + 2000)

    core.now += 2000
    complete_batch(core, token3, 2, "2")
    signal(core, "add")
    [(token4, _)] = core.dispatch_ent()
    core.request({"op": "abandon", "tok": token4})  # a completed batch started the backoff over
    core.apply({"op": "fire_timers"}, now=core.now + 1000)
    assert len(core.dispatch_ent(now=core.now + 1000)) == 1


def test_new_events_that_would_not_fit_wait_for_the_next_work_item(core):
    """An eternal orchestration that continues as new now and then gets a burst of events in pieces it can
    take, instead of one work item no worker could receive."""
    core.start("a")
    core.run_first("a")
    core.state.max_work_item_bytes = 3_000
    for n in range(4):
        core.request({"op": "raise", "i": "a", "n": f"e{n}", "in": '"' + "x" * 900 + '"'})
    token, request = core.dispatch_one("a")
    assert len(request.SerializeToString()) <= 3_000
    first = [e.eventRaised.name for e in request.newEvents if e.HasField("eventRaised")]
    assert first == ["e0", "e1"]
    core.complete_orch("a", token, [complete(0, CONTINUED_AS_NEW, '"next"')])  # the history starts over
    _, request = core.dispatch_one("a")
    rest = [e.eventRaised.name for e in request.newEvents if e.HasField("eventRaised")]
    assert rest == ["e2", "e3"]


def test_an_instance_whose_next_work_item_cannot_fit_fails_saying_why(core):
    """No worker with the default receive limit could take the item, and a stream that gets it breaks for every
    item on it: the partition fails the instance (in its next batch) instead of sending it."""
    core.start("a")
    core.run_first("a")
    core.request({"op": "raise", "i": "a", "n": "big", "in": '"' + "x" * 5_000 + '"'})
    core.state.max_work_item_bytes = 3_000
    assert core.dispatch_orch() == []
    [(key, command)] = core.state.oversized.items()
    size = command["b"]
    assert key == ("o", "a") and command == {"op": "fail_too_large", "i": "a", "x": core.record("a")["x"], "b": size}
    assert size > 5_000

    core.apply(command)
    record = core.record("a")
    assert record["s"] == FAILED
    failure = pb.TaskFailureDetails.FromString(record["fd"])
    assert failure.errorType == "WorkItemTooLarge" and str(size) in failure.errorMessage
    assert core.dispatch_orch() == []


def test_a_batch_that_signals_its_own_entity_keeps_the_lock_granted_meanwhile(core):
    """The signal to itself is applied at once (same partition) and grants the lock request that queued while
    the batch ran; the batch's own save must not overwrite that lock with its stale copy of the record."""
    signal(core, "poke")
    [(token, _)] = core.dispatch_ent()
    holder = "holder"
    core.start(holder)
    lock = pb.EntityLockRequestedEvent(criticalSectionId="cs-1", lockSet=[ENTITY], position=0,
                                       parentInstanceId=wrappers_pb2.StringValue(value=holder))
    core.run_first(holder, [pb.OrchestratorAction(id=1, sendEntityMessage=pb.SendEntityMessageAction(
        entityLockRequested=lock))])
    result = pb.EntityBatchResult(
        completionToken=token, entityState=wrappers_pb2.StringValue(value="1"),
        results=[pb.OperationResult(success=pb.OperationResultSuccess())],
        actions=[pb.OperationAction(id=0, sendSignal=pb.SendSignalAction(instanceId=ENTITY, name="add"))])
    core.request({"op": "complete_ent", "tok": token, "resp": result.SerializeToString()})

    assert "entityLockGranted" in kinds(core.inbox(holder))
    with core.read() as txn:
        assert txn.get_entity(ENTITY)["lo"] == holder  # still locked for the holder
    assert core.dispatch_ent() == []  # the signal waits behind the lock


def test_entity_operations_that_would_not_fit_wait_for_the_next_batch(core):
    core.state.max_work_item_bytes = 3_000
    for n in range(4):
        core.request({"op": "signal_entity", "i": ENTITY, "n": f"op{n}", "req": f"r{n}", "in": '"' + "x" * 900 + '"'})
    [(token, item)] = core.dispatch_ent()
    assert len(item.SerializeToString()) <= 3_000
    first = operations(item)
    assert 1 <= len(first) < 4
    complete_batch(core, token, len(first), "1")
    [(_, item)] = core.dispatch_ent()
    assert first + operations(item) == ["op0", "op1", "op2", "op3"]


def test_an_entity_call_too_large_for_a_work_item_fails_for_its_caller(core):
    """State and operation together are more than a worker receives: the call is refused with a failure the
    orchestration can handle, instead of a work item that would break the worker's stream again and again."""
    caller = "caller"
    core.start(caller)
    called = pb.EntityOperationCalledEvent(
        requestId="big-1", operation="put", input=wrappers_pb2.StringValue(value='"' + "x" * 5_000 + '"'),
        parentInstanceId=wrappers_pb2.StringValue(value=caller), targetInstanceId=wrappers_pb2.StringValue(value=ENTITY))
    core.run_first(caller, [pb.OrchestratorAction(id=1, sendEntityMessage=pb.SendEntityMessageAction(
        entityOperationCalled=called))])
    core.state.max_work_item_bytes = 3_000
    assert core.dispatch_ent() == []
    [(key, command)] = core.state.oversized.items()
    assert key == ("e", ENTITY) and command["op"] == "refuse_operation" and command["i"] == ENTITY
    assert command["b"] > 5_000

    core.apply(command)
    [failed] = [e.entityOperationFailed for e in core.inbox(caller) if e.HasField("entityOperationFailed")]
    assert failed.requestId == "big-1" and failed.failureDetails.errorType == "EntityOperationTooLarge"
    assert core.inbox(ENTITY) == []
    assert core.dispatch_ent() == []


def _lock_action(entity_ids: list[str], owner: str, section: str = "cs-1") -> pb.OrchestratorAction:
    lock = pb.EntityLockRequestedEvent(criticalSectionId=section, lockSet=entity_ids, position=0,
                                       parentInstanceId=wrappers_pb2.StringValue(value=owner))
    return pb.OrchestratorAction(id=1, sendEntityMessage=pb.SendEntityMessageAction(entityLockRequested=lock))


def _locked_by(core, entity_id: str) -> str | None:
    with core.read() as txn:
        record = txn.get_entity(entity_id)
    return None if record is None else record["lo"]


def test_a_lock_granted_to_an_orchestration_that_has_ended_is_released(pair):
    """The grant travels after the lock request; if the orchestration ended meanwhile, nobody would ever send
    the unlock, and the entity would stay locked for good."""
    p0, p1 = pair
    owner, entity = id_on(0, 2, "owner"), id_on(1, 2, "@counter@k")
    p0.start(owner)
    p0.run_first(owner, [_lock_action([entity], owner)])
    p0.request({"op": "force_terminate", "i": owner})
    deliver(p0, p1)  # the lock request: the entity locks, and grants
    assert _locked_by(p1, entity) == owner
    deliver(p1, p0)  # the grant finds the owner ended: it unlocks
    deliver(p0, p1)
    assert _locked_by(p1, entity) is None


def test_ending_a_lock_holder_without_its_worker_releases_its_locks(core):
    """A forced termination (and a failure the engine decides, or a replacement) applies no response from the
    worker, whose unlock actions would have released the critical section: the engine sends them."""
    owner = "owner"
    core.start(owner)
    core.run_first(owner, [_lock_action([ENTITY], owner)])  # same partition: granted at once
    assert _locked_by(core, ENTITY) == owner
    core.request({"op": "force_terminate", "i": owner})
    assert _locked_by(core, ENTITY) is None


def _owner_holds_the_entity_and_a_waiter_asks(core, owner: str = "owner", waiter: str = "waiter") -> str:
    core.start(owner)
    core.run_first(owner, [_lock_action([ENTITY], owner)])
    core.request({"op": "raise", "i": owner, "n": "go"})
    token, _ = core.dispatch_one(owner)
    core.start(waiter)
    core.run_first(waiter, [_lock_action([ENTITY], waiter, "cs-2")])
    assert _locked_by(core, ENTITY) == owner
    return token


def test_a_holder_whose_worker_ends_it_without_the_unlocks_releases_its_locks(core):
    """The Python SDK, terminated while a call to one entity of a section is out, sends unlocks for the others
    only (a crash review saw entities stay locked by TERMINATED orchestrations, and everything behind them wait);
    another SDK may complete inside its section. The end of the execution releases what it still holds."""
    token = _owner_holds_the_entity_and_a_waiter_asks(core)
    core.complete_orch("owner", token, [complete(2, COMPLETED)])  # no unlock
    assert _locked_by(core, ENTITY) == "waiter"


def test_an_ending_holder_whose_worker_unlocked_part_of_a_section_releases_the_rest(core, monkeypatch):
    a, b = "@counter@a", "@counter@b"
    core.start("owner")
    core.run_first("owner", [_lock_action([a, b], "owner")])
    token, _ = core.dispatch_one("owner")  # the grant
    assert (_locked_by(core, a), _locked_by(core, b)) == ("owner", "owner")
    sent = []
    real = entities.unlock
    monkeypatch.setattr(entities, "unlock", lambda ctx, i, cs, ids: (sent.append((cs, list(ids))), real(ctx, i, cs, ids)))
    core.complete_orch("owner", token, [_unlock_action("owner", "cs-1", a), complete(5, TERMINATED)])
    assert (_locked_by(core, a), _locked_by(core, b)) == (None, None)
    assert sent == [("cs-1", [b])]  # the engine tells only the entity the worker did not


def test_clean_releases_a_lock_whose_holder_is_gone(core):
    """A record lost with its lock still held (an earlier version, which did not release on every end):
    CleanEntityStorage lists the lock, and releasing it lets the next request in."""
    _owner_holds_the_entity_and_a_waiter_asks(core)
    txn = core.store.begin(write=True)
    txn.delete_instance("owner")
    txn.commit()

    [listed] = replies(core.request({"op": "clean_entities", "empty": False}))
    assert listed.result["locks"] == [[ENTITY, "owner", "cs-1"]]
    [released] = replies(core.request({"op": "release_lock", "i": ENTITY, "owner": "owner", "cs": "cs-1"}))
    assert released.result == {"released": True}
    assert _locked_by(core, ENTITY) == "waiter"


def test_clean_does_not_release_a_section_the_owners_id_has_taken_since(core):
    """Between the listing and the release, the owner's id started again and took the entity anew: that lock is
    live, and is kept."""
    core.start("owner")
    core.run_first("owner", [_lock_action([ENTITY], "owner", "cs-new")])
    [released] = replies(core.request({"op": "release_lock", "i": ENTITY, "owner": "owner", "cs": "cs-old"}))
    assert released.result == {"released": False}
    assert _locked_by(core, ENTITY) == "owner"


def test_a_lock_request_that_outlives_its_terminated_orchestration_leaves_nothing_locked(core):
    """o2 asks for [A, B] while o1 holds A, and is terminated; its worker's unlocks reach B before the request
    does (nothing to release there yet). When o1 lets A go, the request locks A and B and the grant finds o2
    ended: both are released. All on one partition, where one message leads to the next in one transaction."""
    a, b = "@counter@a", "@counter@b"

    def unlock(owner: str, target: str, section: str, action_id: int) -> pb.OrchestratorAction:
        sent = pb.EntityUnlockSentEvent(criticalSectionId=section, parentInstanceId=wrappers_pb2.StringValue(value=owner),
                                        targetInstanceId=wrappers_pb2.StringValue(value=target))
        return pb.OrchestratorAction(id=action_id, sendEntityMessage=pb.SendEntityMessageAction(entityUnlockSent=sent))

    core.start("o1")
    core.run_first("o1", [_lock_action([a], "o1", "cs-1")])
    token, _ = core.dispatch_one("o1")  # the grant
    core.complete_orch("o1", token, [])
    core.start("o2")
    core.run_first("o2", [_lock_action([a, b], "o2", "cs-2")])
    core.request({"op": "terminate", "i": "o2"})
    token, _ = core.dispatch_one("o2")
    core.complete_orch("o2", token, [unlock("o2", a, "cs-2", 2), unlock("o2", b, "cs-2", 3), complete(4, TERMINATED)])
    assert (_locked_by(core, a), _locked_by(core, b)) == ("o1", None)

    core.request({"op": "raise", "i": "o1", "n": "release"})
    token, _ = core.dispatch_one("o1")
    core.complete_orch("o1", token, [unlock("o1", a, "cs-1", 2)])
    assert (_locked_by(core, a), _locked_by(core, b)) == (None, None)


def test_a_lock_granted_after_its_orchestration_continued_as_new_is_released(core):
    """The new execution never asked for it and ignores the grant: the engine releases the set instead."""
    a, b = "@counter@a", "@counter@b"
    core.start("o1")
    core.run_first("o1", [_lock_action([a], "o1", "cs-1")])
    token, _ = core.dispatch_one("o1")
    core.complete_orch("o1", token, [])
    core.start("o2")
    core.run_first("o2", [_lock_action([a, b], "o2", "cs-2")])  # waits behind o1 at A
    core.request({"op": "raise", "i": "o2", "n": "next"})
    token, _ = core.dispatch_one("o2")
    gives_up = [pb.OrchestratorAction(id=n, sendEntityMessage=pb.SendEntityMessageAction(
        entityUnlockSent=pb.EntityUnlockSentEvent(
            criticalSectionId="cs-2", parentInstanceId=wrappers_pb2.StringValue(value="o2"),
            targetInstanceId=wrappers_pb2.StringValue(value=target))))
        for n, target in ((2, a), (3, b))]  # as the SDK does: they reach B before the request, and do nothing
    core.complete_orch("o2", token, [*gives_up, complete(4, CONTINUED_AS_NEW, '"again"')])
    assert core.record("o2")["lr"] == []  # the new execution has asked for nothing
    token, _ = core.dispatch_one("o2")  # the new execution's first turn: it asks for no lock
    core.complete_orch("o2", token, [])

    core.request({"op": "raise", "i": "o1", "n": "release"})
    token, _ = core.dispatch_one("o1")
    sent = pb.EntityUnlockSentEvent(criticalSectionId="cs-1", parentInstanceId=wrappers_pb2.StringValue(value="o1"),
                                    targetInstanceId=wrappers_pb2.StringValue(value=a))
    core.complete_orch("o1", token, [pb.OrchestratorAction(id=2, sendEntityMessage=pb.SendEntityMessageAction(
        entityUnlockSent=sent))])  # A goes to o2's request, then B; the grant finds o2 continued as new
    assert (_locked_by(core, a), _locked_by(core, b)) == (None, None)
    assert "entityLockGranted" not in kinds(core.inbox("o2"))


def _grant_waits_then_replace(core, replace) -> None:
    """o1 holds A; "x" asks for A and waits; `replace` puts a new execution in x's place; o1 releases A."""
    a = "@counter@a"
    core.start("o1")
    core.run_first("o1", [_lock_action([a], "o1", "cs-1")])
    token, _ = core.dispatch_one("o1")
    core.complete_orch("o1", token, [])
    core.start("x")
    core.run_first("x", [_lock_action([a], "x", "cs-2")])
    replace()
    core.request({"op": "raise", "i": "o1", "n": "release"})
    token, _ = core.dispatch_one("o1")
    sent = pb.EntityUnlockSentEvent(criticalSectionId="cs-1", parentInstanceId=wrappers_pb2.StringValue(value="o1"),
                                    targetInstanceId=wrappers_pb2.StringValue(value=a))
    core.complete_orch("o1", token, [pb.OrchestratorAction(id=2, sendEntityMessage=pb.SendEntityMessageAction(
        entityUnlockSent=sent))])  # A goes to x's request; the grant finds another execution


@pytest.mark.parametrize("replace", ["start with a reuse policy", "forced terminate, then start again"])
def test_a_lock_granted_to_an_execution_since_replaced_is_released(core, replace):
    """The new execution never asked for it: the SDK ignores the grant ("unexpected entityLockGranted"), and
    the entity stayed locked for good, so every later critical section on it hung; a restarted instance waited
    behind its own stale lock."""
    def start_again():
        if replace == "forced terminate, then start again":
            core.request({"op": "force_terminate", "i": "x"})
            core.start("x", reuse=[TERMINATED])
        else:
            core.start("x", reuse=[RUNNING])
        core.run_first("x")  # the new execution's first turn: it asks for no lock

    _grant_waits_then_replace(core, start_again)
    assert _locked_by(core, "@counter@a") is None
    assert "entityLockGranted" not in kinds(core.inbox("x"))


def test_a_grant_to_a_record_of_an_earlier_version_still_reaches_it(core):
    """Records written before the engine listed the sections an execution asked for carry no list: their
    grants are delivered as before."""
    def forget_the_list():
        record = core.record("x")
        del record["lr"]
        txn = core.store.begin(write=True)
        txn.put_instance("x", record)
        txn.commit()

    _grant_waits_then_replace(core, forget_the_list)
    assert _locked_by(core, "@counter@a") == "x"
    assert "entityLockGranted" in kinds(core.inbox("x"))


def test_a_grant_that_comes_while_the_last_turn_is_out_is_released_when_the_execution_ends(core):
    """O waits for E or a timeout; the timeout's turn is out when E comes free and its grant goes into O's inbox;
    the turn completes O. Its worker never saw the grant and will never send the unlock: E stayed locked by a
    COMPLETED orchestration, and the next critical section on E waited for ever."""
    core.start("h")
    core.run_first("h", [_lock_action([ENTITY], "h", "cs-h")])
    core.run_first("h", [])  # the grant: h is in its section
    core.start("o")
    core.run_first("o", [_lock_action([ENTITY], "o", "cs-o"), create_timer(2, core.now + 10)])
    core.apply({"op": "fire_timers"}, now=core.now + 10)
    o_token, _ = core.dispatch_one("o")  # the timeout's turn is out
    core.request({"op": "raise", "i": "h", "n": "done"})
    token, _ = core.dispatch_one("h")
    core.complete_orch("h", token, [_unlock_action("h", "cs-h")])  # E locks for o: the grant waits in o's inbox
    assert _locked_by(core, ENTITY) == "o" and "entityLockGranted" in kinds(core.inbox("o"))

    core.complete_orch("o", o_token, [complete(3, COMPLETED, '"timeout"')])
    assert _locked_by(core, ENTITY) is None
    core.start("z")
    core.run_first("z", [_lock_action([ENTITY], "z", "cs-z")])
    assert _locked_by(core, ENTITY) == "z"


def test_a_lock_set_naming_an_id_no_entity_can_have_fails_the_orchestration_and_locks_nothing(core):
    """Lock requests travel along the set, one entity after the other: one that reached such an id would leave
    the entities before it locked and the orchestration waiting, for good. The set is checked whole first."""
    a = "@counter@a"
    core.start("o1")
    core.run_first("o1", [_lock_action([a, "@@nobody"], "o1")])
    assert core.status("o1") == FAILED
    failure = pb.TaskFailureDetails.FromString(core.record("o1")["fd"])
    assert failure.errorType == "InvalidEntityId" and "'@@nobody'" in failure.errorMessage, failure
    assert _locked_by(core, a) is None


def test_a_response_failed_as_a_whole_still_releases_the_section_it_ended(core):
    """A response is applied whole or not at all: when one of its actions fails the instance (here a lock set
    with an id no entity can have), the unlocks it carried for a section it had just left are not applied. The
    engine then sends them itself, or that section would stay locked for good."""
    a = "@counter@a"
    core.start("o1")
    core.run_first("o1", [_lock_action([a], "o1", "cs-1")])
    token, _ = core.dispatch_one("o1")  # the grant
    assert _locked_by(core, a) == "o1"
    sent = pb.EntityUnlockSentEvent(criticalSectionId="cs-1", parentInstanceId=wrappers_pb2.StringValue(value="o1"),
                                    targetInstanceId=wrappers_pb2.StringValue(value=a))
    leave = pb.OrchestratorAction(id=2, sendEntityMessage=pb.SendEntityMessageAction(entityUnlockSent=sent))
    core.complete_orch("o1", token, [leave, _lock_action(["@@nobody"], "o1", "cs-2")])
    assert core.status("o1") == FAILED
    assert _locked_by(core, a) is None


def test_a_signal_to_an_entity_with_a_long_queue_reads_only_the_head(core, monkeypatch):
    """With no worker to run them, an entity's operations pile up, and every new signal once read and decoded
    the whole queue twice (lock messages, then runnable operations): 8,000 signals took 10 ms each by the end,
    quadratic in all, and held up the rest of the partition. The record counts the lock messages queued, and
    the runnable operations are read only as far as a batch goes."""
    for n in range(2_000):
        core.request({"op": "signal_entity", "i": ENTITY, "n": "add", "req": f"r{n}"})
    read = _rows_read(monkeypatch)
    core.request({"op": "signal_entity", "i": ENTITY, "n": "add", "req": "one-more"})
    assert read["rows"] <= 2, read  # the head, to see the entity still has work


def _call_action(owner: str, request_id: str, entity_id: str = ENTITY) -> pb.OrchestratorAction:
    called = pb.EntityOperationCalledEvent(requestId=request_id, operation="get",
                                           parentInstanceId=wrappers_pb2.StringValue(value=owner),
                                           targetInstanceId=wrappers_pb2.StringValue(value=entity_id))
    return pb.OrchestratorAction(id=3, sendEntityMessage=pb.SendEntityMessageAction(entityOperationCalled=called))


def _unlock_action(owner: str, section: str = "cs-1", entity_id: str = ENTITY) -> pb.OrchestratorAction:
    sent = pb.EntityUnlockSentEvent(criticalSectionId=section, parentInstanceId=wrappers_pb2.StringValue(value=owner),
                                    targetInstanceId=wrappers_pb2.StringValue(value=entity_id))
    return pb.OrchestratorAction(id=4, sendEntityMessage=pb.SendEntityMessageAction(entityUnlockSent=sent))


def _rows_read(monkeypatch) -> dict[str, int]:
    read = {"rows": 0}
    real = StoreTxn.inbox_iter

    def counted(self, instance_id):
        for row in real(self, instance_id):
            read["rows"] += 1
            yield row

    monkeypatch.setattr(StoreTxn, "inbox_iter", counted)
    return read


def test_a_message_to_an_entity_locked_with_a_long_queue_reads_none_of_it(core, monkeypatch):
    """Signals and other orchestrations' lock requests queue behind a critical section, and each new message once
    read the whole queue through, for the section's unlock and for calls from its owner. The record counts
    those, so the queue is read only when one of them is there, and then only as far as the last of them."""
    holder, waiter = "holder", "waiter"
    core.start(holder)
    core.run_first(holder, [_lock_action([ENTITY], holder)])  # same partition: granted at once
    token, _ = core.dispatch_one(holder)  # the grant
    core.start(waiter)
    core.run_first(waiter, [_lock_action([ENTITY], waiter, "cs-2")])
    for n in range(2_000):
        core.request({"op": "signal_entity", "i": ENTITY, "n": "add", "req": f"r{n}"})
    read = _rows_read(monkeypatch)
    core.request({"op": "signal_entity", "i": ENTITY, "n": "add", "req": "one-more"})
    assert read["rows"] == 0, read
    assert core.dispatch_ent() == []

    core.complete_orch(holder, token, [_call_action(holder, "call-1")])  # the owner's call runs ahead of them all
    [(batch_token, item)] = core.dispatch_ent()
    assert [e.entityOperationCalled.requestId for e in item.entityRequestV2.operationRequests] == ["call-1"]
    read["rows"] = 0
    core.request({"op": "signal_entity", "i": ENTITY, "n": "add", "req": "while-the-call-runs"})
    assert read["rows"] == 0, read
    core.request({"op": "complete_ent", "tok": batch_token, "resp": pb.EntityBatchResult(
        completionToken=batch_token, results=[pb.OperationResult(success=pb.OperationResultSuccess())],
    ).SerializeToString()})
    assert "entityOperationCompleted" in kinds(core.inbox(holder))

    token, _ = core.dispatch_one(holder)
    core.complete_orch(holder, token, [_unlock_action(holder)])
    assert _locked_by(core, ENTITY) == waiter  # its request came before the signals
    assert core.dispatch_ent() == []


def test_an_owners_call_queued_before_its_lock_came_through_runs_in_its_section(core):
    """The owner's messages are counted from the queue when the lock is taken: a call it sent before then is
    already queued behind its lock request, and must run inside the section, not wait for the unlock."""
    first, owner = "first", "owner"
    core.start(first)
    core.run_first(first, [_lock_action([ENTITY], first)])
    first_token, _ = core.dispatch_one(first)
    core.start(owner)
    core.run_first(owner, [_lock_action([ENTITY], owner, "cs-2"), _call_action(owner, "early")])
    assert core.dispatch_ent() == []  # the entity is still in the first section

    core.complete_orch(first, first_token, [_unlock_action(first)])
    assert _locked_by(core, ENTITY) == owner
    [(_, item)] = core.dispatch_ent()
    assert [e.entityOperationCalled.requestId for e in item.entityRequestV2.operationRequests] == ["early"]


def test_an_entity_locked_before_its_owners_messages_were_counted_still_runs_them(core):
    """A record written by an earlier version, locked, carries no count: it is taken once from the queue."""
    holder = "o1"
    core.start(holder)
    core.run_first(holder, [_lock_action([ENTITY], holder)])
    token, _ = core.dispatch_one(holder)
    core.request({"op": "signal_entity", "i": ENTITY, "n": "add", "req": "waits"})
    core.complete_orch(holder, token, [_call_action(holder, "call-1")])
    with core.read() as txn:
        record = txn.get_entity(ENTITY)
    assert record["oq"] == 1
    del record["oq"], record["uq"]
    txn = core.store.begin(write=True)
    txn.put_entity(ENTITY, record)
    txn.commit()
    core.request({"op": "signal_entity", "i": ENTITY, "n": "add", "req": "another"})  # looks again
    [(batch_token, item)] = core.dispatch_ent()
    assert [e.entityOperationCalled.requestId for e in item.entityRequestV2.operationRequests] == ["call-1"]


def test_an_entity_stored_before_lock_messages_were_counted_still_releases_its_lock(core):
    """Records written by an earlier version carry no count: it is taken once from the queue."""
    holder = "o1"
    core.start(holder)
    core.run_first(holder, [_lock_action([ENTITY], holder, "cs-1")])
    token, _ = core.dispatch_one(holder)  # the grant
    assert _locked_by(core, ENTITY) == holder
    core.request({"op": "signal_entity", "i": ENTITY, "n": "add", "req": "waits"})  # queued behind the lock
    with core.read() as txn:
        record = txn.get_entity(ENTITY)
    record.pop("lq")
    txn = core.store.begin(write=True)
    txn.put_entity(ENTITY, record)
    txn.commit()
    sent = pb.EntityUnlockSentEvent(criticalSectionId="cs-1", parentInstanceId=wrappers_pb2.StringValue(value=holder),
                                    targetInstanceId=wrappers_pb2.StringValue(value=ENTITY))
    core.complete_orch(holder, token, [pb.OrchestratorAction(id=2, sendEntityMessage=pb.SendEntityMessageAction(
        entityUnlockSent=sent))])
    assert _locked_by(core, ENTITY) is None
    assert [item.entityRequestV2.instanceId for _, item in core.dispatch_ent()] == [ENTITY]


def test_an_entity_key_may_hold_an_at_sign(core):
    """As the .NET SDK allows (an e-mail address as a key)."""
    user = "@user@alice@example.com"
    core.start("o1")
    core.run_first("o1", [_lock_action([user], "o1")])
    assert _locked_by(core, user) == "o1"
    _, request = core.dispatch_one("o1")
    assert "entityLockGranted" in kinds(request.newEvents)


def test_a_filtered_worker_reaches_its_work_behind_more_rows_than_one_walk_looks_at(core, monkeypatch):
    """Work no connected worker accepts (say, for a version none runs any more) piles up ahead: a worker with
    filters goes on where its last walk stopped instead of looking at the same rows again every time."""
    monkeypatch.setattr(dispatch, "SCAN_BUDGET", 5)
    for n in range(12):
        core.start(f"old-{n:02d}", name="Old")
    core.start("new-1", name="New")
    core.start("new-2", name="New")
    accepts_new = dispatch.matcher({"New": []})
    dispatched: list[str] = []
    for _ in range(10):  # bounded: each walk looks at 5 rows at most
        with core.read() as txn:
            items = dispatch.dispatch_orchestrations(txn, core.state, GATEWAY, 10, core.now, LEASE_MS, accepts_new)
        dispatched += [pb.WorkItem.FromString(raw).orchestratorRequest.instanceId for _, raw in items]
        if len(dispatched) == 2:
            break
    assert sorted(dispatched) == ["new-1", "new-2"]
    with core.read() as txn:  # and the rows nobody took are still all there for an Old worker
        old = dispatch.dispatch_orchestrations(txn, core.state, GATEWAY, 100, core.now, LEASE_MS,
                                               dispatch.matcher({"Old": []}))
    assert len(old) == 5  # one walk's worth; the next walks go on from there
