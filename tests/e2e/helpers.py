"""Small helpers shared by the end-to-end tests (no fixtures here; see conftest.py)."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import grpc
from durabletask import client as dt_client
from durabletask import worker as dt_worker
from durabletask.client import OrchestrationStatus
from durabletask.internal import helpers as ph
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.internal import orchestrator_service_pb2_grpc as stubs
from google.protobuf import empty_pb2

T = TypeVar("T")

#: Which backend the suite drives: "engine" (our runtime, the default) or "inmemory" (the SDK's test backend).
BACKEND = os.environ.get("DURABLE_E2E_BACKEND", "engine").strip().lower() or "engine"
INMEMORY = BACKEND == "inmemory"

#: Partition count the shared runtime is started with (ids are picked against this number).
PARTITIONS = int(os.environ.get("DURABLE_E2E_PARTITIONS", "3"))

#: Default deadline for every wait in the suite, in seconds.
DEADLINE_S = float(os.environ.get("DURABLE_E2E_DEADLINE_S", "30"))

_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


def fnv1a_32(data: bytes) -> int:
    """FNV-1a 32 bit, the engine's placement hash (re-implemented so the tests do not trust the engine)."""
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return h


def partition_of(instance_id: str, partitions: int = PARTITIONS) -> int:
    return fnv1a_32(instance_id.encode("utf-8")) % partitions


def new_id(prefix: str = "e2e") -> str:
    """A unique instance id for one test."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def id_on_partition(prefix: str, partition: int, partitions: int = PARTITIONS) -> str:
    """A fresh unique id that hashes to `partition`."""
    for _ in range(10_000):
        candidate = new_id(prefix)
        if partition_of(candidate, partitions) == partition:
            return candidate
    raise AssertionError(f"no id found for partition {partition}/{partitions}")


def id_not_on_partition(prefix: str, partition: int, partitions: int = PARTITIONS) -> str:
    """A fresh unique id that does NOT hash to `partition`."""
    assert partitions > 1, "cross-partition ids need at least 2 partitions"
    for _ in range(10_000):
        candidate = new_id(prefix)
        if partition_of(candidate, partitions) != partition:
            return candidate
    raise AssertionError(f"no id found off partition {partition}/{partitions}")


def ids_on_different_partitions(prefix_a: str, prefix_b: str, partitions: int = PARTITIONS) -> tuple[str, str]:
    """Two fresh ids (e.g. parent and child) owned by different partitions."""
    a = new_id(prefix_a)
    b = id_not_on_partition(prefix_b, partition_of(a, partitions), partitions)
    return a, b


def parent_id_with_remote_default_child(prefix: str, task_id: int = 1, partitions: int = PARTITIONS) -> str:
    """A parent id whose SDK-default child id (f"{parent}:{task_id:04x}") hashes to another partition."""
    for _ in range(10_000):
        parent = new_id(prefix)
        if partition_of(parent, partitions) != partition_of(f"{parent}:{task_id:04x}", partitions):
            return parent
    raise AssertionError("no parent id found whose default child lives on another partition")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = DEADLINE_S,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition",
) -> T:
    """Poll `predicate` until it returns a truthy value (which is returned) or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {text} (last value: {last!r})")
        time.sleep(interval)


def hello_ok(address: str, timeout: float = 1.0) -> bool:
    """True when a gRPC Hello round-trips to `address` within `timeout`."""
    channel = grpc.insecure_channel(address)
    try:
        stubs.TaskHubSidecarServiceStub(channel).Hello(empty_pb2.Empty(), timeout=timeout)
        return True
    except grpc.RpcError:
        return False
    finally:
        channel.close()


def new_worker(address: str, orchestrators: Iterable[Callable[..., Any]] = (),
               activities: Iterable[Callable[..., Any]] = (), thread_pool: int = 32) -> dt_worker.TaskHubGrpcWorker:
    """A started SDK worker with the given functions registered (registered under their __name__)."""
    w = dt_worker.TaskHubGrpcWorker(
        host_address=address,
        concurrency_options=dt_worker.ConcurrencyOptions(maximum_thread_pool_workers=thread_pool),
    )
    for fn in orchestrators:
        w.add_orchestrator(fn)
    for fn in activities:
        w.add_activity(fn)
    w.start()
    return w


@contextlib.contextmanager
def running_worker(address: str, orchestrators: Iterable[Callable[..., Any]] = (),
                   activities: Iterable[Callable[..., Any]] = (), **kwargs: Any
                   ) -> Iterator[dt_worker.TaskHubGrpcWorker]:
    w = new_worker(address, orchestrators, activities, **kwargs)
    try:
        yield w
    finally:
        w.stop()


class RawStream:
    """A raw GetWorkItems stream; its items (health pings dropped, unless `keep_pings`) are read on a thread
    into a queue."""

    def __init__(self, channel: grpc.Channel, request: pb.GetWorkItemsRequest, keep_pings: bool = False) -> None:
        self.keep_pings = keep_pings
        call = channel.unary_stream(
            "/TaskHubSidecarService/GetWorkItems",
            request_serializer=pb.GetWorkItemsRequest.SerializeToString,
            response_deserializer=pb.WorkItem.FromString,
        )
        self.call = call(request)
        self.items: queue.Queue[pb.WorkItem] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            for item in self.call:
                if self.keep_pings or not item.HasField("healthPing"):
                    self.items.put(item)

    def next(self, timeout: float = DEADLINE_S) -> pb.WorkItem:
        try:
            return self.items.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no work item within {timeout}s") from None

    def nothing_within(self, window: float) -> None:
        with contextlib.suppress(queue.Empty):
            item = self.items.get(timeout=window)
            raise AssertionError(f"unexpected work item: {item}")

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(timeout=5)


def status_of(client: dt_client.TaskHubGrpcClient, instance_id: str) -> OrchestrationStatus | None:
    state = client.get_orchestration_state(instance_id, fetch_payloads=False)
    return None if state is None else state.runtime_status


def cleanup(client: dt_client.TaskHubGrpcClient, *instance_ids: str) -> None:
    """Unfinished instances a test leaves are terminated at once (no worker needed), so no later worker of
    this module picks them up."""
    left = [i for i in instance_ids
            if status_of(client, i) in (OrchestrationStatus.PENDING, OrchestrationStatus.RUNNING)]
    if not left:
        return
    with contextlib.suppress(grpc.RpcError):
        client._stub.SkipGracefulOrchestrationTerminations(pb.SkipGracefulOrchestrationTerminationsRequest(
            instanceBatch=pb.InstanceBatch(instanceIds=left), reason=ph.get_string_value("test cleanup")))
        return
    for instance_id in left:  # a backend without SkipGracefulOrchestrationTerminations
        with contextlib.suppress(Exception):
            client.terminate_orchestration(instance_id, output="test cleanup")
