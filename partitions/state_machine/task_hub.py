"""DeleteTaskHub / CreateTaskHub(recreateIfExists): wipe a partition's instances and work."""

from __future__ import annotations

from typing import Any

from partitions.state_machine.actions import Reply
from partitions.state_machine.context import Ctx
from partitions.store import keys

VOID = {"op": "void"}

# Kept: meta (partition count, epoch, counters), the outbox rows and the peers' dedup marks, so the sequence
# numbers partitions exchange never go backwards and no message stream is left with a gap. The rows still
# unacknowledged are voided, though: their causes are gone. And each wipe starts a new generation, recorded
# here and carried by every delivery, so a message another partition sent before its own wipe, which arrives
# after ours, is acknowledged but not applied. (Work started while the wipe is in progress may still be
# wiped in part: the partitions do not wipe at one instant.)
WIPED_TABLES = (
    "instances",
    "history",
    "inbox",
    "orch_ready",
    "act_ready",
    "timers",
    "timer_idx",
    "idx_created",
    "idx_status",
    "idx_completed",
    "entities",
    "ent_ready",
    "payloads",
)


def apply_wipe(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """Every instance, history, queued item and timer goes; leases and waiters are forgotten."""
    for table in WIPED_TABLES:
        ctx.txn.drop_table(table)
    for destination in ctx.txn.outbox_destinations():
        for seq, _ in ctx.txn.outbox_from(destination, 0, 1 << 62):
            ctx.txn.put_outbox(destination, seq, VOID)
    state = ctx.state
    generation = max(state.hub_generation, int(cmd.get("gen", 0)))
    ctx.txn.put_meta(keys.META_HUB_GENERATION, keys.pack_u64(generation))
    state.hub_generation = generation
    state.orch_leases.clear()
    state.act_leases.clear()
    state.ent_leases.clear()
    state.leases_by_token.clear()
    state.orch_cursor = state.act_cursor = state.ent_cursor = 0
    for waiters in state.waiters.values():
        for waiter in waiters:
            ctx.actions.append(Reply(waiter.sender, waiter.request_id, None))
    state.waiters.clear()
    ctx.reply(cmd)
