"""PurgeInstances by id: delete a terminal instance and everything stored for it, optionally its children."""

from __future__ import annotations

from typing import Any

from partitions.state_machine import events as ev
from partitions.state_machine.context import Ctx, Record, is_child_of


def remove_instance(ctx: Ctx, instance_id: str, record: Record) -> None:
    """Delete the record, history, inbox, timers and ready row. Late completions then find nothing and are
    dropped."""
    ctx.unqueue(record)
    lease = ctx.state.orch_leases.get(instance_id)
    if lease is not None:
        ctx.state.release(lease)
    ctx.txn.delete_history(instance_id)
    ctx.txn.delete_inbox(instance_id)
    ctx.txn.delete_instance_timers(instance_id)
    ctx.txn.delete_payloads(instance_id)
    ctx.txn.delete_instance(instance_id)
    ctx.txn.index_instance(instance_id, record.get("ix"), None)


def apply_purge(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """Running instances are never purged: they count as not deleted.

    Recursive purge is driven by the gateway (children first, then the parent), so the count it
    reports is the real one; purging is idempotent, so a retried request does no harm.

    In a recursive purge, "seen" lists the children the gateway's walk found, and "sx" the execution it saw. An
    instance that runs again since, or has run again (rewound, restarted, replaced), or has a child the walk did
    not see is kept, and the reply says so: purging it would leave a child where no recursive purge reaches it.
    """
    instance_id = cmd["i"]
    record = _of_parent(ctx.load(instance_id), cmd.get("pp"))
    if record is None:
        ctx.reply(cmd, {"deleted": 0})
        return
    seen = cmd.get("seen")
    changed = seen is not None and (record["s"] not in ev.TERMINAL or not set(record.get("ch") or ()) <= set(seen)
                                    or cmd.get("sx", record["x"]) != record["x"])
    if changed or record["s"] not in ev.TERMINAL:
        ctx.reply(cmd, {"deleted": 0, "kept": 1} if changed else {"deleted": 0})
        return
    remove_instance(ctx, instance_id, record)
    ctx.reply(cmd, {"deleted": 1})


def apply_get_children(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """The status and sub-orchestration ids of an instance (None when it does not exist)."""
    record = _of_parent(ctx.load(cmd["i"]), cmd.get("pp"))
    ctx.reply(cmd, None if record is None else {"s": record["s"], "ch": list(record.get("ch") or ()), "x": record["x"]})


def _of_parent(record: Record | None, parent_id: str | None) -> Record | None:
    """In a recursive purge (`parent_id` given), an instance that parent did not start counts as absent: its
    id was in the parent's child list only because the child's start failed, since another instance had it."""
    if record is None or parent_id is None or is_child_of(record, parent_id):
        return record
    return None
