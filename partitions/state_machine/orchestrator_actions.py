"""The orchestrator's actions from CompleteOrchestratorTask, one function per action kind.

Each action is confirmed by a history event whose eventId is the action's id (DESIGN.md §5).
Handlers are named `_apply_<proto field name>` and kept in alphabetical order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from partitions.state_machine import events as ev
from partitions.state_machine.context import Ctx, Record
from partitions.state_machine.entities import lock_requested
from protos import orchestrator_service_pb2 as pb
from runtime.hashing import partition_for


class Outcome:
    """What the actions of one completion add up to."""

    def __init__(self, instance_id: str, record: Record) -> None:
        self.instance_id = instance_id
        self.record = record
        self.history: list[bytes] = []
        self.complete: pb.CompleteOrchestrationAction | None = None
        self.complete_id = -1

    def confirm(self, ctx: Ctx, action_id: int, **payload: object) -> None:
        self.history.append(ev.history_event(ctx.now_ms, action_id, **payload).SerializeToString())


def _apply_complete_orchestration(ctx: Ctx, out: Outcome, action: pb.OrchestratorAction) -> None:
    # Applied last by the caller: it ends (or restarts) the execution.
    out.complete = action.completeOrchestration
    out.complete_id = action.id


def _apply_create_sub_orchestration(ctx: Ctx, out: Outcome, action: pb.OrchestratorAction) -> None:
    sub = action.createSubOrchestration
    record = out.record
    child_id = sub.instanceId or f"{out.instance_id}:{action.id:04x}"
    out.confirm(
        ctx,
        action.id,
        subOrchestrationInstanceCreated=pb.SubOrchestrationInstanceCreatedEvent(
            instanceId=child_id,
            name=sub.name,
            version=sub.version if sub.HasField("version") else None,
            input=sub.input if sub.HasField("input") else None,
            parentTraceContext=sub.parentTraceContext if sub.HasField("parentTraceContext") else None,
            tags=sub.tags,
        ),
    )
    children = record.setdefault("ch", [])
    if child_id not in children and not _taken_here(ctx, out.instance_id, child_id):
        children.append(child_id)  # a child elsewhere whose start fails is taken off again (apply_child_done)
    message = {
        "op": "start_child",
        "n": sub.name,
        "v": sub.version.value if sub.HasField("version") else None,
        "in": sub.input.value if sub.HasField("input") else None,
        "tg": dict(sub.tags),
        "p": [out.instance_id, record["x"], action.id, record["n"], record.get("v")],
    }
    if sub.HasField("parentTraceContext"):
        message["tc"] = sub.parentTraceContext.SerializeToString()
    ctx.send_to_instance(child_id, message)


def _taken_here(ctx: Ctx, instance_id: str, child_id: str) -> bool:
    """The child's id is this instance's own, or a running instance's on this partition: its start will fail,
    and it must not become a child that a recursive terminate or purge reaches."""
    if child_id == instance_id:
        return True
    if partition_for(child_id, ctx.state.partition_count) != ctx.state.partition:
        return False
    existing = ctx.load(child_id)
    return existing is not None and existing["s"] not in ev.TERMINAL


def _apply_create_timer(ctx: Ctx, out: Outcome, action: pb.OrchestratorAction) -> None:
    fire_at = action.createTimer.fireAt
    out.confirm(ctx, action.id, timerCreated=pb.TimerCreatedEvent(fireAt=fire_at))
    fire_ms, row = ev.timer_row(out.record["x"], fire_at)
    ctx.schedule_timer(fire_ms, out.instance_id, action.id, row)


def _apply_schedule_task(ctx: Ctx, out: Outcome, action: pb.OrchestratorAction) -> None:
    task = action.scheduleTask
    out.confirm(
        ctx,
        action.id,
        taskScheduled=pb.TaskScheduledEvent(
            name=task.name,
            version=task.version if task.HasField("version") else None,
            input=task.input if task.HasField("input") else None,
            parentTraceContext=task.parentTraceContext if task.HasField("parentTraceContext") else None,
            tags=task.tags,
        ),
    )
    ctx.queue_activity(activity_row(out.instance_id, out.record["x"], action.id, task))


def activity_row(instance_id: str, execution_id: str, task_id: int, task: Any) -> dict[str, Any]:
    """The queued activity for a scheduleTask action or its taskScheduled event (the fields are the same)."""
    activity = {
        "i": instance_id,
        "x": execution_id,
        "t": task_id,
        "n": task.name,
        "v": task.version.value if task.HasField("version") else None,
        "in": task.input.value if task.HasField("input") else None,
        "tg": dict(task.tags),
    }
    if task.HasField("parentTraceContext"):
        activity["tc"] = task.parentTraceContext.SerializeToString()
    return activity


def _apply_send_entity_message(ctx: Ctx, out: Outcome, action: pb.OrchestratorAction) -> None:
    """Signal, call, lock request or unlock: confirmed in history, then sent to the entity's partition."""
    message = action.sendEntityMessage
    which = message.WhichOneof("EntityMessageType")
    if which is None:
        return
    inner = getattr(message, which)
    out.confirm(ctx, action.id, **{which: inner})
    if which == "entityLockRequested":
        target = inner.lockSet[inner.position] if 0 <= inner.position < len(inner.lockSet) else ""
    else:
        target = inner.targetInstanceId.value
    if not target:
        return
    if which == "entityLockRequested":
        lock_requested(out.record, inner.criticalSectionId)
    if which == "entityOperationCalled" and not inner.parentExecutionId.value:
        # The SDK leaves it out. The entity's answer names it, so an answer meant for an execution that has
        # since continued as new (or been replaced) is dropped instead of failing the one that runs now.
        called = pb.EntityOperationCalledEvent()
        called.CopyFrom(inner)
        called.parentExecutionId.value = out.record["x"]
        inner = called
    at = ev.timestamp_ms(inner.scheduledTime) if which in _TIMED and inner.HasField("scheduledTime") else 0
    event = ev.history_event(ctx.now_ms, **{which: inner}).SerializeToString()
    ctx.send_to_instance(target, {"op": "entity_msg", "ev": event, "at": at})


_TIMED = ("entityOperationSignaled", "entityOperationCalled")


def _apply_send_event(ctx: Ctx, out: Outcome, action: pb.OrchestratorAction) -> None:
    send = action.sendEvent
    target = send.instance.instanceId
    data = send.data.value if send.HasField("data") else None
    out.confirm(
        ctx,
        action.id,
        eventSent=pb.EventSentEvent(instanceId=target, name=send.name, input=send.data if send.HasField("data") else None),
    )
    if target:
        ctx.send_to_instance(target, {"op": "raise", "n": send.name, "in": data, "quiet": True})


def _apply_terminate_orchestration(ctx: Ctx, out: Outcome, action: pb.OrchestratorAction) -> None:
    term = action.terminateOrchestration
    if term.instanceId:
        reason = term.reason.value if term.HasField("reason") else None
        ctx.send_to_instance(term.instanceId, {"op": "terminate", "out": reason, "r": term.recurse, "quiet": True})


HANDLERS: dict[str, Callable[[Ctx, Outcome, pb.OrchestratorAction], None]] = {
    "completeOrchestration": _apply_complete_orchestration,
    "createSubOrchestration": _apply_create_sub_orchestration,
    "createTimer": _apply_create_timer,
    "scheduleTask": _apply_schedule_task,
    "rewindOrchestration": lambda ctx, out, action: None,  # handled before any other action
    "sendEntityMessage": _apply_send_entity_message,
    "sendEvent": _apply_send_event,
    "terminateOrchestration": _apply_terminate_orchestration,
}
