"""CompleteActivityTask: the activity's result or failure becomes taskCompleted/taskFailed in the inbox."""

from __future__ import annotations

from typing import Any

from partitions.state_machine import events as ev
from partitions.state_machine.context import Ctx
from runtime.errors import StaleCompletionError


def apply_complete_activity(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """A result for an instance that moved on (finished, continued as new, purged) is dropped."""
    lease = ctx.state.leases_by_token.get(cmd.get("tok", ""))
    activity = ctx.txn.get_activity(lease.key) if lease is not None and lease.kind == "a" else None  # type: ignore[arg-type]
    if lease is None or activity is None or activity["i"] != cmd["i"] or activity["t"] != cmd["t"]:
        raise StaleCompletionError(
            f"completion token '{cmd.get('tok', '')}' for activity {cmd['t']} of instance '{cmd['i']}'"
            " is not the current lease (expired, abandoned, already completed, or from before a restart)"
        )
    ctx.state.release(lease)
    ctx.txn.delete_activity(lease.key)  # type: ignore[arg-type]
    instance_id = activity["i"]
    record = ctx.load(instance_id)
    if record is not None and record["s"] not in ev.TERMINAL and record["x"] == activity["x"]:
        event = ev.task_result(ctx.now_ms, activity["t"], cmd.get("out"), cmd.get("fd"))
        ctx.enqueue_event(instance_id, record, event)
        ctx.save(instance_id, record)
    ctx.reply(cmd)
