"""TerminateInstance: an executionTerminated event, and with `recursive` the same for every child."""

from __future__ import annotations

from typing import Any

from partitions.state_machine import events as ev
from partitions.state_machine.context import WAKES_SCHEDULED, Ctx
from runtime.errors import InstanceNotFoundError


def apply_terminate(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """The SDK answers the event with completeOrchestration(TERMINATED); children are our job."""
    instance_id = cmd["i"]
    record = ctx.load(instance_id)
    if record is None:
        if cmd.get("quiet"):
            return
        raise InstanceNotFoundError(f"no orchestration instance with id '{instance_id}'")
    if record["s"] not in ev.TERMINAL:
        recurse = bool(cmd.get("r"))
        event = ev.execution_terminated(ctx.now_ms, cmd.get("out"), recurse)
        ctx.enqueue_event(instance_id, record, event, wakes=WAKES_SCHEDULED)
        ctx.save(instance_id, record)
        if recurse:
            for child in record.get("ch") or ():
                ctx.send_to_instance(child, {"op": "terminate", "out": cmd.get("out"), "r": True, "quiet": True})
    ctx.reply(cmd)
