"""Work-item filters (GetWorkItemsRequest.workItemFilters) and payload strings, with the official SDK.

Filters:
- Workers with use_work_item_filters() (filters generated from their registry) receive only their own
  orchestrations, activities and entities, also when one worker's orchestration calls another's activity
  or entity. Every worker records who it is in its results, and a foreign work item would fail the instance
  ("not registered"), so COMPLETED + the right worker tag proves the routing.
- Work no connected worker accepts stays PENDING, and runs as soon as a worker that accepts it connects; a
  worker without filters takes what nobody else registered.
- Versions in filters: a filter with versions receives only those versions (explicit WorkItemFilters, and
  the filters the SDK generates for a STRICT-versioned worker); for activities through a raw stream, since
  the SDK never sets activity versions.

Payloads:
- Payload strings are stored and returned untouched: a ~1 MB JSON input round-trips byte-identical, and
  strings that look like payload-store tokens ("blob:v1:container:name") as input, output, custom status and
  event data come back as given.
- The SDK's large-payload capability (PayloadStore; the worker then advertises
  WORKER_CAPABILITY_LARGE_PAYLOADS) with an in-memory store shared by client and worker: the engine stores
  only tokens, and client, orchestrator, activity and event all see the full payloads.

Every wait polls against a deadline; the only fixed waits are short windows that show something does not happen.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
import pytest
from durabletask import client as dt_client
from durabletask import task
from durabletask import worker as dt_worker
from durabletask.entities import EntityContext, EntityInstanceId
from durabletask.internal import helpers as ph
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.payload import LargePayloadStorageOptions, PayloadStore
from durabletask.worker import (
    OrchestrationWorkItemFilter,
    VersionFailureStrategy,
    VersioningOptions,
    VersionMatchStrategy,
    WorkItemFilters,
)

from .helpers import DEADLINE_S, RawStream, cleanup, new_id, status_of, wait_until

OrchestrationStatus = dt_client.OrchestrationStatus

#: How long work that no worker accepts is watched to show it stays PENDING.
QUIET_WINDOW_S = 1.0

AUTO = object()  # use_work_item_filters() with no argument: filters generated from the registry


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------
def unique(name: str) -> str:
    """A name for this run only, so no instance of an earlier test matches a later test's filters."""
    return f"{name}_{uuid.uuid4().hex[:6]}"


def named(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn`, registered by the SDK under `name` (the registry takes __name__)."""
    fn.__name__ = name
    return fn


@contextlib.contextmanager
def sdk_worker(address: str, orchestrators: Iterable[Callable[..., Any]] = (),
               activities: Iterable[Callable[..., Any]] = (), entities: dict[str, Callable[..., Any]] | None = None,
               filters: Any = AUTO, versioning: VersioningOptions | None = None,
               payload_store: PayloadStore | None = None) -> Iterator[dt_worker.TaskHubGrpcWorker]:
    """A started worker, stopped when the block ends. filters: AUTO (from the registry), None (no filters),
    or a WorkItemFilters."""
    w = dt_worker.TaskHubGrpcWorker(host_address=address, payload_store=payload_store)
    for fn in orchestrators:
        w.add_orchestrator(fn)
    for fn in activities:
        w.add_activity(fn)
    for name, fn in (entities or {}).items():
        w.add_entity(fn, name=name)
    if versioning is not None:
        w.use_versioning(versioning)
    if filters is AUTO:
        w.use_work_item_filters()
    elif filters is not None:
        w.use_work_item_filters(filters)
    w.start()
    try:
        yield w
    finally:
        w.stop()


def completed(client: dt_client.TaskHubGrpcClient, instance_id: str,
              timeout: float = DEADLINE_S) -> dt_client.OrchestrationState:
    state = client.wait_for_orchestration_completion(instance_id, timeout=int(timeout))
    assert state is not None, instance_id
    assert state.runtime_status == OrchestrationStatus.COMPLETED, (instance_id, state.failure_details)
    return state


def stays_pending(client: dt_client.TaskHubGrpcClient, instance_ids: Iterable[str],
                  window: float = QUIET_WINDOW_S) -> None:
    """Every instance is (and stays, for `window` seconds) PENDING: no connected worker took it."""
    ids = list(instance_ids)
    end = time.monotonic() + window
    while True:
        for instance_id in ids:
            assert status_of(client, instance_id) == OrchestrationStatus.PENDING, instance_id
        if time.monotonic() >= end:
            return
        time.sleep(0.1)


def entity_state(client: dt_client.TaskHubGrpcClient, entity_id: EntityInstanceId) -> Any:
    metadata = client.get_entity(entity_id)
    return None if metadata is None else metadata.get_typed_state(dict)




# ---------------------------------------------------------------------------------------------------------
# routing by name
# ---------------------------------------------------------------------------------------------------------
def test_filtered_workers_receive_only_their_own_work(runtime: Any, client: Any) -> None:
    names = {k: unique(k) for k in ("orch_a", "act_a", "orch_b", "act_b", "ent_a", "ent_b")}

    def make(tag: str, mine: str, other: str) -> dict[str, Callable[..., Any]]:
        def act(_: task.ActivityContext, value: Any) -> Any:
            return {"activity_by": tag, "value": value}

        def ent(ctx: EntityContext, value: Any) -> Any:
            state = ctx.get_state(dict, {"count": 0})
            state = {"count": state["count"] + (value or 0), "by": tag}
            ctx.set_state(state)
            return state

        def orch(ctx: task.OrchestrationContext, value: Any) -> Any:
            own = yield ctx.call_activity(names[f"act_{mine}"], input=value)
            foreign = yield ctx.call_activity(names[f"act_{other}"], input=value)
            own_entity = yield ctx.call_entity(EntityInstanceId(names[f"ent_{mine}"], ctx.instance_id), "add", 1)
            foreign_entity = yield ctx.call_entity(EntityInstanceId(names[f"ent_{other}"], ctx.instance_id), "add", 2)
            return {"orchestration_by": tag, "own": own, "foreign": foreign,
                    "own_entity": own_entity, "foreign_entity": foreign_entity}

        return {"orch": named(names[f"orch_{mine}"], orch), "act": named(names[f"act_{mine}"], act), "ent": ent}

    a, b = make("worker-a", "a", "b"), make("worker-b", "b", "a")
    with sdk_worker(runtime.address, [a["orch"]], [a["act"]], {names["ent_a"]: a["ent"]}), \
            sdk_worker(runtime.address, [b["orch"]], [b["act"]], {names["ent_b"]: b["ent"]}):
        started = []
        for i in range(4):
            started.append(("a", client.schedule_new_orchestration(names["orch_a"], input=i, instance_id=new_id("wf-a"))))
            started.append(("b", client.schedule_new_orchestration(names["orch_b"], input=i, instance_id=new_id("wf-b"))))
        signalled = EntityInstanceId(names["ent_b"], "signalled")
        client.signal_entity(signalled, "add", 5)
        for kind, instance_id in started:
            other = "b" if kind == "a" else "a"
            out = completed(client, instance_id).get_output()
            value = out["own"]["value"]
            assert out == {
                "orchestration_by": f"worker-{kind}",
                "own": {"activity_by": f"worker-{kind}", "value": value},
                "foreign": {"activity_by": f"worker-{other}", "value": value},
                "own_entity": {"count": 1, "by": f"worker-{kind}"},
                "foreign_entity": {"count": 2, "by": f"worker-{other}"},
            }, out
        wait_until(lambda: entity_state(client, signalled) == {"count": 5, "by": "worker-b"},
                   message=lambda: f"the signalled entity's state (now {entity_state(client, signalled)})")


def test_unaccepted_work_stays_pending_until_a_worker_accepts_it(runtime: Any, client: Any) -> None:
    known, orphan, rest = unique("wf_known"), unique("wf_orphan"), unique("wf_rest")

    def known_fn(_: task.OrchestrationContext, __: Any) -> Any:
        return "known"

    def orphan_fn(_: task.OrchestrationContext, __: Any) -> Any:
        return "filtered worker"

    def rest_fn(_: task.OrchestrationContext, __: Any) -> Any:
        return "unfiltered worker"

    orphan_id, rest_id = new_id("wf-orphan"), new_id("wf-rest")
    try:
        with sdk_worker(runtime.address, [named(known, known_fn)]):
            client.schedule_new_orchestration(orphan, instance_id=orphan_id)
            client.schedule_new_orchestration(rest, instance_id=rest_id)
            known_id = client.schedule_new_orchestration(known, instance_id=new_id("wf-known"))
            # The filtered worker runs its own orchestration, after the two nobody accepts were queued ...
            assert completed(client, known_id).get_output() == "known"
            # ... and those two stay pending.
            stays_pending(client, [orphan_id, rest_id])

            with sdk_worker(runtime.address, [named(orphan, orphan_fn)]):
                assert completed(client, orphan_id).get_output() == "filtered worker"
                assert status_of(client, rest_id) == OrchestrationStatus.PENDING

                # A worker without filters takes what no filtered worker registered.
                with sdk_worker(runtime.address, [named(rest, rest_fn)], filters=None):
                    assert completed(client, rest_id).get_output() == "unfiltered worker"
    finally:
        cleanup(client, orphan_id, rest_id)


# ---------------------------------------------------------------------------------------------------------
# versions in filters
# ---------------------------------------------------------------------------------------------------------
def test_filter_versions_receive_only_matching_versions(runtime: Any, client: Any) -> None:
    name = unique("wf_versioned")

    def make(tag: str) -> Callable[..., Any]:
        def orch(ctx: task.OrchestrationContext, _: Any) -> Any:
            return {"by": tag, "version": ctx.version}

        return named(name, orch)

    def only(*versions: str) -> WorkItemFilters:
        return WorkItemFilters(orchestrations=[OrchestrationWorkItemFilter(name=name, versions=list(versions))])

    ids = {v: new_id(f"wf-v{v or 'none'}") for v in ("1.0", "2.0", "3.0", "")}
    try:
        with sdk_worker(runtime.address, [make("v1-worker")], filters=only("1.0")), \
                sdk_worker(runtime.address, [make("v2-worker")], filters=only("2.0", "2.1")):
            for version, instance_id in ids.items():
                client.schedule_new_orchestration(name, instance_id=instance_id, version=version or None)
            assert completed(client, ids["1.0"]).get_output() == {"by": "v1-worker", "version": "1.0"}
            assert completed(client, ids["2.0"]).get_output() == {"by": "v2-worker", "version": "2.0"}
            stays_pending(client, [ids["3.0"], ids[""]])
            # A filter entry without versions accepts any version, and no version.
            with sdk_worker(runtime.address, [make("any-worker")], filters=only()):
                assert completed(client, ids["3.0"]).get_output() == {"by": "any-worker", "version": "3.0"}
                assert completed(client, ids[""]).get_output() == {"by": "any-worker", "version": None}
    finally:
        cleanup(client, *ids.values())


def test_generated_filters_of_a_strict_versioned_worker(runtime: Any, client: Any) -> None:
    """With STRICT versioning the SDK puts the worker's version into its generated filters: the engine then
    never offers it other versions (so it never has to reject one)."""
    name = unique("wf_strict")
    runs: list[str | None] = []

    def orch(ctx: task.OrchestrationContext, _: Any) -> Any:
        runs.append(ctx.version)
        return ctx.version

    strict = VersioningOptions(version="5.0", match_strategy=VersionMatchStrategy.STRICT,
                               failure_strategy=VersionFailureStrategy.FAIL)
    match_id, other_id = new_id("wf-strict-5"), new_id("wf-strict-4")
    try:
        with sdk_worker(runtime.address, [named(name, orch)], versioning=strict):
            client.schedule_new_orchestration(name, instance_id=other_id, version="4.0")
            client.schedule_new_orchestration(name, instance_id=match_id, version="5.0")
            assert completed(client, match_id).get_output() == "5.0"
            # With FAIL, a 4.0 work item reaching this worker would fail the instance: it stays pending instead.
            stays_pending(client, [other_id])
        assert runs == ["5.0"]
    finally:
        cleanup(client, match_id, other_id)


@pytest.mark.engine_only
def test_activity_filter_versions(runtime: Any, client: Any, raw_stub: Any, raw_channel: grpc.Channel) -> None:
    """The SDK never sets an activity version, so a raw stream schedules two versions of one activity and
    accepts only one of them; the other is left for another worker."""
    orch, act = unique("wf_raw_orch"), unique("wf_raw_act")
    filters = pb.WorkItemFilters(orchestrations=[pb.OrchestrationFilter(name=orch)],
                                 activities=[pb.ActivityFilter(name=act, versions=["2.0"])])
    stream = RawStream(raw_channel, pb.GetWorkItemsRequest(workItemFilters=filters))
    instance_id = new_id("wf-act-ver")
    other: RawStream | None = None
    try:
        client.schedule_new_orchestration(orch, instance_id=instance_id)
        first = stream.next()
        assert first.HasField("orchestratorRequest") and first.orchestratorRequest.instanceId == instance_id
        actions = []
        for task_id, version in ((0, "3.0"), (1, "2.0"), (2, None)):
            action = ph.new_schedule_task_action(task_id, act, json.dumps(version), None)
            if version is not None:
                action.scheduleTask.version.value = version
            actions.append(action)
        raw_stub.CompleteOrchestratorTask(pb.OrchestratorResponse(
            instanceId=instance_id, actions=actions, completionToken=first.completionToken), timeout=DEADLINE_S)
        item = stream.next()
        assert item.HasField("activityRequest"), item
        assert (item.activityRequest.taskId, item.activityRequest.version.value) == (1, "2.0")
        stream.nothing_within(QUIET_WINDOW_S)

        # A stream whose filter names the activity without versions takes the other two.
        any_version = pb.WorkItemFilters(activities=[pb.ActivityFilter(name=act)])
        other = RawStream(raw_channel, pb.GetWorkItemsRequest(workItemFilters=any_version))
        rest = [other.next(), other.next()]
        assert sorted((r.activityRequest.taskId, r.activityRequest.version.value) for r in rest) == [(0, "3.0"), (2, "")]
        assert [r.activityRequest.HasField("version") for r in sorted(rest, key=lambda r: r.activityRequest.taskId)] == [
            True, False]
    finally:
        stream.close()
        if other is not None:
            other.close()
        cleanup(client, instance_id)


# ---------------------------------------------------------------------------------------------------------
# payload strings are stored untouched
# ---------------------------------------------------------------------------------------------------------
def big_json(target_bytes: int) -> str:
    """A JSON document of about `target_bytes`, formatted the way no JSON library would re-emit it."""
    rows = []
    i = 0
    size = 0
    while size < target_bytes:
        row = '{ "id" :' + str(i) + ',  "name":"caf\\u00e9 \u00fcber \U0001f600 ' + str(i) + '" ,"tags":[ "a","b" ] }'
        rows.append(row)
        size += len(row.encode()) + 2
        i += 1
    return "[\n " + ",\n ".join(rows) + "\n]"


def test_large_json_input_round_trips_byte_identical(runtime: Any, client: Any, raw_stub: Any) -> None:
    name = unique("wf_big")
    raw = big_json(1_000_000)
    assert len(raw.encode()) >= 1_000_000

    def big_act(_: task.ActivityContext, value: Any) -> Any:
        return value

    def big_orch(ctx: task.OrchestrationContext, value: Any) -> Any:
        echoed = yield ctx.call_activity(big_act, input=value)
        return echoed

    instance_id = new_id("wf-big")
    # StartInstance with the exact string (the SDK client would re-serialize a Python object).
    raw_stub.StartInstance(pb.CreateInstanceRequest(instanceId=instance_id, name=name,
                                                    input=ph.get_string_value(raw)), timeout=DEADLINE_S)
    with sdk_worker(runtime.address, [named(name, big_orch)], [big_act]):
        state = completed(client, instance_id)
    assert state.serialized_input == raw  # byte-identical
    assert state.get_output() == json.loads(raw)
    res = raw_stub.GetInstance(pb.GetInstanceRequest(instanceId=instance_id, getInputsAndOutputs=True),
                               timeout=DEADLINE_S)
    assert res.orchestrationState.input.value == raw
    assert res.orchestrationState.output.value == state.serialized_output


TOKENS = {
    "input": "blob:v1:container:input-name",
    "output": "blob:v1:container:output-name",
    "custom_status": "blob:v1:container:status-name",
    "event": "blob:v1:container:event-name",
    "terminate": "blob:v1:container:terminate-name",
}


@pytest.mark.engine_only
def test_token_like_strings_are_returned_as_given(runtime: Any, client: Any, raw_stub: Any,
                                                  raw_channel: grpc.Channel) -> None:
    """Raw (not JSON) strings shaped like payload-store tokens, through the protocol without an SDK worker
    (which would try to decode them as JSON) and without an SDK client (which would JSON-encode them)."""
    orch = unique("wf_tokens")
    stream = RawStream(raw_channel, pb.GetWorkItemsRequest(
        workItemFilters=pb.WorkItemFilters(orchestrations=[pb.OrchestrationFilter(name=orch)])))
    instance_id, terminated_id, forced_id = new_id("wf-tokens"), new_id("wf-tokens-term"), new_id("wf-tokens-force")
    try:
        raw_stub.StartInstance(pb.CreateInstanceRequest(instanceId=instance_id, name=orch,
                                                        input=ph.get_string_value(TOKENS["input"])),
                               timeout=DEADLINE_S)
        first = stream.next()
        started = [e.executionStarted for e in first.orchestratorRequest.newEvents if e.HasField("executionStarted")]
        assert started and started[0].input.value == TOKENS["input"]
        # Wait for an event, with a custom status.
        raw_stub.CompleteOrchestratorTask(pb.OrchestratorResponse(
            instanceId=instance_id, actions=[], customStatus=ph.get_string_value(TOKENS["custom_status"]),
            completionToken=first.completionToken), timeout=DEADLINE_S)
        wait_until(lambda: raw_stub.GetInstance(pb.GetInstanceRequest(instanceId=instance_id), timeout=DEADLINE_S)
                   .orchestrationState.customStatus.value == TOKENS["custom_status"],
                   message="the custom status to be stored")
        raw_stub.RaiseEvent(pb.RaiseEventRequest(instanceId=instance_id, name="go",
                                                 input=ph.get_string_value(TOKENS["event"])), timeout=DEADLINE_S)
        second = stream.next()
        raised = [e.eventRaised for e in second.orchestratorRequest.newEvents if e.HasField("eventRaised")]
        assert [(r.name, r.input.value) for r in raised] == [("go", TOKENS["event"])]
        done = ph.new_complete_orchestration_action(0, pb.ORCHESTRATION_STATUS_COMPLETED, TOKENS["output"])
        raw_stub.CompleteOrchestratorTask(pb.OrchestratorResponse(
            instanceId=instance_id, actions=[done], customStatus=ph.get_string_value(TOKENS["custom_status"]),
            completionToken=second.completionToken), timeout=DEADLINE_S)

        state = client.wait_for_orchestration_completion(instance_id, timeout=int(DEADLINE_S))
        assert state is not None and state.runtime_status == OrchestrationStatus.COMPLETED
        assert (state.serialized_input, state.serialized_output, state.serialized_custom_status) == (
            TOKENS["input"], TOKENS["output"], TOKENS["custom_status"])
        history = list(raw_stub.StreamInstanceHistory(pb.StreamInstanceHistoryRequest(instanceId=instance_id),
                                                      timeout=DEADLINE_S))
        events = [e for chunk in history for e in chunk.events]
        assert [e.eventRaised.input.value for e in events if e.HasField("eventRaised")] == [TOKENS["event"]]
        assert [e.executionStarted.input.value for e in events if e.HasField("executionStarted")] == [TOKENS["input"]]
        assert [e.executionCompleted.result.value for e in events if e.HasField("executionCompleted")] == [
            TOKENS["output"]]

        # Terminate output: the executionTerminated event carries it untouched to the worker, and what the
        # worker answers is stored as given; SkipGracefulOrchestrationTerminations stores its reason as given.
        raw_stub.StartInstance(pb.CreateInstanceRequest(instanceId=terminated_id, name=orch,
                                                        input=ph.get_string_value(TOKENS["input"])),
                               timeout=DEADLINE_S)
        raw_stub.TerminateInstance(pb.TerminateRequest(instanceId=terminated_id,
                                                       output=ph.get_string_value(TOKENS["terminate"])),
                                   timeout=DEADLINE_S)
        item = stream.next()
        while item.orchestratorRequest.instanceId != terminated_id or not any(
                e.HasField("executionTerminated") for e in item.orchestratorRequest.newEvents):
            # The start may come alone first; answer it and wait for the terminate.
            raw_stub.CompleteOrchestratorTask(pb.OrchestratorResponse(
                instanceId=item.orchestratorRequest.instanceId, actions=[], completionToken=item.completionToken),
                timeout=DEADLINE_S)
            item = stream.next()
        terminated = [e.executionTerminated for e in item.orchestratorRequest.newEvents
                      if e.HasField("executionTerminated")]
        assert [t.input.value for t in terminated] == [TOKENS["terminate"]]
        end = ph.new_complete_orchestration_action(0, pb.ORCHESTRATION_STATUS_TERMINATED, TOKENS["terminate"])
        raw_stub.CompleteOrchestratorTask(pb.OrchestratorResponse(
            instanceId=terminated_id, actions=[end], completionToken=item.completionToken), timeout=DEADLINE_S)
        state = client.wait_for_orchestration_completion(terminated_id, timeout=int(DEADLINE_S))
        assert state is not None and state.runtime_status == OrchestrationStatus.TERMINATED
        assert (state.serialized_input, state.serialized_output) == (TOKENS["input"], TOKENS["terminate"])

        raw_stub.StartInstance(pb.CreateInstanceRequest(instanceId=forced_id, name=unique("wf_nobody"),
                                                        input=ph.get_string_value(TOKENS["input"])),
                               timeout=DEADLINE_S)
        res = raw_stub.SkipGracefulOrchestrationTerminations(pb.SkipGracefulOrchestrationTerminationsRequest(
            instanceBatch=pb.InstanceBatch(instanceIds=[forced_id]), reason=ph.get_string_value(TOKENS["terminate"])),
            timeout=DEADLINE_S)
        assert list(res.unterminatedInstanceIds) == []
        state = client.get_orchestration_state(forced_id)
        assert state is not None and state.runtime_status == OrchestrationStatus.TERMINATED
        assert (state.serialized_input, state.serialized_output) == (TOKENS["input"], TOKENS["terminate"])
    finally:
        stream.close()
        cleanup(client, instance_id, terminated_id, forced_id)


def test_token_like_values_through_the_sdk(runtime: Any, client: Any) -> None:
    """The same shapes as JSON values through an SDK client and worker (no payload store): returned as given."""
    name = unique("wf_sdk_tokens")

    def orch(ctx: task.OrchestrationContext, value: Any) -> Any:
        ctx.set_custom_status(TOKENS["custom_status"])
        event = yield ctx.wait_for_external_event("go")
        return {"input": value, "event": event, "output": TOKENS["output"]}

    with sdk_worker(runtime.address, [named(name, orch)]):
        instance_id = client.schedule_new_orchestration(name, input=TOKENS["input"], instance_id=new_id("wf-sdk-tok"))
        client.wait_for_orchestration_start(instance_id, timeout=int(DEADLINE_S))
        client.raise_orchestration_event(instance_id, "go", data=TOKENS["event"])
        state = completed(client, instance_id)
    assert state.get_input() == TOKENS["input"]
    assert state.get_custom_status() == TOKENS["custom_status"]
    assert state.get_output() == {"input": TOKENS["input"], "event": TOKENS["event"], "output": TOKENS["output"]}


# ---------------------------------------------------------------------------------------------------------
# the SDK's large-payload capability, with an in-memory payload store
# ---------------------------------------------------------------------------------------------------------
class MemoryPayloadStore(PayloadStore):
    """A PayloadStore keeping payloads in a dict (shared by the test's client and worker)."""

    PREFIX = "memblob:v1:e2e:"

    def __init__(self, threshold_bytes: int = 1024) -> None:
        self._options = LargePayloadStorageOptions(threshold_bytes=threshold_bytes, enable_compression=False)
        self.blobs: dict[str, bytes] = {}
        self.downloads = 0
        self._lock = threading.Lock()

    @property
    def options(self) -> LargePayloadStorageOptions:
        return self._options

    def upload(self, data: bytes, *, instance_id: str | None = None) -> str:
        token = f"{self.PREFIX}{instance_id or 'none'}:{uuid.uuid4().hex}"
        with self._lock:
            self.blobs[token] = data
        return token

    async def upload_async(self, data: bytes, *, instance_id: str | None = None) -> str:
        return self.upload(data, instance_id=instance_id)

    def download(self, token: str) -> bytes:
        with self._lock:
            self.downloads += 1
            return self.blobs[token]

    async def download_async(self, token: str) -> bytes:
        return self.download(token)

    def is_known_token(self, value: str) -> bool:
        return value.startswith(self.PREFIX)


def test_large_payload_store_end_to_end(runtime: Any, raw_stub: Any) -> None:
    store = MemoryPayloadStore(threshold_bytes=1024)
    name, act_name = unique("wf_lp"), unique("wf_lp_act")
    big_input = {"blob": "i" * 200_000, "n": 1}
    big_event = {"blob": "e" * 150_000}
    seen: dict[str, Any] = {}

    def lp_act(_: task.ActivityContext, value: Any) -> Any:
        seen["activity_input_len"] = len(value["blob"])
        return {"blob": value["blob"].upper(), "from": "activity"}

    def lp_orch(ctx: task.OrchestrationContext, value: Any) -> Any:
        echoed = yield ctx.call_activity(act_name, input=value)
        event = yield ctx.wait_for_external_event("big")
        ctx.set_custom_status({"status": "s" * 50_000})
        return {"input_len": len(value["blob"]), "activity": echoed, "event_len": len(event["blob"]),
                "out": "o" * 300_000}

    lp_client = dt_client.TaskHubGrpcClient(host_address=runtime.address, payload_store=store)
    try:
        with sdk_worker(runtime.address, [named(name, lp_orch)], [named(act_name, lp_act)], payload_store=store):
            instance_id = lp_client.schedule_new_orchestration(name, input=big_input, instance_id=new_id("wf-lp"))
            lp_client.wait_for_orchestration_start(instance_id, timeout=int(DEADLINE_S))
            lp_client.raise_orchestration_event(instance_id, "big", data=big_event)
            state = lp_client.wait_for_orchestration_completion(instance_id, timeout=int(DEADLINE_S))
        assert state is not None and state.runtime_status == OrchestrationStatus.COMPLETED, state
        # Client, orchestrator, activity and event see the full payloads ...
        assert state.get_input() == big_input
        out = state.get_output()
        assert out["input_len"] == 200_000 and out["event_len"] == 150_000 and out["out"] == "o" * 300_000
        assert out["activity"] == {"blob": "I" * 200_000, "from": "activity"}
        assert seen["activity_input_len"] == 200_000
        assert state.get_custom_status() == {"status": "s" * 50_000}

        # ... while the engine stored only the tokens, exactly as given.
        res = raw_stub.GetInstance(pb.GetInstanceRequest(instanceId=instance_id, getInputsAndOutputs=True),
                                   timeout=DEADLINE_S)
        stored = res.orchestrationState
        for field in (stored.input, stored.output, stored.customStatus):
            assert store.is_known_token(field.value) and field.value in store.blobs, field.value
        assert json.loads(store.blobs[stored.input.value]) == big_input
        events = [e for chunk in raw_stub.StreamInstanceHistory(
            pb.StreamInstanceHistoryRequest(instanceId=instance_id), timeout=DEADLINE_S) for e in chunk.events]
        kinds = {"taskScheduled": "input", "taskCompleted": "result", "eventRaised": "input"}
        for kind, attr in kinds.items():
            values = [getattr(getattr(e, kind), attr).value for e in events if e.HasField(kind)]
            assert len(values) == 1 and store.is_known_token(values[0]), (kind, values)
        # Every token the engine handed back was one the store had issued.
        assert len(store.blobs) >= 6 and store.downloads >= 6
    finally:
        lp_client.close()
