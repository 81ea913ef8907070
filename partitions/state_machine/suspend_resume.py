"""SuspendInstance and ResumeInstance: the server sets the status; the SDK sees the events."""

from __future__ import annotations

from typing import Any

from partitions.state_machine import events as ev
from partitions.state_machine.context import WAKES_SUSPENDED, Ctx
from runtime.errors import InstanceNotFoundError


def _load(ctx: Ctx, instance_id: str) -> dict[str, Any]:
    record = ctx.load(instance_id)
    if record is None:
        raise InstanceNotFoundError(f"no orchestration instance with id '{instance_id}'")
    return record


def apply_suspend(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """A duplicate suspend, or a suspend of a finished instance, changes nothing."""
    instance_id = cmd["i"]
    record = _load(ctx, instance_id)
    if record["s"] not in ev.TERMINAL and record["s"] != ev.SUSPENDED:
        if record["s"] == ev.PENDING:
            record["sp"] = 1  # not started yet: a resume makes it PENDING again, not RUNNING
        ctx.set_status(instance_id, record, ev.SUSPENDED)
        ctx.enqueue_event(instance_id, record, ev.execution_suspended(ctx.now_ms, cmd.get("reason")))
        ctx.save(instance_id, record)
    ctx.reply(cmd)


def apply_resume(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """Only a suspended instance gets executionResumed: the SDK fails an instance on a stray one.

    It goes back to PENDING if no worker had run it yet (say, its scheduled start is still to come).
    """
    instance_id = cmd["i"]
    record = _load(ctx, instance_id)
    if record["s"] == ev.SUSPENDED:
        ctx.set_status(instance_id, record, ev.PENDING if record.pop("sp", None) else ev.RUNNING)
        ctx.enqueue_event(instance_id, record, ev.execution_resumed(ctx.now_ms, cmd.get("reason")), wakes=WAKES_SUSPENDED)
        ctx.save(instance_id, record)
    ctx.reply(cmd)
