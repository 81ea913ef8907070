"""Abandoned and expired work items go back to the queue; they are never dropped."""

from __future__ import annotations

from typing import Any

from partitions.state_machine.context import Ctx
from partitions.state_machine.entities import requeue_entity
from partitions.state_machine.state import Lease
from partitions.store.keys import SCHEDULED_START_TIMER_ID, TIMER_ACTIVITY, TIMER_RELEASE
from runtime.errors import StaleCompletionError

ABANDON_BASE_DELAY_MS = 1000
ABANDON_MAX_DELAY_MS = 30_000


def backoff_ms(abandons: int) -> int:
    return min(ABANDON_MAX_DELAY_MS, ABANDON_BASE_DELAY_MS << min(abandons, 10))


def requeue(ctx: Ctx, lease: Lease, backoff: bool = False) -> None:
    """Release `lease` and queue its work again behind everything already waiting.

    With `backoff` (a worker abandoned the item, e.g. a version it rejects) the item waits first,
    1 s doubling to 30 s, so it does not bounce straight back to the same worker.
    """
    ctx.state.release(lease)
    if lease.kind == "e":
        assert isinstance(lease.key, str)
        requeue_entity(ctx, lease.key, backoff_ms if backoff else None)
        return
    if lease.kind == "o":
        instance_id = lease.key
        assert isinstance(instance_id, str)
        record = ctx.load(instance_id)
        if record is not None:
            ctx.unqueue(record)
            if backoff:
                record["ab"] = record.get("ab", 0) + 1
                record["hu"] = ctx.now_ms + backoff_ms(record["ab"] - 1)
                ctx.schedule_timer(record["hu"], instance_id, SCHEDULED_START_TIMER_ID, {"x": record["x"]}, TIMER_RELEASE)
            if ctx.txn.has_inbox(instance_id) or record.get("kick"):
                ctx.mark_ready(instance_id, record)
            ctx.save(instance_id, record)
        return
    seq = lease.key
    assert isinstance(seq, int)
    activity = ctx.txn.get_activity(seq)
    if activity is None:
        return
    ctx.txn.delete_activity(seq)
    if backoff:
        activity["ab"] = activity.get("ab", 0) + 1
        fire_ms = ctx.now_ms + backoff_ms(activity["ab"] - 1)
        ctx.schedule_timer(fire_ms, activity["i"], activity["t"], {"x": activity["x"], "a": activity}, TIMER_ACTIVITY)
    else:
        ctx.queue_activity(activity)


def apply_abandon(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """AbandonTask*WorkItem, a closed worker stream, or an expired lease."""
    lease = ctx.state.leases_by_token.get(cmd.get("tok", ""))
    if lease is None:
        if cmd.get("quiet"):
            return
        raise StaleCompletionError(f"completion token '{cmd.get('tok', '')}' is not a current lease")
    requeue(ctx, lease, backoff=not cmd.get("quiet"))
    ctx.reply(cmd)


def apply_release_gateway(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """A gateway went silent or restarted: everything it held goes back to the queue."""
    gateway = cmd["g"]
    held = [lease for lease in ctx.state.leases_by_token.values() if lease.gateway == gateway]
    for lease in held:
        requeue(ctx, lease)
