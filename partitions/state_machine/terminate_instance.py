"""TerminateInstance: an executionTerminated event, and with `recursive` the same for every child once it is taken."""

from __future__ import annotations

from typing import Any

from partitions.state_machine import events as ev
from partitions.state_machine.complete_orchestration import end_without_worker
from partitions.state_machine.context import WAKES_SCHEDULED, Ctx, is_child_of
from runtime.errors import InstanceNotFoundError


def apply_terminate(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """The SDK answers the event with completeOrchestration(TERMINATED); children are our job."""
    instance_id = cmd["i"]
    record = ctx.load(instance_id)
    if record is None:
        if cmd.get("quiet"):
            return
        raise InstanceNotFoundError(f"no orchestration instance with id '{instance_id}'")
    via = cmd.get("via")
    if via and not is_child_of(record, via[-1]):
        return  # a cascade reached an id its parent listed but never started: another instance has it
    if _never_ran(ctx, instance_id, record):
        # Nothing to run it down: handed to a worker with its start, the terminate would come second, and an
        # orchestration that completes on its first turn would end COMPLETED (a start scheduled days ahead, say).
        end_without_worker(ctx, instance_id, record, ev.TERMINATED, cmd.get("out"), None)
    elif record["s"] not in ev.TERMINAL:
        # With `recursive`, the children are told when the instance takes the terminate (complete_orchestration),
        # not now: its turn in flight may complete it first, and then the terminate is moot for them too.
        event = ev.execution_terminated(ctx.now_ms, cmd.get("out"), bool(cmd.get("r")))
        ctx.enqueue_event(instance_id, record, event, wakes=WAKES_SCHEDULED)
        ctx.save(instance_id, record)
    ctx.reply(cmd)


def _never_ran(ctx: Ctx, instance_id: str, record: dict[str, Any]) -> bool:
    """Not started by any worker yet (PENDING, or suspended before its start), and no first turn in flight."""
    return (record["s"] in (ev.PENDING, ev.SUSPENDED) and not record["hl"]
            and instance_id not in ctx.state.orch_leases)


def apply_force_terminate(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """SkipGracefulOrchestrationTerminations: end the instance now, without a worker's help.

    A work item in flight loses its lease, so its late completion is rejected and changes nothing.
    Replies whether the instance was terminated (False: unknown or already finished).
    """
    instance_id = cmd["i"]
    record = ctx.load(instance_id)
    if record is None or record["s"] in ev.TERMINAL:
        ctx.reply(cmd, {"terminated": False})
        return
    lease = ctx.state.orch_leases.get(instance_id)
    if lease is not None:
        ctx.state.release(lease)
    end_without_worker(ctx, instance_id, record, ev.TERMINATED, cmd.get("out"), None)
    ctx.reply(cmd, {"terminated": True})
