"""Fuzzing every RPC of a running engine: random bytes, and well-formed messages full of nonsense (empty, huge and
non-ASCII ids, control characters, negative task ids, unknown tokens, unknown enum values, junk actions).

Every call must end with a gRPC status before its deadline, no engine process may crash (a partition or gateway
restart is a finding, even though the supervisor hides it), and afterwards the server still serves and the
instances created before the fuzzing are intact.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import uuid
from collections import Counter
from typing import Any

import grpc
import pytest
from durabletask import task
from durabletask.client import OrchestrationStatus, TaskHubGrpcClient
from durabletask.internal import orchestrator_service_pb2 as pb
from google.protobuf import descriptor as pbd
from google.protobuf import empty_pb2, message_factory, timestamp_pb2, wrappers_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from .helpers import DEADLINE_S, PARTITIONS, id_on_partition, new_id, new_worker, partition_of, wait_until

pytestmark = [pytest.mark.engine_only]

SERVICE = pb.DESCRIPTOR.services_by_name["TaskHubSidecarService"]
CALL_DEADLINE_S = 5.0
SLACK_S = 2.0  # client-side scheduling on a loaded 2-core machine
#: Destructive by design (it would delete the task hub with every instance): not fuzzed.
EXCLUDED = {"DeleteTaskHub"}
UNARY = [m.name for m in SERVICE.methods if not m.server_streaming and m.name not in EXCLUDED]
STREAMING = [m.name for m in SERVICE.methods if m.server_streaming]
#: RPCs that may legitimately wait until the caller's deadline.
MAY_WAIT = {"WaitForInstanceStart", "WaitForInstanceCompletion", "GetWorkItems", "StreamInstanceHistory"}
CODES: Counter[tuple[str, str]] = Counter()
CRASHES: list[str] = []
BROKEN: list[str] = []
LAST_INTERNAL = ("*", "INTERNAL")  # counts every INTERNAL answer, whatever the RPC
FUZZ = settings(deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate], derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


# ---------------------------------------------------------------------------------------------------------
# the instances that must survive the fuzzing
# ---------------------------------------------------------------------------------------------------------
def fz_echo(ctx: task.ActivityContext, value: Any) -> Any:
    return value


def fz_done(ctx: task.OrchestrationContext, value: Any):
    return [(yield ctx.call_activity(fz_echo, input=value)), "done"]


def fz_waiter(ctx: task.OrchestrationContext, value: Any):
    got = yield ctx.wait_for_external_event("go")
    return [value, got]


@pytest.fixture(scope="module")
def before(runtime) -> dict[str, Any]:
    """A completed and a waiting instance, made by an SDK worker that is stopped before the fuzzing starts (so
    the fuzzer's own GetWorkItems streams receive the work items of the instances it creates)."""
    client = TaskHubGrpcClient(host_address=runtime.address)
    w = new_worker(runtime.address, [fz_done, fz_waiter], [fz_echo])
    try:
        done = client.schedule_new_orchestration(fz_done, input={"k": "ünïcødé"}, instance_id=new_id("fz-done"))
        waiting = client.schedule_new_orchestration(fz_waiter, input=7, instance_id=new_id("fz-wait"))
        st_done = client.wait_for_orchestration_completion(done, timeout=DEADLINE_S)
        assert st_done.runtime_status == OrchestrationStatus.COMPLETED, st_done.failure_details
        wait_until(lambda: client.get_orchestration_state(waiting).runtime_status == OrchestrationStatus.RUNNING,
                   message="waiter running")
    finally:
        w.stop()
        client.close()
    return {"done": done, "done_output": st_done.serialized_output, "waiting": waiting,
            "exits": exits(runtime)}


def log_lines(runtime, marker: str) -> list[str]:
    """Lines of the runtime's log (this module's runtime is started once) that contain `marker`."""
    try:
        text = runtime.log_path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if marker in line]


def exits(runtime) -> list[str]:
    """The supervisor's "<child> exited with <code>; restarting" lines: one per crashed engine process."""
    return log_lines(runtime, " exited with ")


def engine_answers(runtime) -> bool:
    """Every partition answers a GetInstance within 2 s."""
    channel = grpc.insecure_channel(runtime.address)
    try:
        stub = channel.unary_unary("/TaskHubSidecarService/GetInstance", request_serializer=None,
                                   response_deserializer=None)
        for p in range(PARTITIONS):
            stub(pb.GetInstanceRequest(instanceId=id_on_partition("fz-probe", p)).SerializeToString(), timeout=2.0)
        return True
    except grpc.RpcError:
        return False
    finally:
        channel.close()


def assert_no_restart(runtime, before: dict[str, Any], what: str) -> None:
    """Fail if an engine process died since the last check (the supervisor restarts it, which would hide the
    crash). A crash can lag its cause: INTERNAL is answered before the partition exits, and a poisoned message
    to another partition crashes the receiver asynchronously; so an INTERNAL answer waits for the exit."""
    seen = len(before["exits"])
    if CODES.get(LAST_INTERNAL) != before.get("internal_seen"):
        before["internal_seen"] = CODES.get(LAST_INTERNAL)
        with contextlib.suppress(AssertionError):
            wait_until(lambda: len(exits(runtime)) > seen, timeout=5.0, message="the partition's exit")
    now = exits(runtime)
    if len(now) == seen:
        return
    new = [line.split(" WARNING ", 1)[-1] for line in now[seen:]]
    CRASHES.append(f"{new} after {what[:300]}")
    # Wait for a whole, answering engine before the next example; one that keeps crashing is broken for good.
    def recovered() -> bool:
        partition_exits = sum(" partition-" in line for line in exits(runtime))
        noticed = len(log_lines(runtime, " restarted (epoch "))  # the gateway saw the new partition process
        return noticed >= partition_exits and engine_answers(runtime)
    with contextlib.suppress(AssertionError):
        wait_until(recovered, timeout=20.0, interval=0.2, message="engine answering")
    before["exits"] = exits(runtime)
    if not engine_answers(runtime) or len(before["exits"]) > len(now) + 2:
        BROKEN.append(f"crash loop after {what[:300]}")
    errors = sorted({line for line in runtime.log_tail(200).splitlines() if line and not line[0].isspace()
                     and ("Error" in line or "failed" in line)})
    raise AssertionError(f"engine process crashed after {what[:2000]}: {new}\n" + "\n".join(errors[-12:]))


@pytest.fixture(autouse=True)
def _fail_fast_when_broken():
    if BROKEN:
        pytest.fail(f"the engine is crash-looping ({BROKEN[0]}); see the first failure")


# ---------------------------------------------------------------------------------------------------------
# calls: every one ends with a status, in time
# ---------------------------------------------------------------------------------------------------------
def call_unary(channel: grpc.Channel, name: str, payload: bytes, timeout: float = CALL_DEADLINE_S) -> grpc.StatusCode:
    fn = channel.unary_unary(f"/TaskHubSidecarService/{name}", request_serializer=None, response_deserializer=None)
    started = time.monotonic()
    try:
        fn(payload, timeout=timeout)
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()
    elapsed = time.monotonic() - started
    CODES[(name, code.name if code else "none")] += 1
    if code == grpc.StatusCode.INTERNAL:
        CODES[LAST_INTERNAL] += 1
    assert isinstance(code, grpc.StatusCode), f"{name}: no status"
    assert elapsed < timeout + SLACK_S, f"{name} ran {elapsed:.1f}s past its {timeout}s deadline"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        assert name in MAY_WAIT, f"{name} hung until its deadline ({len(payload)} bytes)"
    return code


def call_streaming(channel: grpc.Channel, name: str, payload: bytes, timeout: float = 0.5) -> grpc.StatusCode:
    """Read whatever the stream sends until it ends or its short deadline passes, then cancel it."""
    fn = channel.unary_stream(f"/TaskHubSidecarService/{name}", request_serializer=None, response_deserializer=None)
    started = time.monotonic()
    stream = fn(payload, timeout=timeout)
    code = grpc.StatusCode.OK
    try:
        for _ in stream:
            if time.monotonic() - started > timeout + SLACK_S:
                break
    except grpc.RpcError as exc:
        code = exc.code()
    finally:
        stream.cancel()
    elapsed = time.monotonic() - started
    CODES[(name, code.name if code else "none")] += 1
    assert elapsed < timeout + SLACK_S, f"{name} stream ran {elapsed:.1f}s past its {timeout}s deadline"
    return code


# ---------------------------------------------------------------------------------------------------------
# strategies: any message of the SDK's proto, filled with nonsense
# ---------------------------------------------------------------------------------------------------------
NASTY_STRINGS = st.sampled_from([
    "", " ", "x" * 257, "x" * 5000, "😀" * 64, "😀" * 200, "a\x00b", "\n", "\x7f", "@entity@key", "../../etc",
    "0.1.1", "1.99999.1", "-1.1.1", "99.1.1", "0", "0.", ".", "1.1.1.1", "é" * 300,
])
STRINGS = st.one_of(NASTY_STRINGS, st.text(max_size=40), st.text(min_size=200, max_size=600))
INT_RANGES = {
    pbd.FieldDescriptor.TYPE_INT32: (-2**31, 2**31 - 1), pbd.FieldDescriptor.TYPE_SINT32: (-2**31, 2**31 - 1),
    pbd.FieldDescriptor.TYPE_SFIXED32: (-2**31, 2**31 - 1), pbd.FieldDescriptor.TYPE_ENUM: (-2**31, 2**31 - 1),
    pbd.FieldDescriptor.TYPE_INT64: (-2**63, 2**63 - 1), pbd.FieldDescriptor.TYPE_SINT64: (-2**63, 2**63 - 1),
    pbd.FieldDescriptor.TYPE_SFIXED64: (-2**63, 2**63 - 1), pbd.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    pbd.FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1), pbd.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    pbd.FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = [v for v in (0, 1, -1, 2, lo, hi, 2**31 - 1, -2**31, 2**53) if lo <= v <= hi]
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi), st.integers(-3, 20).filter(lambda v: lo <= v <= hi))


def scalar(field: pbd.FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t == pbd.FieldDescriptor.TYPE_STRING:
        return STRINGS
    if t == pbd.FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == pbd.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (pbd.FieldDescriptor.TYPE_DOUBLE, pbd.FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=32 if t == pbd.FieldDescriptor.TYPE_FLOAT else 64)
    if t == pbd.FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), ints(*INT_RANGES[t]))
    return ints(*INT_RANGES[t])


@st.composite
def messages(draw: Any, descriptor: pbd.Descriptor, depth: int = 0) -> Any:
    """A message of type `descriptor` with a random subset of its fields set to random values."""
    msg = message_factory.GetMessageClass(descriptor)()
    fields = list(descriptor.fields)
    if depth >= 3:
        fields = [f for f in fields if f.type != pbd.FieldDescriptor.TYPE_MESSAGE]
    if not fields:
        return msg
    chosen = draw(st.lists(st.sampled_from(fields), max_size=min(len(fields), 6), unique_by=lambda f: f.number))
    for f in chosen:
        is_map = f.type == pbd.FieldDescriptor.TYPE_MESSAGE and f.message_type.GetOptions().map_entry
        if is_map:
            key_f, value_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            for _ in range(draw(st.integers(0, 3))):
                key = draw(scalar(key_f))
                if value_f.type == pbd.FieldDescriptor.TYPE_MESSAGE:
                    getattr(msg, f.name)[key].CopyFrom(draw(messages(value_f.message_type, depth + 1)))
                else:
                    getattr(msg, f.name)[key] = draw(scalar(value_f))
        elif f.is_repeated:
            count = draw(st.integers(0, 3))
            if f.type == pbd.FieldDescriptor.TYPE_MESSAGE:
                for _ in range(count):
                    getattr(msg, f.name).add().CopyFrom(draw(messages(f.message_type, depth + 1)))
            else:
                getattr(msg, f.name).extend(draw(scalar(f)) for _ in range(count))
        elif f.type == pbd.FieldDescriptor.TYPE_MESSAGE:
            getattr(msg, f.name).CopyFrom(draw(messages(f.message_type, depth + 1)))
        else:
            setattr(msg, f.name, draw(scalar(f)))
    return msg


def harmless(name: str, msg: Any) -> Any:
    """Keep bulk deletion away from the instances that must survive: a purge filter matches nothing."""
    if name == "PurgeInstances" and msg.HasField("purgeInstanceFilter"):
        msg.purgeInstanceFilter.createdTimeTo.CopyFrom(timestamp_pb2.Timestamp(seconds=1))
    return msg


def purges_by_filter(name: str, payload: bytes) -> bool:
    if name != "PurgeInstances":
        return False
    try:
        return pb.PurgeInstancesRequest.FromString(payload).HasField("purgeInstanceFilter")
    except Exception:  # noqa: BLE001 - not a valid message: harmless
        return False


def method_input(name: str) -> pbd.Descriptor:
    return SERVICE.methods_by_name[name].input_type


# ---------------------------------------------------------------------------------------------------------
# the tests, in order; the last one checks what survived
# ---------------------------------------------------------------------------------------------------------
@settings(FUZZ, max_examples=70)
@given(name=st.sampled_from(UNARY), payload=st.binary(max_size=512))
def test_random_bytes_to_every_unary_rpc(runtime, raw_channel, before, name, payload):
    if purges_by_filter(name, payload):
        payload = b""
    call_unary(raw_channel, name, payload)
    assert_no_restart(runtime, before, f"{name} with random bytes {payload!r}")


@settings(FUZZ, max_examples=110)
@given(data=st.data())
def test_nonsense_messages_to_every_unary_rpc(runtime, raw_channel, before, data):
    name = data.draw(st.sampled_from(UNARY), label="rpc")
    msg = harmless(name, data.draw(messages(method_input(name)), label="request"))
    call_unary(raw_channel, name, msg.SerializeToString())
    assert_no_restart(runtime, before, f"{name}({msg})")


# Hand-picked edge cases: each once, every run.
EDGE_CASES = [
    ("StartInstance", pb.CreateInstanceRequest(instanceId="😀" * 200, name="fz")),  # 200 chars, 800 UTF-8 bytes
    ("StartInstance", pb.CreateInstanceRequest(instanceId="é" * 256, name="fz")),
    ("StartInstance", pb.CreateInstanceRequest(instanceId=new_id("fz-far"), name="fz",
                                               scheduledStartTimestamp=timestamp_pb2.Timestamp(seconds=2**62))),
    ("StartInstance", pb.CreateInstanceRequest(instanceId=new_id("fz-past"), name="fz",
                                               scheduledStartTimestamp=timestamp_pb2.Timestamp(seconds=-2**40))),
    ("StartInstance", pb.CreateInstanceRequest(instanceId=new_id("fz-nn"), name="fz",
                                               scheduledStartTimestamp=timestamp_pb2.Timestamp(nanos=-5))),
    ("StartInstance", pb.CreateInstanceRequest(instanceId=new_id("fz-tags"), name="fz",
                                               tags={"😀" * 300: "x" * 10_000})),
    ("StartInstance", pb.CreateInstanceRequest(instanceId=new_id("fz-huge"), name="fz" * 1_000_000)),
    ("RaiseEvent", pb.RaiseEventRequest(instanceId="😀" * 200, name="x")),
    ("TerminateInstance", pb.TerminateRequest(instanceId="😀" * 200)),
    ("PurgeInstances", pb.PurgeInstancesRequest(instanceId="😀" * 200, recursive=True)),
    ("RestartInstance", pb.RestartInstanceRequest(instanceId="😀" * 200)),
    ("RewindInstance", pb.RewindInstanceRequest(instanceId="😀" * 200)),
    ("WaitForInstanceCompletion", pb.GetInstanceRequest(instanceId="😀" * 200)),
    ("CompleteActivityTask", pb.ActivityResponse(instanceId="i", taskId=-1, completionToken="0.1.1")),
    ("CompleteOrchestratorTask", pb.OrchestratorResponse(instanceId="i", completionToken="99.1.1")),
    ("AbandonTaskOrchestratorWorkItem", pb.AbandonOrchestrationTaskRequest(completionToken="-1.0.0")),
    ("AbandonTaskActivityWorkItem", pb.AbandonActivityTaskRequest(completionToken="0.18446744073709551616.1")),
]


@pytest.mark.parametrize("name,msg", EDGE_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(EDGE_CASES)])
def test_edge_case_requests(runtime, raw_channel, before, name, msg):
    call_unary(raw_channel, name, msg.SerializeToString())
    assert_no_restart(runtime, before, f"{name}({str(msg)[:300]})")


def test_oversized_request_is_resource_exhausted(runtime, raw_channel, before):
    payload = pb.CreateInstanceRequest(instanceId=new_id("fz-big"), name="fz",
                                       input=wrappers_pb2.StringValue(value="x" * (5 << 20))).SerializeToString()
    assert call_unary(raw_channel, "StartInstance", payload) == grpc.StatusCode.RESOURCE_EXHAUSTED


@settings(FUZZ, max_examples=16)
@given(data=st.data())
def test_streaming_rpcs_with_random_requests(runtime, raw_channel, before, data):
    name = data.draw(st.sampled_from(STREAMING), label="rpc")
    if data.draw(st.booleans(), label="raw bytes"):
        payload = data.draw(st.binary(max_size=256), label="payload")
    else:
        payload = data.draw(messages(method_input(name)), label="request").SerializeToString()
    call_streaming(raw_channel, name, payload)
    assert_no_restart(runtime, before, f"{name} stream")


# Junk actions completing a real work item (valid token): what a buggy or hostile worker can send.
def _timer(action_id: int, seconds: int | None = None) -> pb.OrchestratorAction:
    """A createTimer action; by default due now, so that it fires at once."""
    fire_at = timestamp_pb2.Timestamp(seconds=int(time.time()) if seconds is None else seconds)
    return pb.OrchestratorAction(id=action_id, createTimer=pb.CreateTimerAction(fireAt=fire_at))


def _sub(child_id: str) -> pb.OrchestratorAction:
    return pb.OrchestratorAction(id=1, createSubOrchestration=pb.CreateSubOrchestrationAction(instanceId=child_id,
                                                                                             name="fz"))


# (actions, what to wait for before checking for a crash: "timer" = the fired timer's work item, or the id the
# actions send a message to, for an outbox barrier to its partition). A crash that the junk causes later (a timer
# firing, a message delivered to another partition) thus shows up within the test that caused it.
JUNK_ACTIONS = [
    ([pb.OrchestratorAction(id=-1)], None),  # no action set
    ([pb.OrchestratorAction(id=2**31 - 1, completeOrchestration=pb.CompleteOrchestrationAction(
        orchestrationStatus=12345))], None),
    ([_timer(1, seconds=-5)], "timer"),  # before the epoch
    ([_timer(1, seconds=2**62)], None),  # past what a u64 of milliseconds holds
    ([_sub("a\x00b")], "a\x00b"),  # NUL separates the parts of store keys
    ([_sub("😀" * 200)], "😀" * 200),  # 200 characters, 800 UTF-8 bytes
    ([_sub("x" * 1000)], "x" * 1000),
    ([pb.OrchestratorAction(id=1, sendEvent=pb.SendEventAction(instance=pb.OrchestrationInstance(
        instanceId="x" * 1000), name="e"))], "x" * 1000),
    ([pb.OrchestratorAction(id=1, terminateOrchestration=pb.TerminateOrchestrationAction(instanceId="x" * 1000))],
     "x" * 1000),
    # Negative ids are the engine's own timer-row kinds (scheduled start, activity retry, entity signal).
    ([_timer(-2)], "timer"),
    ([_timer(-5)], "timer"),
    ([_timer(-(2**31))], "timer"),
]


class WorkItemSource:
    """A raw GetWorkItems stream that hands out the work items of instances we start; the items of any other
    (fuzz-made) instance are simply completed."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        fn = channel.unary_stream("/TaskHubSidecarService/GetWorkItems",
                                  request_serializer=pb.GetWorkItemsRequest.SerializeToString,
                                  response_deserializer=pb.WorkItem.FromString)
        self.stream = fn(pb.GetWorkItemsRequest(maxConcurrentOrchestrationWorkItems=50,
                                                maxConcurrentActivityWorkItems=50), timeout=600)
        self.items: queue.Queue[Any] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for item in self.stream:
                self.items.put(item)
        except grpc.RpcError as exc:
            self.items.put(exc)

    def _next(self, wanted: Any, timeout: float, give_up: Any) -> pb.WorkItem | None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = self.items.get(timeout=min(0.2, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline or (give_up is not None and give_up()):
                    return None
                continue
            if isinstance(item, grpc.RpcError):
                raise AssertionError(f"work item stream ended: {item.code()}")
            if wanted(item):
                return item
            self._complete(item)

    def _complete(self, item: pb.WorkItem) -> None:
        if item.HasField("orchestratorRequest"):
            self.finish(item.orchestratorRequest.instanceId, item)
        elif item.HasField("activityRequest"):
            call_unary(self.channel, "CompleteActivityTask", pb.ActivityResponse(
                instanceId=item.activityRequest.orchestrationInstance.instanceId,
                taskId=item.activityRequest.taskId, completionToken=item.completionToken).SerializeToString())

    def next_for(self, instance_id: str, timeout: float = 20.0, give_up: Any = None) -> pb.WorkItem:
        """The next orchestrator work item of `instance_id`."""
        item = self._next(lambda i: i.HasField("orchestratorRequest") and
                          i.orchestratorRequest.instanceId == instance_id, timeout, give_up)
        if item is None:
            raise AssertionError(f"no work item for {instance_id} within {timeout}s")
        return item

    def next_activity(self, instance_id: str, timeout: float, give_up: Any = None) -> pb.WorkItem | None:
        """The next activity work item of `instance_id`, or None."""
        return self._next(lambda i: i.HasField("activityRequest") and
                          i.activityRequest.orchestrationInstance.instanceId == instance_id, timeout, give_up)

    def answer(self, instance_id: str, item: pb.WorkItem, actions: list[Any]) -> grpc.StatusCode:
        return call_unary(self.channel, "CompleteOrchestratorTask", pb.OrchestratorResponse(
            instanceId=instance_id, completionToken=item.completionToken, actions=actions).SerializeToString())

    def finish(self, instance_id: str, item: pb.WorkItem, actions: list[Any] = ()) -> grpc.StatusCode:
        """Complete the instance, after `actions`."""
        done = pb.OrchestratorAction(id=99, completeOrchestration=pb.CompleteOrchestrationAction(
            orchestrationStatus=pb.ORCHESTRATION_STATUS_COMPLETED))
        return self.answer(instance_id, item, [*actions, done])

    def close(self) -> None:
        self.stream.cancel()


@pytest.fixture(scope="module")
def work_items(raw_channel, before):
    source = WorkItemSource(raw_channel)
    yield source
    source.close()


def _complete_with(runtime, raw_channel, before, work_items, actions: list[Any], what: str,
                   wait_for: str | None = None) -> None:
    iid = f"fz-junk-{uuid.uuid4().hex[:10]}"
    call_unary(raw_channel, "StartInstance", pb.CreateInstanceRequest(instanceId=iid, name="fz").SerializeToString())
    item = work_items.next_for(iid)
    response = pb.OrchestratorResponse(instanceId=iid, completionToken=item.completionToken, actions=actions)
    code = call_unary(raw_channel, "CompleteOrchestratorTask", response.SerializeToString())
    seen = len(before["exits"])
    crashed = lambda: len(exits(runtime)) > seen  # noqa: E731
    if wait_for == "timer" and code == grpc.StatusCode.OK:
        # The timer fires: its work item comes (then the instance completes), or the engine crashes.
        with contextlib.suppress(AssertionError):
            item = work_items.next_for(iid, timeout=5.0, give_up=crashed)
            work_items.finish(iid, item)
    elif wait_for is not None and code == grpc.StatusCode.OK:
        outbox_barrier(raw_channel, work_items, partition_of(iid), partition_of(wait_for), crashed)
    assert_no_restart(runtime, before, f"CompleteOrchestratorTask with {what}: {actions}")


def outbox_barrier(channel: grpc.Channel, work_items: WorkItemSource, source: int, destination: int,
                   give_up: Any) -> None:
    """Send an event from partition `source` to `destination` and wait for it: the outbox delivers in order, so
    whatever `source` sent `destination` before has been applied (or crashed it)."""
    if source == destination:
        return
    receiver, sender = id_on_partition("fz-rcv", destination), id_on_partition("fz-snd", source)
    with contextlib.suppress(AssertionError):  # a crashed partition is reported by assert_no_restart
        for iid in (receiver, sender):
            call_unary(channel, "StartInstance", pb.CreateInstanceRequest(instanceId=iid, name="fz").SerializeToString())
        work_items.answer(receiver, work_items.next_for(receiver, 10.0, give_up), [])  # running, waits for events
        send = pb.OrchestratorAction(id=0, sendEvent=pb.SendEventAction(
            instance=pb.OrchestrationInstance(instanceId=receiver), name="barrier"))
        work_items.finish(sender, work_items.next_for(sender, 10.0, give_up), [send])
        work_items.finish(receiver, work_items.next_for(receiver, 10.0, give_up))


@pytest.mark.parametrize("actions,wait_for", JUNK_ACTIONS, ids=[f"junk-{i}" for i in range(len(JUNK_ACTIONS))])
def test_junk_actions_with_a_valid_token(runtime, raw_channel, before, work_items, actions, wait_for):
    _complete_with(runtime, raw_channel, before, work_items, actions, "hand-picked junk", wait_for)


def test_sub_orchestration_id_with_nul_stays_apart_from_its_parent(runtime, raw_channel, before, work_items):
    """Store keys are `<instance id> NUL <index>`: a child id `<parent> NUL y` created by an orchestrator action
    (client RPCs refuse control characters; actions must too) must not share the parent's history or inbox."""
    # Both on one partition, so in one store. The suffix varies too: with FNV-1a and a power-of-two partition
    # count, the low bits of the hash of `<parent> NUL y` follow from the parent's alone, for any parent.
    parent, child = next((p, p + "\0" + c) for p in (new_id("fz-nul") for _ in range(100)) for c in "yzabcdefgh"
                         if partition_of(p) == partition_of(p + "\0" + c))
    call_unary(raw_channel, "StartInstance", pb.CreateInstanceRequest(instanceId=parent, name="fz").SerializeToString())
    work_items.answer(parent, work_items.next_for(parent), [_sub(child)])
    call_unary(raw_channel, "RaiseEvent", pb.RaiseEventRequest(instanceId=parent, name="poke").SerializeToString())
    item = work_items.next_for(parent)
    events = [e.WhichOneof("eventType") for e in (*item.orchestratorRequest.pastEvents,
                                                     *item.orchestratorRequest.newEvents)]
    work_items.finish(parent, item)
    assert_no_restart(runtime, before, "a sub-orchestration id with NUL")
    assert events.count("executionStarted") == 1, f"the parent's work item carries its child's events: {events}"


def test_entity_and_orchestration_messages_reach_only_ids_of_their_own_kind(runtime, raw_channel, before,
                                                                           work_items):
    """Entities and orchestrations share the inbox table. An entity signal or call aimed at an orchestration's
    id, or a sub-orchestration given an entity's id (`@name@key`), once put entity operations into an
    orchestration's work item (failing it), or let an orchestration take and delete an entity's queued operations.
    Now the child fails its parent's task, the call fails its caller's, and the signal is dropped."""
    victim, sender = new_id("fz-victim"), new_id("fz-sender")
    call_unary(raw_channel, "StartInstance", pb.CreateInstanceRequest(instanceId=victim, name="fz").SerializeToString())
    work_items.answer(victim, work_items.next_for(victim), [])  # keeps running, waiting for an event
    call_unary(raw_channel, "StartInstance", pb.CreateInstanceRequest(instanceId=sender, name="fz").SerializeToString())
    target = wrappers_pb2.StringValue(value=victim)
    signal = pb.SendEntityMessageAction(entityOperationSignaled=pb.EntityOperationSignaledEvent(
        requestId="s1", operation="add", targetInstanceId=target))
    call = pb.SendEntityMessageAction(entityOperationCalled=pb.EntityOperationCalledEvent(
        requestId="c1", operation="get", targetInstanceId=target,
        parentInstanceId=wrappers_pb2.StringValue(value=sender)))
    child = pb.OrchestratorAction(id=3, createSubOrchestration=pb.CreateSubOrchestrationAction(
        instanceId="@counter@fz", name="fz"))
    work_items.answer(sender, work_items.next_for(sender), [
        pb.OrchestratorAction(id=1, sendEntityMessage=signal), pb.OrchestratorAction(id=2, sendEntityMessage=call),
        child])
    answers: dict[str, Any] = {}
    for _ in range(5):
        if len(answers) == 2:
            break
        item = work_items.next_for(sender)
        for event in item.orchestratorRequest.newEvents:
            if event.HasField("entityOperationFailed"):
                answers["call"] = event.entityOperationFailed
            elif event.HasField("subOrchestrationInstanceFailed"):
                answers["child"] = event.subOrchestrationInstanceFailed
        work_items.answer(sender, item, [])
    assert answers["call"].requestId == "c1", answers
    assert answers["call"].failureDetails.errorType == "InvalidEntityId", answers
    assert answers["child"].taskScheduledId == 3, answers
    assert "reserved for entities" in answers["child"].failureDetails.errorMessage, answers

    call_unary(raw_channel, "RaiseEvent", pb.RaiseEventRequest(instanceId=victim, name="poke").SerializeToString())
    item = work_items.next_for(victim)
    events = [e.WhichOneof("eventType") for e in (*item.orchestratorRequest.pastEvents,
                                                     *item.orchestratorRequest.newEvents)]
    work_items.finish(victim, item)
    assert_no_restart(runtime, before, "entity messages to an orchestration's id")
    assert "eventRaised" in events and not [e for e in events if e.startswith("entity")], events


@pytest.mark.parametrize("task_id", [-7, 2**30, 2**31 - 1])
def test_abandoned_activity_with_an_odd_task_id_goes_back_to_the_queue(runtime, raw_channel, before, work_items,
                                                                       task_id):
    """An abandoned work item is never dropped (DESIGN §5), whatever task id the orchestrator gave it; an engine
    that rejects the id instead must fail the instance."""
    iid = f"fz-abandon-{uuid.uuid4().hex[:10]}"
    call_unary(raw_channel, "StartInstance", pb.CreateInstanceRequest(instanceId=iid, name="fz").SerializeToString())
    item = work_items.next_for(iid)
    schedule = pb.OrchestratorAction(id=task_id, scheduleTask=pb.ScheduleTaskAction(name="fz_act"))
    code = call_unary(raw_channel, "CompleteOrchestratorTask", pb.OrchestratorResponse(
        instanceId=iid, completionToken=item.completionToken, actions=[schedule]).SerializeToString())
    activity = work_items.next_activity(iid, timeout=10.0) if code == grpc.StatusCode.OK else None
    if activity is not None:
        assert activity.activityRequest.taskId == task_id
        call_unary(raw_channel, "AbandonTaskActivityWorkItem", pb.AbandonActivityTaskRequest(
            completionToken=activity.completionToken).SerializeToString())
        seen = len(before["exits"])
        again = work_items.next_activity(iid, timeout=10.0, give_up=lambda: len(exits(runtime)) > seen)
        assert_no_restart(runtime, before, f"abandoning an activity with task id {task_id}")
        assert again is not None and again.activityRequest.taskId == task_id, \
            f"the abandoned activity (task id {task_id}) was not dispatched again"
        return
    assert_no_restart(runtime, before, f"scheduleTask with id {task_id}")
    state = pb.GetInstanceResponse.FromString(raw_channel.unary_unary(
        "/TaskHubSidecarService/GetInstance", request_serializer=None, response_deserializer=None)(
        pb.GetInstanceRequest(instanceId=iid).SerializeToString(), timeout=CALL_DEADLINE_S))
    assert state.orchestrationState.orchestrationStatus == pb.ORCHESTRATION_STATUS_FAILED, \
        f"task id {task_id}: neither an activity work item nor a failed instance"


@settings(FUZZ, max_examples=30)
@given(actions=st.lists(messages(pb.OrchestratorAction.DESCRIPTOR), min_size=1, max_size=4))
def test_random_actions_with_a_valid_token(runtime, raw_channel, before, work_items, actions):
    _complete_with(runtime, raw_channel, before, work_items, actions, "random actions")


def test_server_intact_after_fuzzing(runtime, raw_channel, before):
    print("status codes seen:", dict(sorted(CODES.items())))
    assert_no_restart(runtime, before, "the fuzzing")
    assert not CRASHES, "engine processes crashed during the fuzzing:\n" + "\n".join(CRASHES)
    assert call_unary(raw_channel, "Hello", empty_pb2.Empty().SerializeToString()) == grpc.StatusCode.OK
    client = TaskHubGrpcClient(host_address=runtime.address)
    w = new_worker(runtime.address, [fz_done, fz_waiter], [fz_echo])
    try:
        st_done = client.get_orchestration_state(before["done"])
        assert st_done.runtime_status == OrchestrationStatus.COMPLETED
        assert st_done.serialized_output == before["done_output"]
        assert client.get_orchestration_state(before["waiting"]).runtime_status == OrchestrationStatus.RUNNING
        client.raise_orchestration_event(before["waiting"], "go", data="after")
        st_wait = client.wait_for_orchestration_completion(before["waiting"], timeout=DEADLINE_S)
        assert st_wait.runtime_status == OrchestrationStatus.COMPLETED, st_wait.failure_details
        assert st_wait.get_output() == [7, "after"]
        fresh = client.schedule_new_orchestration(fz_done, input="new", instance_id=new_id("fz-after"))
        st_new = client.wait_for_orchestration_completion(fresh, timeout=DEADLINE_S)
        assert st_new.runtime_status == OrchestrationStatus.COMPLETED, st_new.failure_details
        assert st_new.get_output() == ["new", "done"]
    finally:
        w.stop()
        client.close()
