"""Work-item dispatch: ready orchestrations and activities become leased WorkItem messages.

Orchestrator work items are assembled from stored event bytes without decoding them: a repeated
message field on the wire is just tag, length and bytes, one after another.
"""

from __future__ import annotations

from collections.abc import Callable

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


Matcher = Callable[[str, str | None], bool] | None
SCAN_BUDGET = 10_000  # ready rows one dispatch call looks at, at most


def forget(state: CoreState, matches: Matcher) -> None:
    """`matches` is no longer used: its walks' places go."""
    if matches is not None:
        for key in [key for key in state.scan_resume if key[1] == id(matches)]:
            del state.scan_resume[key]


class _Walk:
    """Ready rows from the low-water mark on.

    The mark only moves over rows that are leased (or stale), never past a row left for another
    worker, so a worker with filters cannot hide work from the others.

    A worker with filters also goes on where its last walk stopped, until a walk reaches the end of the
    rows: with more than SCAN_BUDGET rows it does not accept ahead of its own (work for a version no
    worker runs any more, say), starting at the mark every time would never reach them.
    """

    def __init__(self, state: CoreState, attr: str, matches: Matcher = None) -> None:
        self.state, self.attr, self.contiguous, self.seen = state, attr, True, 0
        self.key = None if matches is None else (attr, id(matches))
        self.previous: int | None = None  # the last row this walk looked at in full
        self.current: int | None = None

    @property
    def mark(self) -> int:
        return getattr(self.state, self.attr)

    @property
    def start(self) -> int:
        resume = self.state.scan_resume.get(self.key) if self.key is not None else None
        return self.mark if resume is None else max(self.mark, resume)

    def tick(self, seq: int) -> bool:
        self.previous, self.current = self.current, seq
        self.seen += 1
        return self.seen <= SCAN_BUDGET

    def pause(self) -> None:
        """The walk stops early (its budget or its limit): the next one for these filters goes on from here."""
        if self.key is not None and self.previous is not None:
            self.state.scan_resume[self.key] = self.previous

    def reached_end(self) -> None:
        if self.key is not None:
            self.state.scan_resume.pop(self.key, None)

    def passed(self, seq: int) -> None:
        if self.contiguous:
            setattr(self.state, self.attr, seq)

    def left(self) -> None:
        self.contiguous = False


def dispatch_orchestrations(
    txn: StoreTxn, state: CoreState, gateway: bytes, limit: int, now_ms: int, lease_ms: int, matches: Matcher = None
) -> list[tuple[str, bytes]]:
    """Lease up to `limit` ready orchestrations (that `matches` accepts) to `gateway`, oldest first."""
    items: list[tuple[str, bytes]] = []
    walk = _Walk(state, "orch_cursor", matches)
    for seq, instance_id in txn.orch_ready_after(walk.start):
        if len(items) >= limit or not walk.tick(seq):
            walk.pause()
            break
        record = txn.get_instance(instance_id)
        if instance_id in state.orch_leases or record is None or record.get("rq") != seq:
            walk.passed(seq)
            continue
        if matches is not None and not matches(record["n"], record.get("v")):
            walk.left()
            continue
        inbox = txn.inbox(instance_id, 1 if record.get("rw") else MAX_NEW_EVENTS)
        if not inbox and not record.get("kick"):
            walk.passed(seq)
            continue
        started = ev.orchestrator_started(now_ms)
        head = b"".join(
            (
                length_delimited(1, instance_id.encode("utf-8")),
                length_delimited(2, length_delimited(1, record["x"].encode("utf-8"))),
                b"".join(length_delimited(3, event) for event in txn.history(instance_id)),
                length_delimited(4, started),
            )
        )
        new_events, size = _fields_that_fit(4, inbox, len(head) + _WORK_ITEM_FRAMING, state.max_work_item_bytes)
        if size > state.max_work_item_bytes:
            # No worker with the default receive limit could take it, and its stream would break for every item
            # on it, again and again: the instance fails instead (in the next batch), saying why.
            state.oversized[("o", instance_id)] = {"op": "fail_too_large", "i": instance_id, "x": record["x"], "b": size}
            walk.left()
            continue
        inbox = inbox[: len(new_events)]
        token = _new_token(state)
        request = head + b"".join(new_events)
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
        walk.passed(seq)
        items.append((token, length_delimited(1, request) + length_delimited(10, token.encode())))
    else:
        walk.reached_end()
    return items


_WORK_ITEM_FRAMING = 32  # WorkItem's own field headers and the completion token, generously


def _fields_that_fit(
    number: int, inbox: list[tuple[bytes, bytes]], used: int, limit: int
) -> tuple[list[bytes], int]:
    """The inbox events (as fields `number` of the request) that fit in `limit` after `used` bytes, oldest
    first; at least the first one, so the size returned may exceed the limit. The rest wait for the next item."""
    fields: list[bytes] = []
    for _, event in inbox:
        field = length_delimited(number, event)
        if fields and used + len(field) > limit:
            break
        fields.append(field)
        used += len(field)
    return fields, used


def dispatch_activities(
    txn: StoreTxn, state: CoreState, gateway: bytes, limit: int, now_ms: int, lease_ms: int, matches: Matcher = None
) -> list[tuple[str, bytes]]:
    """Lease up to `limit` queued activities (that `matches` accepts) to `gateway`, oldest first."""
    items: list[tuple[str, bytes]] = []
    walk = _Walk(state, "act_cursor", matches)
    for seq, activity in txn.activities_after(walk.start):
        if len(items) >= limit or not walk.tick(seq):
            walk.pause()
            break
        if seq in state.act_leases:
            walk.passed(seq)
            continue
        if matches is not None and not matches(activity["n"], activity.get("v")):
            walk.left()
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
        walk.passed(seq)
        items.append((token, pb.WorkItem(activityRequest=request, completionToken=token).SerializeToString()))
    else:
        walk.reached_end()
    return items


def entity_name(entity_id: str) -> str:
    """`@name@key` -> name."""
    return entity_id[1:].split("@", 1)[0]


def dispatch_entities(
    txn: StoreTxn, state: CoreState, gateway: bytes, limit: int, now_ms: int, lease_ms: int, matches: Matcher = None
) -> list[tuple[str, bytes]]:
    """Lease up to `limit` entities with runnable operations; each gets one batch (EntityRequest)."""
    items: list[tuple[str, bytes]] = []
    walk = _Walk(state, "ent_cursor", matches)
    for seq, entity_id in txn.ent_ready_after(walk.start):
        if len(items) >= limit or not walk.tick(seq):
            walk.pause()
            break
        record = txn.get_entity(entity_id)
        if entity_id in state.ent_leases or record is None or record.get("rq") != seq:
            walk.passed(seq)
            continue
        if matches is not None and not matches(entity_name(entity_id), None):
            walk.left()
            continue
        batch = runnable_operations(record, txn.inbox_iter(entity_id))
        if not batch:
            walk.passed(seq)
            continue
        head = b"".join(
            (
                length_delimited(1, entity_id.encode("utf-8")),
                length_delimited(3, length_delimited(1, record["st"].encode("utf-8")))
                if record["st"] is not None
                else b"",
            )
        )
        operations, size = _fields_that_fit(4, batch, len(head) + _WORK_ITEM_FRAMING, state.max_work_item_bytes)
        if size > state.max_work_item_bytes:
            # Its state and its next operation together are more than a worker receives: that operation is
            # refused (in the next batch), as the stream would otherwise break on it again and again.
            state.oversized[("e", entity_id)] = {"op": "refuse_operation", "i": entity_id, "k": batch[0][0], "b": size}
            walk.left()
            continue
        batch = batch[: len(operations)]
        token = _new_token(state)
        request = head + b"".join(operations)
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
        walk.passed(seq)
        items.append((token, length_delimited(5, request) + length_delimited(10, token.encode())))
    else:
        walk.reached_end()
    return items


def matcher(spec: dict[str, list[str]] | None) -> Matcher:
    """A worker's filter for one kind: None accepts everything; else name -> versions ([] = any version)."""
    if spec is None:
        return None

    def matches(name: str, version: str | None) -> bool:
        versions = spec.get(name)
        return versions is not None and (not versions or (version or "") in versions)

    return matches


DISPATCHERS = {"o": dispatch_orchestrations, "a": dispatch_activities, "e": dispatch_entities}


def demand(txn: StoreTxn, state: CoreState) -> dict[str, int]:
    """Ready work not yet leased, per kind: what this partition asks the gateways for."""
    return {
        "o": max(0, txn.orch_ready_count() - len(state.orch_leases)),
        "a": max(0, txn.activity_count() - len(state.act_leases)),
        "e": max(0, txn.ent_ready_count() - len(state.ent_leases)),
    }
