"""Overload: a large backlog with no worker keeps the engine's memory bounded (pending work waits in LMDB, not in
the gateway), a worker's maxConcurrent* limits hold, and client RPCs keep answering while the engine is saturated.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import statistics
import threading
import time
from typing import Any

import grpc
import pytest
from durabletask import task
from durabletask import worker as dt_worker
from durabletask.client import AsyncTaskHubGrpcClient, OrchestrationStatus, TaskHubGrpcClient
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.internal import orchestrator_service_pb2_grpc as stubs

from .conftest import make_runtime
from .faults_workload import gateway_pid, partition_pid, rss_kb
from .helpers import DEADLINE_S, PARTITIONS, new_id, wait_until

pytestmark = [pytest.mark.engine_only]

BACKLOG = int(os.environ.get("DURABLE_E2E_OVERLOAD_BACKLOG", "3000"))
PAYLOAD_BYTES = 16_000  # per instance input: the backlog carries BACKLOG * 16 KB (47 MB) of payload
#: Growth of any engine process's VmRSS (LMDB's file-backed map pages included) while the backlog is built and
#: drained. The gateway's bound is below the backlog's payload: a gateway that held the backlog would exceed it.
RSS_GROWTH_LIMIT_KB = 100 * 1024
GATEWAY_GROWTH_LIMIT_KB = min(RSS_GROWTH_LIMIT_KB, BACKLOG * PAYLOAD_BYTES // 1024 * 2 // 3)
START_CONCURRENCY = 64
PROBE_DEADLINE_S = 5.0
SLOW_ACTIVITY_S = 0.15
FIGURES_PATH = os.environ.get("DURABLE_E2E_FIGURES")


# ---------------------------------------------------------------------------------------------------------
# orchestrations and activities
# ---------------------------------------------------------------------------------------------------------
def ovl_echo(ctx: task.OrchestrationContext, inp: dict):
    """One work item: return the input's tag and its payload size (so the payload really travelled)."""
    return [inp["tag"], len(inp["pad"])]
    yield  # noqa: B901 - a generator orchestrator that completes on its first work item


class Concurrency:
    """Counts activities running at once, across the worker's threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self.total = 0

    def enter(self) -> None:
        with self.lock:
            self.running += 1
            self.total += 1
            self.peak = max(self.peak, self.running)

    def leave(self) -> None:
        with self.lock:
            self.running -= 1


CONCURRENCY = Concurrency()


def ovl_slow(ctx: task.ActivityContext, n: int) -> int:
    CONCURRENCY.enter()
    try:
        time.sleep(SLOW_ACTIVITY_S)  # the work itself: a slow activity
        return n * n
    finally:
        CONCURRENCY.leave()


def ovl_two_slow(ctx: task.OrchestrationContext, n: int):
    results = yield task.when_all([ctx.call_activity(ovl_slow, input=n), ctx.call_activity(ovl_slow, input=n + 1)])
    return results


def ovl_busy(ctx: task.OrchestrationContext, n: int):
    out = []
    for i in range(3):
        out.append((yield ctx.call_activity(ovl_fast, input=n + i)))
    return out


def ovl_fast(ctx: task.ActivityContext, n: int) -> int:
    return n


def record(test: str, **figures: Any) -> None:
    line = json.dumps({"test": test, **figures})
    print(f"figures: {line}")
    if FIGURES_PATH:
        with open(FIGURES_PATH, "a") as f:
            f.write(line + "\n")


def engine_rss(runtime: Any) -> dict[str, int]:
    pids = {"gateway": gateway_pid(runtime)}
    pids.update({f"partition-{p}": partition_pid(runtime, p) for p in range(PARTITIONS)})
    return {name: rss_kb(pid) for name, pid in pids.items() if pid}


class RssSampler(threading.Thread):
    """Peak VmRSS of every engine process while it runs."""

    def __init__(self, runtime: Any) -> None:
        super().__init__(daemon=True)
        self.runtime = runtime
        self.peak: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for name, kb in engine_rss(self.runtime).items():
                self.peak[name] = max(self.peak.get(name, 0), kb)
            self.stop.wait(0.2)

    def finish(self) -> dict[str, int]:
        self.stop.set()
        self.join()
        return self.peak


def start_many(address: str, orchestrator: Any, inputs: dict[str, Any]) -> None:
    """Start an instance per (id, input), START_CONCURRENCY at a time, with the SDK's async client."""
    async def run() -> None:
        client = AsyncTaskHubGrpcClient(host_address=address)
        gate = asyncio.Semaphore(START_CONCURRENCY)

        async def one(iid: str, inp: Any) -> None:
            async with gate:
                await client.schedule_new_orchestration(orchestrator, input=inp, instance_id=iid)

        try:
            await asyncio.gather(*(one(iid, inp) for iid, inp in inputs.items()))
        finally:
            await client.close()

    asyncio.run(run())


def count_done(stub: stubs.TaskHubSidecarServiceStub, ids: list[str]) -> int:
    done = 0
    for iid in ids:
        res = stub.GetInstance(pb.GetInstanceRequest(instanceId=iid), timeout=PROBE_DEADLINE_S)
        done += res.orchestrationState.orchestrationStatus == pb.ORCHESTRATION_STATUS_COMPLETED
    return done


# ---------------------------------------------------------------------------------------------------------
# (a) + (c): a backlog with no worker, then a worker drains it while client RPCs are probed
# ---------------------------------------------------------------------------------------------------------
def test_backlog_without_worker_keeps_memory_bounded_then_drains(runtime, raw_stub):
    ids = [f"ovl-{n:05d}-{new_id('b')}" for n in range(BACKLOG)]
    pad = "x" * PAYLOAD_BYTES
    before = engine_rss(runtime)
    sampler = RssSampler(runtime)
    sampler.start()
    started = time.monotonic()
    start_many(runtime.address, ovl_echo, {iid: {"tag": iid, "pad": pad} for iid in ids})
    start_s = time.monotonic() - started
    after_backlog = engine_rss(runtime)
    st = raw_stub.GetInstance(pb.GetInstanceRequest(instanceId=ids[-1]), timeout=PROBE_DEADLINE_S)
    assert st.orchestrationState.orchestrationStatus == pb.ORCHESTRATION_STATUS_PENDING

    # The worker drains the backlog; meanwhile a client keeps asking (5 s deadline), and must always be answered.
    probes = ClientProbe(runtime.address, ids)
    w = dt_worker.TaskHubGrpcWorker(host_address=runtime.address, concurrency_options=dt_worker.ConcurrencyOptions(
        maximum_thread_pool_workers=8))
    w.add_orchestrator(ovl_echo)
    drain_started = time.monotonic()
    w.start()
    probes.start()
    try:
        wait_until(lambda: count_done(raw_stub, ids[::50]) == len(ids[::50]), timeout=2 * DEADLINE_S,
                   interval=0.5, message="sampled backlog instances completed")
        wait_until(lambda: count_done(raw_stub, ids) == len(ids), timeout=2 * DEADLINE_S, interval=0.5,
                   message="whole backlog completed")
    finally:
        probes.finish()
        w.stop()
    drain_s = time.monotonic() - drain_started
    peak = sampler.finish()

    client = TaskHubGrpcClient(host_address=runtime.address)
    try:
        for iid in ids[:: max(1, BACKLOG // 100)]:
            state = client.get_orchestration_state(iid)
            assert state.runtime_status == OrchestrationStatus.COMPLETED
            assert state.get_output() == [iid, PAYLOAD_BYTES]
    finally:
        client.close()

    growth = {name: peak[name] - before[name] for name in before}
    record("test_backlog_without_worker_keeps_memory_bounded_then_drains", instances=BACKLOG,
           payload_mb=round(BACKLOG * PAYLOAD_BYTES / 2**20), start_s=round(start_s, 1), drain_s=round(drain_s, 1),
           rss_before_kb=before, rss_after_backlog_kb=after_backlog, rss_peak_growth_kb=growth,
           probes=probes.count, probe_failures=len(probes.failures), probe_p50_ms=probes.p(50), probe_max_ms=probes.p(100))
    assert all(g < RSS_GROWTH_LIMIT_KB for g in growth.values()), f"RSS grew: {growth} KB"
    assert growth["gateway"] < GATEWAY_GROWTH_LIMIT_KB, f"the gateway grew by {growth['gateway']} KB"
    assert not probes.failures, f"client RPCs failed while saturated: {probes.failures[:5]}"
    assert probes.count >= 10, "the probe barely ran"


class ClientProbe(threading.Thread):
    """GetInstance with a 5 s deadline, back to back, on random backlog ids."""

    def __init__(self, address: str, ids: list[str]) -> None:
        super().__init__(daemon=True)
        self.channel = grpc.insecure_channel(address)
        self.stub = stubs.TaskHubSidecarServiceStub(self.channel)
        self.ids = ids
        self.stop = threading.Event()
        self.latencies_ms: list[float] = []
        self.failures: list[str] = []

    @property
    def count(self) -> int:
        return len(self.latencies_ms) + len(self.failures)

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            iid = self.ids[(n * 7919) % len(self.ids)]
            n += 1
            started = time.monotonic()
            try:
                res = self.stub.GetInstance(pb.GetInstanceRequest(instanceId=iid), timeout=PROBE_DEADLINE_S)
                assert res.exists, iid
                self.latencies_ms.append((time.monotonic() - started) * 1000)
            except (grpc.RpcError, AssertionError) as exc:
                self.failures.append(f"{iid}: {exc}")
            self.stop.wait(0.02)

    def p(self, q: int) -> float | None:
        if not self.latencies_ms:
            return None
        data = sorted(self.latencies_ms)
        return round(data[min(len(data) - 1, len(data) * q // 100)], 1)

    def finish(self) -> None:
        self.stop.set()
        self.join()
        self.channel.close()


# ---------------------------------------------------------------------------------------------------------
# (b) maxConcurrentActivityWorkItems = 2
# ---------------------------------------------------------------------------------------------------------
def test_slow_worker_never_runs_more_activities_than_its_limit(runtime):
    w = dt_worker.TaskHubGrpcWorker(host_address=runtime.address, concurrency_options=dt_worker.ConcurrencyOptions(
        maximum_concurrent_activity_work_items=2, maximum_thread_pool_workers=16))
    w.add_orchestrator(ovl_two_slow)
    w.add_activity(ovl_slow)
    client = TaskHubGrpcClient(host_address=runtime.address)
    w.start()
    started = time.monotonic()
    try:
        ids = [client.schedule_new_orchestration(ovl_two_slow, input=n, instance_id=new_id(f"ovl-slow{n}"))
               for n in range(20)]
        for n, iid in enumerate(ids):
            state = client.wait_for_orchestration_completion(iid, timeout=DEADLINE_S)
            assert state.runtime_status == OrchestrationStatus.COMPLETED, state.failure_details
            assert state.get_output() == [n * n, (n + 1) ** 2]
        elapsed = time.monotonic() - started
    finally:
        w.stop()
        client.close()
    ideal = 40 * SLOW_ACTIVITY_S / 2
    record("test_slow_worker_never_runs_more_activities_than_its_limit", instances=20, activities=CONCURRENCY.total,
           peak_concurrent=CONCURRENCY.peak, seconds=round(elapsed, 1), ideal_seconds=ideal)
    assert CONCURRENCY.total >= 40
    assert CONCURRENCY.peak <= 2, f"{CONCURRENCY.peak} activities ran at once with maxConcurrentActivityWorkItems=2"
    assert CONCURRENCY.peak == 2, "the limit was never reached: the test proves nothing"
    # A freed slot is refilled when it frees, not at the next heartbeat: 40 activities of 0.15 s, 2 at a time.
    assert elapsed < 4 * ideal, f"{elapsed:.1f}s for work that takes {ideal:.1f}s at 2 activities at once"


def test_engine_holds_back_activity_work_items_beyond_the_stream_limit(runtime, raw_stub, raw_channel):
    """The engine itself respects maxConcurrentActivityWorkItems (the SDK also queues locally, which would hide
    an engine that over-delivers): a raw stream with a limit of 2 that never completes gets exactly 2."""
    ids = [new_id(f"ovl-raw{n}") for n in range(5)]
    stream = raw_stub.GetWorkItems(pb.GetWorkItemsRequest(maxConcurrentOrchestrationWorkItems=10,
                                                          maxConcurrentActivityWorkItems=2), timeout=120)
    items: queue.Queue[Any] = queue.Queue()
    reader = threading.Thread(target=lambda: [items.put(i) for i in _iterate(stream)], daemon=True)
    reader.start()
    try:
        for iid in ids:
            raw_stub.StartInstance(pb.CreateInstanceRequest(instanceId=iid, name="ovl_raw"), timeout=PROBE_DEADLINE_S)
        scheduled: set[str] = set()
        activities: list[pb.WorkItem] = []
        deadline = time.monotonic() + DEADLINE_S
        while len(scheduled) < len(ids):  # every instance schedules one activity
            item = items.get(timeout=max(0.1, deadline - time.monotonic()))
            if item.HasField("orchestratorRequest") and item.orchestratorRequest.instanceId in ids:
                iid = item.orchestratorRequest.instanceId
                raw_stub.CompleteOrchestratorTask(pb.OrchestratorResponse(
                    instanceId=iid, completionToken=item.completionToken,
                    actions=[pb.OrchestratorAction(id=0, scheduleTask=pb.ScheduleTaskAction(name="ovl_act"))]),
                    timeout=PROBE_DEADLINE_S)
                scheduled.add(iid)
            elif item.HasField("activityRequest"):
                activities.append(item)
        # Five activities are queued; the stream holds at most two. Give the engine a second to over-deliver.
        _collect_activities(items, activities, within_s=1.0)
        assert len(activities) == 2, f"{len(activities)} activity work items delivered to a stream limited to 2"
        # Completing one frees one slot: exactly one more arrives.
        first = activities[0].activityRequest
        raw_stub.CompleteActivityTask(pb.ActivityResponse(
            instanceId=first.orchestrationInstance.instanceId, taskId=first.taskId,
            completionToken=activities[0].completionToken), timeout=PROBE_DEADLINE_S)
        while True:
            item = items.get(timeout=DEADLINE_S)
            if item.HasField("activityRequest"):
                activities.append(item)
                break
        _collect_activities(items, activities, within_s=1.0)
        assert len(activities) == 3, f"{len(activities)} activity work items after one slot was freed (want 3)"
    finally:
        stream.cancel()
        for iid in ids:
            raw_stub.TerminateInstance(pb.TerminateRequest(instanceId=iid), timeout=PROBE_DEADLINE_S)


def _collect_activities(items: queue.Queue[Any], activities: list[Any], within_s: float) -> None:
    """Add the activity work items that arrive within `within_s` (the stream may over-deliver)."""
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        try:
            item = items.get(timeout=max(0.01, end - time.monotonic()))
        except queue.Empty:
            break
        if item.HasField("activityRequest"):
            activities.append(item)


def _iterate(stream: Any):
    try:
        yield from stream
    except grpc.RpcError:
        return


# ---------------------------------------------------------------------------------------------------------
# (c) on its own: a saturated engine (a fast worker, a flood of 3-activity instances) still answers clients
# ---------------------------------------------------------------------------------------------------------
def test_client_rpcs_answer_while_engine_is_saturated(runtime):
    w = dt_worker.TaskHubGrpcWorker(host_address=runtime.address, concurrency_options=dt_worker.ConcurrencyOptions(
        maximum_thread_pool_workers=16))
    w.add_orchestrator(ovl_busy)
    w.add_activity(ovl_fast)
    ids = [f"ovl-busy-{n:04d}-{new_id('c')}" for n in range(600)]
    w.start()
    probes = ClientProbe(runtime.address, ids[:1])
    client = TaskHubGrpcClient(host_address=runtime.address)
    try:
        client.schedule_new_orchestration(ovl_busy, input=0, instance_id=ids[0])
        probes.start()
        started = time.monotonic()
        start_many(runtime.address, ovl_busy, {iid: n for n, iid in enumerate(ids) if n})
        wait_until(lambda: all(s.runtime_status == OrchestrationStatus.COMPLETED
                               for s in (client.get_orchestration_state(i, fetch_payloads=False) for i in ids)),
                   timeout=2 * DEADLINE_S, interval=0.5, message="flood completed")
        elapsed = time.monotonic() - started
        for n, iid in enumerate(ids):
            state = client.get_orchestration_state(iid)
            assert state.runtime_status == OrchestrationStatus.COMPLETED, (iid, state.runtime_status)
            assert state.get_output() == [n, n + 1, n + 2]
    finally:
        probes.finish()
        w.stop()
        client.close()
    record("test_client_rpcs_answer_while_engine_is_saturated", instances=len(ids), seconds=round(elapsed, 1),
           probes=probes.count, probe_failures=len(probes.failures), probe_p50_ms=probes.p(50),
           probe_p99_ms=probes.p(99), probe_max_ms=probes.p(100),
           probe_mean_ms=round(statistics.mean(probes.latencies_ms), 1) if probes.latencies_ms else None)
    assert not probes.failures, f"client RPCs failed while saturated: {probes.failures[:5]}"
    assert probes.count >= 10


# ---------------------------------------------------------------------------------------------------------
# max history length: the instance fails, the engine and the other instances carry on
# ---------------------------------------------------------------------------------------------------------
def ovl_long(ctx: task.OrchestrationContext, steps: int):
    out = []
    for i in range(steps):
        out.append((yield ctx.call_activity(ovl_fast, input=i)))
    return out


def test_history_limit_fails_the_instance_not_the_engine(tmp_path):
    rt = make_runtime(tmp_path / "data", extra_args=["--max-history-events", "60"])
    rt.start()
    w = dt_worker.TaskHubGrpcWorker(host_address=rt.address)
    w.add_orchestrator(ovl_long)
    w.add_activity(ovl_fast)
    client = TaskHubGrpcClient(host_address=rt.address)
    w.start()
    try:
        # Each activity adds at least taskScheduled, orchestratorStarted and taskCompleted: 40 need > 60 events.
        long_id = client.schedule_new_orchestration(ovl_long, input=40, instance_id=new_id("ovl-long"))
        short_id = client.schedule_new_orchestration(ovl_long, input=5, instance_id=new_id("ovl-short"))
        long_state = client.wait_for_orchestration_completion(long_id, timeout=DEADLINE_S)
        assert long_state.runtime_status == OrchestrationStatus.FAILED
        assert "HistoryLimitExceeded" in long_state.failure_details.error_type, long_state.failure_details
        short_state = client.wait_for_orchestration_completion(short_id, timeout=DEADLINE_S)
        assert short_state.runtime_status == OrchestrationStatus.COMPLETED
        assert short_state.get_output() == list(range(5))
    finally:
        w.stop()
        client.close()
        rt.close()


# ---------------------------------------------------------------------------------------------------------
# max request size, from the worker's side: a completion the gateway cannot accept
# ---------------------------------------------------------------------------------------------------------
BIG = 5 << 20  # above the default --max-request-bytes (4 MiB)


def ovl_big_output(ctx: task.OrchestrationContext, _):
    return "x" * BIG
    yield  # noqa: B901 - a generator orchestrator that completes on its first work item


def ovl_big_result(ctx: task.ActivityContext, _) -> str:
    return "x" * BIG


def ovl_calls_big(ctx: task.OrchestrationContext, _):
    return len((yield ctx.call_activity(ovl_big_result)))


def assert_a_small_instance_still_runs(client: TaskHubGrpcClient) -> None:
    small = client.schedule_new_orchestration(ovl_echo, input={"tag": "t", "pad": "p"}, instance_id=new_id("ovl-small"))
    assert client.wait_for_orchestration_completion(small, timeout=DEADLINE_S).get_output() == ["t", 1]


def test_oversized_completion_fails_the_instance_instead_of_hanging(runtime):
    """The SDK only logs a CompleteOrchestratorTask/CompleteActivityTask that fails (RESOURCE_EXHAUSTED here), so
    the engine must not leave the instance waiting forever on a work item that can never be completed: it ends
    FAILED and says why. The engine stays usable for other instances."""
    w = dt_worker.TaskHubGrpcWorker(host_address=runtime.address)
    for fn in (ovl_big_output, ovl_calls_big, ovl_echo):
        w.add_orchestrator(fn)
    w.add_activity(ovl_big_result)
    client = TaskHubGrpcClient(host_address=runtime.address)
    w.start()
    try:
        ids = [client.schedule_new_orchestration(fn, instance_id=new_id(f"ovl-{fn.__name__}"))
               for fn in (ovl_big_output, ovl_calls_big)]
        for iid in ids:
            state = wait_until(
                lambda i=iid: (s := client.get_orchestration_state(i)) and s.runtime_status not in (
                    OrchestrationStatus.PENDING, OrchestrationStatus.RUNNING) and s,
                timeout=DEADLINE_S, interval=0.2,
                message=lambda i=iid: f"{i} to end (it is {client.get_orchestration_state(i).runtime_status}: its "
                                      "completion above the request limit was rejected and the work item is held)")
            assert state.runtime_status == OrchestrationStatus.FAILED, (iid, state.runtime_status)
        assert_a_small_instance_still_runs(client)
    finally:
        w.stop()
        client.close()


# ---------------------------------------------------------------------------------------------------------
# a work item the worker could not receive: its history outgrew --max-request-bytes
# ---------------------------------------------------------------------------------------------------------
THIRD = 3 << 20  # two of these in the history make a work item above the SDK's 4 MiB receive limit


def ovl_third_result(ctx: task.ActivityContext, _) -> str:
    return "x" * THIRD


def ovl_history_outgrows(ctx: task.OrchestrationContext, _):
    first = yield ctx.call_activity(ovl_third_result)
    second = yield ctx.call_activity(ovl_third_result)
    return len(first) + len(second)


@pytest.mark.engine_only
def test_an_instance_whose_work_item_outgrows_the_limit_fails_and_the_worker_goes_on(runtime):
    """Each completion is below the limit, but the history they add up to is not: a work item carrying it would
    break the worker's stream (the SDK receives 4 MiB), with every other item on it, again and again. The
    instance fails instead, saying why, and the worker's other work goes on."""
    w = dt_worker.TaskHubGrpcWorker(host_address=runtime.address)
    w.add_orchestrator(ovl_history_outgrows)
    w.add_orchestrator(ovl_echo)
    w.add_activity(ovl_third_result)
    client = TaskHubGrpcClient(host_address=runtime.address)
    w.start()
    try:
        big = client.schedule_new_orchestration(ovl_history_outgrows, instance_id=new_id("ovl-outgrows"))
        state = client.wait_for_orchestration_completion(big, timeout=DEADLINE_S)
        assert state.runtime_status == OrchestrationStatus.FAILED
        assert state.failure_details.error_type == "WorkItemTooLarge", state.failure_details
        assert_a_small_instance_still_runs(client)
    finally:
        w.stop()
        client.close()


# ---------------------------------------------------------------------------------------------------------
# one call that fans out to many partition requests
# ---------------------------------------------------------------------------------------------------------
PURGE_BATCH = 100_000


def test_a_purge_of_a_huge_id_batch_does_not_stall_the_gateway(tmp_path):
    """PurgeInstances with 100,000 ids in its instanceBatch. The gateway once built a request for every id before
    it sent any: its loop stalled for seconds, its heartbeats stopped, and the partitions dropped it (releasing
    every work item its workers held, so running activities ran twice). It now keeps a bounded number in flight,
    so with a 2 s gateway timeout no partition finds it silent, and the purge counts what it deleted."""
    rt = make_runtime(tmp_path / "data", extra_args=["--gateway-timeout-s", "2", "--heartbeat-interval-s", "0.2"])
    rt.start()
    client = TaskHubGrpcClient(host_address=rt.address)
    w = dt_worker.TaskHubGrpcWorker(host_address=rt.address)
    w.add_orchestrator(ovl_echo)
    w.start()
    try:
        done = [client.schedule_new_orchestration(ovl_echo, input={"tag": n, "pad": ""}, instance_id=new_id("ovl-p"))
                for n in range(3)]
        for instance_id in done:
            assert client.wait_for_orchestration_completion(instance_id, timeout=DEADLINE_S) is not None
        ids = done + [f"ovl-unknown-{n}" for n in range(PURGE_BATCH - len(done))]
        with grpc.insecure_channel(rt.address) as channel:
            purged = stubs.TaskHubSidecarServiceStub(channel).PurgeInstances(pb.PurgeInstancesRequest(
                instanceBatch=pb.InstanceBatch(instanceIds=ids)), timeout=120)
        assert purged.deletedInstanceCount == len(done), purged
        log = rt.log_path.read_text(errors="replace")
        assert "silent; releasing its work items" not in log, rt.log_tail()
        assert_a_small_instance_still_runs(client)
    finally:
        w.stop()
        client.close()
        rt.close()
