"""RaiseEvent and sendEvent: an eventRaised in the target's inbox."""

from __future__ import annotations

from typing import Any

from partitions.state_machine import events as ev
from partitions.state_machine.context import Ctx
from runtime.errors import InstanceNotFoundError


def apply_raise_event(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """Events for a missing instance fail the client call, but a sendEvent (quiet) is dropped.

    Events for a terminal instance are dropped: nothing would ever read them.
    """
    instance_id = cmd["i"]
    record = ctx.load(instance_id)
    if record is None:
        if cmd.get("quiet"):
            return
        raise InstanceNotFoundError(f"no orchestration instance with id '{instance_id}'")
    if record["s"] not in ev.TERMINAL:
        ctx.enqueue_event(instance_id, record, ev.event_raised(ctx.now_ms, cmd["n"], cmd.get("in")))
        ctx.save(instance_id, record)
    ctx.reply(cmd)
