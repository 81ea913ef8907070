"""PurgeInstances by id: delete a terminal instance and everything stored for it, optionally its children."""

from __future__ import annotations

from typing import Any

from partitions.state_machine import events as ev
from partitions.state_machine.context import Ctx, Record


def remove_instance(ctx: Ctx, instance_id: str, record: Record) -> None:
    """Delete the record, history, inbox and ready row. Late completions then find nothing and are dropped."""
    ctx.unqueue(record)
    lease = ctx.state.orch_leases.get(instance_id)
    if lease is not None:
        ctx.state.release(lease)
    ctx.txn.delete_history(instance_id)
    ctx.txn.delete_inbox(instance_id)
    ctx.txn.delete_instance(instance_id)


def apply_purge(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """Running instances are never purged: they count as not deleted."""
    instance_id = cmd["i"]
    record = ctx.load(instance_id)
    deleted = 0
    if record is not None and record["s"] in ev.TERMINAL:
        if cmd.get("r"):
            for child in record.get("ch") or ():
                ctx.send_to_instance(child, {"op": "purge", "r": True})
        remove_instance(ctx, instance_id, record)
        deleted = 1
    ctx.reply(cmd, {"deleted": deleted})
