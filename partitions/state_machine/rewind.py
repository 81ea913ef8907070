"""RewindInstance: a failed instance gets executionRewound; the SDK answers with the clean history.

1. `apply_rewind` (client, or a rewound parent for its failed child) sets the instance RUNNING and
   queues [orchestratorStarted, executionRewound] as its next work item.
2. The SDK replies with a rewindOrchestration action whose newHistory drops the failures;
   `install_rewound_history` stores it and re-runs the orchestration from it, and failed
   sub-orchestrations are rewound (or re-created, if purged) on their own partitions.
"""

from __future__ import annotations

from typing import Any

from partitions.state_machine import events as ev
from partitions.state_machine.context import WAKES_SUSPENDED, Ctx, Record, is_child_of, wake_of
from partitions.state_machine.entities import request_lock
from partitions.state_machine.orchestrator_actions import activity_row
from partitions.state_machine.start_instance import create_instance
from protos import orchestrator_service_pb2 as pb
from runtime.errors import InstanceNotCompletedError, InstanceNotFoundError


def apply_rewind(ctx: Ctx, cmd: dict[str, Any]) -> None:
    instance_id = cmd["i"]
    record = ctx.load(instance_id)
    if record is None:
        raise InstanceNotFoundError(f"no orchestration instance with id '{instance_id}'")
    if record["s"] != ev.FAILED:
        status = pb.OrchestrationStatus.Name(record["s"])
        raise InstanceNotCompletedError(f"only a FAILED instance can be rewound; '{instance_id}' is {status}")
    _prepare(ctx, instance_id, record, cmd.get("reason"), None)
    ctx.reply(cmd)


def _prepare(ctx: Ctx, instance_id: str, record: Record, reason: str | None, parent_execution_id: str | None) -> None:
    ctx.set_status(instance_id, record, ev.RUNNING)
    record["out"] = record["fd"] = None
    record["d"] = 0
    record["rw"] = 1  # the next work item is exactly [orchestratorStarted, executionRewound]
    rewound = pb.ExecutionRewoundEvent(reason=ev.string_value(reason))
    if parent_execution_id:
        rewound.parentExecutionId.value = parent_execution_id
        record["p"][1] = parent_execution_id
    event = ev.history_event(ctx.now_ms, executionRewound=rewound).SerializeToString()
    # Answers to entity calls kept while it was FAILED go on to the rewound execution; they follow the rewind,
    # which must come first and alone.
    answers = [raw for _, raw in ctx.txn.inbox_iter(instance_id) if is_entity_answer(raw)]
    ctx.txn.delete_inbox(instance_id)
    ctx.enqueue_event(instance_id, record, event, wakes=WAKES_SUSPENDED)
    for raw in answers:
        ctx.txn.put_inbox(instance_id, ctx.state.next_seq(), raw)
    ctx.save(instance_id, record)


def is_entity_answer(raw: bytes) -> bool:
    """An entity's answer to a call: kept for a rewind while the instance is FAILED."""
    return pb.HistoryEvent.FromString(raw).WhichOneof("eventType") in _ENTITY_ANSWERS


_ENTITY_ANSWERS = ("entityOperationCompleted", "entityOperationFailed")


def apply_rewind_child(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """A rewound parent still waits for this child: rewind it if it failed, re-create it if purged, point it
    at the parent's new execution if it still runs, and report again a result the failed parent dropped."""
    instance_id = cmd["i"]
    parent = cmd["p"]
    record = ctx.load(instance_id)
    if record is None:
        create_instance(ctx, instance_id, cmd, parent=parent)
        return
    if not is_child_of(record, parent[0]):
        return  # the id was taken by another instance: that one is not the parent's to rewind
    if record["s"] == ev.FAILED:
        _prepare(ctx, instance_id, record, cmd.get("reason"), parent[1])
    elif record["s"] in ev.TERMINAL:
        ctx.report_to_parent([parent[0], parent[1], record["p"][2]], record["s"], record.get("out"), record.get("fd"))
    else:
        record["p"][1] = parent[1]
        ctx.save(instance_id, record)


def install_rewound_history(ctx: Ctx, instance_id: str, record: Record, action: pb.RewindOrchestrationAction) -> None:
    """Replace the history with the SDK's clean one and replay from it."""
    history = list(action.newHistory)
    failed_execution = record["x"]
    ctx.txn.delete_history(instance_id)
    for index, event in enumerate(history):
        ctx.txn.put_history(instance_id, index, event.SerializeToString())
    record["hl"] = len(history)
    reason = None
    created: dict[int, pb.SubOrchestrationInstanceCreatedEvent] = {}
    finished: set[int] = set()
    scheduled: dict[int, pb.TaskScheduledEvent] = {}  # activities the new history still waits for
    answered: set[int] = set()
    timers: dict[int, Any] = {}  # timerCreated id -> fireAt, while no timerFired answers it
    lock_requests: dict[str, pb.EntityLockRequestedEvent] = {}  # critical sections the history waits to be granted
    calls: set[str] = set()  # entity calls the history waits to be answered
    for event in history:
        which = event.WhichOneof("eventType")
        if which == "executionStarted":
            record["x"] = event.executionStarted.orchestrationInstance.executionId.value or record["x"]
        elif which == "executionRewound" and event.executionRewound.HasField("reason"):
            reason = event.executionRewound.reason.value
        elif which == "subOrchestrationInstanceCreated":
            created[event.eventId] = event.subOrchestrationInstanceCreated
        elif which == "subOrchestrationInstanceCompleted":
            finished.add(event.subOrchestrationInstanceCompleted.taskScheduledId)
        elif which == "taskScheduled":
            scheduled[event.eventId] = event.taskScheduled
        elif which in ("taskCompleted", "taskFailed"):
            answered.add(getattr(event, which).taskScheduledId)
        elif which == "timerCreated":
            timers[event.eventId] = event.timerCreated.fireAt
        elif which == "timerFired":
            timers.pop(event.timerFired.timerId, None)
        elif which == "entityLockRequested":
            lock_requests[event.entityLockRequested.criticalSectionId] = event.entityLockRequested
        elif which == "entityLockGranted":
            lock_requests.pop(event.entityLockGranted.criticalSectionId, None)
        elif which == "entityOperationCalled":
            calls.add(event.entityOperationCalled.requestId)
        elif which in _ENTITY_ANSWERS:
            calls.discard(getattr(event, which).requestId)
    record["rw"] = 0
    record["kick"] = 1  # dispatch once with no new events: the replay re-issues the removed work
    if record["s"] != ev.SUSPENDED:  # a suspend that came while the rewind was out holds it until resumed
        ctx.set_status(instance_id, record, ev.RUNNING)
    # What may wake it through that hold is what is left in its inbox, not the rewind, which has been delivered.
    record["wk"] = max((wake_of(raw) for _, raw in ctx.txn.inbox_iter(instance_id)), default=0)
    ctx.unqueue(record)  # the ready row of the rewind work item itself
    ctx.mark_ready(instance_id, record)
    waited_for = {t: e for t, e in scheduled.items() if t not in answered}
    _carry_activities(ctx, instance_id, record, failed_execution, waited_for)
    for timer_id, fire_at in timers.items():
        # Its row may have come due, and gone, while the instance was FAILED; the replay waits for it. (A row
        # still there has the same key: writing it again changes nothing.)
        fire_ms, row = ev.timer_row(record["x"], fire_at)
        ctx.schedule_timer(fire_ms, instance_id, timer_id, row)
    waiting = [pb.HistoryEvent.FromString(raw) for _, raw in ctx.txn.inbox_iter(instance_id)]  # since the rewind
    _ask_for_locks_again(ctx, instance_id, record, lock_requests, waiting)
    _wait_for_calls(record, calls, waiting)
    for task_id, child in created.items():
        if task_id in finished:
            continue
        ctx.send_to_instance(
            child.instanceId,
            {
                "op": "rewind_child",
                "reason": reason,
                "n": child.name,
                "v": child.version.value if child.HasField("version") else None,
                "in": child.input.value if child.HasField("input") else None,
                "tg": dict(child.tags),
                "p": [instance_id, record["x"], task_id, record["n"], record.get("v")],
            },
        )


def _carry_activities(
    ctx: Ctx, instance_id: str, record: Record, failed_execution: str, waited_for: dict[int, pb.TaskScheduledEvent]
) -> None:
    """The rewound history names a new execution. Activities of the failed one still queued or running now
    report to it; one whose result the failed instance dropped (or that waited for a retry) is queued again."""
    queued = set()
    for seq, activity in list(ctx.txn.activities_after(0)):
        if activity.get("i") == instance_id and activity.get("x") == failed_execution:
            activity["x"] = record["x"]
            ctx.txn.put_activity(seq, activity)
            queued.add(activity["t"])
    for task_id, task in waited_for.items():
        if task_id not in queued:
            ctx.queue_activity(activity_row(instance_id, record["x"], task_id, task))


def _ask_for_locks_again(
    ctx: Ctx, instance_id: str, record: Record, waited_for: dict[str, pb.EntityLockRequestedEvent],
    inbox: list[pb.HistoryEvent],
) -> None:
    """The replay waits for the grant of each section in `waited_for`. One still listed as asked for ("lr") comes
    to the rewound execution, and one that came since the rewind began waits in its `inbox`; one that came while
    the instance was FAILED was released then, so it is asked for again, or the rewound orchestration would wait
    for it for ever."""
    granted = {event.entityLockGranted.criticalSectionId for event in inbox if event.HasField("entityLockGranted")}
    still_coming = set(record.get("lr") or ()) | granted
    record["lr"] = [section for section in record.get("lr") or () if section in waited_for]
    for section, request in waited_for.items():
        if section not in still_coming:
            request_lock(ctx, instance_id, record, request)


def _wait_for_calls(record: Record, calls: set[str], inbox: list[pb.HistoryEvent]) -> None:
    """The rewound execution waits for the answers to these entity calls. Each names the execution that made
    it, which is not this one: the record lists the calls ("cx") so that their answers are taken all the same.
    (Asking again would run the operation twice.) Answers already in its `inbox` need no listing."""
    for event in inbox:
        which = event.WhichOneof("eventType")
        if which in _ENTITY_ANSWERS:
            calls.discard(getattr(event, which).requestId)
    if calls:
        record["cx"] = sorted(calls)
    else:
        record.pop("cx", None)
