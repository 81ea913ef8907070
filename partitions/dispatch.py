"""Work-item dispatch: ready orchestrations and activities become leased WorkItem messages.

Orchestrator work items are assembled from stored event bytes without decoding them: a repeated
message field on the wire is just tag, length and bytes, one after another.
"""

from __future__ import annotations

from partitions.state_machine import events as ev
from partitions.state_machine.entities import runnable_operations
from partitions.state_machine.state import CoreState, Lease
from partitions.store.lmdb_store import StoreTxn
from protos import orchestrator_service_pb2 as pb
from runtime.wire import length_delimited

MAX_NEW_EVENTS = 5000  # per work item; the rest waits for the next one


def _new_token(state: CoreState) -> str:
    state.next_token += 1
    return f"{state.partition}.{state.epoch}.{state.next_token}"


def dispatch_orchestrations(
    txn: StoreTxn, state: CoreState, gateway: bytes, limit: int, now_ms: int, lease_ms: int
) -> list[tuple[str, bytes]]:
    """Lease up to `limit` ready orchestrations to `gateway`, oldest first."""
    items: list[tuple[str, bytes]] = []
    for seq, instance_id in txn.orch_ready_after(state.orch_cursor):
        if len(items) >= limit:
            break
        state.orch_cursor = seq
        record = txn.get_instance(instance_id)
        if instance_id in state.orch_leases or record is None or record.get("rq") != seq:
            continue
        inbox = txn.inbox(instance_id)[: 1 if record.get("rw") else MAX_NEW_EVENTS]
        if not inbox and not record.get("kick"):
            continue
        token = _new_token(state)
        started = ev.orchestrator_started(now_ms)
        request = b"".join(
            (
                length_delimited(1, instance_id.encode("utf-8")),
                length_delimited(2, length_delimited(1, record["x"].encode("utf-8"))),
                b"".join(length_delimited(3, event) for event in txn.history(instance_id)),
                length_delimited(4, started),
                b"".join(length_delimited(4, event) for _, event in inbox),
            )
        )
        state.add_lease(
            Lease(
                token=token,
                kind="o",
                key=instance_id,
                gateway=gateway,
                expires_ms=now_ms + lease_ms,
                started_event=started,
                inbox_keys=[key for key, _ in inbox],
                execution_id=record["x"],
            )
        )
        items.append((token, length_delimited(1, request) + length_delimited(10, token.encode())))
    return items


def dispatch_activities(
    txn: StoreTxn, state: CoreState, gateway: bytes, limit: int, now_ms: int, lease_ms: int
) -> list[tuple[str, bytes]]:
    """Lease up to `limit` queued activities to `gateway`, oldest first."""
    items: list[tuple[str, bytes]] = []
    for seq, activity in txn.activities_after(state.act_cursor):
        if len(items) >= limit:
            break
        state.act_cursor = seq
        if seq in state.act_leases:
            continue
        token = _new_token(state)
        request = pb.ActivityRequest(
            name=activity["n"],
            version=ev.string_value(activity.get("v")),
            input=ev.string_value(activity.get("in")),
            orchestrationInstance=pb.OrchestrationInstance(
                instanceId=activity["i"], executionId=ev.string_value(activity["x"])
            ),
            taskId=activity["t"],
            tags=activity.get("tg") or {},
        )
        if activity.get("tc"):
            request.parentTraceContext.ParseFromString(activity["tc"])
        state.add_lease(Lease(token=token, kind="a", key=seq, gateway=gateway, expires_ms=now_ms + lease_ms))
        items.append((token, pb.WorkItem(activityRequest=request, completionToken=token).SerializeToString()))
    return items


def dispatch_entities(
    txn: StoreTxn, state: CoreState, gateway: bytes, limit: int, now_ms: int, lease_ms: int
) -> list[tuple[str, bytes]]:
    """Lease up to `limit` entities with runnable operations; each gets one batch (EntityRequest)."""
    items: list[tuple[str, bytes]] = []
    for seq, entity_id in txn.ent_ready_after(state.ent_cursor):
        if len(items) >= limit:
            break
        state.ent_cursor = seq
        record = txn.get_entity(entity_id)
        if entity_id in state.ent_leases or record is None or record.get("rq") != seq:
            continue
        batch = runnable_operations(record, txn.inbox(entity_id))
        if not batch:
            continue
        token = _new_token(state)
        request = b"".join(
            (
                length_delimited(1, entity_id.encode("utf-8")),
                length_delimited(3, length_delimited(1, record["st"].encode("utf-8")))
                if record["st"] is not None
                else b"",
                b"".join(length_delimited(4, raw) for _, raw in batch),
            )
        )
        state.add_lease(
            Lease(
                token=token,
                kind="e",
                key=entity_id,
                gateway=gateway,
                expires_ms=now_ms + lease_ms,
                inbox_keys=[key for key, _ in batch],
            )
        )
        items.append((token, length_delimited(5, request) + length_delimited(10, token.encode())))
    return items


DISPATCHERS = {"o": dispatch_orchestrations, "a": dispatch_activities, "e": dispatch_entities}


def demand(txn: StoreTxn, state: CoreState) -> dict[str, int]:
    """Ready work not yet leased, per kind: what this partition asks the gateways for."""
    return {
        "o": max(0, txn.orch_ready_count() - len(state.orch_leases)),
        "a": max(0, txn.activity_count() - len(state.act_leases)),
        "e": max(0, txn.ent_ready_count() - len(state.ent_leases)),
    }
