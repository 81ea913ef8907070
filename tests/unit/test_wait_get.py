"""GetInstance and WaitForInstanceStart/Completion: immediate replies or parked waiters."""

from __future__ import annotations

from partitions.state_machine import actions as act
from partitions.state_machine.queries import condition_met
from tests.unit.conftest import (
    COMPLETED,
    PENDING,
    RUNNING,
    T0,
    complete,
    create_sub,
    of_type,
    replies,
)


def _wait(core, instance_id, kind, payloads=False):
    return core.request({"op": "wait", "i": instance_id, "k": kind, "pl": payloads, "dl": T0 + 60_000})


def test_get_unknown_instance_replies_none(core):
    [reply] = replies(core.request({"op": "get", "i": "nobody"}))
    assert reply.result is None


def test_get_returns_the_state_with_payloads_only_when_asked(core):
    core.start("a", name="Orch", data='"in"', x="x1", tg={"t": "1"})
    [plain] = replies(core.request({"op": "get", "i": "a"}))
    assert plain.result["i"] == "a"
    assert plain.result["n"] == "Orch"
    assert plain.result["s"] == PENDING
    assert plain.result["x"] == "x1"
    assert plain.result["tg"] == {"t": "1"}
    assert plain.result["pi"] is None
    assert "in" not in plain.result
    [full] = replies(core.request({"op": "get", "i": "a", "pl": True}))
    assert full.result["in"] == '"in"'
    assert full.result["out"] is None


def test_get_of_a_child_names_its_parent(core):
    core.start("p")
    core.run_first("p", [create_sub(1, "C")])
    [reply] = replies(core.request({"op": "get", "i": "p:0001"}))
    assert reply.result["pi"] == "p"


def test_wait_start_on_a_pending_instance_parks_a_waiter(core):
    core.start("a")
    actions = _wait(core, "a", "start")

    assert replies(actions) == []
    [waiter] = core.state.waiters["a"]
    assert (waiter.kind, waiter.request_id, waiter.deadline_ms) == ("start", core.next_rid, T0 + 60_000)

    actions = core.run_first("a")
    assert act.StatusChanged("a") in actions  # the process answers the waiter after commit
    assert condition_met("start", core.status("a"))


def test_wait_start_on_a_running_instance_replies_at_once(core):
    core.start("a")
    core.run_first("a")
    [reply] = replies(_wait(core, "a", "start"))
    assert reply.result["s"] == RUNNING
    assert "a" not in core.state.waiters


def test_wait_done_parks_until_completion(core):
    core.start("a")
    core.run_first("a")
    assert replies(_wait(core, "a", "done")) == []
    assert [w.kind for w in core.state.waiters["a"]] == ["done"]

    assert core.ready() == []  # nothing to run yet; still parked
    core.request({"op": "raise", "i": "a", "n": "go"})
    actions = core.run_first("a", [complete(0, COMPLETED, '"out"')])
    assert act.StatusChanged("a") in actions
    assert condition_met("done", core.status("a"))


def test_wait_done_on_a_completed_instance_replies_at_once_with_output(core):
    core.start("a")
    core.run_first("a", [complete(0, COMPLETED, '"out"')])
    [reply] = replies(_wait(core, "a", "done", payloads=True))
    assert reply.result["s"] == COMPLETED
    assert reply.result["out"] == '"out"'
    assert "a" not in core.state.waiters


def test_a_wait_on_an_instance_not_started_yet_parks_until_it_starts(core):
    """The waits block until their condition or the caller's deadline, whether or not the instance exists yet:
    a client may wait for an instance that another client (or an orchestration) is about to start."""
    assert not replies(_wait(core, "later", "start"))
    assert not replies(_wait(core, "later", "done"))
    assert [w.kind for w in core.state.waiters["later"]] == ["start", "done"]

    core.start("later")

    assert act.StatusChanged("later") in core.run_first("later", [])  # the process answers the waiters after commit
    assert condition_met("start", core.status("later"))


def test_a_wait_on_an_id_no_orchestration_can_have_is_answered_at_once(core):
    for kind in ("start", "done"):
        [reply] = replies(_wait(core, "@counter@k", kind))
        assert reply.result is None
    assert core.state.waiters == {}


def test_status_changes_only_when_the_status_does(core):
    core.start("a")
    core.run_first("a")
    core.request({"op": "raise", "i": "a", "n": "e"})
    actions = core.run_first("a", [])
    assert not of_type(actions, act.StatusChanged)


def test_a_wait_sent_again_with_its_request_id_parks_one_waiter(core):
    # A gateway re-sends its pending waits when a partition restarts; the copy sent while the partition was
    # down may be there already.
    core.start("a")
    wait = {"op": "wait", "i": "a", "k": "done", "pl": False, "dl": T0 + 60_000, "rid": 41, "_from": b"g-1"}
    core.apply(dict(wait))
    core.apply(dict(wait))
    core.apply({**wait, "_from": b"g-2"})  # the same number from another gateway is another request
    assert [(w.sender, w.request_id) for w in core.state.waiters["a"]] == [(b"g-1", 41), (b"g-2", 41)]
