"""Durable timers: due rows become timerFired events, or make a scheduled instance ready."""

from __future__ import annotations

import logging
from typing import Any

from partitions.state_machine import events as ev
from partitions.state_machine.context import Ctx
from partitions.state_machine.entities import apply_entity_message, release_entity
from partitions.store.keys import TIMER_ACTIVITY, TIMER_ENTITY_RELEASE, TIMER_ENTITY_SIGNAL, TIMER_RELEASE

log = logging.getLogger(__name__)


def apply_fire_timers(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """Act on every timer due at `now` (at most `limit`): each row is deleted, whatever it holds.

    A row that cannot be acted on is logged and dropped: a persisted poison row must not stop the
    partition from ever firing timers again.
    """
    for key, fire_ms, kind, instance_id, timer_id, row in ctx.txn.due_timers(ctx.now_ms, cmd.get("limit", 1000)):
        ctx.txn.delete_timer_key(key)
        try:
            _fire(ctx, kind, instance_id, timer_id, fire_ms, row)
        except Exception:
            log.exception("%s: dropped timer row (kind %d, id %d) that could not fire", instance_id, kind, timer_id)


def _fire(ctx: Ctx, kind: int, instance_id: str, timer_id: int, fire_ms: int, row: dict[str, Any]) -> None:
    if kind == TIMER_ENTITY_SIGNAL:
        apply_entity_message(ctx, {"i": instance_id, "ev": row["ev"]})
        return
    if kind == TIMER_ENTITY_RELEASE:
        release_entity(ctx, instance_id)
        return
    record = ctx.load(instance_id)
    if record is None or record["s"] in ev.TERMINAL or record["x"] != row["x"]:
        return  # the execution this timer belonged to is gone
    if kind == TIMER_ACTIVITY:
        ctx.queue_activity(row["a"])
        return
    if kind == TIMER_RELEASE:
        record["hu"] = 0
        ctx.mark_ready(instance_id, record)
    else:
        ctx.enqueue_event(instance_id, record, ev.timer_fired(ctx.now_ms, timer_id, fire_ms, row.get("fa")))
    ctx.save(instance_id, record)
