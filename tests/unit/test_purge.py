"""PurgeInstance by id: only terminal instances are deleted; recursive purge reaches the children."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from protos import orchestrator_service_pb2 as pb
from runtime.config import Config
from runtime.gateway.management import Management
from tests.unit.conftest import (
    COMPLETED,
    FAILED,
    RUNNING,
    TERMINATED,
    Core,
    complete,
    create_sub,
    id_on,
    replies,
    schedule_task,
)


def _result(actions):
    [reply] = replies(actions)
    return reply.result


def test_purge_of_a_running_instance_deletes_nothing(core):
    core.start("a")
    core.run_first("a")
    core.request({"op": "raise", "i": "a", "n": "e"})
    before = (core.record("a"), core.history("a"), core.inbox("a"), core.ready())

    assert _result(core.request({"op": "purge", "i": "a"})) == {"deleted": 0}
    assert (core.record("a"), core.history("a"), core.inbox("a"), core.ready()) == before


def test_purge_of_an_unknown_instance_deletes_nothing(core):
    assert _result(core.request({"op": "purge", "i": "nobody"})) == {"deleted": 0}


def test_purge_of_a_completed_instance_deletes_record_history_and_inbox(core):
    core.start("a")
    core.start("other")
    token = core.dispatch_tokens()["a"]
    core.complete_orch("a", token, [complete(0, COMPLETED, '"r"')])
    assert core.history("a")

    assert _result(core.request({"op": "purge", "i": "a"})) == {"deleted": 1}

    assert core.record("a") is None
    assert core.history("a") == []
    assert core.inbox("a") == []
    assert "a" not in core.ready()
    assert core.record("other") is not None  # neighbours untouched
    assert len(core.inbox("other")) == 1
    # the id can be used again afterwards
    core.start("a")
    assert core.history("a") == []


def test_late_activity_result_after_purge_is_dropped(core):
    core.start("a")
    core.run_first("a", [schedule_task(1, "Act"), complete(2, FAILED)])
    [(token, _)] = core.dispatch_act()
    core.request({"op": "purge", "i": "a"})

    core.complete_act("a", 1, token, result='"late"')

    assert core.record("a") is None
    assert core.inbox("a") == []


def test_get_children_lists_sub_orchestrations_and_purge_removes_only_the_named_instance(pair):
    """Recursive purge is driven by the gateway: the partition reports children, then purges one id."""
    p0, _ = pair
    parent = id_on(0, 2, "parent")
    local_child, remote_child = id_on(0, 2, "lc"), id_on(1, 2, "rc")
    p0.start(parent)
    p0.run_first(parent, [create_sub(1, "C", local_child), create_sub(2, "C", remote_child)])
    p0.complete_orch(local_child, p0.dispatch_tokens()[local_child], [complete(0, COMPLETED)])
    p0.run_first(parent, [complete(0, COMPLETED)])
    rows_before = len(p0.outbox(1))

    execution = p0.record(parent)["x"]
    info = _result(p0.request({"op": "get_children", "i": parent}))
    actions = p0.request({"op": "purge", "i": parent, "r": True})

    assert info == {"s": COMPLETED, "ch": [local_child, remote_child], "x": execution}
    assert _result(actions) == {"deleted": 1}
    assert p0.record(parent) is None
    assert p0.record(local_child) is not None  # the gateway purges each child with its own request
    assert len(p0.outbox(1)) == rows_before  # no cascade through the outbox


def test_get_children_of_unknown_instance_is_none(core):
    assert _result(core.request({"op": "get_children", "i": "nobody"})) is None


def test_recursive_purge_leaves_a_running_child(core):
    core.start("parent")
    core.run_first("parent", [create_sub(1, "C")])
    core.request({"op": "terminate", "i": "parent"})
    core.complete_orch("parent", core.dispatch_tokens()["parent"], [])
    assert core.status("parent") == TERMINATED

    core.request({"op": "purge", "i": "parent", "r": True})

    assert core.record("parent") is None
    assert core.record("parent:0001") is not None  # still running: never purged


def test_non_recursive_purge_leaves_children(core):
    core.start("parent")
    core.run_first("parent", [create_sub(1, "C")])
    child_token = core.dispatch_tokens()["parent:0001"]
    core.complete_orch("parent:0001", child_token, [complete(0, COMPLETED)])
    core.run_first("parent", [complete(0, COMPLETED)])

    core.request({"op": "purge", "i": "parent"})

    assert core.record("parent") is None
    assert core.record("parent:0001") is not None


def test_a_recursive_purge_only_reaches_children_their_parent_started(pair):
    """A child list can name an id whose start failed because another instance had it: asked on behalf of a
    parent (`pp`), the partition treats an instance that parent did not start as absent."""
    p0, _ = pair
    parent, child, stranger = id_on(0, 2, "parent"), id_on(0, 2, "child"), id_on(0, 2, "stranger")
    p0.start(stranger)
    p0.run_first(stranger, [complete(0, COMPLETED)])
    p0.start(parent)
    p0.run_first(parent, [create_sub(1, "C", child)])
    p0.complete_orch(child, p0.dispatch_tokens()[child], [complete(0, COMPLETED)])

    assert _result(p0.request({"op": "get_children", "i": stranger, "pp": parent})) is None
    assert _result(p0.request({"op": "purge", "i": stranger, "pp": parent})) == {"deleted": 0}
    assert p0.record(stranger) is not None
    assert _result(p0.request({"op": "get_children", "i": child, "pp": parent})) == {
        "s": COMPLETED, "ch": [], "x": p0.record(child)["x"]}
    assert _result(p0.request({"op": "purge", "i": child, "pp": parent})) == {"deleted": 1}


def _failed_parent_with_failed_child(core):
    core.start("parent")
    core.run_first("parent", [create_sub(1, "C")])
    core.complete_orch("parent:0001", core.dispatch_tokens()["parent:0001"], [complete(0, FAILED)])
    core.run_first("parent", [complete(0, FAILED)])
    assert (core.status("parent"), core.status("parent:0001")) == (FAILED, FAILED)


def test_a_recursive_purge_keeps_an_instance_that_runs_again_since_the_walk(core):
    """The gateway's walk saw the tree finished; a rewind came before the purge reached the child."""
    _failed_parent_with_failed_child(core)
    core.request({"op": "rewind", "i": "parent:0001"})

    purge = {"op": "purge", "i": "parent:0001", "pp": "parent", "seen": []}

    assert _result(core.request(purge)) == {"deleted": 0, "kept": 1}
    assert core.status("parent:0001") == RUNNING


def test_a_recursive_purge_keeps_an_instance_with_a_child_the_walk_did_not_see(core):
    _failed_parent_with_failed_child(core)

    assert _result(core.request({"op": "purge", "i": "parent", "seen": []})) == {"deleted": 0, "kept": 1}
    assert core.record("parent") is not None
    assert _result(core.request({"op": "purge", "i": "parent", "seen": ["parent:0001"]})) == {"deleted": 1}
    assert core.record("parent") is None


class InProcessPartitions:
    """The gateway's partition client, over one partition's core in this process: the same commands and
    replies as over ZeroMQ. `before(command)` runs just before each command is applied."""

    def __init__(self, core: Core, before: Callable[[dict[str, Any]], None] = lambda command: None) -> None:
        self.core = core
        self.before = before

    def partition_of(self, instance_id: str) -> int:
        return 0

    async def request(self, partition: int, message: dict[str, Any], timeout_s: float) -> Any:
        self.before(message)
        [reply] = replies(self.core.request(message))
        return reply.result


def _purge_recursively(core: Core, tmp_path, before=lambda command: None) -> pb.PurgeInstancesResponse:
    management = Management(Config(data_dir=str(tmp_path / "data"), partitions=1), InProcessPartitions(core, before))
    request = pb.PurgeInstancesRequest(instanceId="parent", recursive=True)
    return asyncio.run(management.purge(request, timeout=10.0))


def test_the_gateway_purges_a_finished_tree_whole(core, tmp_path):
    _failed_parent_with_failed_child(core)

    response = _purge_recursively(core, tmp_path)

    assert (response.deletedInstanceCount, response.isComplete.value) == (2, True)
    assert core.record("parent") is None and core.record("parent:0001") is None


def test_a_child_rewound_between_the_walk_and_its_purge_keeps_its_parent(core, tmp_path):
    """Purging the parent would leave the running child where no recursive purge reaches it."""
    _failed_parent_with_failed_child(core)

    def rewind_the_child_first(command: dict[str, Any]) -> None:
        if command["op"] == "purge" and command["i"] == "parent:0001":
            core.request({"op": "rewind", "i": "parent:0001"})

    response = _purge_recursively(core, tmp_path, rewind_the_child_first)

    assert (response.deletedInstanceCount, response.isComplete.value) == (0, False)
    assert core.status("parent") == FAILED
    assert core.status("parent:0001") == RUNNING


def test_a_recursive_purge_keeps_an_instance_that_ran_again_since_the_walk(core):
    """Restarted (or replaced) and ended again between the walk and the purge: the same status and child ids,
    but a new execution, whose child may still be on its way."""
    _failed_parent_with_failed_child(core)
    walked = _result(core.request({"op": "get_children", "i": "parent"}))
    core.request({"op": "restart", "i": "parent", "x": "x-again"})
    core.run_first("parent", [complete(0, FAILED)])

    purge = {"op": "purge", "i": "parent", "seen": walked["ch"], "sx": walked["x"]}

    assert _result(core.request(purge)) == {"deleted": 0, "kept": 1}
    assert core.record("parent") is not None


def test_a_tree_deeper_than_the_walk_goes_is_kept_whole(core, tmp_path, monkeypatch):
    """The walk stops at a depth; the instance whose children it did not walk is kept, with its ancestors,
    rather than leaving those children where no recursive purge reaches them."""
    from runtime.gateway import management

    monkeypatch.setattr(management, "_MAX_PURGE_DEPTH", 1)
    core.start("parent")
    core.run_first("parent", [create_sub(1, "C")])
    core.run_first("parent:0001", [create_sub(1, "C")])
    core.run_first("parent:0001:0001", [complete(0, COMPLETED)])
    core.run_first("parent:0001", [complete(2, COMPLETED)])
    core.run_first("parent", [complete(2, COMPLETED)])

    response = _purge_recursively(core, tmp_path)

    assert (response.deletedInstanceCount, response.isComplete.value) == (0, False)
    assert all(core.record(i) is not None for i in ("parent", "parent:0001", "parent:0001:0001"))
