"""Shared fixtures for the unit tests: drive the deterministic core over a real LMDB store.

`Core` mirrors how `partitions.process` drives the core: one write transaction, a nested child
transaction per command, `state.save_counters` before the commit; dispatch runs in a read
transaction after the commit. Only `protos.orchestrator_service_pb2` is used (never durabletask's).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from google.protobuf import timestamp_pb2, wrappers_pb2

from partitions import dispatch
from partitions.process import PartitionProcess
from partitions.state_machine import actions as act
from partitions.state_machine import apply
from partitions.state_machine.state import CoreState
from partitions.store import keys
from partitions.store.lmdb_store import LmdbStore, StoreTxn, unpack
from protos import orchestrator_service_pb2 as pb
from runtime.config import Config
from runtime.hashing import partition_for

T0 = 1_700_000_000_000  # a fixed "now" in ms; tests advance it explicitly
GATEWAY = b"g-test"
LEASE_MS = 30_000

RUNNING = pb.ORCHESTRATION_STATUS_RUNNING
COMPLETED = pb.ORCHESTRATION_STATUS_COMPLETED
CONTINUED_AS_NEW = pb.ORCHESTRATION_STATUS_CONTINUED_AS_NEW
FAILED = pb.ORCHESTRATION_STATUS_FAILED
TERMINATED = pb.ORCHESTRATION_STATUS_TERMINATED
PENDING = pb.ORCHESTRATION_STATUS_PENDING
SUSPENDED = pb.ORCHESTRATION_STATUS_SUSPENDED


# ---------------------------------------------------------------------------
# ids and event helpers
# ---------------------------------------------------------------------------


def id_on(partition: int, partition_count: int, prefix: str = "inst") -> str:
    """The first `<prefix>-<n>` that hashes to `partition`."""
    n = 0
    while partition_for(f"{prefix}-{n}", partition_count) != partition:
        n += 1
    return f"{prefix}-{n}"


def kind(event: pb.HistoryEvent) -> str:
    return event.WhichOneof("eventType")


def kinds(events: Iterable[pb.HistoryEvent]) -> list[str]:
    return [kind(e) for e in events]


def ts(ms: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def ms_of(value: timestamp_pb2.Timestamp) -> int:
    return value.seconds * 1000 + value.nanos // 1_000_000


def sv(value: str | None) -> wrappers_pb2.StringValue | None:
    return None if value is None else wrappers_pb2.StringValue(value=value)


def of_type(actions: Iterable[Any], cls: type) -> list[Any]:
    return [a for a in actions if isinstance(a, cls)]


# ---------------------------------------------------------------------------
# orchestrator actions (what an SDK worker sends back)
# ---------------------------------------------------------------------------


def schedule_task(action_id: int, name: str, data: str | None = None) -> pb.OrchestratorAction:
    return pb.OrchestratorAction(id=action_id, scheduleTask=pb.ScheduleTaskAction(name=name, input=sv(data)))


def create_timer(action_id: int, fire_ms: int) -> pb.OrchestratorAction:
    return pb.OrchestratorAction(id=action_id, createTimer=pb.CreateTimerAction(fireAt=ts(fire_ms)))


def create_sub(
    action_id: int, name: str, instance_id: str = "", data: str | None = None
) -> pb.OrchestratorAction:
    sub = pb.CreateSubOrchestrationAction(instanceId=instance_id, name=name, input=sv(data))
    return pb.OrchestratorAction(id=action_id, createSubOrchestration=sub)


def send_event(action_id: int, target: str, name: str, data: str | None = None) -> pb.OrchestratorAction:
    send = pb.SendEventAction(instance=pb.OrchestrationInstance(instanceId=target), name=name, data=sv(data))
    return pb.OrchestratorAction(id=action_id, sendEvent=send)


def complete(
    action_id: int,
    status: int = COMPLETED,
    result: str | None = None,
    failure: pb.TaskFailureDetails | None = None,
    carryover: Iterable[pb.HistoryEvent] = (),
) -> pb.OrchestratorAction:
    done = pb.CompleteOrchestrationAction(
        orchestrationStatus=status, result=sv(result), failureDetails=failure, carryoverEvents=list(carryover)
    )
    return pb.OrchestratorAction(id=action_id, completeOrchestration=done)


def raised_event(name: str, data: str | None = None) -> pb.HistoryEvent:
    return pb.HistoryEvent(
        eventId=-1, timestamp=ts(T0), eventRaised=pb.EventRaisedEvent(name=name, input=sv(data))
    )


# ---------------------------------------------------------------------------
# the core over a real store
# ---------------------------------------------------------------------------


class Core:
    """One partition's core over a real LMDB store in a tmp dir."""

    def __init__(self, path: str, partition: int = 0, partition_count: int = 1, now_ms: int = T0) -> None:
        self.store = LmdbStore(path, 1 << 26)
        self.state = CoreState(partition=partition, partition_count=partition_count, epoch=1)
        self.now = now_ms
        self.next_rid = 0

    def close(self) -> None:
        self.store.close()

    # applying commands
    def apply(self, command: dict[str, Any], now: int | None = None) -> list[Any]:
        """Apply `command` like `PartitionProcess.apply_batch` does, commit, and return its actions.

        On an error the child transaction and the counters roll back, the outer transaction still
        commits (as in the process), and the error propagates.
        """
        now = self.now if now is None else now
        txn = self.store.begin(write=True)
        child = txn.child()
        counters = self.state.snapshot_counters()
        try:
            actions = apply(child, command, now, self.state)
            child.commit()
        except BaseException:
            child.abort()
            self.state.restore_counters(counters)
            self.state.save_counters(txn)
            txn.commit()
            raise
        self.state.save_counters(txn)
        txn.commit()
        return actions

    def request(self, command: dict[str, Any], now: int | None = None) -> list[Any]:
        """A command that expects a Reply (carries `rid` and `_from`, as from a gateway)."""
        self.next_rid += 1
        return self.apply({**command, "rid": self.next_rid, "_from": GATEWAY}, now)

    def start(self, instance_id: str, name: str = "Orch", data: str | None = None, **extra: Any) -> list[Any]:
        return self.request({"op": "start", "i": instance_id, "n": name, "in": data, **extra})

    def complete_orch(
        self,
        instance_id: str,
        token: str,
        actions: Iterable[pb.OrchestratorAction] = (),
        custom_status: str | None = None,
        now: int | None = None,
    ) -> list[Any]:
        response = pb.OrchestratorResponse(
            instanceId=instance_id,
            actions=list(actions),
            completionToken=token,
            customStatus=sv(custom_status),
        )
        command = {
            "op": "complete_orch",
            "i": instance_id,
            "tok": token,
            "resp": response.SerializeToString(),
        }
        return self.request(command, now)

    def complete_act(
        self,
        instance_id: str,
        task_id: int,
        token: str,
        result: str | None = None,
        failure: pb.TaskFailureDetails | None = None,
    ) -> list[Any]:
        command = {
            "op": "complete_act",
            "i": instance_id,
            "t": task_id,
            "tok": token,
            "out": result,
            "fd": None if failure is None else failure.SerializeToString(),
        }
        return self.request(command)

    # dispatch (a read transaction after the commit, as in the process)
    def dispatch_orch(self, limit: int = 100, now: int | None = None) -> list[tuple[str, pb.WorkItem]]:
        return self._dispatch("o", limit, now)

    def dispatch_act(self, limit: int = 100, now: int | None = None) -> list[tuple[str, pb.WorkItem]]:
        return self._dispatch("a", limit, now)

    def dispatch_ent(self, limit: int = 100, now: int | None = None) -> list[tuple[str, pb.WorkItem]]:
        return self._dispatch("e", limit, now)

    def _dispatch(self, kind: str, limit: int, now: int | None) -> list[tuple[str, pb.WorkItem]]:
        with self.read() as txn:
            items = dispatch.DISPATCHERS[kind](
                txn, self.state, GATEWAY, limit, self.now if now is None else now, LEASE_MS
            )
        return [(token, pb.WorkItem.FromString(raw)) for token, raw in items]

    def dispatch_one(self, instance_id: str) -> tuple[str, pb.OrchestratorRequest]:
        """Dispatch and return the single orchestrator work item, which must be for `instance_id`."""
        items = self.dispatch_orch()
        assert len(items) == 1, f"expected one work item, got {len(items)}"
        token, item = items[0]
        assert item.WhichOneof("request") == "orchestratorRequest"
        assert item.completionToken == token
        assert item.orchestratorRequest.instanceId == instance_id
        return token, item.orchestratorRequest

    def dispatch_tokens(self) -> dict[str, str]:
        """Dispatch every ready orchestration: instance id -> completion token."""
        return {item.orchestratorRequest.instanceId: token for token, item in self.dispatch_orch()}

    def run_first(self, instance_id: str, actions: Iterable[pb.OrchestratorAction] = ()) -> list[Any]:
        """Dispatch the instance's work item and complete it with `actions`."""
        token, _ = self.dispatch_one(instance_id)
        return self.complete_orch(instance_id, token, actions)

    def demand(self) -> dict[str, int]:
        with self.read() as txn:
            return dispatch.demand(txn, self.state)

    # reading what is stored
    @contextmanager
    def read(self) -> Iterator[StoreTxn]:
        txn = self.store.begin()
        try:
            yield txn
        finally:
            txn.abort()

    def record(self, instance_id: str) -> dict[str, Any] | None:
        with self.read() as txn:
            return txn.get_instance(instance_id)

    def status(self, instance_id: str) -> int:
        record = self.record(instance_id)
        assert record is not None, f"no record for {instance_id}"
        return record["s"]

    def history(self, instance_id: str) -> list[pb.HistoryEvent]:
        with self.read() as txn:
            return [pb.HistoryEvent.FromString(raw) for raw in txn.history(instance_id)]

    def inbox(self, instance_id: str) -> list[pb.HistoryEvent]:
        with self.read() as txn:
            return [pb.HistoryEvent.FromString(raw) for _, raw in txn.inbox(instance_id)]

    def timers(self) -> list[tuple[int, str, int, dict[str, Any]]]:
        """(fire_ms, instance id, timer id, row) for every stored timer."""
        with self.read() as txn:
            return [(f, i, t, row) for _, f, _kind, i, t, row in txn.due_timers(2**63 - 1, 10**6)]

    def outbox(self, destination: int) -> list[tuple[int, dict[str, Any]]]:
        with self.read() as txn:
            return txn.outbox_from(destination, 0, 10**6)

    def activities(self) -> list[dict[str, Any]]:
        with self.read() as txn:
            return [a for _, a in txn.activities_after(0)]

    def ready(self) -> list[str]:
        with self.read() as txn:
            return [i for _, i in txn.orch_ready_after(0)]

    def dedup(self, sender: int) -> int:
        with self.read() as txn:
            return txn.get_dedup(sender)

    def meta_seq(self) -> int:
        with self.read() as txn:
            raw = txn.get_meta(keys.META_SEQ)
            return keys.unpack_u64(raw) if raw else 0

    def raw_table(self, name: str) -> list[tuple[bytes, Any]]:
        with self.read() as txn:
            cur = txn.txn.cursor(db=txn.dbs[name])
            return [(k, unpack(v) if name in ("instances", "act_ready", "outbox") else v) for k, v in cur]


def replies(actions: Iterable[Any]) -> list[act.Reply]:
    return of_type(actions, act.Reply)


@pytest.fixture
def process(tmp_path) -> Iterator[PartitionProcess]:
    """A whole partition process object (store, claim, ZeroMQ context), not started: tests call its parts."""
    config = Config(data_dir=str(tmp_path / "data"), partitions=1, gateway_timeout_s=10.0)
    process = PartitionProcess(config, 0)
    try:
        yield process
    finally:
        if process.channel is not None:
            process.channel.close()
        process.store.close()
        os.close(process.claim)
        process.ctx.term()


@pytest.fixture
def core(tmp_path) -> Iterator[Core]:
    """Partition 0 of 1: every instance is local."""
    c = Core(str(tmp_path / "p0"))
    yield c
    c.close()


@pytest.fixture
def pair(tmp_path) -> Iterator[tuple[Core, Core]]:
    """Partitions 0 and 1 of 2, each with its own store."""
    a = Core(str(tmp_path / "p0"), partition=0, partition_count=2)
    b = Core(str(tmp_path / "p1"), partition=1, partition_count=2)
    yield a, b
    a.close()
    b.close()


def deliver(sender: Core, receiver: Core, now: int | None = None) -> list[Any]:
    """Carry every row in `sender`'s outbox for `receiver` over in one 'deliver', as the outbox sends them.

    The ack is left to the caller: apply `{"op": "acked", ...}` on the sender to delete the rows.
    """
    rows = sender.outbox(receiver.state.partition)
    command = {"op": "deliver", "from": sender.state.partition, "msgs": [[seq, body] for seq, body in rows]}
    return receiver.apply(command, now)
