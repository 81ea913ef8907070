"""Messages between partitions: outbox rows, in-order delivery with dedup, acks that delete rows."""

from __future__ import annotations

import pytest

from partitions.state_machine import actions as act
from partitions.store import keys
from protos import orchestrator_service_pb2 as pb
from tests.unit.conftest import (
    COMPLETED,
    CONTINUED_AS_NEW,
    FAILED,
    PENDING,
    Core,
    complete,
    create_sub,
    deliver,
    id_on,
    kinds,
    of_type,
    send_event,
)


def _raise(target: str, name: str) -> dict:
    return {"op": "raise", "i": target, "n": name, "in": None, "quiet": True}


def _deliver(core: Core, sender: int, msgs: list) -> list:
    return core.apply({"op": "deliver", "from": sender, "msgs": msgs})


@pytest.fixture
def target(pair):
    """A running instance on partition 1."""
    _, p1 = pair
    instance_id = id_on(1, 2, "target")
    p1.start(instance_id)
    p1.run_first(instance_id)
    return instance_id


def _raised_names(core: Core, instance_id: str) -> list[str]:
    return [e.eventRaised.name for e in core.inbox(instance_id) if e.HasField("eventRaised")]


# the sending side


def test_outbox_rows_are_numbered_per_destination_and_the_counter_is_saved(pair):
    p0, _ = pair
    sender = id_on(0, 2, "s")
    t1, t2 = id_on(1, 2, "t"), id_on(1, 2, "u")
    p0.start(sender)
    actions = p0.run_first(sender, [send_event(1, t1, "a"), send_event(2, t2, "b")])

    assert of_type(actions, act.SendToPartition) == [act.SendToPartition(1), act.SendToPartition(1)]
    assert [(seq, m["i"], m["n"]) for seq, m in p0.outbox(1)] == [(1, t1, "a"), (2, t2, "b")]
    with p0.read() as txn:
        assert keys.unpack_u64(txn.get_meta(keys.outbox_seq_meta_key(1))) == 2


# the receiving side


def test_delivery_applies_messages_in_order_records_the_seq_and_acks(pair, target):
    _, p1 = pair
    actions = _deliver(p1, 0, [[1, _raise(target, "e1")], [2, _raise(target, "e2")]])

    assert _raised_names(p1, target) == ["e1", "e2"]
    assert p1.dedup(0) == 2
    assert of_type(actions, act.AckPartition) == [act.AckPartition(0, 2)]


def test_duplicates_are_skipped_and_acked_again(pair, target):
    _, p1 = pair
    _deliver(p1, 0, [[1, _raise(target, "e1")], [2, _raise(target, "e2")]])

    actions = _deliver(p1, 0, [[1, _raise(target, "e1")], [2, _raise(target, "e2")]])
    assert _raised_names(p1, target) == ["e1", "e2"]
    assert of_type(actions, act.AckPartition) == [act.AckPartition(0, 2)]

    # a resend that overlaps: only the new tail is applied
    _deliver(p1, 0, [[2, _raise(target, "e2")], [3, _raise(target, "e3")]])
    assert _raised_names(p1, target) == ["e1", "e2", "e3"]
    assert p1.dedup(0) == 3


def test_delivery_stops_at_a_gap(pair, target):
    _, p1 = pair
    actions = _deliver(
        p1, 0, [[1, _raise(target, "e1")], [3, _raise(target, "e3")], [4, _raise(target, "e4")]]
    )

    assert _raised_names(p1, target) == ["e1"]
    assert p1.dedup(0) == 1
    assert of_type(actions, act.AckPartition) == [act.AckPartition(0, 1)]

    actions = _deliver(p1, 0, [[3, _raise(target, "e3")]])  # 2 still missing
    assert _raised_names(p1, target) == ["e1"]
    assert of_type(actions, act.AckPartition) == [act.AckPartition(0, 1)]

    _deliver(p1, 0, [[2, _raise(target, "e2")], [3, _raise(target, "e3")]])
    assert _raised_names(p1, target) == ["e1", "e2", "e3"]


def test_dedup_is_per_sender(tmp_path):
    p2 = Core(str(tmp_path / "p2"), partition=2, partition_count=3)
    target = id_on(2, 3, "t")
    p2.start(target)
    _deliver(p2, 0, [[1, _raise(target, "from0")]])
    _deliver(p2, 1, [[1, _raise(target, "from1")]])
    assert _raised_names(p2, target) == ["from0", "from1"]
    assert (p2.dedup(0), p2.dedup(1)) == (1, 1)
    p2.close()


def test_dedup_survives_reopening_the_store(tmp_path):
    path = str(tmp_path / "p1")
    p1 = Core(path, partition=1, partition_count=2)
    target = id_on(1, 2, "t")
    p1.start(target)
    _deliver(p1, 0, [[1, _raise(target, "e1")]])
    p1.close()

    p1 = Core(path, partition=1, partition_count=2)
    _deliver(p1, 0, [[1, _raise(target, "e1")]])
    assert _raised_names(p1, target) == ["e1"]
    p1.close()


# acks


def test_acked_deletes_rows_up_to_the_seq(pair):
    p0, _ = pair
    sender = id_on(0, 2, "s")
    p0.start(sender)
    p0.run_first(sender, [send_event(i, id_on(1, 2, f"t{i}"), "e") for i in range(1, 4)])

    p0.apply({"op": "acked", "dest": 1, "seq": 2})

    assert [seq for seq, _ in p0.outbox(1)] == [3]


def test_acked_for_one_destination_leaves_the_others(tmp_path):
    p0 = Core(str(tmp_path / "p0"), partition=0, partition_count=3)
    sender = id_on(0, 3, "s")
    p0.start(sender)
    p0.run_first(sender, [send_event(1, id_on(1, 3, "a"), "e"), send_event(2, id_on(2, 3, "b"), "e")])

    p0.apply({"op": "acked", "dest": 1, "seq": 1})

    assert p0.outbox(1) == []
    assert [seq for seq, _ in p0.outbox(2)] == [1]
    p0.close()


def test_acked_deletes_the_last_rows_of_the_outbox(pair):
    p0, _ = pair
    sender = id_on(0, 2, "s")
    p0.start(sender)
    p0.run_first(sender, [send_event(1, id_on(1, 2, "t"), "e"), send_event(2, id_on(1, 2, "u"), "e")])

    p0.apply({"op": "acked", "dest": 1, "seq": 2})

    assert p0.outbox(1) == []


# whole round trips through two stores


def test_child_on_another_partition_is_created_and_reports_back(pair):
    p0, p1 = pair
    parent, child = id_on(0, 2, "parent"), id_on(1, 2, "child")
    p0.start(parent, name="P", x="px")
    p0.run_first(parent, [create_sub(4, "Child", child, '"ci"')])

    actions = deliver(p0, p1)
    assert of_type(actions, act.AckPartition) == [act.AckPartition(0, 1)]
    record = p1.record(child)
    assert record["s"] == PENDING
    assert record["p"] == [parent, "px", 4, "P", None]
    _, request = p1.dispatch_one(child)
    started = request.newEvents[1].executionStarted
    assert started.parentInstance.taskScheduledId == 4
    assert started.parentInstance.orchestrationInstance.instanceId == parent
    assert started.input.value == '"ci"'

    p1.complete_orch(child, p1.state.orch_leases[child].token, [complete(0, COMPLETED, '"co"')])
    actions = deliver(p1, p0)
    assert of_type(actions, act.AckPartition) == [act.AckPartition(1, 1)]
    [done] = p0.inbox(parent)
    assert done.subOrchestrationInstanceCompleted.taskScheduledId == 4
    assert done.subOrchestrationInstanceCompleted.result.value == '"co"'
    _, request = p0.dispatch_one(parent)
    assert kinds(request.newEvents) == ["orchestratorStarted", "subOrchestrationInstanceCompleted"]


def test_start_child_for_a_running_id_fails_the_parents_task(pair):
    p0, p1 = pair
    parent, child = id_on(0, 2, "parent"), id_on(1, 2, "child")
    p1.start(child)  # already running under the same id
    p0.start(parent, x="px")
    p0.run_first(parent, [create_sub(6, "Child", child)])

    deliver(p0, p1)

    assert len(p1.inbox(child)) == 1  # untouched
    [(_, message)] = p1.outbox(0)
    assert (message["op"], message["i"], message["t"], message["s"]) == ("child_done", parent, 6, FAILED)
    deliver(p1, p0)
    [failed] = p0.inbox(parent)
    assert failed.subOrchestrationInstanceFailed.taskScheduledId == 6
    assert failed.subOrchestrationInstanceFailed.failureDetails.errorType == "InstanceAlreadyExists"


def test_failed_child_can_be_created_again_under_the_same_id(pair):
    p0, p1 = pair
    parent, child = id_on(0, 2, "parent"), id_on(1, 2, "child")
    p0.start(parent, x="px")
    p0.run_first(parent, [create_sub(1, "Child", child)])
    deliver(p0, p1)
    p1.run_first(child, [complete(0, FAILED, failure=pb.TaskFailureDetails(errorType="E"))])
    deliver(p1, p0)
    p0.run_first(parent, [create_sub(1, "Child", child)])  # the SDK's retry reuses the id

    deliver(p0, p1)

    assert p1.status(child) == PENDING
    assert p1.history(child) == []
    assert kinds(p1.inbox(child)) == ["executionStarted"]


def test_child_done_for_an_earlier_parent_execution_is_dropped(pair):
    p0, _ = pair
    parent = id_on(0, 2, "parent")
    p0.start(parent, x="px")
    p0.run_first(parent)
    p0.request({"op": "raise", "i": parent, "n": "e"})
    p0.run_first(parent, [complete(0, CONTINUED_AS_NEW, '"n"')])
    inbox = p0.inbox(parent)

    _deliver(p0, 1, [[1, {"op": "child_done", "i": parent, "x": "px", "t": 1, "s": COMPLETED, "out": None}]])

    assert p0.inbox(parent) == inbox
    assert p0.dedup(1) == 1  # still counted as applied


# DeleteTaskHub / CreateTaskHub(recreateIfExists): messages whose causes a wipe removed


def test_a_wipe_voids_the_unacknowledged_outbox_and_the_receiver_applies_nothing_of_it(pair, target):
    p0, p1 = pair
    sender = id_on(0, 2, "s")
    p0.start(sender)
    p0.run_first(sender, [send_event(1, target, "before-the-wipe")])
    p0.request({"op": "wipe", "gen": 5})

    rows = p0.outbox(1)
    assert rows == [(1, {"op": "void"})]  # numbering kept: the receiver's stream has no gap
    actions = _deliver(p1, 0, [[seq, body] for seq, body in rows])
    assert _raised_names(p1, target) == []
    assert p1.dedup(0) == 1
    assert of_type(actions, act.AckPartition) == [act.AckPartition(0, 1)]


def test_a_delivery_sent_before_a_wipe_the_receiver_applied_is_acknowledged_not_applied(pair):
    p0, p1 = pair
    p1.request({"op": "wipe", "gen": 7})
    child = id_on(1, 2, "child")
    late = {"op": "start_orch", "i": child, "n": "Orch", "quiet": True}  # written by p0 before its own wipe

    actions = p1.apply({"op": "deliver", "from": 0, "gen": 6, "msgs": [[1, late]]})
    assert p1.record(child) is None
    assert p1.dedup(0) == 1
    assert of_type(actions, act.AckPartition) == [act.AckPartition(0, 1)]

    # After p0's wipe its deliveries carry the new generation, and they are applied as usual.
    fresh = {"op": "raise", "i": child, "n": "x", "in": None, "quiet": True}
    p1.start(child)
    p1.apply({"op": "deliver", "from": 0, "gen": 7, "msgs": [[2, fresh]]})
    assert _raised_names(p1, child) == ["x"]
    with p1.read() as txn:
        assert keys.unpack_u64(txn.get_meta(keys.META_HUB_GENERATION)) == 7
