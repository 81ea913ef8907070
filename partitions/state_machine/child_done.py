"""A sub-orchestration finished: its result or failure goes into the parent's inbox."""

from __future__ import annotations

from typing import Any

from partitions.state_machine import events as ev
from partitions.state_machine.context import Ctx


def apply_child_done(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """Dropped when the parent is gone, finished, or is a later execution than the one that asked."""
    instance_id = cmd["i"]
    record = ctx.load(instance_id)
    if record is None or record["x"] != cmd["x"]:
        return
    not_started = cmd.get("ns")
    if not_started and not_started in (record.get("ch") or ()):
        # Its id belongs to another instance: a recursive terminate or purge must not reach that one (they
        # check the child's parent too). Taken off even when this parent has finished meanwhile.
        record["ch"].remove(not_started)
        ctx.save(instance_id, record)
    if record["s"] in ev.TERMINAL:
        return
    event = ev.child_result(ctx.now_ms, cmd["t"], cmd["s"], cmd.get("out"), cmd.get("fd"))
    ctx.enqueue_event(instance_id, record, event)
    ctx.save(instance_id, record)
