"""QueryInstances, ListInstanceIds, purge by filter and history: one partition's share, over a real store.

The index rows (idx_created, idx_status, idx_completed) are read back raw, so these tests check the
indexes themselves as well as the answers computed from them. Expected answers come from a plain
model of (id -> created, status, completed), never from the engine.
"""

from __future__ import annotations

from typing import Any

import pytest

from partitions.state_machine import query_instances
from partitions.state_machine.query_instances import MAX_PAGE, MAX_PURGE_BATCH
from partitions.store import keys
from protos import orchestrator_service_pb2 as pb
from tests.unit.conftest import (
    COMPLETED,
    CONTINUED_AS_NEW,
    FAILED,
    PENDING,
    RUNNING,
    SUSPENDED,
    T0,
    TERMINATED,
    complete,
    create_sub,
    kinds,
    replies,
    schedule_task,
)

TERMINAL = (COMPLETED, FAILED, TERMINATED)


def _result(actions: list[Any]) -> Any:
    [reply] = replies(actions)
    return reply.result


class Fleet:
    """Instances created at chosen times and driven to chosen statuses; keeps the model to check against."""

    def __init__(self, core) -> None:
        self.core = core
        self.model: dict[str, dict[str, Any]] = {}  # id -> {"c", "s", "d"}
        self.tokens: dict[str, str] = {}

    def token(self, instance_id: str) -> str:
        if instance_id not in self.tokens:
            self.tokens.update(
                {item.orchestratorRequest.instanceId: tok for tok, item in self.core.dispatch_orch(limit=100_000)}
            )
        return self.tokens.pop(instance_id)

    def start(self, instance_id: str, created: int, data: str | None = None, **extra: Any) -> None:
        self.core.now = created
        self.core.start(instance_id, data=data, **extra)
        self.model[instance_id] = {"c": created, "s": PENDING, "d": 0}

    def run(self, instance_id: str, now: int, actions=()) -> None:
        """One orchestrator turn without completing: PENDING -> RUNNING."""
        self.core.complete_orch(instance_id, self.token(instance_id), list(actions), now=now)
        self.model[instance_id]["s"] = RUNNING

    def finish(self, instance_id: str, status: int, now: int, result: str | None = None) -> None:
        if self.model[instance_id]["s"] == RUNNING and instance_id not in self.tokens:
            self.core.request({"op": "raise", "i": instance_id, "n": "wake"}, now)  # idle: give it work
        self.core.complete_orch(instance_id, self.token(instance_id), [complete(0, status, result)], now=now)
        self.model[instance_id].update(s=status, d=now)

    def suspend(self, instance_id: str, now: int) -> None:
        self.core.request({"op": "suspend", "i": instance_id}, now)
        self.model[instance_id]["s"] = SUSPENDED

    def make(self, instance_id: str, created: int, status: int, completed: int | None = None) -> None:
        self.start(instance_id, created, data=f'"in-{instance_id}"')
        if status == PENDING:
            return
        if status in TERMINAL:
            self.finish(instance_id, status, completed if completed is not None else created + 1000, f'"out-{instance_id}"')
            return
        self.run(instance_id, created + 1)
        if status == SUSPENDED:
            self.suspend(instance_id, created + 2)

    def expected(self, statuses=(), cf=None, ct=None, prefix="") -> list[str]:
        rows = [
            (m["c"], i)
            for i, m in self.model.items()
            if (not statuses or m["s"] in statuses)
            and (cf is None or m["c"] >= cf)
            and (ct is None or m["c"] < ct)
            and i.startswith(prefix)
        ]
        if prefix:  # prefix pages are ordered by id, so paging never re-reads the whole prefix
            return sorted(i for _, i in rows)
        return [i for _, i in sorted(rows)]

    def expected_completed(self, statuses=(), df=None, dt=None) -> list[list[Any]]:
        rows = [
            [m["d"], i]
            for i, m in self.model.items()
            if m["d"]
            and (not statuses or m["s"] in statuses)
            and (df is None or m["d"] >= df)
            and (dt is None or m["d"] < dt)
        ]
        return sorted(rows)


def query(core, **cmd: Any) -> list[dict[str, Any]]:
    return _result(core.request({"op": "query", **cmd}))


def query_ids(core, **cmd: Any) -> list[str]:
    return [s["i"] for s in query(core, **cmd)]


def query_all(core, page: int, **cmd: Any) -> list[str]:
    """Follow the continuation point page by page, as the gateway does for one partition."""
    out: list[str] = []
    after = None
    for _ in range(10_000):
        states = query(core, limit=page, after=after, **cmd)
        assert len(states) <= page
        out += [s["i"] for s in states]
        if len(states) < page:
            return out
        after = [states[-1]["c"], states[-1]["i"]]
    raise AssertionError("paging did not end")


def list_ids(core, **cmd: Any) -> list[list[Any]]:
    return _result(core.request({"op": "list_ids", **cmd}))


def list_all(core, page: int, **cmd: Any) -> list[list[Any]]:
    out: list[list[Any]] = []
    after = None
    for _ in range(10_000):
        rows = list_ids(core, limit=page, after=after, **cmd)
        assert len(rows) <= page
        out += rows
        if len(rows) < page:
            return out
        after = rows[-1]
    raise AssertionError("paging did not end")


def purge_filter(core, **cmd: Any) -> dict[str, Any]:
    return _result(core.request({"op": "purge_filter", **cmd}))


def outcome(result: dict[str, Any]) -> tuple[int, bool, list[str]]:
    return result["deleted"], result["more"], result["trees"]


def index_rows(core) -> dict[str, list[tuple]]:
    """Every row of the three index tables, decoded."""
    created = [keys.parse_time_index_key(k) for k, _ in core.raw_table("idx_created")]
    status = [(k[0], *keys.parse_time_index_key(k, 1)) for k, _ in core.raw_table("idx_status")]
    completed = [(*keys.parse_time_index_key(k), v[0]) for k, v in core.raw_table("idx_completed")]
    return {"created": created, "status": status, "completed": completed}


def rows_for(core, instance_id: str) -> dict[str, list[tuple]]:
    rows = index_rows(core)
    return {
        "created": [r for r in rows["created"] if r[1] == instance_id],
        "status": [r for r in rows["status"] if r[2] == instance_id],
        "completed": [r for r in rows["completed"] if r[1] == instance_id],
    }


# ---------------------------------------------------------------------------------------------------------
# index rows follow the record
# ---------------------------------------------------------------------------------------------------------


def test_index_rows_follow_status_changes(core):
    fleet = Fleet(core)
    fleet.start("a", T0)
    assert rows_for(core, "a") == {"created": [(T0, "a")], "status": [(PENDING, T0, "a")], "completed": []}
    [state] = query(core)
    assert (state["i"], state["s"], state["c"], state["d"]) == ("a", PENDING, T0, None)

    fleet.run("a", T0 + 10, [schedule_task(1, "Act")])
    assert rows_for(core, "a") == {"created": [(T0, "a")], "status": [(RUNNING, T0, "a")], "completed": []}
    assert [s["s"] for s in query(core)] == [RUNNING]

    fleet.suspend("a", T0 + 20)
    assert rows_for(core, "a")["status"] == [(SUSPENDED, T0, "a")]
    core.request({"op": "resume", "i": "a"}, T0 + 30)
    assert rows_for(core, "a")["status"] == [(RUNNING, T0, "a")]

    fleet.finish("a", COMPLETED, T0 + 50, '"done"')
    assert rows_for(core, "a") == {
        "created": [(T0, "a")],
        "status": [(COMPLETED, T0, "a")],
        "completed": [(T0 + 50, "a", COMPLETED)],
    }
    [state] = query(core)
    assert (state["s"], state["c"], state["d"]) == (COMPLETED, T0, T0 + 50)


def test_failed_and_terminated_instances_get_completed_rows_with_their_status(core):
    fleet = Fleet(core)
    fleet.make("f", T0, FAILED, completed=T0 + 7)
    fleet.make("t", T0 + 1, TERMINATED, completed=T0 + 5)
    assert index_rows(core)["completed"] == [(T0 + 5, "t", TERMINATED), (T0 + 7, "f", FAILED)]
    assert sorted(index_rows(core)["status"]) == [(FAILED, T0, "f"), (TERMINATED, T0 + 1, "t")]


def test_continue_as_new_keeps_one_running_row_and_no_completed_row(core):
    fleet = Fleet(core)
    fleet.start("a", T0)
    core.complete_orch("a", fleet.token("a"), [complete(0, CONTINUED_AS_NEW, '"again"')], now=T0 + 5)
    assert rows_for(core, "a") == {"created": [(T0, "a")], "status": [(RUNNING, T0, "a")], "completed": []}
    assert list_ids(core) == []


def test_index_rows_match_the_instances_table_after_a_mixed_workload(core):
    fleet = Fleet(core)
    statuses = [PENDING, RUNNING, SUSPENDED, COMPLETED, FAILED, TERMINATED]
    for n in range(30):
        fleet.make(f"w-{n:02d}", T0 + n // 4, statuses[n % len(statuses)], completed=T0 + 100 - n)
    rows = index_rows(core)
    assert sorted(rows["created"]) == sorted((m["c"], i) for i, m in fleet.model.items())
    assert sorted(rows["status"]) == sorted((m["s"], m["c"], i) for i, m in fleet.model.items())
    assert sorted(rows["completed"]) == sorted((m["d"], i, m["s"]) for i, m in fleet.model.items() if m["d"])


# ---------------------------------------------------------------------------------------------------------
# query
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def mixed(core) -> Fleet:
    """40 instances over 10 created times (ties included), three prefixes and every status."""
    fleet = Fleet(core)
    statuses = [PENDING, RUNNING, COMPLETED, FAILED, TERMINATED, SUSPENDED, COMPLETED]
    prefixes = ["ab", "abc", "b"]
    for n in range(40):
        # ids are not in created order, and several share a created ms
        instance_id = f"{prefixes[n % 3]}-{(n * 7) % 40:02d}"
        fleet.make(instance_id, T0 + (n * 3) % 10, statuses[n % len(statuses)], completed=T0 + 500 + (n * 11) % 17)
    return fleet


FILTERS = [
    {},
    {"statuses": [COMPLETED]},
    {"statuses": [RUNNING, PENDING]},
    {"statuses": [FAILED, TERMINATED, SUSPENDED]},
    {"statuses": [COMPLETED, COMPLETED]},
    {"cf": T0 + 3},
    {"ct": T0 + 3},
    {"cf": T0 + 2, "ct": T0 + 6},
    {"cf": T0 + 4, "ct": T0 + 5},
    {"cf": T0 + 5, "ct": T0 + 5},
    {"cf": T0 + 20},
    {"prefix": "ab"},
    {"prefix": "abc"},
    {"prefix": "b-1"},
    {"prefix": "zzz"},
    {"prefix": "ab", "statuses": [COMPLETED, RUNNING]},
    {"prefix": "ab", "cf": T0 + 2, "ct": T0 + 8},
    {"statuses": [COMPLETED, FAILED], "cf": T0 + 1, "ct": T0 + 9},
    {"prefix": "abc", "statuses": [PENDING, SUSPENDED], "cf": T0, "ct": T0 + 7},
]


@pytest.mark.parametrize("flt", FILTERS, ids=[str(f) for f in FILTERS])
def test_query_filters_and_orders_by_created_then_id(core, mixed, flt):
    """Created-then-id order; with an id prefix, id order."""
    expected = mixed.expected(flt.get("statuses", ()), flt.get("cf"), flt.get("ct"), flt.get("prefix", ""))
    states = query(core, **flt)
    assert [s["i"] for s in states] == expected
    order = [s["i"] for s in states] if flt.get("prefix") else [(s["c"], s["i"]) for s in states]
    assert order == sorted(order)
    for s in states:
        assert s["s"] == mixed.model[s["i"]]["s"]


@pytest.mark.parametrize("flt", FILTERS, ids=[str(f) for f in FILTERS])
@pytest.mark.parametrize("page", [1, 3, 7])
def test_query_paging_after_returns_every_instance_exactly_once(core, mixed, flt, page):
    expected = mixed.expected(flt.get("statuses", ()), flt.get("cf"), flt.get("ct"), flt.get("prefix", ""))
    assert query_all(core, page, **flt) == expected


def test_query_payloads_only_when_asked(core):
    fleet = Fleet(core)
    fleet.make("a", T0, COMPLETED)
    [bare] = query(core)
    assert "in" not in bare and "out" not in bare
    [full] = query(core, pl=True)
    assert (full["in"], full["out"]) == ('"in-a"', '"out-a"')


def test_query_page_size_is_capped_at_max_page(core):
    for n in range(MAX_PAGE + 5):
        core.start(f"i-{n:05d}")
    assert len(query(core, limit=MAX_PAGE * 10)) == MAX_PAGE
    assert len(query(core)) == MAX_PAGE  # no limit: one full page
    assert len(query(core, limit=MAX_PAGE + 5)) == MAX_PAGE
    assert query_all(core, MAX_PAGE) == [f"i-{n:05d}" for n in range(MAX_PAGE + 5)]


def test_query_after_a_point_that_no_longer_exists(core):
    """The continuation point is a position, not an instance: it may have been purged since."""
    fleet = Fleet(core)
    for n in range(6):
        fleet.make(f"p-{n}", T0 + n, COMPLETED)
    first = query(core, limit=3)
    core.request({"op": "purge", "i": first[-1]["i"]})
    rest = query(core, limit=10, after=[first[-1]["c"], first[-1]["i"]])
    assert [s["i"] for s in rest] == ["p-3", "p-4", "p-5"]


def test_status_change_during_paging_does_not_repeat_an_instance(core):
    """An instance moving between statuses keeps its (created, id) position; a page boundary before it is safe."""
    fleet = Fleet(core)
    for n in range(6):
        fleet.make(f"s-{n}", T0 + n, RUNNING)
    page1 = query(core, limit=3)
    fleet.finish("s-1", COMPLETED, T0 + 100)  # behind the cursor
    fleet.finish("s-4", COMPLETED, T0 + 101)  # ahead of the cursor
    after = [page1[-1]["c"], page1[-1]["i"]]
    assert [s["i"] for s in query(core, after=after)] == ["s-3", "s-4", "s-5"]
    assert [s["i"] for s in query(core, after=after, statuses=[RUNNING])] == ["s-3", "s-5"]


# ---------------------------------------------------------------------------------------------------------
# list_ids
# ---------------------------------------------------------------------------------------------------------

LIST_FILTERS = [
    {},
    {"statuses": [COMPLETED]},
    {"statuses": [FAILED, TERMINATED]},
    {"statuses": [RUNNING]},  # never terminal: nothing
    {"df": T0 + 505},
    {"dt": T0 + 505},
    {"df": T0 + 503, "dt": T0 + 510},
    {"df": T0 + 503, "dt": T0 + 503},
    {"statuses": [COMPLETED, FAILED], "df": T0 + 502, "dt": T0 + 512},
]


@pytest.mark.parametrize("flt", LIST_FILTERS, ids=[str(f) for f in LIST_FILTERS])
@pytest.mark.parametrize("page", [1, 4, 1000])
def test_list_ids_by_completed_range_and_status_with_paging(core, mixed, flt, page):
    expected = mixed.expected_completed(flt.get("statuses", ()), flt.get("df"), flt.get("dt"))
    assert list_all(core, page, **flt) == expected
    if expected:
        assert list_ids(core, limit=page, **flt) == expected[:page]


def test_list_ids_lists_only_terminal_instances(core, mixed):
    listed = {i for _, i in list_all(core, 1000)}
    assert listed == {i for i, m in mixed.model.items() if m["s"] in TERMINAL}
    assert listed  # the fixture has terminal ones


# ---------------------------------------------------------------------------------------------------------
# purge_filter
# ---------------------------------------------------------------------------------------------------------


def test_purge_filter_never_deletes_running_instances(core, mixed):
    live = {i for i, m in mixed.model.items() if m["s"] not in TERMINAL}
    assert outcome(purge_filter(core, statuses=[RUNNING, PENDING, SUSPENDED])) == (0, False, [])
    result = purge_filter(core, statuses=[RUNNING, PENDING, SUSPENDED, COMPLETED, FAILED, TERMINATED])
    assert result["deleted"] == len(mixed.model) - len(live)
    assert result["more"] is False
    assert {i for i in mixed.model if core.record(i) is not None} == live
    assert set(query_ids(core)) == live


@pytest.mark.parametrize(
    "flt",
    [
        {},
        {"statuses": [COMPLETED]},
        {"statuses": [FAILED, TERMINATED]},
        {"cf": T0 + 3, "ct": T0 + 7},
        {"cf": T0 + 3, "ct": T0 + 7, "statuses": [FAILED]},
        {"ct": T0 + 1},
    ],
    ids=str,
)
def test_purge_filter_deletes_exactly_the_matching_terminal_instances(core, mixed, flt):
    statuses = flt.get("statuses") or TERMINAL
    doomed = set(mixed.expected(statuses, flt.get("cf"), flt.get("ct")))
    result = purge_filter(core, **flt)
    assert outcome(result) == (len(doomed), False, [])
    assert {i for i in mixed.model if core.record(i) is None} == doomed
    survivors = [i for i in mixed.expected() if i not in doomed]
    assert query_ids(core) == survivors
    for i in doomed:
        assert rows_for(core, i) == {"created": [], "status": [], "completed": []}
        assert core.history(i) == []
    assert outcome(purge_filter(core, **flt)) == (0, False, [])


def test_purge_filter_works_in_batches_of_max_purge_batch(core):
    fleet = Fleet(core)
    count = MAX_PURGE_BATCH + 3 + 5  # 5 running ones among them (n % 100 == 50)
    for n in range(count):
        fleet.start(f"t-{n:04d}", T0 + n)
    for n in range(count):
        if n % 100 == 50:
            fleet.run(f"t-{n:04d}", T0 + 10_000)  # a few running ones in between, never deleted
        else:
            fleet.finish(f"t-{n:04d}", COMPLETED, T0 + 10_000)
    running = [i for i, m in fleet.model.items() if m["s"] == RUNNING]
    terminal = count - len(running)
    assert terminal == MAX_PURGE_BATCH + 3

    first = purge_filter(core)
    assert (first["deleted"], first["more"]) == (MAX_PURGE_BATCH, True)
    second = purge_filter(core)
    assert (second["deleted"], second["more"]) == (terminal - MAX_PURGE_BATCH, False)
    assert query_ids(core) == running


@pytest.mark.parametrize("terminal,batches", [(8, [(3, True), (3, True), (2, False)]), (6, [(3, True), (3, False)])])
def test_purge_filter_more_is_set_only_when_something_is_left(core, monkeypatch, terminal, batches):
    monkeypatch.setattr(query_instances, "MAX_PURGE_BATCH", 3)
    fleet = Fleet(core)
    for n in range(terminal):
        fleet.make(f"d-{n}", T0 + n, COMPLETED)
        fleet.make(f"r-{n}", T0 + n, RUNNING)
    got = [(r["deleted"], r["more"]) for r in (purge_filter(core) for _ in batches)]
    assert got == batches
    assert outcome(purge_filter(core)) == (0, False, [])
    assert sorted(query_ids(core)) == sorted(f"r-{n}" for n in range(terminal))


def _parent_with_finished_children(core) -> None:
    fleet = Fleet(core)
    fleet.start("parent", T0)
    core.complete_orch("parent", fleet.token("parent"), [create_sub(1, "C", "kid-1"), create_sub(2, "C", "kid-2")],
                       now=T0 + 100)
    for kid in ("kid-1", "kid-2"):
        core.complete_orch(kid, fleet.token(kid), [complete(0, COMPLETED)], now=T0 + 200)
    core.complete_orch("parent", fleet.token("parent"), [complete(0, COMPLETED)], now=T0 + 300)
    assert core.status("parent") == COMPLETED


def test_a_recursive_purge_filter_leaves_a_parent_to_the_gateway_as_a_tree(core):
    """The gateway purges it whole (children first), or not at all while one of them still runs; the children
    were created at T0+100, outside the range."""
    _parent_with_finished_children(core)
    result = purge_filter(core, cf=T0, ct=T0 + 1, r=True)
    assert outcome(result) == (0, False, ["parent"])
    assert result["last"] == [T0, "parent"]
    assert core.record("parent") is not None
    assert outcome(purge_filter(core, cf=T0, ct=T0 + 1, r=True, after=result["last"])) == (0, False, [])


def test_a_purge_filter_that_is_not_recursive_deletes_a_parent_and_leaves_its_children(core):
    _parent_with_finished_children(core)
    assert outcome(purge_filter(core, cf=T0, ct=T0 + 1)) == (1, False, [])
    assert core.record("parent") is None
    assert core.record("kid-1") is not None and core.record("kid-2") is not None


def test_a_recursive_purge_filter_goes_on_past_the_trees_it_left(core, monkeypatch):
    monkeypatch.setattr(query_instances, "MAX_PURGE_BATCH", 1)
    _parent_with_finished_children(core)
    fleet = Fleet(core)
    fleet.make("later", T0 + 1, COMPLETED)
    first = purge_filter(core, r=True)
    assert outcome(first) == (0, True, ["parent"])
    second = purge_filter(core, r=True, after=first["last"])
    assert outcome(second) == (1, True, [])  # "later"; the children come next
    assert core.record("later") is None and core.record("parent") is not None


def test_purge_filter_skips_running_parent_and_reports_no_trees(core):
    fleet = Fleet(core)
    fleet.start("parent", T0)
    core.complete_orch("parent", fleet.token("parent"), [create_sub(1, "C", "kid")], now=T0 + 1)
    core.complete_orch("kid", fleet.token("kid"), [complete(0, COMPLETED)], now=T0 + 2)
    result = purge_filter(core, cf=T0, ct=T0 + 1, r=True)
    assert outcome(result) == (0, False, [])
    assert core.record("parent") is not None


# ---------------------------------------------------------------------------------------------------------
# purge / replace remove index rows
# ---------------------------------------------------------------------------------------------------------


def test_purge_by_id_removes_index_rows(core):
    fleet = Fleet(core)
    fleet.make("gone", T0, COMPLETED, completed=T0 + 5)
    fleet.make("kept", T0, COMPLETED, completed=T0 + 6)
    assert _result(core.request({"op": "purge", "i": "gone"})) == {"deleted": 1}
    assert rows_for(core, "gone") == {"created": [], "status": [], "completed": []}
    assert query_ids(core) == ["kept"]
    assert query_ids(core, prefix="gone") == []
    assert query_ids(core, statuses=[COMPLETED]) == ["kept"]
    assert list_ids(core) == [[T0 + 6, "kept"]]


def test_replacing_a_terminal_instance_moves_its_index_rows(core):
    fleet = Fleet(core)
    fleet.make("a", T0, COMPLETED, completed=T0 + 5)
    core.now = T0 + 100
    core.start("a", reuse=[COMPLETED, FAILED, TERMINATED])
    assert rows_for(core, "a") == {"created": [(T0 + 100, "a")], "status": [(PENDING, T0 + 100, "a")], "completed": []}
    assert [(s["i"], s["s"], s["c"]) for s in query(core)] == [("a", PENDING, T0 + 100)]
    assert query(core, cf=T0, ct=T0 + 1) == []
    assert query(core, statuses=[COMPLETED]) == []
    assert list_ids(core) == []


# ---------------------------------------------------------------------------------------------------------
# history
# ---------------------------------------------------------------------------------------------------------


def _history(core, instance_id: str, execution_id: str | None = None) -> Any:
    return _result(core.request({"op": "history", "i": instance_id, "x": execution_id}))


def test_history_returns_the_stored_events(core):
    fleet = Fleet(core)
    fleet.start("h", T0, data='"x"')
    assert _history(core, "h") == {"x": core.record("h")["x"], "events": []}  # nothing committed yet
    fleet.run("h", T0 + 1, [schedule_task(1, "Act", '"a"')])
    [(token, _)] = core.dispatch_act()
    core.complete_act("h", 1, token, result='"r"')
    fleet.finish("h", COMPLETED, T0 + 3, '"done"')

    result = _history(core, "h")
    assert result["x"] == core.record("h")["x"]
    assert result["events"] == [e.SerializeToString() for e in core.history("h")]
    decoded = kinds(pb.HistoryEvent.FromString(e) for e in result["events"])
    assert decoded.index("executionStarted") < decoded.index("taskScheduled") < decoded.index("taskCompleted")
    assert decoded[-1] == "executionCompleted"


def test_history_with_execution_id(core):
    fleet = Fleet(core)
    fleet.make("h", T0, COMPLETED)
    x = core.record("h")["x"]
    assert _history(core, "h", x)["x"] == x
    assert _history(core, "h", "not-" + x) is None
    assert _history(core, "nobody") is None
    assert _history(core, "nobody", x) is None


def test_history_of_an_earlier_execution_is_gone_after_continue_as_new(core):
    fleet = Fleet(core)
    fleet.start("h", T0)
    first_x = core.record("h")["x"]
    core.complete_orch("h", fleet.token("h"), [complete(0, CONTINUED_AS_NEW, '"again"')], now=T0 + 5)
    assert core.record("h")["x"] != first_x
    assert _history(core, "h", first_x) is None
    assert _history(core, "h", core.record("h")["x"]) == {"x": core.record("h")["x"], "events": []}


def test_an_upper_bound_at_the_epoch_matches_nothing(core, mixed):
    """The gateway clamps a time at or before 1970 to 0. As an upper bound that matches no instance: it is not
    the absent bound, which matches them all (a purge by such a filter once deleted every terminal instance)."""
    assert query_ids(core, ct=0) == []
    assert query_ids(core, ct=0, statuses=[COMPLETED]) == []
    assert list_ids(core, dt=0) == []
    assert outcome(purge_filter(core, ct=0)) == (0, False, [])
    assert len(query_ids(core)) == 40
