"""Durable entities through the official SDK: client signals and queries, entity work items on the worker,
calls/signals/critical sections from orchestrations, and actions taken by entity code.

Entity ids `@name@key` are placed with the same FNV-1a hash as orchestration ids, so keys are picked with
`partition_of("@name@key")` when a test needs entities on different partitions.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from durabletask import task
from durabletask import worker as dt_worker
from durabletask.client import (
    AsyncTaskHubGrpcClient,
    EntityQuery,
    OrchestrationQuery,
    OrchestrationStatus,
    TaskHubGrpcClient,
)
from durabletask.entities import DurableEntity, EntityContext, EntityInstanceId, EntityMetadata
from durabletask.internal import orchestrator_service_pb2 as pb
from google.protobuf import wrappers_pb2

from .helpers import DEADLINE_S, PARTITIONS, new_id, partition_of, wait_until

pytestmark = pytest.mark.engine_only


# ---------------------------------------------------------------------------------------------------------
# entities
# ---------------------------------------------------------------------------------------------------------
class Counter(DurableEntity):
    """`@counter@key`: an int."""

    def add(self, amount: int) -> int:
        value = self.get_state(int, 0) + amount
        self.set_state(value)
        return value

    def get(self) -> int:
        return self.get_state(int, 0)

    def fail(self, message: str) -> None:
        self.set_state(-999)  # must be rolled back: the operation fails
        raise ValueError(message)


def ledger(ctx: EntityContext, payload: Any) -> Any:
    """`@ledger@key` (a function entity): a value and the log of who wrote it."""
    state = ctx.get_state(dict, {"value": 0, "log": []})
    if ctx.operation == "read":
        return state["value"]
    if ctx.operation == "write":
        state["value"] = payload["value"]
        state["log"].append(payload["by"])
        ctx.set_state(state)
        return None
    raise ValueError(f"unknown operation {ctx.operation}")


class Relay(DurableEntity):
    """`@relay@key`: entity actions, counted in its state."""

    def forward(self, request: dict) -> None:
        self.signal_entity(EntityInstanceId("counter", request["target"]), "add", request["amount"])
        self.set_state(self.get_state(int, 0) + 1)

    def spawn(self, request: dict) -> str:
        instance_id = self.schedule_new_orchestration("spawned", input=request, instance_id=request.get("instance_id"))
        self.set_state(self.get_state(int, 0) + 1)
        return instance_id


def counter(key: str) -> EntityInstanceId:
    return EntityInstanceId("counter", key)


def ledger_id(key: str) -> EntityInstanceId:
    return EntityInstanceId("ledger", key)


# ---------------------------------------------------------------------------------------------------------
# orchestrators
# ---------------------------------------------------------------------------------------------------------
def call_counter(ctx: task.OrchestrationContext, inp: dict):
    added = yield ctx.call_entity(counter(inp["key"]), "add", inp["amount"])
    value = yield ctx.call_entity(counter(inp["key"]), "get")
    return [added, value]


def call_failing_caught(ctx: task.OrchestrationContext, key: str):
    try:
        yield ctx.call_entity(counter(key), "fail", "boom")
        caught = None
    except task.TaskFailedError as exc:
        caught = str(exc)
    after = yield ctx.call_entity(counter(key), "add", 1)  # the entity keeps working, its state unharmed
    return {"caught": caught, "after": after}


def call_failing_uncaught(ctx: task.OrchestrationContext, key: str):
    yield ctx.call_entity(counter(key), "fail", "kaboom")
    return "unreachable"


def signal_counter(ctx: task.OrchestrationContext, inp: dict):
    ctx.signal_entity(counter(inp["key"]), "add", inp["amount"])
    return "sent"


def signal_counter_later(ctx: task.OrchestrationContext, inp: dict):
    due = ctx.current_utc_datetime + timedelta(seconds=inp["delay_s"])
    ctx.signal_entity(counter(inp["key"]), "add", inp["amount"], signal_time=due)
    return due.isoformat()


def section_across_partitions(ctx: task.OrchestrationContext, keys: list):
    """Lock counters on several partitions, call each inside, wait for `go`, then read them again."""
    ids = [counter(k) for k in keys]
    with (yield ctx.lock_entities(ids)):
        first = []
        for eid in ids:
            first.append((yield ctx.call_entity(eid, "add", 1)))
        yield ctx.wait_for_external_event("go")
        second = []
        for eid in ids:
            second.append((yield ctx.call_entity(eid, "get")))
    return {"first": first, "second": second}


def locked_increments(ctx: task.OrchestrationContext, inp: dict):
    """Read-modify-write of every ledger, `rounds` times, inside one critical section."""
    ids = [ledger_id(k) for k in inp["keys"]]
    with (yield ctx.lock_entities(ids)):
        for _ in range(inp["rounds"]):
            for eid in ids:
                value = yield ctx.call_entity(eid, "read")
                yield ctx.call_entity(eid, "write", {"value": value + 1, "by": ctx.instance_id})
    return "done"


def hold_lock(ctx: task.OrchestrationContext, inp: dict):
    """Lock one counter (optionally add to it), then wait for `release` inside the critical section."""
    with (yield ctx.lock_entities([counter(inp["key"])])):
        if inp.get("add"):
            yield ctx.call_entity(counter(inp["key"]), "add", inp["add"])
        yield ctx.wait_for_external_event("release")
    return "released"


def fail_inside_section(ctx: task.OrchestrationContext, key: str):
    with (yield ctx.lock_entities([counter(key)])):
        yield ctx.call_entity(counter(key), "add", 1)
        yield ctx.call_entity(counter(key), "fail", "inside")
    return "unreachable"


def lock_and_add(ctx: task.OrchestrationContext, key: str):
    with (yield ctx.lock_entities([counter(key)])):
        value = yield ctx.call_entity(counter(key), "add", 1)
    return value


def spawn_via_relay(ctx: task.OrchestrationContext, inp: dict):
    spawned_id = yield ctx.call_entity(EntityInstanceId("relay", inp["relay"]), "spawn", inp["request"])
    return spawned_id


def spawned(ctx: task.OrchestrationContext, request: dict):
    yield ctx.call_entity(counter(request["key"]), "add", 1)
    return request["tag"]


ORCHESTRATORS = [
    call_counter, call_failing_caught, call_failing_uncaught, signal_counter, signal_counter_later,
    section_across_partitions,
    locked_increments, hold_lock, fail_inside_section, lock_and_add, spawn_via_relay, spawned,
]
ENTITIES = [Counter, ledger, Relay]


# ---------------------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------------------
def start_worker(address: str) -> dt_worker.TaskHubGrpcWorker:
    w = dt_worker.TaskHubGrpcWorker(
        host_address=address,
        concurrency_options=dt_worker.ConcurrencyOptions(maximum_thread_pool_workers=32),
    )
    for fn in ORCHESTRATORS:
        w.add_orchestrator(fn)
    for entity in ENTITIES:
        w.add_entity(entity)
    w.start()
    return w


@pytest.fixture(scope="module", autouse=True)
def worker(runtime) -> Iterator[dt_worker.TaskHubGrpcWorker]:
    w = start_worker(runtime.address)
    try:
        yield w
    finally:
        w.stop()


def key_on(name: str, partition: int, tag: str = "k") -> str:
    """A fresh entity key such that `@name@key` lives on `partition`."""
    for _ in range(10_000):
        key = f"{tag}{uuid.uuid4().hex[:10]}"
        if partition_of(f"@{name}@{key}") == partition:
            return key
    raise AssertionError(f"no key for partition {partition}")


def state_of(client: TaskHubGrpcClient, eid: EntityInstanceId) -> Any:
    meta = client.get_entity(eid, include_state=True)
    return None if meta is None or not meta.get_state() else meta.get_typed_state()


def wait_state(client: TaskHubGrpcClient, eid: EntityInstanceId, expected: Any, timeout: float = DEADLINE_S) -> None:
    wait_until(lambda: state_of(client, eid) == expected, timeout=timeout,
               message=lambda: f"{eid} state == {expected!r} (now {state_of(client, eid)!r})")


def locked_by(meta: EntityMetadata | None) -> str | None:
    # EntityMetadata.get_locked_by() parses the owner as an *entity* id; the owner is an orchestration id.
    return None if meta is None else (meta._locked_by or None)  # noqa: SLF001


def completed(client: TaskHubGrpcClient, instance_id: str, status: OrchestrationStatus = OrchestrationStatus.COMPLETED):
    state = client.wait_for_orchestration_completion(instance_id, timeout=DEADLINE_S)
    assert state is not None, f"{instance_id} did not finish"
    assert state.runtime_status == status, (state.runtime_status, state.failure_details)
    return state


# ---------------------------------------------------------------------------------------------------------
# client: signal / get
# ---------------------------------------------------------------------------------------------------------
def test_signal_and_get_entity_with_and_without_state(client):
    eid = counter(new_id("sig"))
    assert client.get_entity(eid) is None
    for amount in (1, 2, 3):
        client.signal_entity(eid, "add", input=amount)
    wait_state(client, eid, 6)

    with_state = client.get_entity(eid, include_state=True)
    assert with_state is not None and with_state.id == eid and with_state.includes_state
    assert with_state.get_typed_state(int) == 6
    assert with_state.backlog_queue_size == 0 and locked_by(with_state) is None
    assert abs((datetime.now(UTC) - with_state.last_modified).total_seconds()) < DEADLINE_S

    without_state = client.get_entity(eid, include_state=False)
    assert without_state is not None and not without_state.includes_state
    assert without_state.get_state() is None
    assert without_state.last_modified == with_state.last_modified


def test_scheduled_signal_applies_only_after_its_time(client):
    eid = counter(new_id("later"))
    client.signal_entity(eid, "add", input=1)
    wait_state(client, eid, 1)
    due = datetime.now(UTC) + timedelta(seconds=2.5)
    client.signal_entity(eid, "add", input=10, signal_time=due)

    observations: list[tuple[datetime, Any]] = []

    def applied() -> bool:
        value = state_of(client, eid)
        observations.append((datetime.now(UTC), value))
        return value == 11

    wait_until(applied, timeout=DEADLINE_S, interval=0.1, message="the scheduled signal to apply")
    early = [value for at, value in observations if at < due - timedelta(milliseconds=100)]
    assert early and all(value == 1 for value in early), observations
    first_applied = next(at for at, value in observations if value == 11)
    assert first_applied >= due - timedelta(milliseconds=100), (first_applied, due)

    client.signal_entity(eid, "add", input=100, signal_time=datetime.now(UTC) - timedelta(hours=1))
    wait_state(client, eid, 111, timeout=5)  # a signal time in the past is due now


def test_async_client_signal_get_query_clean(runtime):
    tag = new_id("async")

    async def scenario():
        async with AsyncTaskHubGrpcClient(host_address=runtime.address) as aclient:
            eids = [counter(f"{tag}-{i}") for i in range(3)]
            for i, eid in enumerate(eids):
                await aclient.signal_entity(eid, "add", input=i + 1)
            deadline = time.monotonic() + DEADLINE_S
            while True:
                metas = [await aclient.get_entity(eid) for eid in eids]
                if all(m is not None for m in metas):
                    break
                assert time.monotonic() < deadline, "signals not applied"
                await asyncio.sleep(0.05)
            listed = await aclient.get_all_entities(EntityQuery(instance_id_starts_with=f"@counter@{tag}", page_size=2))
            cleaned = await aclient.clean_entity_storage()
            missing = await aclient.get_entity(counter(f"{tag}-none"))
            return metas, listed, cleaned, missing

    metas, listed, cleaned, missing = asyncio.run(asyncio.wait_for(scenario(), timeout=2 * DEADLINE_S))
    assert [m.get_typed_state(int) for m in metas] == [1, 2, 3]
    assert sorted(str(m.id) for m in listed) == sorted(str(m.id) for m in metas)
    assert cleaned.empty_entities_removed >= 0 and cleaned.orphaned_locks_released >= 0
    assert missing is None


# ---------------------------------------------------------------------------------------------------------
# client: queries
# ---------------------------------------------------------------------------------------------------------
def test_query_by_name_prefix_and_include_state(client):
    tag = new_id("q")
    counters = [counter(f"{tag}-{i}") for i in range(3)]
    relays = [EntityInstanceId("relay", f"{tag}-{i}") for i in range(2)]
    for i, eid in enumerate(counters):
        client.signal_entity(eid, "add", input=i + 10)
    for eid in relays:  # a relay forwarding 0 to a throwaway counter just counts 1
        client.signal_entity(eid, "forward", input={"target": f"{tag}sink", "amount": 0})
    for eid in counters + relays:
        wait_until(lambda eid=eid: client.get_entity(eid) is not None, message=f"{eid} to exist")

    found = client.get_all_entities(EntityQuery(instance_id_starts_with=f"@counter@{tag}-", include_state=True))
    assert sorted(str(m.id) for m in found) == sorted(str(e) for e in counters)
    assert {str(m.id): m.get_typed_state(int) for m in found} == {str(e): i + 10 for i, e in enumerate(counters)}
    assert all(m.includes_state for m in found)

    no_state = client.get_all_entities(EntityQuery(instance_id_starts_with=f"@counter@{tag}-", include_state=False))
    assert sorted(str(m.id) for m in no_state) == sorted(str(e) for e in counters)
    assert all(not m.includes_state and m.get_state() is None for m in no_state)

    relays_found = client.get_all_entities(EntityQuery(instance_id_starts_with=f"@relay@{tag}"))
    assert sorted(str(m.id) for m in relays_found) == sorted(str(e) for e in relays)

    # A prefix of the entity *name* alone matches every key of that name (and no other name).
    by_name = client.get_all_entities(EntityQuery(instance_id_starts_with="@rel", include_state=False))
    assert {str(e) for e in relays} <= {str(m.id) for m in by_name}
    assert all(m.id.entity == "relay" for m in by_name)

    assert client.get_all_entities(EntityQuery(instance_id_starts_with=f"@counter@{tag}-nothing")) == []


def test_query_last_modified_range(client):
    tag = new_id("lm")
    a, b, c = (counter(f"{tag}-{n}") for n in "abc")
    stamps = []
    for eid in (a, b, c):
        client.signal_entity(eid, "add", input=1)
        wait_state(client, eid, 1)
        stamp = client.get_entity(eid).last_modified
        stamps.append(stamp)
        # the next entity is written strictly later (ms resolution), measured on the engine's own stamps
        wait_until(lambda stamp=stamp: datetime.now(UTC) > stamp + timedelta(milliseconds=20))
    assert stamps[0] < stamps[1] < stamps[2], stamps

    def ids(**kwargs) -> list[str]:
        found = client.get_all_entities(EntityQuery(instance_id_starts_with=f"@counter@{tag}-", **kwargs))
        return sorted(str(m.id) for m in found)

    mid_ab = stamps[0] + (stamps[1] - stamps[0]) / 2
    mid_bc = stamps[1] + (stamps[2] - stamps[1]) / 2
    assert ids(last_modified_from=mid_ab) == [str(b), str(c)]
    assert ids(last_modified_to=mid_bc) == [str(a), str(b)]
    assert ids(last_modified_from=mid_ab, last_modified_to=mid_bc) == [str(b)]
    assert ids(last_modified_from=stamps[2] + timedelta(seconds=5)) == []
    assert ids() == sorted(str(e) for e in (a, b, c))


def test_query_paging_returns_every_entity_exactly_once(client, raw_stub):
    tag = new_id("page")
    eids = [counter(f"{tag}-{i:02d}") for i in range(11)]
    for i, eid in enumerate(eids):
        client.signal_entity(eid, "add", input=i)
    # add 0 leaves the state 0 (not None), so all eleven exist
    for eid in eids:
        wait_until(lambda eid=eid: client.get_entity(eid) is not None, message=f"{eid} to exist")
    assert {partition_of(str(e)) for e in eids} == set(range(PARTITIONS))  # the pages merge partitions

    listed = client.get_all_entities(EntityQuery(instance_id_starts_with=f"@counter@{tag}-", page_size=3))
    ids = [str(m.id) for m in listed]
    assert len(ids) == len(set(ids)) == len(eids)
    assert set(ids) == {str(e) for e in eids}
    assert {str(m.id): m.get_typed_state(int) for m in listed} == {str(e): i for i, e in enumerate(eids)}

    # The raw pages: never more than page_size, a continuation token until the end, ids in order.
    pages: list[list[str]] = []
    token = None
    for _ in range(20):
        query = pb.EntityQuery(instanceIdStartsWith=wrappers_pb2.StringValue(value=f"@counter@{tag}-"),
                               includeState=False, pageSize=wrappers_pb2.Int32Value(value=3))
        if token is not None:
            query.continuationToken.CopyFrom(token)
        resp = raw_stub.QueryEntities(pb.QueryEntitiesRequest(query=query), timeout=DEADLINE_S)
        page = [e.instanceId for e in resp.entities]
        assert len(page) <= 3
        pages.append(page)
        if not resp.HasField("continuationToken"):
            break
        token = resp.continuationToken
    flat = [i for page in pages for i in page]
    assert flat == sorted(str(e) for e in eids), pages
    assert len(pages) >= 4


def test_include_transient_lists_locked_entity_without_state(client):
    key = new_id("transient")
    eid = counter(key)
    iid = client.schedule_new_orchestration(hold_lock, input={"key": key}, instance_id=new_id("holder"))
    meta = wait_until(lambda: client.get_entity(eid, include_state=True), message="the lock to be taken")
    assert locked_by(meta) == iid and not meta.get_state()  # the SDK reads an absent state as ""

    prefix = f"@counter@{key}"
    assert client.get_all_entities(EntityQuery(instance_id_starts_with=prefix, include_transient=False)) == []
    transient = client.get_all_entities(EntityQuery(instance_id_starts_with=prefix, include_transient=True))
    assert [str(m.id) for m in transient] == [str(eid)]
    assert locked_by(transient[0]) == iid and not transient[0].get_state()

    client.raise_orchestration_event(iid, "release")
    completed(client, iid)
    wait_until(lambda: client.get_entity(eid) is None, message="the unlocked, empty entity to disappear")
    assert client.get_all_entities(EntityQuery(instance_id_starts_with=prefix, include_transient=True)) == []


# ---------------------------------------------------------------------------------------------------------
# client: clean entity storage
# ---------------------------------------------------------------------------------------------------------
def test_entity_that_deletes_its_state_is_gone_after_clean(client):
    eid = counter(new_id("del"))
    client.signal_entity(eid, "add", input=5)
    wait_state(client, eid, 5)
    client.signal_entity(eid, "delete")
    wait_until(lambda: client.get_entity(eid) is None, message="the deleted entity to stop existing")

    result = client.clean_entity_storage(remove_empty_entities=True, release_orphaned_locks=False)
    assert result.empty_entities_removed >= 0 and result.orphaned_locks_released == 0
    assert client.get_entity(eid) is None
    prefix = str(eid)
    assert client.get_all_entities(EntityQuery(instance_id_starts_with=prefix, include_transient=True)) == []
    # the same id starts from scratch
    client.signal_entity(eid, "add", input=2)
    wait_state(client, eid, 2)


def test_graceful_terminate_releases_locks(client):
    """A terminate reaches the worker; the SDK leaves the critical section (unlock messages) as it ends."""
    key = new_id("term")
    eid = counter(key)
    holder = client.schedule_new_orchestration(hold_lock, input={"key": key, "add": 1}, instance_id=new_id("holder"))
    wait_state(client, eid, 1)  # the call inside the critical section ran: the lock is held
    assert locked_by(client.get_entity(eid)) == holder
    client.terminate_orchestration(holder, output="stop")
    completed(client, holder, OrchestrationStatus.TERMINATED)
    wait_until(lambda: locked_by(client.get_entity(eid)) is None, message="the terminated holder's lock to go")
    waiter = client.schedule_new_orchestration(lock_and_add, input=key, instance_id=new_id("waiter"))
    assert completed(client, waiter).get_output() == 2


def test_a_holder_ended_without_its_worker_releases_its_lock(client, raw_stub):
    """A holder ended by the engine alone (SkipGracefulOrchestrationTerminations) sends no unlocks of its own: the
    engine releases its critical section, so the next orchestration gets the lock without a CleanEntityStorage."""
    key = new_id("forced")
    eid = counter(key)
    holder = client.schedule_new_orchestration(hold_lock, input={"key": key, "add": 1}, instance_id=new_id("holder"))
    wait_state(client, eid, 1)
    assert locked_by(client.get_entity(eid)) == holder

    response = raw_stub.SkipGracefulOrchestrationTerminations(
        pb.SkipGracefulOrchestrationTerminationsRequest(instanceBatch=pb.InstanceBatch(instanceIds=[holder])),
        timeout=DEADLINE_S,
    )
    assert list(response.unterminatedInstanceIds) == []
    completed(client, holder, OrchestrationStatus.TERMINATED)
    wait_until(lambda: locked_by(client.get_entity(eid)) is None, message="the forced-out holder's lock to go")

    waiter = client.schedule_new_orchestration(lock_and_add, input=key, instance_id=new_id("waiter"))
    assert completed(client, waiter).get_output() == 2
    wait_until(lambda: locked_by(client.get_entity(eid)) is None, message="the waiter's lock to be released")
    assert client.clean_entity_storage().orphaned_locks_released == 0  # nothing orphaned is left


# ---------------------------------------------------------------------------------------------------------
# worker: batches and persistence
# ---------------------------------------------------------------------------------------------------------
def test_state_is_per_entity_across_batches(client):
    tag = new_id("batch")
    a, b = counter(f"{tag}-a"), counter(f"{tag}-b")
    expected = {str(a): 0, str(b): 0}
    for round_no in range(1, 5):  # every round waits for the last: each round is a separate batch
        for _ in range(round_no):
            client.signal_entity(a, "add", input=1)
        client.signal_entity(b, "add", input=100)
        expected[str(a)] += round_no
        expected[str(b)] += 100
        wait_state(client, a, expected[str(a)])
        wait_state(client, b, expected[str(b)])
    # a burst larger than one batch (the engine caps a batch at 100 operations)
    for _ in range(150):
        client.signal_entity(a, "add", input=1)
    wait_state(client, a, expected[str(a)] + 150)
    assert state_of(client, b) == expected[str(b)]


def test_failed_operation_in_a_batch_rolls_back_only_itself(client):
    eid = counter(new_id("mixed"))
    client.signal_entity(eid, "add", input=1)
    client.signal_entity(eid, "fail", input="one bad operation")
    client.signal_entity(eid, "add", input=2)
    wait_state(client, eid, 3)


@pytest.mark.crash
def test_entity_state_survives_runtime_restart(fresh_runtime):
    key = new_id("durable")
    eid = counter(key)
    other = EntityInstanceId("relay", key)
    c = TaskHubGrpcClient(host_address=fresh_runtime.address)
    w = start_worker(fresh_runtime.address)
    try:
        for amount in (1, 2, 3):
            c.signal_entity(eid, "add", input=amount)
            wait_state(c, eid, sum(range(1, amount + 1)))
        c.signal_entity(other, "forward", input={"target": f"{key}-sink", "amount": 7})
        wait_state(c, counter(f"{key}-sink"), 7)
        wait_state(c, other, 1)
        due = datetime.now(UTC) + timedelta(seconds=3)  # still pending across the restart
        c.signal_entity(counter(f"{key}-later"), "add", input=5, signal_time=due)
    finally:
        w.stop()
        c.close()

    fresh_runtime.restart()
    c = TaskHubGrpcClient(host_address=fresh_runtime.address)
    try:
        # persisted without any worker attached
        if datetime.now(UTC) < due - timedelta(milliseconds=200):
            assert state_of(c, counter(f"{key}-later")) is None  # not yet due
        assert state_of(c, eid) == 6
        assert state_of(c, other) == 1
        assert state_of(c, counter(f"{key}-sink")) == 7
        w = start_worker(fresh_runtime.address)
        try:
            c.signal_entity(eid, "add", input=10)
            wait_state(c, eid, 16)  # the worker was handed the persisted state
            wait_state(c, counter(f"{key}-later"), 5)  # the scheduled signal's timer survived the restart
            assert datetime.now(UTC) >= due - timedelta(milliseconds=100)
            iid = c.schedule_new_orchestration(call_counter, input={"key": key, "amount": 4}, instance_id=new_id())
            assert completed(c, iid).get_output() == [20, 20]
        finally:
            w.stop()
    finally:
        c.close()


# ---------------------------------------------------------------------------------------------------------
# orchestrations: call / signal
# ---------------------------------------------------------------------------------------------------------
def test_call_entity_returns_result(client):
    key = new_id("call")
    iid = client.schedule_new_orchestration(call_counter, input={"key": key, "amount": 5}, instance_id=new_id())
    assert completed(client, iid).get_output() == [5, 5]
    iid = client.schedule_new_orchestration(call_counter, input={"key": key, "amount": 2}, instance_id=new_id())
    assert completed(client, iid).get_output() == [7, 7]
    assert state_of(client, counter(key)) == 7


def test_call_entity_failure_caught_by_orchestration(client):
    key = new_id("failc")
    client.signal_entity(counter(key), "add", input=41)
    wait_state(client, counter(key), 41)
    iid = client.schedule_new_orchestration(call_failing_caught, input=key, instance_id=new_id())
    out = completed(client, iid).get_output()
    assert out["caught"] and "boom" in out["caught"], out
    assert out["after"] == 42  # the failed operation's set_state(-999) was rolled back
    assert state_of(client, counter(key)) == 42


def test_call_entity_failure_uncaught_fails_orchestration(client):
    key = new_id("failu")
    iid = client.schedule_new_orchestration(call_failing_uncaught, input=key, instance_id=new_id())
    state = completed(client, iid, OrchestrationStatus.FAILED)
    assert state.failure_details is not None and "kaboom" in state.failure_details.message
    assert client.get_entity(counter(key)) is None  # the rolled-back operation left no state


def test_uncaught_failure_inside_critical_section_releases_the_lock(client):
    key = new_id("failcs")
    iid = client.schedule_new_orchestration(fail_inside_section, input=key, instance_id=new_id())
    state = completed(client, iid, OrchestrationStatus.FAILED)
    assert "inside" in state.failure_details.message
    wait_until(lambda: locked_by(client.get_entity(counter(key))) is None, message="the lock to be released")
    assert state_of(client, counter(key)) == 1
    waiter = client.schedule_new_orchestration(lock_and_add, input=key, instance_id=new_id("waiter"))
    assert completed(client, waiter).get_output() == 2


def test_signal_entity_from_orchestration(client):
    key = new_id("osig")
    iid = client.schedule_new_orchestration(signal_counter, input={"key": key, "amount": 9}, instance_id=new_id())
    assert completed(client, iid).get_output() == "sent"
    wait_state(client, counter(key), 9)


def test_scheduled_signal_from_orchestration(client):
    key = new_id("osigl")
    iid = client.schedule_new_orchestration(signal_counter_later, input={"key": key, "amount": 3, "delay_s": 1.5},
                                            instance_id=new_id())
    due = datetime.fromisoformat(completed(client, iid).get_output())
    due = due if due.tzinfo else due.replace(tzinfo=UTC)  # current_utc_datetime is naive UTC
    seen: list[tuple[datetime, Any]] = []

    def applied() -> bool:
        value = state_of(client, counter(key))
        seen.append((datetime.now(UTC), value))
        return value == 3

    wait_until(applied, interval=0.05, message="the orchestration's scheduled signal")
    early = [value for at, value in seen if at < due - timedelta(milliseconds=100)]
    assert early and all(value is None for value in early), seen
    assert next(at for at, value in seen if value == 3) >= due - timedelta(milliseconds=100), (seen, due)


def test_concurrent_callers_each_get_their_own_result(client):
    key = new_id("many")
    ids = [client.schedule_new_orchestration(call_counter, input={"key": key, "amount": 1}, instance_id=new_id())
           for _ in range(20)]
    added = sorted(completed(client, iid).get_output()[0] for iid in ids)
    assert added == list(range(1, 21))  # every call ran once and its own result came back
    assert state_of(client, counter(key)) == 20


# ---------------------------------------------------------------------------------------------------------
# orchestrations: critical sections
# ---------------------------------------------------------------------------------------------------------
def test_critical_section_across_partitions_holds_off_other_signals(client):
    keys = [key_on("counter", p, "cs") for p in range(PARTITIONS)]
    eids = [counter(k) for k in keys]
    assert len({partition_of(str(e)) for e in eids}) == PARTITIONS
    iid = client.schedule_new_orchestration(section_across_partitions, input=keys, instance_id=new_id("section"))
    for eid in eids:
        wait_state(client, eid, 1)
    for eid in eids:
        assert locked_by(client.get_entity(eid)) == iid

    # A client signal to a locked entity waits in its queue until the section ends.
    client.signal_entity(eids[0], "add", input=100)
    wait_until(lambda: client.get_entity(eids[0]).backlog_queue_size >= 1, message="the signal to queue")
    client.raise_orchestration_event(iid, "go")
    out = completed(client, iid).get_output()
    assert out == {"first": [1] * PARTITIONS, "second": [1] * PARTITIONS}, out
    wait_state(client, eids[0], 101)
    for eid in eids:
        wait_until(lambda eid=eid: locked_by(client.get_entity(eid)) is None, message=f"{eid} unlocked")


def test_contending_critical_sections_in_opposite_order_do_not_interleave(client):
    a = key_on("ledger", 0, "lg")
    b = key_on("ledger", 1, "lg")
    rounds = 4
    x = client.schedule_new_orchestration(locked_increments, input={"keys": [a, b], "rounds": rounds},
                                          instance_id=new_id("x"))
    y = client.schedule_new_orchestration(locked_increments, input={"keys": [b, a], "rounds": rounds},
                                          instance_id=new_id("y"))
    completed(client, x)
    completed(client, y)
    for key in (a, b):
        state = state_of(client, ledger_id(key))
        assert state["value"] == 2 * rounds, state  # no lost update
        log = state["log"]
        assert sorted(log) == sorted([x] * rounds + [y] * rounds)
        assert log in ([x] * rounds + [y] * rounds, [y] * rounds + [x] * rounds), log  # one section, then the other
    # both entities saw the sections in the same order
    first = {key: state_of(client, ledger_id(key))["log"][0] for key in (a, b)}
    assert first[a] == first[b]


# ---------------------------------------------------------------------------------------------------------
# entity actions
# ---------------------------------------------------------------------------------------------------------
def test_entity_signals_another_entity_exactly_once(client):
    tag = new_id("fwd")
    relay = EntityInstanceId("relay", key_on("relay", 0, "r"))
    target_key = key_on("counter", 1, tag)
    client.signal_entity(relay, "forward", input={"target": target_key, "amount": 5})
    wait_state(client, counter(target_key), 5)
    client.signal_entity(relay, "forward", input={"target": target_key, "amount": 100})
    wait_state(client, counter(target_key), 105)  # a duplicate of the first would show as 110 / 10 extra
    wait_state(client, relay, 2)
    assert state_of(client, counter(target_key)) == 105


def test_entity_starts_orchestration_exactly_once(client):
    tag = new_id("spawn")
    relay = EntityInstanceId("relay", tag)
    # 1) signalled by the client, with an explicit instance id
    explicit = new_id("spawned")
    client.signal_entity(relay, "spawn", input={"key": f"{tag}-a", "tag": tag, "instance_id": explicit})
    wait_until(lambda: client.get_orchestration_state(explicit) is not None, message="the spawned orchestration")
    assert completed(client, explicit).get_output() == tag
    wait_state(client, counter(f"{tag}-a"), 1)

    # 2) called from an orchestration, the SDK picks the id; the entity's answer carries it
    caller = client.schedule_new_orchestration(spawn_via_relay, instance_id=new_id(),
                                               input={"relay": tag, "request": {"key": f"{tag}-b", "tag": tag}})
    spawned_id = completed(client, caller).get_output()
    assert isinstance(spawned_id, str) and spawned_id
    assert completed(client, spawned_id).get_output() == tag
    wait_state(client, counter(f"{tag}-b"), 1)
    wait_state(client, relay, 2)

    states = client.get_all_orchestration_states(OrchestrationQuery(fetch_inputs_and_outputs=True))
    mine = sorted(s.instance_id for s in states if s.name == "spawned" and tag in (s.serialized_input or ""))
    assert mine == sorted([explicit, spawned_id])
    assert state_of(client, counter(f"{tag}-a")) == 1 and state_of(client, counter(f"{tag}-b")) == 1
