"""Durable timers: due rows become timerFired events, or make a scheduled instance ready."""

from __future__ import annotations

from typing import Any

from partitions.state_machine import events as ev
from partitions.state_machine.context import Ctx
from partitions.state_machine.entities import apply_entity_message
from partitions.store.keys import ACTIVITY_RETRY_TIMER_BASE, SCHEDULED_START_TIMER_ID, is_entity_signal_timer


def apply_fire_timers(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """Move every timer due at `now` (at most `limit`) into its instance's inbox."""
    for key, fire_ms, instance_id, timer_id, row in ctx.txn.due_timers(ctx.now_ms, cmd.get("limit", 1000)):
        ctx.txn.delete_timer_key(key)
        if is_entity_signal_timer(timer_id):
            apply_entity_message(ctx, {"i": instance_id, "ev": row["ev"]})
            continue
        record = ctx.load(instance_id)
        if record is None or record["s"] in ev.TERMINAL or record["x"] != row["x"]:
            continue  # the execution this timer belonged to is gone
        if timer_id <= ACTIVITY_RETRY_TIMER_BASE:
            ctx.queue_activity(row["a"])
            continue
        if timer_id == SCHEDULED_START_TIMER_ID:
            record["hu"] = 0
            ctx.mark_ready(instance_id, record)
        else:
            ctx.enqueue_event(instance_id, record, ev.timer_fired(ctx.now_ms, timer_id, fire_ms))
        ctx.save(instance_id, record)
