"""DeleteTaskHub / CreateTaskHub(recreateIfExists): wipe a partition's instances and work."""

from __future__ import annotations

from typing import Any

from partitions.state_machine.actions import Reply
from partitions.state_machine.context import Ctx

# Kept: meta (partition count, epoch, counters), and the outbox with its peers' dedup marks, so the
# sequence numbers partitions exchange never go backwards and no message stream is left with a gap.
WIPED_TABLES = (
    "instances",
    "history",
    "inbox",
    "orch_ready",
    "act_ready",
    "timers",
    "idx_created",
    "idx_status",
    "idx_completed",
    "entities",
    "ent_ready",
)


def apply_wipe(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """Every instance, history, queued item and timer goes; leases and waiters are forgotten."""
    for table in WIPED_TABLES:
        ctx.txn.drop_table(table)
    state = ctx.state
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
