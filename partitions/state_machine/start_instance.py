"""StartInstance and sub-orchestration creation: a new instance record with executionStarted in its inbox."""

from __future__ import annotations

import uuid
from typing import Any

from partitions.state_machine import events as ev
from partitions.state_machine.context import Ctx, Record
from partitions.state_machine.payloads import payload_of, set_payload
from partitions.state_machine.purge_instance import remove_instance
from partitions.store.keys import SCHEDULED_START_TIMER_ID, TIMER_RELEASE
from runtime.errors import InstanceAlreadyExistsError, InstanceNotCompletedError, InstanceNotFoundError

_EXECUTION_NAMESPACE = uuid.UUID("6f1d3c52-7a0e-4b8e-9a57-2f0d9b1c4e11")


def derive_execution_id(instance_id: str, now_ms: int, generation: int) -> str:
    """Execution ids derived from the command, so the core stays free of randomness."""
    return uuid.uuid5(_EXECUTION_NAMESPACE, f"{instance_id}\x00{now_ms}\x00{generation}").hex


def apply_start_instance(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """Create the instance, or replace one whose status the reuse policy lists as replaceable."""
    instance_id = cmd["i"]
    existing = ctx.load(instance_id)
    if existing is not None:
        if existing["s"] not in (cmd.get("reuse") or ()):
            raise InstanceAlreadyExistsError(
                f"an orchestration instance with id '{instance_id}' already exists"
                f" (status {ev.pb.OrchestrationStatus.Name(existing['s'])})"
            )
        if existing["s"] not in ev.TERMINAL:
            from partitions.state_machine.complete_orchestration import (
                cascade_queued_terminate,  # (imports us)
            )
            from partitions.state_machine.entities import release_held_locks  # entities imports this module

            release_held_locks(ctx, instance_id, existing)  # the replaced execution will never send its unlocks
            cascade_queued_terminate(ctx, instance_id, existing)
        parent = existing.get("p")
        if parent and existing["s"] not in ev.TERMINAL:
            # A running sub-orchestration replaced by the client: its parent would otherwise wait for ever.
            failure = ev.failure_details(
                "OrchestrationReplaced",
                f"sub-orchestration '{instance_id}' was replaced by a new instance started with the same id",
            )
            ctx.report_to_parent(parent, ev.TERMINATED, failure=failure)
        remove_instance(ctx, instance_id, existing)
    create_instance(ctx, instance_id, cmd, parent=None)
    ctx.reply(cmd, {"i": instance_id})


def apply_restart(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """RestartInstance with the same id: the check that the instance has finished and its new start are one
    command, so of concurrent restarts one starts it and the others are refused as for a running instance, and
    a restart that comes after a purge finds nothing to restart."""
    instance_id = cmd["i"]
    existing = ctx.load(instance_id)
    if existing is None:
        raise InstanceNotFoundError(f"no orchestration instance with id '{instance_id}'")
    if existing["s"] not in ev.TERMINAL:
        raise InstanceNotCompletedError(f"instance '{instance_id}' is not in a terminal state; it cannot be restarted")
    start = {"n": existing["n"], "v": existing.get("v"), "in": payload_of(ctx.txn, instance_id, existing, "in"),
             "tg": existing.get("tg") or {},
             "x": cmd.get("x")}
    remove_instance(ctx, instance_id, existing)
    create_instance(ctx, instance_id, start, parent=None)
    ctx.reply(cmd, {"i": instance_id})


def apply_start_child(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """A parent's createSubOrchestration. A terminal child with the same id is replaced (SDK retries reuse it)."""
    instance_id = cmd["i"]
    parent = cmd["p"]
    existing = ctx.load(instance_id)
    if existing is not None:
        if existing["s"] not in ev.TERMINAL:
            failure = ev.failure_details(
                "InstanceAlreadyExists", f"a sub-orchestration with id '{instance_id}' is already running"
            )
            ctx.report_to_parent(parent, ev.FAILED, failure=failure, ns=instance_id)  # not started: not its child
            return
        remove_instance(ctx, instance_id, existing)
    create_instance(ctx, instance_id, cmd, parent=parent)


def create_instance(ctx: Ctx, instance_id: str, cmd: dict[str, Any], parent: list[Any] | None) -> Record:
    scheduled_ms = cmd.get("ss") or 0
    record: Record = {
        "n": cmd["n"],
        "v": cmd.get("v"),
        "s": ev.PENDING,
        "x": cmd.get("x") or derive_execution_id(instance_id, ctx.now_ms, 0),
        "c": ctx.now_ms,
        "hu": scheduled_ms if scheduled_ms > ctx.now_ms else 0,  # dispatch held until (ms)
        "sst": scheduled_ms,  # the scheduled start the client asked for
        "tg": cmd.get("tg") or {},
        "p": parent,
        "hl": 0,
        "rq": 0,
        "g": 0,
        "ch": [],
        "lr": [],  # critical sections asked for and not granted yet
        "lh": 0,  # whether it has asked for any
    }
    if cmd.get("tc"):
        record["tc"] = cmd["tc"]
    set_payload(ctx.txn, instance_id, record, "in", cmd.get("in"))
    ctx.enqueue_event(instance_id, record, ev.execution_started(ctx.now_ms, instance_id, record["x"], record, cmd.get("in")))
    if record["hu"]:
        ctx.schedule_timer(record["hu"], instance_id, SCHEDULED_START_TIMER_ID, {"x": record["x"]}, TIMER_RELEASE)
    ctx.save(instance_id, record)
    return record
