"""The deterministic core of a partition: `apply(txn, command, now_ms, state) -> actions`.

No I/O, no clock, no randomness, no awaits: the process supplies the transaction and the time, and
performs the returned actions only after the transaction commits. One module per command.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from partitions.state_machine import actions as act
from partitions.state_machine.child_done import apply_child_done
from partitions.state_machine.complete_activity import apply_complete_activity
from partitions.state_machine.complete_orchestration import apply_complete_orchestration, apply_fail_too_large
from partitions.state_machine.context import Ctx
from partitions.state_machine.entities import (
    apply_complete_entity,
    apply_entity_message,
    apply_entity_result,
    apply_lock_granted,
    apply_refuse_operation,
    apply_release_lock,
    apply_signal_entity,
    apply_start_orchestration,
)
from partitions.state_machine.entity_queries import (
    apply_clean_entities,
    apply_get_entity,
    apply_query_entities,
)
from partitions.state_machine.leases import apply_abandon, apply_release_gateway
from partitions.state_machine.purge_instance import apply_get_children, apply_purge
from partitions.state_machine.queries import apply_get_instance, apply_wait
from partitions.state_machine.query_instances import (
    apply_history,
    apply_list_ids,
    apply_purge_filter,
    apply_query,
)
from partitions.state_machine.raise_event import apply_raise_event
from partitions.state_machine.rewind import apply_rewind, apply_rewind_child
from partitions.state_machine.start_instance import apply_restart, apply_start_child, apply_start_instance
from partitions.state_machine.state import CoreState
from partitions.state_machine.suspend_resume import apply_resume, apply_suspend
from partitions.state_machine.task_hub import apply_wipe
from partitions.state_machine.terminate_instance import apply_force_terminate, apply_terminate
from partitions.state_machine.timers import apply_fire_timers
from partitions.store.lmdb_store import StoreTxn
from runtime.errors import InvalidArgumentError

Handler = Callable[[Ctx, dict[str, Any]], None]

# Commands from gateways (and the partition's own timers and lease checks).
COMMANDS: dict[str, Handler] = {
    "abandon": apply_abandon,
    "clean_entities": apply_clean_entities,
    "complete_act": apply_complete_activity,
    "complete_ent": apply_complete_entity,
    "complete_orch": apply_complete_orchestration,
    "fail_too_large": apply_fail_too_large,  # posted by the partition itself (dispatch.py)
    "fire_timers": apply_fire_timers,
    "force_terminate": apply_force_terminate,
    "get": apply_get_instance,
    "get_children": apply_get_children,
    "get_entity": apply_get_entity,
    "history": apply_history,
    "list_ids": apply_list_ids,
    "purge": apply_purge,
    "purge_filter": apply_purge_filter,
    "query": apply_query,
    "query_entities": apply_query_entities,
    "raise": apply_raise_event,
    "refuse_operation": apply_refuse_operation,  # posted by the partition itself (dispatch.py)
    "release_gateway": apply_release_gateway,
    "release_lock": apply_release_lock,
    "resume": apply_resume,
    "signal_entity": apply_signal_entity,
    "rewind": apply_rewind,
    "start": apply_start_instance,
    "restart": apply_restart,
    "suspend": apply_suspend,
    "terminate": apply_terminate,
    "wait": apply_wait,
    "wipe": apply_wipe,
}

# Messages between instances, possibly on other partitions (delivered through the outbox).
MESSAGES: dict[str, Handler] = {
    "void": lambda ctx, message: None,  # an outbox row whose cause a wipe removed (task_hub.py)
    "child_done": apply_child_done,
    "entity_msg": apply_entity_message,
    "entity_result": apply_entity_result,
    "lock_granted": apply_lock_granted,
    "raise": apply_raise_event,
    "rewind_child": apply_rewind_child,
    "start_child": apply_start_child,
    "start_orch": apply_start_orchestration,
    "terminate": apply_terminate,
}


def apply(txn: StoreTxn, command: dict[str, Any], now_ms: int, state: CoreState) -> list[Any]:
    """Apply one command inside `txn` and return the actions to perform after commit."""
    ctx = Ctx(txn, now_ms, state)
    op = command.get("op")
    if op == "deliver":
        _apply_delivery(ctx, command)
    elif op == "acked":
        txn.delete_outbox_through(command["dest"], command["seq"])
    else:
        handler = COMMANDS.get(op)  # type: ignore[arg-type]
        if handler is None:
            raise InvalidArgumentError(f"unknown command {op!r}")
        handler(ctx, command)
    ctx.run_local()
    return ctx.actions


def apply_internal(ctx: Ctx, message: dict[str, Any]) -> None:
    """Apply a message addressed to an instance of this partition."""
    MESSAGES[message["op"]](ctx, message)


def _apply_delivery(ctx: Ctx, command: dict[str, Any]) -> None:
    """Messages from partition `from`, in its outbox order. Seen ones are skipped; a gap waits for the resend."""
    sender = command["from"]
    last = ctx.txn.get_dedup(sender)
    wiped_since = int(command.get("gen", 0)) < ctx.state.hub_generation  # sent before a wipe this side applied
    for seq, message in command["msgs"]:
        if seq <= last:
            continue
        if seq != last + 1:
            break
        if not wiped_since:
            apply_internal(ctx, message)
            ctx.run_local()
        last = seq
    ctx.txn.put_dedup(sender, last)
    ctx.actions.append(act.AckPartition(sender, last))
