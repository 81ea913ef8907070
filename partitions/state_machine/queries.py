"""GetInstance and the WaitFor* requests, answered from the instance record."""

from __future__ import annotations

from typing import Any

from partitions.state_machine import events as ev
from partitions.state_machine.context import Ctx, Record
from partitions.state_machine.payloads import payload_of
from partitions.state_machine.state import Waiter
from partitions.store.keys import orchestration_id_problem
from partitions.store.lmdb_store import StoreTxn

_STATE_FIELDS = ("n", "v", "s", "c", "u", "d", "fd", "x", "tg", "sst")


def instance_state(txn: StoreTxn, instance_id: str, record: Record, with_payloads: bool) -> dict[str, Any]:
    """The fields the gateway turns into an OrchestrationState."""
    state = {k: record.get(k) for k in _STATE_FIELDS}
    state["i"] = instance_id
    state["pi"] = record["p"][0] if record.get("p") else None
    state["cs"] = payload_of(txn, instance_id, record, "cs")
    if with_payloads:
        state["in"] = payload_of(txn, instance_id, record, "in")
        state["out"] = record.get("out")
    return state


def condition_met(kind: str, status: int) -> bool:
    return status != ev.PENDING if kind == "start" else status in ev.TERMINAL


def apply_get_instance(ctx: Ctx, cmd: dict[str, Any]) -> None:
    record = ctx.load(cmd["i"])
    ctx.reply(cmd, None if record is None else instance_state(ctx.txn, cmd["i"], record, bool(cmd.get("pl"))))


def apply_wait(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """Answer now if the condition holds; otherwise park a waiter, also for an instance that does not exist yet:
    a client may wait for an instance another one is about to start. The caller's deadline ends the wait. An id
    no orchestration can have (an entity's) is answered at once: nothing would ever end that wait."""
    instance_id = cmd["i"]
    record = ctx.load(instance_id)
    if record is None and orchestration_id_problem(instance_id):
        ctx.reply(cmd, None)
        return
    if record is not None and condition_met(cmd["k"], record["s"]):
        ctx.reply(cmd, instance_state(ctx.txn, instance_id, record, bool(cmd.get("pl"))))
        return
    waiter = Waiter(cmd["_from"], cmd["rid"], cmd["k"], int(cmd.get("dl", 0)), bool(cmd.get("pl")))
    waiters = ctx.state.waiters.setdefault(instance_id, [])
    # A gateway re-sends its waits when it sees this partition restart, and one sent while the partition was
    # down may already be here: one waiter per request.
    if not any(w.sender == waiter.sender and w.request_id == waiter.request_id for w in waiters):
        waiters.append(waiter)
