"""Management RPCs with the official SDK: QueryInstances, ListInstanceIds, purge by filter,
StreamInstanceHistory and RestartInstance, across the runtime's partitions.

Every test uses its own id prefix. ListInstanceIds and purge by filter have no prefix filter, so those
tests check their own instances exactly and everything else they see against the filter. Created and
completed times are read back from the engine (GetInstance), never guessed from the test's clock.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from durabletask import client as dt_client
from durabletask import task
from durabletask.client import AsyncTaskHubGrpcClient, OrchestrationQuery, OrchestrationStatus
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.internal import orchestrator_service_pb2_grpc as stubs
from google.protobuf import wrappers_pb2

from .helpers import DEADLINE_S, PARTITIONS, id_not_on_partition, new_id, partition_of, wait_until

pytestmark = pytest.mark.engine_only  # paging order, index semantics and the exact purge counts are ours

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FAR_FUTURE = timedelta(hours=6)
TERMINAL = (OrchestrationStatus.COMPLETED, OrchestrationStatus.FAILED, OrchestrationStatus.TERMINATED)


# ---------------------------------------------------------------------------------------------------------
# functions
# ---------------------------------------------------------------------------------------------------------
def plus_one(ctx: task.ActivityContext, n: int) -> int:
    return n + 1


_FLAKY_LOCK = threading.Lock()
_FLAKY_CALLS: Counter[str] = Counter()


def fails_first_time(ctx: task.ActivityContext, key: str) -> str:
    """Fails on its first call for `key`, succeeds afterwards (the worker runs in this process)."""
    with _FLAKY_LOCK:
        _FLAKY_CALLS[key] += 1
        first = _FLAKY_CALLS[key] == 1
    if first:
        raise RuntimeError(f"first attempt for {key} fails")
    return f"ok:{key}"


def big_result(ctx: task.ActivityContext, n: int) -> str:
    return str(n) * 300_000


def echo(ctx: task.OrchestrationContext, inp):
    return inp


def two_steps(ctx: task.OrchestrationContext, n: int):
    a = yield ctx.call_activity(plus_one, input=n)
    b = yield ctx.call_activity(plus_one, input=a)
    return b


def wait_for_go(ctx: task.OrchestrationContext, _):
    value = yield ctx.wait_for_external_event("go")
    return value


def fail_now(ctx: task.OrchestrationContext, message: str):
    raise ValueError(message)


def flaky_orchestrator(ctx: task.OrchestrationContext, key: str):
    result = yield ctx.call_activity(fails_first_time, input=key)
    return result


def parent_after_go(ctx: task.OrchestrationContext, inp: dict):
    """Creates its child only after 'go', so the test controls the child's created time."""
    yield ctx.wait_for_external_event("go")
    result = yield ctx.call_sub_orchestrator(echo, input=inp["n"], instance_id=inp["child"])
    return result


def big_history(ctx: task.OrchestrationContext, n: int):
    for i in range(n):
        yield ctx.call_activity(big_result, input=i)
    return n


def parent_that_does_not_wait(ctx: task.OrchestrationContext, child_id: str):
    ctx.call_sub_orchestrator(wait_for_go, instance_id=child_id)  # not awaited: the parent finishes first
    return "left"


ORCHESTRATORS = [echo, two_steps, wait_for_go, fail_now, flaky_orchestrator, parent_after_go, big_history,
                 parent_that_does_not_wait]
ACTIVITIES = [plus_one, fails_first_time, big_result]


@pytest.fixture(scope="module", autouse=True)
def worker(worker_factory):
    return worker_factory(ORCHESTRATORS, ACTIVITIES)


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------
def ms_of(ts) -> int:
    return ts.seconds * 1000 + ts.nanos // 1_000_000


def at_ms(ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ms)


def raw_state(raw_stub, iid: str) -> pb.OrchestrationState | None:
    res = raw_stub.GetInstance(pb.GetInstanceRequest(instanceId=iid), timeout=DEADLINE_S)
    return res.orchestrationState if res.exists else None


def created_ms(raw_stub, iid: str) -> int:
    state = raw_state(raw_stub, iid)
    assert state is not None, iid
    return ms_of(state.createdTimestamp)


def completed_ms(raw_stub, iid: str) -> int:
    state = raw_state(raw_stub, iid)
    assert state is not None and state.HasField("completedTimestamp"), iid
    return ms_of(state.completedTimestamp)


def finish(client, iid: str, status=OrchestrationStatus.COMPLETED):
    state = client.wait_for_orchestration_completion(iid, timeout=DEADLINE_S)
    assert state is not None, iid
    assert state.runtime_status == status, (iid, state.runtime_status, state.failure_details)
    return state


def wait_clock_past(ms: int) -> None:
    """Poll until this machine's wall clock (the partitions' clock too) is past `ms`."""
    wait_until(lambda: datetime.now(UTC) > at_ms(ms) + timedelta(milliseconds=1), message=f"clock past {ms}")


def make_instances(client, prefix: str) -> dict[str, list[str]]:
    """Instances under `prefix` in every status a query can see; returns status name -> ids."""
    ids: dict[str, list[str]] = {"COMPLETED": [], "FAILED": [], "TERMINATED": [], "RUNNING": [], "PENDING": []}
    for n in range(3):
        ids["COMPLETED"].append(client.schedule_new_orchestration(echo, input=f"in-{n}", instance_id=f"{prefix}c{n}"))
    for n in range(2):
        ids["FAILED"].append(client.schedule_new_orchestration(fail_now, input="boom", instance_id=f"{prefix}f{n}"))
    for n in range(2):
        ids["RUNNING"].append(client.schedule_new_orchestration(wait_for_go, instance_id=f"{prefix}r{n}"))
    ids["TERMINATED"].append(client.schedule_new_orchestration(wait_for_go, instance_id=f"{prefix}t0"))
    for n in range(2):
        ids["PENDING"].append(client.schedule_new_orchestration(
            echo, input="later", instance_id=f"{prefix}p{n}", start_at=datetime.now(UTC) + FAR_FUTURE))
    for iid in ids["COMPLETED"]:
        finish(client, iid)
    for iid in ids["FAILED"]:
        finish(client, iid, OrchestrationStatus.FAILED)
    for iid in ids["RUNNING"] + ids["TERMINATED"]:
        client.wait_for_orchestration_start(iid, timeout=DEADLINE_S)
    client.terminate_orchestration(ids["TERMINATED"][0], output="stopped")
    finish(client, ids["TERMINATED"][0], OrchestrationStatus.TERMINATED)
    for iid in ids["RUNNING"]:
        assert client.get_orchestration_state(iid).runtime_status == OrchestrationStatus.RUNNING
    for iid in ids["PENDING"]:
        assert client.get_orchestration_state(iid).runtime_status == OrchestrationStatus.PENDING
    return ids


def raw_query_pages(raw_stub, page: int, **query) -> list[list[pb.OrchestrationState]]:
    """QueryInstances page by page, following the continuation token until there is none."""
    pages: list[list[pb.OrchestrationState]] = []
    token = None
    for _ in range(10_000):
        req = pb.QueryInstancesRequest(query=pb.InstanceQuery(maxInstanceCount=page, continuationToken=token, **query))
        res = raw_stub.QueryInstances(req, timeout=DEADLINE_S)
        pages.append(list(res.orchestrationState))
        assert page <= 0 or len(pages[-1]) <= page
        if not res.HasField("continuationToken") or not res.continuationToken.value:
            return pages
        assert token is None or res.continuationToken.value != token.value, "continuation token did not advance"
        token = res.continuationToken
    raise AssertionError("paging did not end")


def assert_created_order(states) -> None:
    keys = [(s.created_at, s.instance_id) for s in states]
    assert keys == sorted(keys), keys


# ---------------------------------------------------------------------------------------------------------
# QueryInstances
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def statuses_fleet(client) -> tuple[str, dict[str, list[str]]]:
    prefix = new_id("qs") + "-"
    return prefix, make_instances(client, prefix)


@pytest.mark.parametrize(
    "wanted",
    [
        ["COMPLETED"],
        ["FAILED", "TERMINATED"],
        ["RUNNING"],
        ["PENDING"],
        ["RUNNING", "PENDING", "COMPLETED"],
        ["SUSPENDED"],
        [],
    ],
    ids=lambda w: "+".join(w) or "any",
)
def test_query_by_status_and_prefix(client, statuses_fleet, wanted):
    prefix, ids = statuses_fleet
    query = OrchestrationQuery(
        instance_id_prefix=prefix, runtime_status=[OrchestrationStatus[w] for w in wanted] or None
    )
    states = client.get_all_orchestration_states(query)
    expected = sorted(i for name, group in ids.items() if not wanted or name in wanted for i in group)
    assert sorted(s.instance_id for s in states) == expected
    assert len(states) == len(expected)  # each exactly once
    for s in states:
        assert s.runtime_status.name in (wanted or ids.keys())
    assert [s.instance_id for s in states] == sorted(s.instance_id for s in states)  # prefix pages: id order


def test_query_by_status_without_prefix_sees_every_partition(client, statuses_fleet):
    prefix, ids = statuses_fleet
    states = client.get_all_orchestration_states(
        OrchestrationQuery(runtime_status=[OrchestrationStatus.FAILED, OrchestrationStatus.TERMINATED])
    )
    assert {s.runtime_status for s in states} <= {OrchestrationStatus.FAILED, OrchestrationStatus.TERMINATED}
    mine = sorted(s.instance_id for s in states if s.instance_id.startswith(prefix))
    assert mine == sorted(ids["FAILED"] + ids["TERMINATED"])
    assert len({s.instance_id for s in states}) == len(states)
    assert_created_order(states)


def test_query_fetch_inputs_and_outputs_on_and_off(client, statuses_fleet):
    prefix, ids = statuses_fleet
    query = OrchestrationQuery(instance_id_prefix=prefix, runtime_status=[OrchestrationStatus.COMPLETED])
    bare = client.get_all_orchestration_states(query)
    assert sorted(s.instance_id for s in bare) == sorted(ids["COMPLETED"])
    assert all(s.serialized_input is None and s.serialized_output is None for s in bare)

    query.fetch_inputs_and_outputs = True
    full = {s.instance_id: s for s in client.get_all_orchestration_states(query)}
    assert sorted(full) == sorted(ids["COMPLETED"])
    for n, iid in enumerate(ids["COMPLETED"]):
        assert full[iid].get_input() == f"in-{n}"
        assert full[iid].get_output() == f"in-{n}"

    failed = client.get_all_orchestration_states(OrchestrationQuery(
        instance_id_prefix=prefix, runtime_status=[OrchestrationStatus.FAILED], fetch_inputs_and_outputs=True))
    assert sorted(s.instance_id for s in failed) == sorted(ids["FAILED"])
    for s in failed:
        assert s.failure_details is not None and "boom" in s.failure_details.message


def test_query_by_id_prefix_is_a_prefix_not_a_substring(client):
    base = new_id("qp")
    ids = [f"{base}-1", f"{base}-10", f"{base}-11", f"{base}-2", f"x{base}-1"]
    for iid in ids:
        client.schedule_new_orchestration(echo, input=iid, instance_id=iid)
    for iid in ids:
        finish(client, iid)

    def found(prefix):
        return sorted(s.instance_id for s in client.get_all_orchestration_states(OrchestrationQuery(instance_id_prefix=prefix)))

    assert found(f"{base}-1") == [f"{base}-1", f"{base}-10", f"{base}-11"]
    assert found(f"{base}-10") == [f"{base}-10"]
    assert found(f"{base}-") == sorted(ids[:4])
    assert found(f"x{base}") == [f"x{base}-1"]
    assert found(f"{base}-3") == []


def test_query_by_created_time_range(client, raw_stub):
    prefix = new_id("qt") + "-"
    ids = []
    for n in range(9):
        ids.append(client.schedule_new_orchestration(echo, input=n, instance_id=f"{prefix}{n}"))
        if n in (2, 5):  # make sure some instances fall on either side of the range bounds
            wait_clock_past(created_ms(raw_stub, ids[-1]))
    for iid in ids:
        finish(client, iid)
    created = {iid: created_ms(raw_stub, iid) for iid in ids}
    lo, hi = created[ids[3]], created[ids[6]]
    assert lo < hi and created[ids[2]] < lo

    def expected(frm, to):
        return sorted((c, i) for i, c in created.items() if (frm is None or c >= frm) and (to is None or c < to))

    for frm, to in [(lo, hi), (lo, None), (None, hi), (lo, lo), (lo, lo + 1), (hi, hi + 1)]:
        query = OrchestrationQuery(
            instance_id_prefix=prefix,
            created_time_from=at_ms(frm) if frm is not None else None,
            created_time_to=at_ms(to) if to is not None else None,
        )
        states = client.get_all_orchestration_states(query)
        got = [(int((s.created_at.replace(tzinfo=UTC) - EPOCH) / timedelta(milliseconds=1)), s.instance_id)
               for s in states]
        assert got == expected(frm, to), (frm, to)

    # Without the prefix the range still holds, over all partitions: every state is inside it.
    states = client.get_all_orchestration_states(
        OrchestrationQuery(created_time_from=at_ms(lo), created_time_to=at_ms(hi)))
    assert all(at_ms(lo) <= s.created_at.replace(tzinfo=UTC) < at_ms(hi) for s in states)
    assert sorted(s.instance_id for s in states if s.instance_id.startswith(prefix)) == sorted(
        i for i in ids if lo <= created[i] < hi)


@pytest.fixture(scope="module")
def paging_fleet(client, raw_stub) -> tuple[str, list[str]]:
    """25 pending instances (scheduled hours ahead, so no worker touches them) spread over every partition."""
    prefix = new_id("pg") + "-"
    ids = [
        client.schedule_new_orchestration(echo, input=n, instance_id=f"{prefix}{n:02d}",
                                          start_at=datetime.now(UTC) + FAR_FUTURE)
        for n in range(25)
    ]
    assert {partition_of(i) for i in ids} == set(range(PARTITIONS))
    return prefix, ids


def test_query_paging_by_7_returns_every_instance_once_in_created_order(raw_stub, paging_fleet):
    prefix, ids = paging_fleet
    for extra in ({}, {"runtimeStatus": [pb.ORCHESTRATION_STATUS_PENDING]}):
        pages = raw_query_pages(raw_stub, 7, instanceIdPrefix=wrappers_pb2.StringValue(value=prefix), **extra)
        assert [len(p) for p in pages] == [7, 7, 7, 4]
        states = [s for p in pages for s in p]
        got = [s.instanceId for s in states]
        assert len(got) == len(set(got)) == 25
        assert sorted(got) == sorted(ids)
        keys = [(ms_of(s.createdTimestamp), s.instanceId) for s in states]
        assert keys == sorted(keys)


def test_query_paging_page_boundary_on_the_last_item(raw_stub, paging_fleet):
    """25 items in pages of 5: the 5th page is full, so a token may come back; the next page is then empty."""
    prefix, ids = paging_fleet
    pages = raw_query_pages(raw_stub, 5, instanceIdPrefix=wrappers_pb2.StringValue(value=prefix))
    assert [len(p) for p in pages[:5]] == [5] * 5 and all(not p for p in pages[5:])
    assert sorted(s.instanceId for p in pages for s in p) == sorted(ids)


def test_query_paging_with_the_sdk_clients(client, runtime, paging_fleet):
    prefix, ids = paging_fleet
    query = OrchestrationQuery(instance_id_prefix=prefix, max_instance_count=7)
    states = client.get_all_orchestration_states(query)
    assert len(states) == 25
    assert sorted(s.instance_id for s in states) == sorted(ids)
    assert_created_order(states)

    async def scenario():
        async with AsyncTaskHubGrpcClient(host_address=runtime.address) as aclient:
            return await asyncio.wait_for(aclient.get_all_orchestration_states(query), timeout=DEADLINE_S)

    async_states = asyncio.run(scenario())
    assert [s.instance_id for s in async_states] == [s.instance_id for s in states]


def test_query_paging_without_any_filter_walks_the_whole_hub(raw_stub, paging_fleet):
    prefix, ids = paging_fleet
    pages = raw_query_pages(raw_stub, 7)
    states = [s for p in pages for s in p]
    got = [s.instanceId for s in states]
    assert len(got) == len(set(got)), "an instance was returned twice"
    assert sorted(i for i in got if i.startswith(prefix)) == sorted(ids)
    keys = [(ms_of(s.createdTimestamp), s.instanceId) for s in states]
    assert keys == sorted(keys)


def test_query_with_a_malformed_continuation_token_is_invalid_argument(raw_stub):
    for bad in ("garbage", "12", ":x", "-5:x"):
        req = pb.QueryInstancesRequest(query=pb.InstanceQuery(
            maxInstanceCount=5, continuationToken=wrappers_pb2.StringValue(value=bad)))
        with pytest.raises(grpc.RpcError) as err:
            raw_stub.QueryInstances(req, timeout=DEADLINE_S)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad


@pytest.mark.engine_only
def test_a_continuation_token_of_the_other_kind_of_query_is_invalid_argument(raw_stub):
    """Prefix queries are in id order and their tokens name an id; the others are in created order. A token of
    the wrong kind would restart the listing (repeats) or skip ahead (misses), so it is refused."""
    calls = [
        ("QueryInstances", pb.QueryInstancesRequest(query=pb.InstanceQuery(
            maxInstanceCount=5, continuationToken=wrappers_pb2.StringValue(value="i:some-id")))),
        ("QueryInstances", pb.QueryInstancesRequest(query=pb.InstanceQuery(
            maxInstanceCount=5, instanceIdPrefix=wrappers_pb2.StringValue(value="some"),
            continuationToken=wrappers_pb2.StringValue(value="1700000000000:some-id")))),
        ("ListInstanceIds", pb.ListInstanceIdsRequest(
            pageSize=5, lastInstanceKey=wrappers_pb2.StringValue(value="i:some-id"))),
    ]
    for rpc, req in calls:
        with pytest.raises(grpc.RpcError) as err:
            getattr(raw_stub, rpc)(req, timeout=DEADLINE_S)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (rpc, req)
        assert "continuation token" in err.value.details()


# ---------------------------------------------------------------------------------------------------------
# ListInstanceIds
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_fleet(client, raw_stub) -> dict[str, int]:
    """11 completed and 3 failed instances: id -> completed ms (read from the engine)."""
    prefix = new_id("li") + "-"
    ids = [client.schedule_new_orchestration(echo, input=n, instance_id=f"{prefix}c{n:02d}") for n in range(11)]
    failed = [client.schedule_new_orchestration(fail_now, input="x", instance_id=f"{prefix}f{n}") for n in range(3)]
    for iid in ids:
        finish(client, iid)
    for iid in failed:
        finish(client, iid, OrchestrationStatus.FAILED)
    return {iid: completed_ms(raw_stub, iid) for iid in ids + failed}


def list_all_ids(list_page, page_size: int, **kwargs) -> list[str]:
    out: list[str] = []
    token = None
    for _ in range(10_000):
        page = list_page(page_size=page_size, continuation_token=token, **kwargs)
        assert len(page.items) <= page_size
        out += page.items
        if not page.continuation_token:
            return out
        assert page.continuation_token != token
        token = page.continuation_token
    raise AssertionError("paging did not end")


def check_listing(raw_stub, listed: list[str], mine: dict[str, int], statuses, lo: int | None, hi: int | None):
    """`listed` holds each of `mine` in the filter exactly once, in (completed, id) order, and nothing outside it."""
    assert len(listed) == len(set(listed)), "an id was listed twice"
    expected_mine = sorted((d, i) for i, d in mine.items()
                           if (lo is None or d >= lo) and (hi is None or d < hi) and raw_state(raw_stub, i).orchestrationStatus in statuses)
    assert [i for i in listed if i in mine] == [i for _, i in expected_mine]
    keys = []
    for iid in listed:
        state = raw_state(raw_stub, iid)
        if state is None:  # purged by another test since; nothing to check
            continue
        assert state.orchestrationStatus in statuses, iid
        d = ms_of(state.completedTimestamp)
        assert (lo is None or d >= lo) and (hi is None or d < hi), iid
        keys.append((d, iid))
    assert keys == sorted(keys)


def test_list_instance_ids_by_status_and_completed_time_with_paging(client, raw_stub, finished_fleet):
    times = sorted(finished_fleet.values())
    lo, hi = times[2], times[-3]
    assert lo < hi
    completed = [pb.ORCHESTRATION_STATUS_COMPLETED]
    terminal = [pb.ORCHESTRATION_STATUS_COMPLETED, pb.ORCHESTRATION_STATUS_FAILED,
                pb.ORCHESTRATION_STATUS_TERMINATED, pb.ORCHESTRATION_STATUS_CANCELED]
    cases = [
        ([OrchestrationStatus.COMPLETED], completed, lo, hi),
        ([OrchestrationStatus.FAILED], [pb.ORCHESTRATION_STATUS_FAILED], None, None),
        (None, terminal, lo, None),
        (None, terminal, times[0], times[-1] + 1),
        ([OrchestrationStatus.COMPLETED, OrchestrationStatus.FAILED], completed + [pb.ORCHESTRATION_STATUS_FAILED],
         times[0], times[-1] + 1),
    ]
    for sdk_statuses, statuses, frm, to in cases:
        for page_size in (3, 1000):
            listed = list_all_ids(client.list_instance_ids, page_size, runtime_status=sdk_statuses,
                                  completed_time_from=at_ms(frm) if frm is not None else None,
                                  completed_time_to=at_ms(to) if to is not None else None)
            check_listing(raw_stub, listed, finished_fleet, statuses, frm, to)


def test_list_instance_ids_never_lists_running_or_pending(client, statuses_fleet):
    prefix, ids = statuses_fleet
    listed = set(list_all_ids(client.list_instance_ids, 1000))
    assert set(ids["COMPLETED"] + ids["FAILED"] + ids["TERMINATED"]) <= listed
    assert not listed & set(ids["RUNNING"] + ids["PENDING"])
    running_only = list_all_ids(client.list_instance_ids, 1000, runtime_status=[OrchestrationStatus.RUNNING])
    assert running_only == []


def test_list_instance_ids_with_the_async_client(runtime, raw_stub, finished_fleet):
    times = sorted(finished_fleet.values())

    async def scenario():
        async with AsyncTaskHubGrpcClient(host_address=runtime.address) as aclient:
            out, token = [], None
            for _ in range(1000):
                page = await aclient.list_instance_ids(
                    runtime_status=[OrchestrationStatus.COMPLETED], completed_time_from=at_ms(times[0]),
                    page_size=4, continuation_token=token)
                assert len(page.items) <= 4
                out += page.items
                if not page.continuation_token:
                    return out
                token = page.continuation_token
            raise AssertionError("paging did not end")

    listed = asyncio.run(scenario())
    check_listing(raw_stub, listed, finished_fleet, [pb.ORCHESTRATION_STATUS_COMPLETED], times[0], None)


# ---------------------------------------------------------------------------------------------------------
# purge by filter
# ---------------------------------------------------------------------------------------------------------
def purge_window(client, raw_stub, prefix: str):
    """Instances under `prefix`: one before the window, a window with every status and a parent whose
    child is created after the window, one after the window. Returns (ids, from_ms, to_ms)."""
    before = client.schedule_new_orchestration(echo, input=0, instance_id=f"{prefix}before")
    finish(client, before)
    wait_clock_past(created_ms(raw_stub, before))
    ids = make_instances(client, prefix)
    ids["before"] = [before]
    parent = f"{prefix}parent"
    child = id_not_on_partition(f"{prefix}child", partition_of(parent))
    client.schedule_new_orchestration(parent_after_go, input={"n": 5, "child": child}, instance_id=parent)
    client.wait_for_orchestration_start(parent, timeout=DEADLINE_S)
    window_from = min(created_ms(raw_stub, i) for group in ids.values() for i in group if i != before)
    window_to = created_ms(raw_stub, parent) + 1
    wait_clock_past(window_to)
    client.raise_orchestration_event(parent, "go")
    assert finish(client, parent).get_output() == 5
    finish(client, child)
    assert created_ms(raw_stub, child) >= window_to, "the child must be created outside the window"
    after = client.schedule_new_orchestration(echo, input=1, instance_id=f"{prefix}after")
    finish(client, after)
    ids.update(parent=[parent], child=[child], after=[after])
    assert created_ms(raw_stub, before) < window_from
    # No other test creates instances meanwhile: the window holds only ours.
    in_window = client.get_all_orchestration_states(
        OrchestrationQuery(created_time_from=at_ms(window_from), created_time_to=at_ms(window_to)))
    assert all(s.instance_id.startswith(prefix) for s in in_window)
    return ids, window_from, window_to


def existing(client, ids) -> set[str]:
    return {i for group in ids.values() for i in group if client.get_orchestration_state(i) is not None}


def test_purge_by_filter_deletes_only_terminal_matching_instances_and_children(client, raw_stub):
    prefix = new_id("pf") + "-"
    ids, lo, hi = purge_window(client, raw_stub, prefix)
    everything = existing(client, ids)
    result = client.purge_orchestrations_by(
        created_time_from=at_ms(lo), created_time_to=at_ms(hi),
        runtime_status=[OrchestrationStatus.COMPLETED, OrchestrationStatus.FAILED, OrchestrationStatus.TERMINATED,
                        OrchestrationStatus.RUNNING, OrchestrationStatus.PENDING],
        recursive=True)
    doomed = set(ids["COMPLETED"] + ids["FAILED"] + ids["TERMINATED"] + ids["parent"] + ids["child"])
    assert result.deleted_instance_count == len(doomed)
    assert result.is_complete is True
    assert existing(client, ids) == everything - doomed
    for iid in ids["RUNNING"]:
        assert client.get_orchestration_state(iid).runtime_status == OrchestrationStatus.RUNNING
    for iid in ids["PENDING"]:
        assert client.get_orchestration_state(iid).runtime_status == OrchestrationStatus.PENDING
    # Gone from the indexes too.
    left = client.get_all_orchestration_states(OrchestrationQuery(instance_id_prefix=prefix))
    assert sorted(s.instance_id for s in left) == sorted(everything - doomed)
    assert not doomed & set(list_all_ids(client.list_instance_ids, 1000))
    # Nothing left to purge in the window: a second run deletes nothing.
    again = client.purge_orchestrations_by(created_time_from=at_ms(lo), created_time_to=at_ms(hi), recursive=True)
    assert (again.deleted_instance_count, again.is_complete) == (0, True)
    # Running instances can finish normally afterwards.
    for iid in ids["RUNNING"]:
        client.raise_orchestration_event(iid, "go", data="late")
        assert finish(client, iid).get_output() == "late"


def test_purge_by_filter_status_subset_and_not_recursive(client, raw_stub):
    prefix = new_id("pn") + "-"
    ids, lo, hi = purge_window(client, raw_stub, prefix)
    everything = existing(client, ids)

    failed_only = client.purge_orchestrations_by(
        created_time_from=at_ms(lo), created_time_to=at_ms(hi), runtime_status=[OrchestrationStatus.FAILED])
    assert (failed_only.deleted_instance_count, failed_only.is_complete) == (len(ids["FAILED"]), True)
    assert existing(client, ids) == everything - set(ids["FAILED"])

    rest = client.purge_orchestrations_by(created_time_from=at_ms(lo), created_time_to=at_ms(hi), recursive=False)
    doomed = set(ids["FAILED"] + ids["COMPLETED"] + ids["TERMINATED"] + ids["parent"])
    assert (rest.deleted_instance_count, rest.is_complete) == (len(doomed) - len(ids["FAILED"]), True)
    assert existing(client, ids) == everything - doomed  # the child (outside the window) stays


def test_a_recursive_purge_by_filter_leaves_a_tree_alone_while_a_child_still_runs(client, raw_stub):
    """The matching parent has finished, its child (not awaited) runs on: purging the parent would leave the
    child where no recursive purge reaches it. The tree is left, and the purge says it is not whole."""
    parent = new_id("pfr-parent")
    child = id_not_on_partition("pfr-child", partition_of(parent))
    client.schedule_new_orchestration(parent_that_does_not_wait, input=child, instance_id=parent)
    finish(client, parent)
    wait_until(lambda: (state := client.get_orchestration_state(child)) is not None
               and state.runtime_status == OrchestrationStatus.RUNNING, message="child running")
    window = {"created_time_from": at_ms(created_ms(raw_stub, parent)),
              "created_time_to": at_ms(created_ms(raw_stub, parent) + 1)}

    result = client.purge_orchestrations_by(**window, recursive=True)
    assert (result.deleted_instance_count, result.is_complete) == (0, False)
    assert client.get_orchestration_state(parent) is not None

    client.raise_orchestration_event(child, "go", data="late")
    finish(client, child)
    result = client.purge_orchestrations_by(**window, recursive=True)
    assert (result.deleted_instance_count, result.is_complete) == (2, True)
    assert client.get_orchestration_state(parent) is None and client.get_orchestration_state(child) is None


def test_purge_by_filter_with_the_async_client(runtime, client, raw_stub):
    prefix = new_id("pa") + "-"
    ids = [client.schedule_new_orchestration(echo, input=n, instance_id=f"{prefix}{n}") for n in range(4)]
    for iid in ids:
        finish(client, iid)
    lo = min(created_ms(raw_stub, i) for i in ids)
    hi = max(created_ms(raw_stub, i) for i in ids) + 1

    async def scenario():
        async with AsyncTaskHubGrpcClient(host_address=runtime.address) as aclient:
            return await aclient.purge_orchestrations_by(created_time_from=at_ms(lo), created_time_to=at_ms(hi),
                                                         runtime_status=[OrchestrationStatus.COMPLETED])

    result = asyncio.run(scenario())
    assert (result.deleted_instance_count, result.is_complete) == (4, True)
    assert all(client.get_orchestration_state(i) is None for i in ids)


# ---------------------------------------------------------------------------------------------------------
# StreamInstanceHistory
# ---------------------------------------------------------------------------------------------------------
def event_names(events) -> list[str]:
    """SDK history event class names, without the orchestratorStarted/Completed markers."""
    skip = {"OrchestratorStartedEvent", "OrchestratorCompletedEvent"}
    return [type(e).__name__ for e in events if type(e).__name__ not in skip]


EXPECTED_TWO_STEPS = [
    "ExecutionStartedEvent", "TaskScheduledEvent", "TaskCompletedEvent",
    "TaskScheduledEvent", "TaskCompletedEvent", "ExecutionCompletedEvent",
]


def test_stream_history_returns_committed_events_in_order(client, raw_stub):
    iid = client.schedule_new_orchestration(two_steps, input=1, instance_id=new_id("hist"))
    assert finish(client, iid).get_output() == 3
    events = client.get_orchestration_history(iid)
    assert event_names(events) == EXPECTED_TWO_STEPS
    started = events[[type(e).__name__ for e in events].index("ExecutionStartedEvent")]
    assert started.name == "two_steps" and started.input == "1"
    assert [e.result for e in events if type(e).__name__ == "TaskCompletedEvent"] == ["2", "3"]
    assert events[-1].result == "3"

    execution_id = raw_state(raw_stub, iid).executionId.value
    assert execution_id
    assert event_names(client.get_orchestration_history(iid, execution_id=execution_id)) == EXPECTED_TWO_STEPS


def test_stream_history_errors(client):
    iid = client.schedule_new_orchestration(echo, input=1, instance_id=new_id("hist-x"))
    finish(client, iid)
    with pytest.raises(grpc.RpcError) as err:
        client.get_orchestration_history(iid, execution_id="not-the-execution-id")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        client.get_orchestration_history(new_id("hist-nobody"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_stream_history_of_a_running_instance_is_what_is_committed(client):
    iid = client.schedule_new_orchestration(wait_for_go, instance_id=new_id("hist-run"))
    client.wait_for_orchestration_start(iid, timeout=DEADLINE_S)
    # The first turn commits asynchronously to the status change: poll until it is there.
    events = wait_until(lambda: client.get_orchestration_history(iid) or None, message="first turn committed")
    assert event_names(events) == ["ExecutionStartedEvent"]
    client.raise_orchestration_event(iid, "go", data="v")
    finish(client, iid)
    assert event_names(client.get_orchestration_history(iid)) == [
        "ExecutionStartedEvent", "EventRaisedEvent", "ExecutionCompletedEvent"]


def test_stream_history_with_the_async_client(runtime, client, raw_stub):
    iid = client.schedule_new_orchestration(two_steps, input=5, instance_id=new_id("hist-a"))
    finish(client, iid)
    execution_id = raw_state(raw_stub, iid).executionId.value

    async def scenario():
        async with AsyncTaskHubGrpcClient(host_address=runtime.address) as aclient:
            good = await aclient.get_orchestration_history(iid, execution_id=execution_id)
            try:
                await aclient.get_orchestration_history(iid, execution_id="wrong")
            except grpc.RpcError as e:
                return good, e.code()
            return good, None

    events, code = asyncio.run(scenario())
    assert event_names(events) == EXPECTED_TWO_STEPS
    assert code == grpc.StatusCode.NOT_FOUND


def test_stream_history_larger_than_one_chunk(client, raw_stub):
    iid = client.schedule_new_orchestration(big_history, input=6, instance_id=new_id("hist-big"))
    finish(client, iid)
    chunks = list(raw_stub.StreamInstanceHistory(pb.StreamInstanceHistoryRequest(instanceId=iid), timeout=DEADLINE_S))
    assert len(chunks) >= 2
    events = [e for c in chunks for e in c.events]
    kinds = [e.WhichOneof("eventType") for e in events if e.WhichOneof("eventType") not in (
        "orchestratorStarted", "orchestratorCompleted")]
    assert kinds == ["executionStarted"] + ["taskScheduled", "taskCompleted"] * 6 + ["executionCompleted"]
    results = [e.taskCompleted.result.value for e in events if e.HasField("taskCompleted")]
    assert results == [f'"{str(n) * 300_000}"' for n in range(6)]
    assert len(client.get_orchestration_history(iid)) == len(events)


# ---------------------------------------------------------------------------------------------------------
# RestartInstance
# ---------------------------------------------------------------------------------------------------------
def test_restart_completed_instance_with_the_same_id(client, raw_stub):
    iid = client.schedule_new_orchestration(two_steps, input=10, instance_id=new_id("rs"), tags={"k": "v"})
    assert finish(client, iid).get_output() == 12
    first = raw_state(raw_stub, iid)

    assert client.restart_orchestration(iid) == iid
    state = finish(client, iid)
    assert state.get_input() == 10 and state.get_output() == 12
    second = raw_state(raw_stub, iid)
    assert second.executionId.value != first.executionId.value
    assert ms_of(second.createdTimestamp) >= ms_of(first.createdTimestamp)
    assert second.name == first.name and dict(second.tags) == {"k": "v"}
    assert event_names(client.get_orchestration_history(iid)) == EXPECTED_TWO_STEPS  # a fresh history


def test_restart_failed_instance_runs_again_with_the_original_input(client):
    key = new_id("flaky")
    iid = client.schedule_new_orchestration(flaky_orchestrator, input=key, instance_id=new_id("rf"))
    finish(client, iid, OrchestrationStatus.FAILED)
    assert client.restart_orchestration(iid) == iid
    assert finish(client, iid).get_output() == f"ok:{key}"


def test_restart_with_a_new_instance_id(client, raw_stub):
    iid = client.schedule_new_orchestration(echo, input={"a": 1}, instance_id=new_id("rn"))
    finish(client, iid)
    old = raw_state(raw_stub, iid)

    new = client.restart_orchestration(iid, restart_with_new_instance_id=True)
    assert new and new != iid
    state = finish(client, new)
    assert state.get_input() == {"a": 1} and state.get_output() == {"a": 1}
    assert raw_state(raw_stub, new).name == "echo"
    # the original is untouched
    assert raw_state(raw_stub, iid).executionId.value == old.executionId.value
    assert client.get_orchestration_state(iid).runtime_status == OrchestrationStatus.COMPLETED


def test_restart_of_running_and_unknown_instances(client):
    iid = client.schedule_new_orchestration(wait_for_go, instance_id=new_id("rr"))
    client.wait_for_orchestration_start(iid, timeout=DEADLINE_S)
    for new_id_flag in (False, True):
        with pytest.raises(grpc.RpcError) as err:
            client.restart_orchestration(iid, restart_with_new_instance_id=new_id_flag)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert client.get_orchestration_state(iid).runtime_status == OrchestrationStatus.RUNNING
    with pytest.raises(grpc.RpcError) as err:
        client.restart_orchestration(new_id("rr-nobody"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    client.raise_orchestration_event(iid, "go", data=1)
    finish(client, iid)


def test_restart_with_the_async_client(runtime, client):
    iid = client.schedule_new_orchestration(fail_now, input="again", instance_id=new_id("ra"))
    finish(client, iid, OrchestrationStatus.FAILED)
    running = client.schedule_new_orchestration(wait_for_go, instance_id=new_id("ra-run"))
    client.wait_for_orchestration_start(running, timeout=DEADLINE_S)

    async def scenario():
        async with AsyncTaskHubGrpcClient(host_address=runtime.address) as aclient:
            same = await aclient.restart_orchestration(iid)
            done = await aclient.wait_for_orchestration_completion(iid, timeout=DEADLINE_S)
            new = await aclient.restart_orchestration(iid, restart_with_new_instance_id=True)
            codes = []
            for target in (running, new_id("ra-nobody")):
                try:
                    await aclient.restart_orchestration(target)
                except grpc.RpcError as e:
                    codes.append(e.code())
            return same, done, new, codes

    same, done, new, codes = asyncio.run(scenario())
    assert same == iid
    assert done.runtime_status == OrchestrationStatus.FAILED and "again" in done.failure_details.message
    assert new != iid
    failed = finish(client, new, OrchestrationStatus.FAILED)
    assert "again" in failed.failure_details.message
    assert codes == [grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND]
    client.raise_orchestration_event(running, "go", data=1)
    finish(client, running)


def test_purge_by_filter_with_a_timeout_reports_what_it_deleted(client, raw_stub):
    """A purge cut short by its timeout answers deleted_instance_count (what is really gone) and
    is_complete=False; it must not fail the RPC after having deleted instances."""
    prefix = new_id("pt") + "-"
    ids = [client.schedule_new_orchestration(echo, input=n, instance_id=f"{prefix}{n:03d}") for n in range(90)]
    for iid in ids:
        finish(client, iid)
    lo = min(created_ms(raw_stub, i) for i in ids)
    hi = max(created_ms(raw_stub, i) for i in ids) + 1
    window = {"created_time_from": at_ms(lo), "created_time_to": at_ms(hi)}
    try:
        result = client.purge_orchestrations_by(**window, timeout=timedelta(milliseconds=1))
        error = None
    except grpc.RpcError as e:
        result, error = None, e
    gone = sum(client.get_orchestration_state(i) is None for i in ids)
    assert error is None, (f"PurgeInstances failed with {error.code()} ({error.details()}) "
                           f"although it deleted {gone} of {len(ids)} instances")
    assert result.deleted_instance_count == gone
    assert result.is_complete == (gone == len(ids))
    rest = client.purge_orchestrations_by(**window)
    assert (rest.deleted_instance_count, rest.is_complete) == (len(ids) - gone, True)
    assert all(client.get_orchestration_state(i) is None for i in ids)


# ---------------------------------------------------------------------------------------------------------
# requests the engine must refuse (or answer) without crashing a partition: each on a private runtime
# ---------------------------------------------------------------------------------------------------------
def partition_exits(rt) -> int:
    """Partition processes that exited so far (the supervisor logs each one)."""
    return rt.log_tail(10**6).count("exited with")


PRE_EPOCH = datetime(1969, 12, 31, tzinfo=UTC)


@pytest.mark.parametrize("call", ["query", "list_instance_ids", "purge_by"])
def test_a_time_bound_before_1970_is_answered_and_crashes_nothing(fresh_runtime, call):
    """The SDK sends datetime bounds as Timestamps; one before the epoch is negative and valid."""
    c = dt_client.TaskHubGrpcClient(host_address=fresh_runtime.address)
    try:
        iid = c.schedule_new_orchestration(echo, input=1, instance_id=new_id("pre"),
                                           start_at=datetime.now(UTC) + FAR_FUTURE)
        try:
            if call == "query":
                found = c.get_all_orchestration_states(OrchestrationQuery(created_time_from=PRE_EPOCH))
                assert [s.instance_id for s in found] == [iid]
            elif call == "list_instance_ids":
                assert c.list_instance_ids(completed_time_from=PRE_EPOCH).items == []
            else:
                result = c.purge_orchestrations_by(created_time_from=PRE_EPOCH)
                assert (result.deleted_instance_count, result.is_complete) == (0, True)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
        assert partition_exits(fresh_runtime) == 0, "the request crashed partitions"
        assert c.get_orchestration_state(iid).runtime_status == OrchestrationStatus.PENDING
    finally:
        c.close()


@pytest.mark.parametrize(
    "query",
    [
        pb.InstanceQuery(runtimeStatus=[999]),
        pb.InstanceQuery(runtimeStatus=[-1]),
        pb.InstanceQuery(continuationToken=wrappers_pb2.StringValue(value="\u00b2:x")),
        pb.InstanceQuery(continuationToken=wrappers_pb2.StringValue(value=f"{2**64}:x")),
    ],
    ids=["status-999", "status-minus-1", "token-superscript-digit", "token-2^64"],
)
def test_malformed_query_values_are_invalid_argument_and_crash_nothing(fresh_runtime, query):
    channel = grpc.insecure_channel(fresh_runtime.address)
    try:
        stub = stubs.TaskHubSidecarServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.QueryInstances(pb.QueryInstancesRequest(query=query), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.value.code(), err.value.details())
        assert partition_exits(fresh_runtime) == 0, "the request crashed partitions"
    finally:
        channel.close()


def test_a_negative_max_instance_count_loses_no_instance(raw_stub, paging_fleet):
    """maxInstanceCount is an int32: a negative one is refused or means 'default', never fewer items."""
    prefix, ids = paging_fleet
    try:
        pages = raw_query_pages(raw_stub, -1, instanceIdPrefix=wrappers_pb2.StringValue(value=prefix))
        got = [s.instanceId for p in pages for s in p]
        assert sorted(got) == sorted(ids) and len(got) == len(ids), f"{len(got)} of {len(ids)} returned"
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())


def test_a_negative_page_size_loses_no_instance_id(raw_stub, finished_fleet):
    """ListInstanceIds.pageSize is an int32: a negative one is refused or means 'default'."""
    try:
        res = raw_stub.ListInstanceIds(pb.ListInstanceIdsRequest(pageSize=-3), timeout=DEADLINE_S)
        assert set(finished_fleet) <= set(res.instanceIds) or res.HasField("lastInstanceKey"), (
            f"{len(res.instanceIds)} ids and no continuation key")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
