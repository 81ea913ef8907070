"""A store last written by another version of the engine is brought up to date when a partition starts
(partitions/store/upgrade.py), and work that version left queued is handled as this one would."""

from __future__ import annotations

from partitions.process import open_store
from partitions.state_machine import events as ev
from partitions.state_machine.payloads import PAYLOAD_ASIDE_BYTES
from partitions.state_machine.queries import instance_state
from partitions.store import keys
from partitions.store.lmdb_store import LmdbStore
from runtime.config import Config
from tests.unit.conftest import T0, TERMINATED, Core, complete, create_timer, kinds, schedule_task
from tests.unit.test_dispatch_leases import ENTITY, _lock_action


def _config(tmp_path) -> Config:
    return Config(data_dir=str(tmp_path / "data"), partitions=1)


def _reopen(config: Config) -> LmdbStore:
    store, _ = open_store(config, 0)
    return store


def _at_the_next_start(config: Config, read):
    """Start the partition's store again (bringing it up to date if need be), and `read(txn)` from it."""
    store = _reopen(config)
    txn = store.begin()
    try:
        return read(txn)
    finally:
        txn.abort()
        store.close()


def _as_an_earlier_version_would(store: LmdbStore, *, timers: bool = True, records: dict | None = None,
                                 marks: tuple[bytes, ...] = ()) -> None:
    """Another version starts (the epoch moves on, and it writes only the schema marks it knows) and writes what it
    writes: timer rows with no index, and records whose counts it does not keep."""
    txn = store.begin(write=True)
    epoch = keys.unpack_u64(txn.get_meta(keys.META_EPOCH))
    txn.put_meta(keys.META_EPOCH, keys.pack_u64(epoch + 1))
    for mark in marks:
        txn.put_meta(mark, keys.pack_u64(epoch + 1))
    if timers:
        txn.txn.drop(store.dbs["timer_idx"], delete=False)
    for entity_id, record in (records or {}).items():
        txn.put_entity(entity_id, record)
    txn.commit()


def test_timers_an_earlier_version_wrote_are_indexed_at_the_next_start(tmp_path):
    """Else they outlived their instances' end and purge, for as long as they had to run (months, for a start
    scheduled far ahead)."""
    config = _config(tmp_path)
    store = _reopen(config)
    txn = store.begin(write=True)
    txn.put_timer(T0 + 3_600_000, "scheduled", keys.SCHEDULED_START_TIMER_ID, {"x": "e1"}, keys.TIMER_RELEASE)
    txn.put_timer(T0 + 3_600_000, "waiting", 1, {"x": "e2"})
    txn.put_timer(T0 + 5, "@counter@k", 7, {"ev": b""}, keys.TIMER_ENTITY_SIGNAL)  # not an orchestration's
    txn.commit()
    _as_an_earlier_version_would(store)
    store.close()

    store = _reopen(config)
    txn = store.begin(write=True)
    assert txn.timer_index_count() == 2
    txn.delete_instance_timers("scheduled")
    txn.delete_instance_timers("waiting")
    assert [kind for _, _, kind, _, _, _ in txn.due_timers(2**63 - 1, 10)] == [keys.TIMER_ENTITY_SIGNAL]
    txn.abort()
    store.close()


def test_counts_an_earlier_version_left_stale_are_dropped_at_the_next_start(tmp_path):
    """A rollback to an earlier version, then a redeploy: that version queued the owner's call to a locked
    entity without counting it, and this one, trusting the count, never ran the call: the entity stayed locked."""
    config = _config(tmp_path)
    store = _reopen(config)
    stale = {"st": "1", "lm": T0, "lk": "cs-1", "lo": "owner", "rq": 0, "lq": 0, "oq": 0, "uq": False}
    # (a version from before the lock-message count left "lq" stale the same way)
    _as_an_earlier_version_would(store, timers=False, records={"@counter@f": stale})
    store.close()

    record = _at_the_next_start(config, lambda txn: txn.get_entity("@counter@f"))
    assert not {"lq", "oq", "uq"} & set(record) and record["lk"] == "cs-1"
    store = _reopen(config)  # this version's own restarts keep them
    txn = store.begin(write=True)
    txn.put_entity("@counter@f", {**record, "oq": 1, "uq": False})
    txn.commit()
    store.close()
    assert _at_the_next_start(config, lambda txn: txn.get_entity("@counter@f"))["oq"] == 1


def test_a_terminate_an_earlier_version_queued_before_the_first_turn_wins_over_that_turn(core):
    """This version ends an instance no worker has run as the terminate comes; an earlier one queued it behind
    the start, so the first turn carries it, and an orchestration that completes on its first turn ignored it:
    a start scheduled for next month, terminated today, ran (after an upgrade) at once."""
    core.start("a")
    txn = core.store.begin(write=True)
    txn.put_inbox("a", core.state.next_seq(), ev.execution_terminated(core.now, '"stop"', False))
    txn.commit()
    token, request = core.dispatch_one("a")
    assert kinds(request.newEvents)[-1] == "executionTerminated"

    core.complete_orch("a", token, [schedule_task(1, "SideEffect"), create_timer(2, T0 + 10),
                                    complete(3, result='"ran"')])
    assert core.status("a") == TERMINATED and core.record("a")["out"] == '"stop"'
    assert core.activities() == [] and core.timers() == []



def test_lock_sections_an_earlier_version_did_not_list_are_listed_from_history(tmp_path):
    """Dropping the list would hand a replaced execution's grant to the new execution; leaving one an earlier
    version did not keep would refuse the grant the execution waits for. And a record that never said whether
    its execution asked for a lock is read through when it ends."""
    config = _config(tmp_path)
    _reopen(config).close()
    core = Core(config.partition_data_dir(0))
    core.start("h")
    core.run_first("h", [_lock_action([ENTITY], "h", "cs-h")])
    core.run_first("h")  # the grant: h holds the entity
    core.start("o")
    core.run_first("o", [_lock_action([ENTITY], "o", "cs-o")])  # o waits for it
    core.start("p")
    core.run_first("p")  # p asks for nothing
    for instance_id in ("h", "o", "p"):
        record = core.record(instance_id)
        del record["lr"], record["lh"]
        txn = core.store.begin(write=True)
        txn.put_instance(instance_id, record)
        txn.commit()
    core.close()
    store = LmdbStore(config.partition_data_dir(0), 1 << 26)
    _as_an_earlier_version_would(store, timers=False)
    store.close()

    listed = _at_the_next_start(config, lambda txn: [(txn.get_instance(i)["lr"], txn.get_instance(i)["lh"])
                                                     for i in ("h", "o", "p")])
    assert listed == [([], 1), (["cs-o"], 1), ([], 0)]


def test_a_payload_an_earlier_version_wrote_into_the_record_wins_over_the_one_kept_beside_it(tmp_path):
    """A rollback: the earlier version knows nothing of the payloads table, writes a custom status into the record
    every turn and leaves "pa" as it was. After the redeploy the record's value is the newer one."""
    config = _config(tmp_path)
    _reopen(config).close()
    core = Core(config.partition_data_dir(0))
    big = '"' + "x" * (PAYLOAD_ASIDE_BYTES * 4) + '"'
    core.start("a", data=big)
    token, _ = core.dispatch_one("a")
    core.complete_orch("a", token, [schedule_task(1, "Act")], custom_status=big)
    record = core.record("a")
    assert set(record["pa"]) == {"in", "cs"}
    record["cs"] = '"set by the earlier version"'
    txn = core.store.begin(write=True)
    txn.put_instance("a", record)
    txn.commit()
    core.close()
    store = LmdbStore(config.partition_data_dir(0), 1 << 26)
    _as_an_earlier_version_would(store, timers=False, marks=(keys.META_SCHEMA_EPOCH,))  # as the version before did
    store.close()

    def read(txn):
        record = txn.get_instance("a")
        return instance_state(txn, "a", record, True), set(record["pa"]), txn.get_payload("a", "cs")

    state, aside, row = _at_the_next_start(config, read)
    assert (state["cs"], state["in"]) == ('"set by the earlier version"', big)
    assert aside == {"in"} and row is None


def test_payload_rows_of_records_an_earlier_version_purged_or_replaced_go(tmp_path):
    config = _config(tmp_path)
    _reopen(config).close()
    core = Core(config.partition_data_dir(0))
    big = '"' + "x" * (PAYLOAD_ASIDE_BYTES * 4) + '"'
    for instance_id in ("purged", "replaced", "kept"):
        core.start(instance_id, data=big)
    txn = core.store.begin(write=True)
    txn.delete_instance("purged")  # the earlier version's purge leaves the row
    txn.put_instance("replaced", {**txn.get_instance("replaced"), "in": None, "pa": {}})  # its restart, input lost
    txn.commit()
    core.close()
    store = LmdbStore(config.partition_data_dir(0), 1 << 26)
    _as_an_earlier_version_would(store, timers=False, marks=(keys.META_SCHEMA_EPOCH,))  # as the version before did
    store.close()

    assert _at_the_next_start(config, lambda txn: txn.payload_fields()) == [("kept", "in")]


def test_a_store_larger_than_its_configured_map_is_brought_up_to_date(tmp_path):
    """Opened with a map smaller than its file, a store gets a map of just its used size; the upgrade's
    rewrite of its records (copy on write) then hit MapFullError at every start: a crash loop."""
    config = Config(data_dir=str(tmp_path / "data"), partitions=1, map_size_bytes=1 << 20)
    _reopen(config).close()
    store = LmdbStore(config.partition_data_dir(0), config.map_size_bytes)
    for chunk in range(6):  # about 4 MiB of unfinished instances whose records say nothing of locks
        store.ensure_room(1 << 20)
        txn = store.begin(write=True)
        for n in range(chunk * 500, chunk * 500 + 500):
            txn.put_instance(f"i-{n:05d}", {"n": "Orch", "s": 0, "x": "x", "in": "i" * 1_000, "hl": 0, "ch": []})
        txn.commit()
    assert store.used_bytes() > 3 * config.map_size_bytes
    _as_an_earlier_version_would(store, timers=False)
    store.close()

    assert _at_the_next_start(config, lambda txn: txn.get_instance("i-02999"))["lh"] == 0


def test_a_history_that_cannot_be_read_does_not_stop_the_partition_from_starting(tmp_path):
    """Corrupt rows fail the instance that reads them when it next runs; at start they would stop every start."""
    config = _config(tmp_path)
    _reopen(config).close()
    store = LmdbStore(config.partition_data_dir(0), config.map_size_bytes)
    txn = store.begin(write=True)
    for instance_id in ("bad", "good"):
        txn.put_instance(instance_id, {"n": "Orch", "s": 0, "x": "x", "hl": 1, "ch": []})
    txn.put_history("bad", 0, b"\xff\xff\xff")
    txn.commit()
    _as_an_earlier_version_would(store, timers=False)
    store.close()

    bad, good = _at_the_next_start(config, lambda txn: (txn.get_instance("bad"), txn.get_instance("good")))
    assert "lh" not in bad and good["lh"] == 0
