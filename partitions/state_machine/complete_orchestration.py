"""CompleteOrchestratorTask: commit the dispatched events and the orchestrator's actions to history."""

from __future__ import annotations

from typing import Any

from partitions.state_machine import events as ev
from partitions.state_machine.context import Ctx, Record, wake_of
from partitions.state_machine.entities import release_held_locks
from partitions.state_machine.orchestrator_actions import HANDLERS, Outcome
from partitions.state_machine.payloads import set_payload
from partitions.state_machine.rewind import install_rewound_history, is_entity_answer
from partitions.state_machine.start_instance import derive_execution_id
from partitions.state_machine.state import Lease
from partitions.store.keys import entity_id_problem
from protos import orchestrator_service_pb2 as pb
from runtime.errors import InvalidArgumentError, StaleCompletionError


def _lease(ctx: Ctx, cmd: dict[str, Any]) -> Lease:
    lease = ctx.state.leases_by_token.get(cmd.get("tok", ""))
    if lease is None or lease.kind != "o" or lease.key != cmd["i"]:
        raise StaleCompletionError(
            f"completion token '{cmd.get('tok', '')}' for instance '{cmd['i']}' is not the current lease"
            " (expired, abandoned, already completed, or from before a restart)"
        )
    return lease


def apply_complete_orchestration(ctx: Ctx, cmd: dict[str, Any]) -> None:
    lease = _lease(ctx, cmd)
    if cmd.get("fail"):
        _fail_unapplied(ctx, lease, cmd)
        return
    try:
        response = pb.OrchestratorResponse.FromString(cmd["resp"])
    except Exception as exc:
        raise InvalidArgumentError(f"malformed OrchestratorResponse: {exc}") from exc
    instance_id = lease.key
    assert isinstance(instance_id, str)
    record = ctx.load(instance_id)
    ctx.state.release(lease)
    if record is None or record["x"] != lease.execution_id:
        ctx.reply(cmd)  # purged or replaced while in flight: nothing to commit
        return

    rewind = next((a.rewindOrchestration for a in response.actions if a.HasField("rewindOrchestration")), None)
    if rewind is not None:
        for key in lease.inbox_keys:
            ctx.txn.delete_inbox_key(key)
        install_rewound_history(ctx, instance_id, record, rewind)
        ctx.save(instance_id, record)
        ctx.reply(cmd)
        return
    record.pop("kick", None)

    out = Outcome(instance_id, record)
    delivered = [lease.started_event]
    for key in lease.inbox_keys:
        value = ctx.txn.get_inbox_key(key)
        if value is not None:
            delivered.append(value)
            ctx.txn.delete_inbox_key(key)
    terminations = [event.executionTerminated for event in map(pb.HistoryEvent.FromString, delivered[1:])
                    if event.HasField("executionTerminated")]
    terminate_requested = bool(terminations)
    reason = _terminate_reason(terminations[0]) if terminations else None  # the first one delivered is taken

    record.pop("ab", None)  # a worker took it: the abandon backoff starts over
    record.pop("sp", None)  # ...and ran it: no longer "suspended before it started"
    if terminations and not record["hl"]:
        # Its very first turn carried a terminate: one an earlier version queued before any worker had run the
        # instance (this version ends such an instance as the terminate comes, apply_terminate). The worker ran
        # it first and may have completed it, ignoring the terminate: the terminate wins, and none of the
        # turn's actions are applied.
        _append_history(ctx, instance_id, record, delivered)
        finish_execution(ctx, instance_id, record, ev.TERMINATED, reason, None, cascade_queued=False)
        ctx.save(instance_id, record)
        ctx.reply(cmd)
        return
    if record["s"] == ev.PENDING:
        ctx.set_status(instance_id, record, ev.RUNNING)
    # Every response carries the orchestrator's current custom status; none means it was cleared.
    custom_status = response.customStatus.value if response.HasField("customStatus") else None
    set_payload(ctx.txn, instance_id, record, "cs", custom_status)

    failure = _apply_actions(ctx, out, response)
    events = delivered + out.history
    if failure is None and record["hl"] + len(events) > ctx.state.max_history_events:
        failure = ("HistoryLimitExceeded", f"the history would exceed {ctx.state.max_history_events} events")
    _append_history(ctx, instance_id, record, events)

    # A terminate delivered with this work item ends the instance even if the orchestrator continued as new
    # on an earlier event of the batch (the SDK ignores a terminate once it has completed): it was accepted.
    continued = out.complete is not None and out.complete.orchestrationStatus == ev.CONTINUED_AS_NEW
    # The first terminate this turn delivered is the one that ends the instance: if it is recursive, it reaches the
    # children below. One still queued behind it is moot (it came for an instance already ended), so the end does
    # not cascade that one.
    if failure is not None:
        # The response's actions were not applied (or not all of them kept): the unlocks it carried among them,
        # finish_execution sends itself.
        finish_execution(ctx, instance_id, record, ev.FAILED, None, ev.failure_details(*failure))
    elif out.complete is not None and not (terminate_requested and continued):
        _complete(ctx, out, cascade_queued=not terminations)
    elif terminate_requested:
        finish_execution(ctx, instance_id, record, ev.TERMINATED, reason, None, cascade_queued=False)
    else:
        _requeue_if_pending(ctx, instance_id, record)
    if record["s"] == ev.TERMINATED and terminations and terminations[0].recurse:
        # A recursive terminate reaches the children when the instance takes it (not when it is asked for: a turn
        # in flight then may complete the instance first, and the children stay as they are).
        terminate_children(ctx, instance_id, record, reason, [])
    ctx.save(instance_id, record)
    ctx.reply(cmd)


def _fail_unapplied(ctx: Ctx, lease: Lease, cmd: dict[str, Any]) -> None:
    """A response the engine will not apply (too large): the execution fails with the given reason."""
    instance_id = lease.key
    assert isinstance(instance_id, str)
    record = ctx.load(instance_id)
    ctx.state.release(lease)
    if record is not None and record["x"] == lease.execution_id and record["s"] not in ev.TERMINAL:
        end_without_worker(ctx, instance_id, record, ev.FAILED, None, ev.failure_details(*cmd["fail"]))
    ctx.reply(cmd)


def end_without_worker(
    ctx: Ctx, instance_id: str, record: Record, status: int, output: str | None, failure: bytes | None
) -> None:
    """The engine ends the execution itself, applying no worker response: the unlocks such a response would
    carry are the engine's to send."""
    record.pop("kick", None)
    finish_execution(ctx, instance_id, record, status, output, failure)
    ctx.save(instance_id, record)


def apply_fail_too_large(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """The instance's next work item would exceed what a worker receives (dispatch.py found it): it fails."""
    instance_id = cmd["i"]
    record = ctx.load(instance_id)
    if (record is None or record["x"] != cmd["x"] or record["s"] in ev.TERMINAL
            or instance_id in ctx.state.orch_leases):
        return
    limit = ctx.state.max_work_item_bytes
    failure = ev.failure_details(
        "WorkItemTooLarge",
        f"the orchestrator's next work item would be {cmd['b']} bytes ({record['hl']} history events), above the"
        f" {limit} bytes a worker receives (--max-request-bytes); keep large payloads out of the history",
    )
    end_without_worker(ctx, instance_id, record, ev.FAILED, None, failure)


def _apply_actions(ctx: Ctx, out: Outcome, response: pb.OrchestratorResponse) -> tuple[str, str] | None:
    """Apply every action, or none of them when one is unknown (the instance then fails)."""
    kinds = [action.WhichOneof("orchestratorActionType") for action in response.actions]
    for action, kind in zip(response.actions, kinds, strict=True):
        if kind not in HANDLERS:
            return ("InvalidAction", f"orchestrator action '{kind}' is not a known action")
        if kind == "sendEntityMessage" and action.sendEntityMessage.HasField("entityLockRequested"):
            # Checked whole before anything is locked: a lock set that stopped at an id no entity can have
            # would leave the entities before it locked, and the orchestration waiting, for good.
            for entity_id in action.sendEntityMessage.entityLockRequested.lockSet:
                problem = entity_id_problem(entity_id)
                if problem is not None:
                    return ("InvalidEntityId", f"the lock request names '{entity_id}', which {problem}")
    for action, kind in zip(response.actions, kinds, strict=True):
        HANDLERS[kind](ctx, out, action)
    return None


def _append_history(ctx: Ctx, instance_id: str, record: Record, events: list[bytes]) -> None:
    index = record["hl"]
    for event in events:
        ctx.txn.put_history(instance_id, index, event)
        index += 1
    record["hl"] = index


def _complete(ctx: Ctx, out: Outcome, cascade_queued: bool = True) -> None:
    complete = out.complete
    assert complete is not None
    result = complete.result.value if complete.HasField("result") else None
    failure = complete.failureDetails.SerializeToString() if complete.HasField("failureDetails") else None
    status = complete.orchestrationStatus
    if status == ev.CONTINUED_AS_NEW:
        _continue_as_new(ctx, out, complete, result)
        return
    if status not in ev.TERMINAL:
        name = pb.OrchestrationStatus.Name(status) if status in pb.OrchestrationStatus.values() else str(status)
        failure = ev.failure_details("InvalidStatus", f"completeOrchestration with non-terminal status {name}")
        status, result = ev.FAILED, None
    finish_execution(ctx, out.instance_id, out.record, status, result, failure, event_id=out.complete_id,
                     cascade_queued=cascade_queued)


def finish_execution(
    ctx: Ctx,
    instance_id: str,
    record: Record,
    status: int,
    result: str | None,
    failure: bytes | None,
    event_id: int = -1,
    cascade_queued: bool = True,
) -> None:
    """End the execution: executionCompleted, the outcome, pending events dropped, the parent told. Ended by a
    terminate, it counts the first terminate still queued as taken (`cascade_queued`; not when the turn that
    ends it delivered one, which came first) and cascades it if it is recursive."""
    completed = pb.ExecutionCompletedEvent(orchestrationStatus=status, result=ev.string_value(result))
    if failure:
        completed.failureDetails.ParseFromString(failure)
    _append_history(
        ctx, instance_id, record, [ev.history_event(ctx.now_ms, event_id, executionCompleted=completed).SerializeToString()]
    )
    ctx.set_status(instance_id, record, status)
    record.pop("sp", None)
    record["out"] = result
    record["fd"] = failure
    record["d"] = ctx.now_ms
    record["wk"] = record["hu"] = 0  # a hold's release timer goes with the others: a rewind must not wait for it
    ctx.unqueue(record)
    release_held_locks(ctx, instance_id, record)
    if status == ev.TERMINATED and cascade_queued:
        cascade_queued_terminate(ctx, instance_id, record)
    if status == ev.FAILED:
        # Answers to its entity calls stay, undelivered: an entity answers once, and a rewind hands them on to
        # the rewound execution, whose history still waits for them.
        for key, raw in list(ctx.txn.inbox_iter(instance_id)):
            if not is_entity_answer(raw):
                ctx.txn.delete_inbox_key(key)
    else:
        ctx.txn.delete_inbox(instance_id)
    ctx.txn.delete_instance_timers(instance_id)  # a rewind sets again those its replay waits for
    parent = record.get("p")
    if parent:
        ctx.report_to_parent(parent, status, result, failure)


_OUTLIVE_AN_EXECUTION = frozenset(("eventRaised", "executionTerminated", "executionSuspended", "executionResumed"))


def _continue_as_new(ctx: Ctx, out: Outcome, complete: pb.CompleteOrchestrationAction, new_input: str | None) -> None:
    """Reset history; the next work item starts with executionStarted(new input), carry-over, then arrivals."""
    instance_id, record = out.instance_id, out.record
    # What arrived while this turn was out: events and control messages go on to the new execution. Results of
    # the old one's tasks, timers, children, entity calls and lock requests stay with it: the new execution
    # numbers its tasks from 0 again, and the SDK would match such a result to a task of its own.
    leftovers = [event for event in (pb.HistoryEvent.FromString(raw) for _, raw in ctx.txn.inbox(instance_id))
                 if event.WhichOneof("eventType") in _OUTLIVE_AN_EXECUTION]
    # A recursive terminate that came meanwhile ends the new execution (its first turn), and reaches the old one's
    # children now, before the list goes: it carries over only here.
    _cascade_queued_terminate(ctx, instance_id, record, leftovers)
    # Children belong to the execution that started them, as in its history: an eternal orchestration's list
    # would otherwise grow for ever, and a recursive terminate or purge reach every past generation's children.
    record["ch"] = []
    # So do its critical sections: held ones are released, and a grant still to come will release itself.
    release_held_locks(ctx, instance_id, record)
    record["lr"], record["lh"] = [], 0
    record.pop("lx", None)
    record.pop("cx", None)  # answers to calls a rewound execution still waited for: the new one made none
    ctx.txn.delete_inbox(instance_id)
    ctx.txn.delete_history(instance_id)
    ctx.txn.delete_instance_timers(instance_id)  # the old execution's: they would fire for nothing
    record["hl"] = 0
    record["g"] = record.get("g", 0) + 1
    record["x"] = derive_execution_id(instance_id, ctx.now_ms, record["g"])
    set_payload(ctx.txn, instance_id, record, "in", new_input)
    record["out"] = None
    record["hu"] = record["sst"] = 0
    if complete.HasField("newVersion"):
        record["v"] = complete.newVersion.value
    ctx.unqueue(record)
    if record["s"] != ev.SUSPENDED:
        ctx.set_status(instance_id, record, ev.RUNNING)
    carried = [event.SerializeToString() for event in (*complete.carryoverEvents, *leftovers)]
    carried = _in_step_with_suspension(ctx, record, carried)
    # What may wake the new execution through a hold is what it carries, not what woke the old one.
    record["wk"] = max([wake_of(raw) for raw in carried], default=0)
    ctx.enqueue_event(instance_id, record, ev.execution_started(ctx.now_ms, instance_id, record["x"], record, new_input))
    for event in carried:
        ctx.txn.put_inbox(instance_id, ctx.state.next_seq(), event)


def _in_step_with_suspension(ctx: Ctx, record: Record, carried: list[bytes]) -> list[bytes]:
    """The events a new execution starts with, so that the SDK sees it suspended exactly when its status says so.

    A suspend delivered with the work item that continued as new went to the old execution: the new one gets
    a suspend of its own, or a resume would fail it ("don't know how to handle executionResumed"). For the same
    reason a resume whose suspend went to the old execution is dropped: the new execution was never suspended.
    """
    suspended = False
    kept = []
    for raw in carried:
        event = pb.HistoryEvent.FromString(raw)
        if event.HasField("executionResumed"):
            if not suspended:
                continue
            suspended = False
        elif event.HasField("executionSuspended"):
            suspended = True
        kept.append(raw)
    if record["s"] == ev.SUSPENDED and not suspended:
        kept.insert(0, ev.execution_suspended(ctx.now_ms, None))
    return kept


def _requeue_if_pending(ctx: Ctx, instance_id: str, record: Record) -> None:
    """The dispatched batch is done; events that arrived meanwhile make the instance ready again."""
    ctx.unqueue(record)
    if ctx.txn.has_inbox(instance_id):
        ctx.mark_ready(instance_id, record)
    else:
        record["wk"] = 0


def _cascade_queued_terminate(ctx: Ctx, instance_id: str, record: Record, queued: list[pb.HistoryEvent]) -> None:
    """The first terminate among `queued` (events that were waiting for the instance's next turn), if recursive,
    reaches the children with its reason: the instance's end or replacement takes it without a turn that would.
    Any later one came for an instance the first had ended."""
    first = next((e.executionTerminated for e in queued if e.HasField("executionTerminated")), None)
    if first is not None and first.recurse:
        terminate_children(ctx, instance_id, record, _terminate_reason(first), [])


def _terminate_reason(terminated: pb.ExecutionTerminatedEvent) -> str | None:
    return terminated.input.value if terminated.HasField("input") else None


def cascade_queued_terminate(ctx: Ctx, instance_id: str, record: Record) -> None:
    """The instance is replaced while it runs: a recursive terminate queued for it reaches its children."""
    _cascade_queued_terminate(ctx, instance_id, record,
                              [pb.HistoryEvent.FromString(raw) for _, raw in ctx.txn.inbox(instance_id)])


def terminate_children(ctx: Ctx, instance_id: str, record: dict[str, Any], output: Any, via: list[str]) -> None:
    """A recursive terminate reaches every child. `via` holds the instances the cascade came through, so a
    child list that leads back to one of them ends the cascade instead of going round (or, on one partition,
    recursing until the stack runs out)."""
    path = [*via, instance_id]
    for child in record.get("ch") or ():
        if child not in path:
            ctx.send_to_instance(child, {"op": "terminate", "out": output, "r": True, "quiet": True, "via": path})
