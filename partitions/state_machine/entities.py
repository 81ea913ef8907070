"""Durable entities: queued operations, critical-section locks, batches, and results routed back.

An entity (`@name@key`) lives on the partition its id hashes to. Its operations wait in the inbox
like an orchestration's events. The SDK only runs operations; the engine itself handles locks:
a lock request locks the entity and travels on to the next entity of the (sorted) lock set, and the
last one grants the lock to the orchestration. While locked, only calls from the lock owner run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from partitions.state_machine import actions as act
from partitions.state_machine import events as ev
from partitions.state_machine.context import Ctx, Record
from partitions.state_machine.start_instance import create_instance
from partitions.store.keys import TIMER_ENTITY_RELEASE, TIMER_ENTITY_SIGNAL
from partitions.store.lmdb_store import StoreTxn
from protos import orchestrator_service_pb2 as pb
from runtime.errors import StaleCompletionError

log = logging.getLogger(__name__)

MAX_BATCH = 100
_OPERATIONS = ("entityOperationSignaled", "entityOperationCalled")
_LOCK_MESSAGES = ("entityLockRequested", "entityUnlockSent")


def _load(ctx: Ctx, entity_id: str) -> Record:
    return ctx.txn.get_entity(entity_id) or {"st": None, "lm": ctx.now_ms, "lk": None, "lo": None, "rq": 0, "lq": 0}


def _save(ctx: Ctx, entity_id: str, record: Record) -> None:
    """Entities with no state, no lock and no queued work stop existing."""
    if record["st"] is None and not record["lk"] and not record["rq"] and not ctx.txn.has_inbox(entity_id):
        ctx.txn.delete_entity(entity_id)
    else:
        ctx.txn.put_entity(entity_id, record)


def _is_owners_call(record: Record, event: pb.HistoryEvent) -> bool:
    return event.HasField("entityOperationCalled") and event.entityOperationCalled.parentInstanceId.value == record["lo"]


def _runnable(record: Record, event: pb.HistoryEvent) -> bool:
    """While locked, only calls from the lock's owner run."""
    return not record["lk"] or _is_owners_call(record, event)


def _is_section_unlock(record: Record, event: pb.HistoryEvent) -> bool:
    return event.HasField("entityUnlockSent") and event.entityUnlockSent.criticalSectionId == record["lk"]


def _section_queue(ctx: Ctx, entity_id: str, record: Record) -> tuple[int, bool]:
    """Locked: the owner's calls queued ("oq") and whether the section's unlock is ("uq"). Nothing else can take
    effect before the unlock, so with neither queued there is nothing to look for, however long the queue
    behind the section has grown. Counted from the queue once, when the lock is taken (the owner may have
    queued calls before its lock came through), or for a record written before the count was kept."""
    if "oq" not in record:
        events = [pb.HistoryEvent.FromString(raw) for _, raw in ctx.txn.inbox_iter(entity_id)]
        record["oq"] = sum(1 for event in events if _is_owners_call(record, event))
        record["uq"] = any(_is_section_unlock(record, event) for event in events)
    return record["oq"], record["uq"]


def _unlocked(record: Record) -> None:
    record["lk"] = record["lo"] = None
    record.pop("oq", None)
    record.pop("uq", None)


def _has_runnable(ctx: Ctx, entity_id: str, record: Record) -> bool:
    if record["lk"] and not _section_queue(ctx, entity_id, record)[0]:
        return False
    return bool(runnable_operations(record, ctx.txn.inbox_iter(entity_id), limit=1))


def runnable_operations(
    record: Record, inbox: Iterable[tuple[bytes, bytes]], limit: int = MAX_BATCH
) -> list[tuple[bytes, bytes]]:
    """The operations the next batch may run, in queue order: up to the next lock request or unlock.

    Locked, these are the owner's calls, found among whatever waits behind the section: the read stops at the
    last of them that the record counts."""
    if record["lk"] and "oq" in record:
        limit = min(limit, record["oq"])
    batch: list[tuple[bytes, bytes]] = []
    if limit <= 0:
        return batch
    for key, raw in inbox:
        event = pb.HistoryEvent.FromString(raw)
        kind = event.WhichOneof("eventType")
        if kind not in _OPERATIONS:
            if record["lk"]:
                continue  # requests from others wait; the owner's own unlock follows its calls
            break
        if _runnable(record, event):
            batch.append((key, raw))
            if len(batch) >= limit:
                break
    return batch


def advance(ctx: Ctx, entity_id: str, record: Record) -> None:
    """Apply queued lock requests and unlocks that are due, then queue the entity if it has work."""
    if entity_id in ctx.state.ent_leases:
        return  # a batch is running: look again when it completes
    if record.get("hu", 0) > ctx.now_ms:
        return  # held after an abandoned batch: the release timer looks again
    for _ in range(10_000):
        if not _step_locks(ctx, entity_id, record):
            break
    if record["rq"]:
        ctx.txn.delete_ent_ready(record["rq"])
        record["rq"] = 0
    if _has_runnable(ctx, entity_id, record):
        record["rq"] = ctx.state.next_seq()
        ctx.txn.put_ent_ready(record["rq"], entity_id)
        ctx.actions.append(act.WorkAvailable())


def requeue_entity(ctx: Ctx, entity_id: str, hold_ms: Callable[[int], int] | None) -> None:
    """An abandoned batch: its operations are still in the inbox, so they run again.

    With `hold_ms` (a worker abandoned the batch; it maps the entity's abandon count to a delay) the
    entity is held for that long first, so a failing batch does not bounce straight back.
    """
    record = _load(ctx, entity_id)
    if hold_ms is not None:
        record["ab"] = record.get("ab", 0) + 1
        record["hu"] = ctx.now_ms + hold_ms(record["ab"] - 1)
        if record["rq"]:
            ctx.txn.delete_ent_ready(record["rq"])
            record["rq"] = 0
        ctx.schedule_timer(record["hu"], entity_id, 0, {}, TIMER_ENTITY_RELEASE)
    else:
        advance(ctx, entity_id, record)
    _save(ctx, entity_id, record)


def release_entity(ctx: Ctx, entity_id: str) -> None:
    """The hold after an abandoned batch is over."""
    record = ctx.txn.get_entity(entity_id)
    if record is None:
        return
    record["hu"] = 0
    advance(ctx, entity_id, record)
    _save(ctx, entity_id, record)


def _step_locks(ctx: Ctx, entity_id: str, record: Record) -> bool:
    """Handle the first lock message that can take effect now; False when there is none.

    Unlocked, only the head of the queue can: operations there run before any lock message behind them. Locked,
    the section's own unlock may come after requests from others, which wait. The record counts the lock
    messages queued ("lq"), so an entity with none, whatever its backlog of operations, is not read through."""
    if not _lock_messages_queued(ctx, entity_id, record):
        return False
    if record["lk"] and not _section_queue(ctx, entity_id, record)[1]:
        return False  # the section's unlock is not queued, and nothing else can take effect before it
    for key, raw in ctx.txn.inbox_iter(entity_id):
        event = pb.HistoryEvent.FromString(raw)
        kind = event.WhichOneof("eventType")
        if kind == "entityUnlockSent":
            if record["lk"] == event.entityUnlockSent.criticalSectionId:
                _unlocked(record)
            elif record["lk"]:
                continue  # an unlock for a section this entity is not in: leave it queued
            ctx.txn.delete_inbox_key(key)  # a release, or a stray unlock for no lock at all
            record["lq"] -= 1
            return True
        if kind == "entityLockRequested":
            if record["lk"]:
                continue
            ctx.txn.delete_inbox_key(key)
            record["lq"] -= 1
            _lock(ctx, entity_id, record, event.entityLockRequested)
            return True
        if not record["lk"]:
            return False  # an operation at the head runs first
    return False


def _lock_messages_queued(ctx: Ctx, entity_id: str, record: Record) -> int:
    if "lq" not in record:  # a record written before the count was kept: counted once
        record["lq"] = sum(1 for _, raw in ctx.txn.inbox_iter(entity_id) if _is_lock_message(raw))
    return record["lq"]


def _is_lock_message(raw: bytes) -> bool:
    return pb.HistoryEvent.FromString(raw).WhichOneof("eventType") in _LOCK_MESSAGES


def _lock(ctx: Ctx, entity_id: str, record: Record, request: pb.EntityLockRequestedEvent) -> None:
    record["lk"] = request.criticalSectionId
    record["lo"] = request.parentInstanceId.value
    record.pop("oq", None)
    _section_queue(ctx, entity_id, record)
    following = request.position + 1
    if following < len(request.lockSet):
        forwarded = pb.EntityLockRequestedEvent()
        forwarded.CopyFrom(request)
        forwarded.position = following
        event = ev.history_event(ctx.now_ms, entityLockRequested=forwarded).SerializeToString()
        ctx.send_to_instance(request.lockSet[following], {"op": "entity_msg", "ev": event})
    else:
        ctx.send_to_instance(request.parentInstanceId.value, {
            "op": "lock_granted", "cs": request.criticalSectionId, "ls": list(request.lockSet),
        })


def apply_entity_message(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """An operation, lock request or unlock for an entity of this partition (possibly for later)."""
    entity_id = cmd["i"]
    if cmd.get("at", 0) > ctx.now_ms:
        timer_id = ctx.state.next_seq() & 0x7FFFFFFF
        ctx.schedule_timer(cmd["at"], entity_id, timer_id, {"ev": cmd["ev"]}, TIMER_ENTITY_SIGNAL)
        return
    record = _load(ctx, entity_id)
    queued = _lock_messages_queued(ctx, entity_id, record)
    owners, _ = _section_queue(ctx, entity_id, record) if record["lk"] else (0, False)
    ctx.txn.put_inbox(entity_id, ctx.state.next_seq(), cmd["ev"])
    event = pb.HistoryEvent.FromString(cmd["ev"])
    if event.WhichOneof("eventType") in _LOCK_MESSAGES:
        record["lq"] = queued + 1
    if record["lk"] and _is_owners_call(record, event):
        record["oq"] = owners + 1
    elif record["lk"] and _is_section_unlock(record, event):
        record["uq"] = True
    advance(ctx, entity_id, record)
    _save(ctx, entity_id, record)


def apply_signal_entity(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """The client's SignalEntity."""
    signaled = pb.EntityOperationSignaledEvent(
        requestId=cmd["req"], operation=cmd["n"], input=ev.string_value(cmd.get("in")),
        targetInstanceId=ev.string_value(cmd["i"]),
    )
    if cmd.get("at"):
        signaled.scheduledTime.CopyFrom(ev.timestamp(cmd["at"]))
    event = ev.history_event(ctx.now_ms, entityOperationSignaled=signaled).SerializeToString()
    apply_entity_message(ctx, {"i": cmd["i"], "ev": event, "at": cmd.get("at", 0)})
    ctx.reply(cmd)


def apply_complete_entity(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """CompleteEntityTask: new state, results to callers, signals and new orchestrations sent on."""
    lease = ctx.state.leases_by_token.get(cmd.get("tok", ""))
    if lease is None or lease.kind != "e":
        raise StaleCompletionError(f"completion token '{cmd.get('tok', '')}' is not a current entity lease")
    result = pb.EntityBatchResult.FromString(cmd["resp"])
    entity_id = lease.key
    assert isinstance(entity_id, str)
    ctx.state.release(lease)
    record = _load(ctx, entity_id)
    dispatched = []
    for key in lease.inbox_keys:
        raw = ctx.txn.get_inbox_key(key)
        if raw is not None:
            dispatched.append(pb.HistoryEvent.FromString(raw))
            ctx.txn.delete_inbox_key(key)
    _owners_left(record, dispatched)
    batch_failed = result.HasField("failureDetails") and not result.results
    if not batch_failed:
        record["st"] = result.entityState.value if result.HasField("entityState") else None
    record["lm"] = ctx.now_ms
    record.pop("ab", None)  # a worker completed a batch: the abandon backoff starts over
    for index, event in enumerate(dispatched):
        if event.HasField("entityOperationCalled"):
            outcome = result.results[index] if index < len(result.results) else None
            answer_call(ctx, event.entityOperationCalled, outcome, result.failureDetails if batch_failed else None)
    for action in result.actions:
        _apply_operation_action(ctx, action)  # one to this entity itself runs after this handler (Ctx.local)
    advance(ctx, entity_id, record)
    _save(ctx, entity_id, record)
    ctx.reply(cmd)


def apply_refuse_operation(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """The entity's state and its next operation are more than a worker receives (dispatch.py found it): the
    operation is taken off the queue; a call gets the failure, a signal is dropped and logged."""
    entity_id = cmd["i"]
    if entity_id in ctx.state.ent_leases:
        return
    raw = ctx.txn.get_inbox_key(cmd["k"])
    if raw is None:
        return
    ctx.txn.delete_inbox_key(cmd["k"])
    event = pb.HistoryEvent.FromString(raw)
    record = _load(ctx, entity_id)
    _owners_left(record, [event])
    limit = ctx.state.max_work_item_bytes
    message = (f"entity '{entity_id}': its state and this operation come to {cmd['b']} bytes, more than the"
               f" {limit} bytes a worker receives (--max-request-bytes)")
    if event.HasField("entityOperationCalled"):
        failure = pb.TaskFailureDetails(errorType="EntityOperationTooLarge", errorMessage=message, isNonRetriable=True)
        answer_call(ctx, event.entityOperationCalled, None, failure)
    else:
        log.error("%s; the signal is dropped", message)
    advance(ctx, entity_id, record)
    _save(ctx, entity_id, record)


def _owners_left(record: Record, events: list[pb.HistoryEvent]) -> None:
    """Operations taken off the queue: those of a section's owner leave its count (a count not kept yet is taken
    from the queue when it is needed, so it is right either way)."""
    if record["lk"] and "oq" in record:
        record["oq"] -= sum(1 for event in events if _is_owners_call(record, event))


def answer_call(
    ctx: Ctx, called: pb.EntityOperationCalledEvent, outcome: pb.OperationResult | None, batch_failure: Any
) -> None:
    message: dict[str, Any] = {"op": "entity_result", "x": called.parentExecutionId.value, "req": called.requestId}
    if outcome is not None and outcome.HasField("success"):
        message["out"] = outcome.success.result.value if outcome.success.HasField("result") else None
    elif outcome is not None and outcome.HasField("failure"):
        message["fd"] = outcome.failure.failureDetails.SerializeToString()
    else:
        details = batch_failure if batch_failure is not None else pb.TaskFailureDetails(
            errorType="EntityBatchFailed", errorMessage="the entity batch returned no result for this operation"
        )
        message["fd"] = details.SerializeToString()
    ctx.send_to_instance(called.parentInstanceId.value, message)


def _apply_operation_action(ctx: Ctx, action: pb.OperationAction) -> None:
    if action.HasField("sendSignal"):
        signal = action.sendSignal
        signaled = pb.EntityOperationSignaledEvent(
            requestId=f"{signal.instanceId}:{ctx.state.next_seq()}", operation=signal.name,
            input=signal.input if signal.HasField("input") else None,
            scheduledTime=signal.scheduledTime if signal.HasField("scheduledTime") else None,
            targetInstanceId=ev.string_value(signal.instanceId),
        )
        event = ev.history_event(ctx.now_ms, entityOperationSignaled=signaled).SerializeToString()
        at = ev.timestamp_ms(signal.scheduledTime) if signal.HasField("scheduledTime") else 0
        ctx.send_to_instance(signal.instanceId, {"op": "entity_msg", "ev": event, "at": at})
    elif action.HasField("startNewOrchestration"):
        start = action.startNewOrchestration
        ctx.send_to_instance(
            start.instanceId or f"{ctx.state.partition}-{ctx.now_ms}-{ctx.state.next_seq()}",
            {
                "op": "start_orch",
                "n": start.name,
                "v": start.version.value if start.HasField("version") else None,
                "in": start.input.value if start.HasField("input") else None,
                "ss": ev.timestamp_ms(start.scheduledTime) if start.HasField("scheduledTime") else 0,
            },
        )


def apply_start_orchestration(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """An entity's startNewOrchestration: create the instance unless one with that id exists."""
    if ctx.load(cmd["i"]) is None:
        create_instance(ctx, cmd["i"], cmd, parent=None)


def apply_entity_result(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """An entity answered a call: entityOperationCompleted/Failed for the calling orchestration.

    It goes to the execution that made the call, or to one rewound from it that still waits for the answer
    ("cx"). A FAILED instance keeps it in its inbox, undelivered: a rewind hands it on. An instance ended
    otherwise drops it."""
    instance_id = cmd["i"]
    record = ctx.load(instance_id)
    if record is None or (record["s"] in ev.TERMINAL and record["s"] != ev.FAILED):
        return
    carried = cmd["req"] in (record.get("cx") or ())
    if cmd.get("x") and cmd["x"] != record["x"] and not carried:
        return
    if carried:
        record["cx"].remove(cmd["req"])
        if not record["cx"]:
            del record["cx"]
    if cmd.get("fd") is not None:
        failed = pb.EntityOperationFailedEvent(requestId=cmd["req"], failureDetails=pb.TaskFailureDetails.FromString(cmd["fd"]))
        event = ev.history_event(ctx.now_ms, entityOperationFailed=failed)
    else:
        completed = pb.EntityOperationCompletedEvent(requestId=cmd["req"], output=ev.string_value(cmd.get("out")))
        event = ev.history_event(ctx.now_ms, entityOperationCompleted=completed)
    ctx.enqueue_event(instance_id, record, event.SerializeToString())
    ctx.save(instance_id, record)


def apply_lock_granted(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """A lock is granted only to the execution that asked for it. One granted to an orchestration that has ended
    (or been purged), continued as new, or been replaced by a new execution with the same id (a start with a
    reuse policy, a restart) is released at once: nobody would ever send its unlock, and every entity of the
    set would stay locked for good."""
    instance_id = cmd["i"]
    section = cmd["cs"]
    record = ctx.load(instance_id)
    asked = record is not None and _asked_for_by_current_execution(record, section)
    if record is None or not asked or record["s"] in ev.TERMINAL:
        unlock(ctx, instance_id, section, cmd.get("ls") or ())
        if record is not None:
            ctx.save(instance_id, record)
        return
    granted = pb.EntityLockGrantedEvent(criticalSectionId=section)
    ctx.enqueue_event(instance_id, record, ev.history_event(ctx.now_ms, entityLockGranted=granted).SerializeToString())
    ctx.save(instance_id, record)


def _asked_for_by_current_execution(record: Record, section: str) -> bool:
    """The record lists the sections its execution has asked for and not been granted ("lr"); a grant takes its
    section off the list. Records of an earlier version list instead the sections that executions it continued
    as new from had asked for ("lx")."""
    if "lr" in record:
        if section not in record["lr"]:
            return False
        record["lr"].remove(section)
        return True
    if section in record.get("lx", ()):
        record["lx"].remove(section)
        return False
    return True


def execution_events(txn: StoreTxn, instance_id: str) -> list[pb.HistoryEvent]:
    """The current execution's history, then what waits in its inbox."""
    events = [pb.HistoryEvent.FromString(raw) for raw in txn.history(instance_id)]
    return events + [pb.HistoryEvent.FromString(raw) for _, raw in txn.inbox(instance_id)]


def lock_sections(events: list[pb.HistoryEvent]) -> tuple[list[str], bool]:
    """From an execution's history and inbox: the sections it asked for and has not been granted ("lr"), and
    whether it asked for any ("lh")."""
    requested = [e.entityLockRequested.criticalSectionId for e in events if e.HasField("entityLockRequested")]
    granted = {e.entityLockGranted.criticalSectionId for e in events if e.HasField("entityLockGranted")}
    return [section for section in requested if section not in granted], bool(requested)


def lock_requested(record: Record, section: str) -> None:
    """The execution's lock request went out: its grant is expected (see apply_lock_granted), and the locks it
    holds when it ends are released (release_held_locks)."""
    record.setdefault("lr", []).append(section)
    record["lh"] = 1


def request_lock(ctx: Ctx, instance_id: str, record: Record, request: pb.EntityLockRequestedEvent) -> None:
    """Ask, on behalf of `instance_id`'s execution, for the section's locks, from the first entity of its set."""
    if not 0 <= request.position < len(request.lockSet):
        return
    lock_requested(record, request.criticalSectionId)
    event = ev.history_event(ctx.now_ms, entityLockRequested=request).SerializeToString()
    ctx.send_to_instance(request.lockSet[request.position], {"op": "entity_msg", "ev": event, "at": 0})


def apply_release_lock(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """CleanEntityStorage: a lock whose owner no longer runs is released (if it is still that lock: the same
    critical section, since the owner's id may have started again and taken the entity anew meanwhile)."""
    record = ctx.txn.get_entity(cmd["i"])
    released = (record is not None and record["lk"] is not None and record["lo"] == cmd["owner"]
                and cmd.get("cs", record["lk"]) == record["lk"])
    if released:
        assert record is not None
        _unlocked(record)
        advance(ctx, cmd["i"], record)
        _save(ctx, cmd["i"], record)
    ctx.reply(cmd, {"released": released})


def unlock(ctx: Ctx, instance_id: str, critical_section: str, lock_set: Any) -> None:
    for entity_id in lock_set:
        unlocked = pb.EntityUnlockSentEvent(
            criticalSectionId=critical_section, parentInstanceId=ev.string_value(instance_id),
            targetInstanceId=ev.string_value(entity_id),
        )
        event = ev.history_event(ctx.now_ms, entityUnlockSent=unlocked).SerializeToString()
        ctx.send_to_instance(entity_id, {"op": "entity_msg", "ev": event})


def release_held_locks(ctx: Ctx, instance_id: str, record: Record) -> None:
    """An execution ends, continues as new or is replaced: every entity it holds is released, whatever its worker
    sent. The engine may end it without its worker's answer (which would carry the unlocks); a grant may wait
    in its inbox, never seen by the worker; and the Python SDK, terminated while a call to one entity of a
    section is out, sends unlocks for the others only. Entities of a section its worker unlocked are not told
    again. Sections asked for and not granted yet release themselves when the grant comes (apply_lock_granted);
    unlocks sent for them would reach the later entities of the set before the request does, and release
    nothing there."""
    if record.get("lh", 1) == 0:
        return  # this execution never asked for a lock (a record that does not say is read through)
    events = execution_events(ctx.txn, instance_id)
    requested = {e.entityLockRequested.criticalSectionId: e.entityLockRequested.lockSet
                 for e in events if e.HasField("entityLockRequested")}
    granted = {e.entityLockGranted.criticalSectionId for e in events if e.HasField("entityLockGranted")}
    unlocked: dict[str, set[str]] = {}
    for e in events:
        if e.HasField("entityUnlockSent"):
            unlocked.setdefault(e.entityUnlockSent.criticalSectionId, set()).add(e.entityUnlockSent.targetInstanceId.value)
    for section, lock_set in requested.items():
        held = [entity_id for entity_id in lock_set if entity_id not in unlocked.get(section, ())]
        if section in granted and held:
            unlock(ctx, instance_id, section, held)
