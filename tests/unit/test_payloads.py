"""Large inputs and custom statuses live beside the instance record, which every event rewrites."""

from __future__ import annotations

from partitions.state_machine.payloads import PAYLOAD_ASIDE_BYTES
from partitions.store import keys
from partitions.store.lmdb_store import StoreTxn, pack
from tests.unit.conftest import (
    COMPLETED,
    CONTINUED_AS_NEW,
    complete,
    replies,
    schedule_task,
)

BIG = '"' + "x" * (PAYLOAD_ASIDE_BYTES * 50) + '"'
BIGGER = '"' + "y" * (PAYLOAD_ASIDE_BYTES * 60) + '"'


def _record_bytes(core, instance_id: str) -> int:
    return len(pack(core.record(instance_id)))


def _stored_payloads(core, instance_id: str) -> dict[str, str]:
    prefix = keys.instance_prefix(instance_id)
    return {key[len(prefix):].decode(): bytes(value).decode()
            for key, value in core.raw_table("payloads") if key.startswith(prefix)}


def _turn(core, instance_id: str, actions, custom_status: str) -> None:
    token, _ = core.dispatch_one(instance_id)
    core.complete_orch(instance_id, token, actions, custom_status=custom_status)


def _state(core, instance_id: str) -> dict:
    [reply] = replies(core.request({"op": "get", "i": instance_id, "pl": True}))
    return reply.result


def test_a_large_input_is_written_once_and_not_with_every_event(core):
    core.start("a", data=BIG)
    core.run_first("a", [schedule_task(1, "Act")])
    [(token, item)] = core.dispatch_act()

    assert item.activityRequest.orchestrationInstance.instanceId == "a"
    assert _stored_payloads(core, "a") == {"in": BIG}
    assert _record_bytes(core, "a") < PAYLOAD_ASIDE_BYTES  # what each of these events rewrites
    core.request({"op": "raise", "i": "a", "n": "e", "in": '"small"'})
    core.complete_act("a", 1, token, result='"r"')
    assert _record_bytes(core, "a") < PAYLOAD_ASIDE_BYTES

    _, request = core.dispatch_one("a")
    started = [e for e in request.pastEvents if e.HasField("executionStarted")]
    assert started[0].executionStarted.input.value == BIG  # the orchestrator still gets its input
    assert _state(core, "a")["in"] == BIG


def test_small_payloads_stay_in_the_record(core):
    core.start("a", data='"small"')
    _turn(core, "a", [], custom_status='"cs"')

    assert _stored_payloads(core, "a") == {}
    assert (_state(core, "a")["in"], _state(core, "a")["cs"]) == ('"small"', '"cs"')


def test_a_large_custom_status_is_written_when_it_changes_and_goes_when_it_shrinks(core, monkeypatch):
    writes = []
    real = StoreTxn.put_payload
    monkeypatch.setattr(StoreTxn, "put_payload", lambda txn, i, f, v: (writes.append(f), real(txn, i, f, v)))
    core.start("a")
    _turn(core, "a", [schedule_task(1, "Act")], custom_status=BIG)
    assert _stored_payloads(core, "a") == {"cs": BIG}
    assert _state(core, "a")["cs"] == BIG
    [(token, _)] = core.dispatch_act()
    core.complete_act("a", 1, token, result='"r"')

    _turn(core, "a", [schedule_task(2, "Act")], custom_status=BIG)  # the same again: not written again
    assert writes == ["cs"]
    [(token, _)] = core.dispatch_act()
    core.complete_act("a", 2, token, result='"r"')
    _turn(core, "a", [schedule_task(3, "Act")], custom_status=BIGGER)
    assert writes == ["cs", "cs"]
    assert _state(core, "a")["cs"] == BIGGER
    [(token, _)] = core.dispatch_act()
    core.complete_act("a", 3, token, result='"r"')

    _turn(core, "a", [complete(4, COMPLETED, '"done"')], custom_status='"small"')
    assert _stored_payloads(core, "a") == {}
    assert _state(core, "a")["cs"] == '"small"'
    assert "pa" not in core.record("a")


def test_continue_as_new_replaces_a_large_input(core):
    core.start("a", data=BIG)
    core.run_first("a", [complete(0, CONTINUED_AS_NEW, BIGGER)])

    _, request = core.dispatch_one("a")
    started = [e for e in request.newEvents if e.HasField("executionStarted")]
    assert started[0].executionStarted.input.value == BIGGER
    assert _stored_payloads(core, "a") == {"in": BIGGER}
    assert _state(core, "a")["in"] == BIGGER


def test_restart_keeps_a_large_input_and_purge_removes_it(core):
    core.start("a", data=BIG)
    core.run_first("a", [complete(0, COMPLETED, '"1"')])

    core.request({"op": "restart", "i": "a", "x": "x-2"})
    assert _state(core, "a")["in"] == BIG
    core.run_first("a", [complete(0, COMPLETED, '"2"')])
    assert _stored_payloads(core, "a") == {"in": BIG}

    core.request({"op": "purge", "i": "a"})
    assert _stored_payloads(core, "a") == {}
