"""The context one command is applied in: the write transaction, the clock value, state and actions."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from partitions.state_machine import actions as act
from partitions.state_machine import events as ev
from partitions.state_machine.state import CoreState
from partitions.store.keys import TIMER_ORCHESTRATION, entity_id_problem, orchestration_id_problem
from partitions.store.lmdb_store import StoreTxn
from protos import orchestrator_service_pb2 as pb
from runtime.hashing import partition_for

log = logging.getLogger(__name__)

Record = dict[str, Any]

WAKES_SUSPENDED = 1  # a resume: dispatch even though the instance is (still) marked suspended
WAKES_SCHEDULED = 2  # a terminate: dispatch even before the scheduled start time


def wake_of(raw: bytes) -> int:
    """How far a queued event lets its instance through a hold."""
    event = pb.HistoryEvent.FromString(raw)
    if event.HasField("executionTerminated"):
        return WAKES_SCHEDULED
    if event.HasField("executionResumed"):
        return WAKES_SUSPENDED
    return 0


def is_child_of(record: Record, parent_id: str) -> bool:
    """Whether `parent_id` started this instance. A parent's child list may name an id whose start failed
    because another instance had it: cascades (recursive terminate and purge) check this first."""
    parent = record.get("p")
    return bool(parent) and parent[0] == parent_id


@dataclass
class Ctx:
    txn: StoreTxn
    now_ms: int
    state: CoreState
    actions: list[Any] = field(default_factory=list)
    # Messages to instances of this partition, applied in this transaction once the handler that sent them
    # has finished (run_local): applied at once, they would load and save records that the sender still holds
    # in memory and saves after them, and the sender's stale copy would undo what they did.
    local: list[dict[str, Any]] = field(default_factory=list)

    # placement and messages to other partitions
    def owns(self, instance_id: str) -> bool:
        return partition_for(instance_id, self.state.partition_count) == self.state.partition

    def send_to_instance(self, instance_id: str, message: dict[str, Any]) -> None:
        """Deliver `message` to the partition owning `instance_id`: here in this transaction, once the current
        handler has finished, elsewhere via the outbox.

        The outbox row is written in this transaction, so the message leaves if and only if its cause
        commits; the receiver deduplicates by (sender, seq), which makes the effect exactly-once.
        """
        # Entities and orchestrations share the inbox, so each kind of message goes only to ids of its kind.
        is_for_entity = message.get("op") == "entity_msg"
        problem = (entity_id_problem if is_for_entity else orchestration_id_problem)(instance_id)
        if problem is not None:
            self._undeliverable(instance_id, problem, message)
            return
        message["i"] = instance_id
        destination = partition_for(instance_id, self.state.partition_count)
        if destination == self.state.partition:
            self.local.append(message)
            return
        seq = self.state.next_outbox_seq(destination)
        self.txn.put_outbox(destination, seq, message)
        self.actions.append(act.SendToPartition(destination))

    def run_local(self) -> None:
        """Apply the messages sent to instances of this partition, and those they send in turn, in order."""
        from partitions.state_machine import apply_internal  # local import: the dispatcher imports us

        for _ in range(1_000_000):
            if not self.local:
                return
            apply_internal(self, self.local.pop(0))
        raise RuntimeError("messages between instances of one partition did not come to an end")

    def report_to_parent(self, parent: list[Any], status: int, output: str | None = None, failure: bytes | None = None,
                         **extra: Any) -> None:
        """Tell the orchestration that started a sub-orchestration (`parent`: its id, execution id and the
        task id it waits on) how the child ended."""
        self.send_to_instance(parent[0], {
            "op": "child_done", "x": parent[1], "t": parent[2], "s": status, "out": output, "fd": failure, **extra,
        })

    def _undeliverable(self, instance_id: str, problem: str, message: dict[str, Any]) -> None:
        """No instance of the message's kind can have such an id: a sub-orchestration fails its parent's task,
        an entity call fails the caller's; the rest is dropped."""
        op = message.get("op")
        if op == "start_child":
            failure = ev.failure_details("InvalidInstanceId", f"the sub-orchestration id {problem}")
            self.report_to_parent(message["p"], ev.FAILED, failure=failure)
            return
        if op == "entity_msg":
            from partitions.state_machine.entities import (  # local import: entities imports us
                answer_call,
                unlock,
            )

            event = pb.HistoryEvent.FromString(message["ev"])
            if event.HasField("entityOperationCalled"):
                failure = pb.TaskFailureDetails(errorType="InvalidEntityId", isNonRetriable=True,
                                                errorMessage=f"the entity id '{instance_id}' {problem}")
                answer_call(self, event.entityOperationCalled, None, failure)
                return
            if event.HasField("entityLockRequested"):  # (lock sets are checked whole when asked for; not older ones)
                request = event.entityLockRequested
                unlock(self, request.parentInstanceId.value, request.criticalSectionId,
                       request.lockSet[:request.position])  # the entities before it are locked: free them
        log.warning("partition %d: dropped a %r message to %r: the id %s", self.state.partition, op, instance_id,
                    problem)

    # instances
    def load(self, instance_id: str) -> Record | None:
        return self.txn.get_instance(instance_id)

    def save(self, instance_id: str, record: Record) -> None:
        """Write the record and keep its secondary-index rows in step with it."""
        record["u"] = self.now_ms
        indexed = [record["s"], record["c"], record.get("d") or 0]
        self.txn.index_instance(instance_id, record.get("ix"), indexed)
        record["ix"] = indexed
        self.txn.put_instance(instance_id, record)

    def set_status(self, instance_id: str, record: Record, status: int) -> None:
        if record["s"] != status:
            record["s"] = status
            self.actions.append(act.StatusChanged(instance_id))

    def enqueue_event(self, instance_id: str, record: Record, event: bytes, wakes: int = 0) -> None:
        """Append a new event to the instance's inbox and make it ready if it may run.

        `wakes` lets an event through a hold: WAKES_SUSPENDED (resume) reaches a suspended instance,
        WAKES_SCHEDULED (terminate) also one whose scheduled start lies ahead.
        """
        self.txn.put_inbox(instance_id, self.state.next_seq(), event)
        if wakes > record.get("wk", 0):
            record["wk"] = wakes
        self.mark_ready(instance_id, record)

    def mark_ready(self, instance_id: str, record: Record) -> None:
        """Queue the instance for dispatch unless it is queued already, suspended, or scheduled for later."""
        if record.get("rq") or record["s"] in ev.TERMINAL:
            return
        wakes = record.get("wk", 0)
        if record["s"] == ev.SUSPENDED and wakes < WAKES_SUSPENDED:
            return
        if record.get("hu", 0) > self.now_ms and wakes < WAKES_SCHEDULED:
            return
        seq = self.state.next_seq()
        self.txn.put_orch_ready(seq, instance_id)
        record["rq"] = seq
        self.actions.append(act.WorkAvailable())

    def queue_activity(self, activity: dict[str, Any]) -> None:
        self.txn.put_activity(self.state.next_seq(), activity)
        self.actions.append(act.WorkAvailable())

    def schedule_timer(
        self, fire_ms: int, instance_id: str, timer_id: int, row: dict[str, Any], kind: int = TIMER_ORCHESTRATION
    ) -> None:
        self.txn.put_timer(fire_ms, instance_id, timer_id, row, kind)
        self.actions.append(act.TimerScheduled(fire_ms))

    def unqueue(self, record: Record) -> None:
        if record.get("rq"):
            self.txn.delete_orch_ready(record["rq"])
            record["rq"] = 0

    def reply(self, cmd: dict[str, Any], result: Any = None) -> None:
        if "rid" in cmd:
            self.actions.append(act.Reply(cmd["_from"], cmd["rid"], result))
