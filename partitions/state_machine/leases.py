"""Abandoned and expired work items go back to the queue; they are never dropped."""

from __future__ import annotations

from typing import Any

from partitions.state_machine.context import Ctx
from partitions.state_machine.state import Lease
from runtime.errors import StaleCompletionError


def requeue(ctx: Ctx, lease: Lease) -> None:
    """Release `lease` and queue its work again behind everything already waiting."""
    ctx.state.release(lease)
    if lease.kind == "o":
        instance_id = lease.key
        assert isinstance(instance_id, str)
        record = ctx.load(instance_id)
        if record is not None:
            ctx.unqueue(record)
            if ctx.txn.inbox(instance_id):
                ctx.mark_ready(instance_id, record)
            ctx.save(instance_id, record)
        return
    seq = lease.key
    assert isinstance(seq, int)
    activity = ctx.txn.get_activity(seq)
    if activity is not None:
        ctx.txn.delete_activity(seq)
        ctx.queue_activity(activity)


def apply_abandon(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """AbandonTask*WorkItem, a closed worker stream, or an expired lease."""
    lease = ctx.state.leases_by_token.get(cmd.get("tok", ""))
    if lease is None:
        if cmd.get("quiet"):
            return
        raise StaleCompletionError(f"completion token '{cmd.get('tok', '')}' is not a current lease")
    requeue(ctx, lease)
    ctx.reply(cmd)


def apply_release_gateway(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """A gateway went silent or restarted: everything it held goes back to the queue."""
    gateway = cmd["g"]
    held = [lease for lease in ctx.state.leases_by_token.values() if lease.gateway == gateway]
    for lease in held:
        requeue(ctx, lease)
