"""A mixed, self-checking workload for the fault tests: orchestrations whose outputs fold in what they observed.

Every orchestrator's output is a pure function of its input and of the events it received, so an exact output
proves that no history event was lost or duplicated (a history that does not replay fails the instance in the
SDK with a NonDeterminismError). Activities may run more than once after a fault; their results are pure.

Also here: finding the runtime's child processes through /proc, and a worker that can run in a subprocess
(`python -m tests.e2e.faults_workload ADDRESS`) so that a test can SIGKILL it mid-work-item.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from durabletask import task
from durabletask import worker as dt_worker
from durabletask.client import OrchestrationStatus, TaskHubGrpcClient
from durabletask.grpc_options import GrpcWorkerResiliencyOptions
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.internal import orchestrator_service_pb2_grpc as stubs
from google.protobuf import wrappers_pb2

from .helpers import PARTITIONS, id_not_on_partition, id_on_partition, new_id, partition_of

RPC_TIMEOUT_S = 10.0
GATE_DEADLINE_S = 180.0  # a gated activity never parks a worker thread longer than this


# ---------------------------------------------------------------------------------------------------------
# activities
# ---------------------------------------------------------------------------------------------------------
def fw_step(ctx: task.ActivityContext, inp: list) -> str:
    tag, i = inp
    return f"{tag}/s{i}"


def fw_gated(ctx: task.ActivityContext, inp: dict) -> str:
    """Parks until `<gate>/open` exists; leaves an `entered-*` marker per execution, `done-*` when it returns."""
    gate = Path(inp["gate"])
    marker = f"{inp['tag']}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    (gate / f"entered-{marker}").touch()
    deadline = time.monotonic() + GATE_DEADLINE_S
    while not (gate / "open").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    (gate / f"done-{marker}").touch()
    return f"{inp['tag']}/gated"


# ---------------------------------------------------------------------------------------------------------
# orchestrators
# ---------------------------------------------------------------------------------------------------------
def fw_seq(ctx: task.OrchestrationContext, inp: dict):
    """Three activities in sequence, a fan-out of two, optionally a durable timer and a gated activity."""
    tag = inp["tag"]
    out = []
    for i in range(3):
        out.append((yield ctx.call_activity(fw_step, input=[tag, i])))
    out.extend((yield task.when_all([ctx.call_activity(fw_step, input=[tag, 10 + i]) for i in range(2)])))
    if inp.get("timer_s"):
        yield ctx.create_timer(timedelta(seconds=inp["timer_s"]))
        out.append("timer")
    if inp.get("gate"):
        out.append((yield ctx.call_activity(fw_gated, input={"tag": tag, "gate": inp["gate"]})))
    return out


def fw_parent(ctx: task.OrchestrationContext, inp: dict):
    """A sub-orchestration on another partition, then an activity of its own."""
    child = yield ctx.call_sub_orchestrator(fw_seq, input=inp["child_input"], instance_id=inp["child_id"])
    own = yield ctx.call_activity(fw_step, input=[inp["tag"], 9])
    return {"child": child, "own": own}


def _collect_until(ctx: task.OrchestrationContext, item_event: str, stop_event: str):
    """Every `item_event` payload received before `stop_event`, in arrival order; the count so far is
    the custom status."""
    got = []
    stop = ctx.wait_for_external_event(stop_event)
    while True:
        item = ctx.wait_for_external_event(item_event)
        winner = yield task.when_any([item, stop])
        if winner is stop:
            return got
        got.append(item.get_result())
        ctx.set_custom_status(len(got))


def fw_events(ctx: task.OrchestrationContext, _):
    """Every `ev` payload raised before `end`, in arrival order."""
    return (yield from _collect_until(ctx, "ev", "end"))


def fw_receiver(ctx: task.OrchestrationContext, _):
    """Every `ping` (sent by fw_sender instances on other partitions) received before `fin`."""
    return (yield from _collect_until(ctx, "ping", "fin"))


def fw_sender(ctx: task.OrchestrationContext, inp: dict):
    first = yield ctx.call_activity(fw_step, input=[inp["tag"], 0])
    ctx.send_event(inp["to"], "ping", data=inp["tag"])
    return first


ORCHESTRATORS = [fw_seq, fw_parent, fw_events, fw_receiver, fw_sender]
ACTIVITIES = [fw_step, fw_gated]


def expected_seq(inp: dict) -> list[str]:
    tag = inp["tag"]
    out = [f"{tag}/s{i}" for i in (0, 1, 2, 10, 11)]
    if inp.get("timer_s"):
        out.append("timer")
    if inp.get("gate"):
        out.append(f"{tag}/gated")
    return out


def start_worker(address: str, thread_pool: int = 32) -> dt_worker.TaskHubGrpcWorker:
    """An SDK worker that retries its connection at most 2 s apart (the default backoff grows to 30 s)."""
    w = dt_worker.TaskHubGrpcWorker(
        host_address=address,
        concurrency_options=dt_worker.ConcurrencyOptions(maximum_thread_pool_workers=thread_pool),
        resiliency_options=GrpcWorkerResiliencyOptions(reconnect_backoff_base_seconds=0.2,
                                                       reconnect_backoff_cap_seconds=2.0),
    )
    for fn in ORCHESTRATORS:
        w.add_orchestrator(fn)
    for fn in ACTIVITIES:
        w.add_activity(fn)
    w.start()
    return w


def worker_main(address: str) -> None:
    """Entry point of a worker subprocess: run until killed."""
    start_worker(address)
    threading.Event().wait()


# ---------------------------------------------------------------------------------------------------------
# processes of a runtime, found through /proc
# ---------------------------------------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()  # state, ppid, pgrp, ...


def child_processes(parent_pid: int) -> dict[int, list[str]]:
    """Live (non-zombie) children of `parent_pid`: pid -> argv."""
    out: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None or int(fields[1]) != parent_pid or fields[0] in ("Z", "X"):
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        out[int(entry.name)] = [a for a in argv if a]
    return out


def role_pid(supervisor_pid: int, module: str, index: int) -> int | None:
    """The pid of the supervisor's `python -m <module> --index <index>` child, if it runs."""
    for pid, argv in child_processes(supervisor_pid).items():
        if module in argv and "--index" in argv and argv[argv.index("--index") + 1] == str(index):
            return pid
    return None


def partition_pid(rt: Any, index: int) -> int | None:
    return role_pid(rt.proc.pid, "partitions", index)


def gateway_pid(rt: Any, index: int = 0) -> int | None:
    return role_pid(rt.proc.pid, "runtime.gateway", index)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


# ---------------------------------------------------------------------------------------------------------
# the load: instances started and events raised through a raw stub with deadlines, every call accounted for
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Planned:
    instance_id: str
    orchestrator: str
    input: Any
    expected: Any = None  # None: computed from the events (fw_events / fw_receiver)


@dataclass
class Stats:
    started_ok: int = 0
    start_retries: int = 0
    raised_ok: int = 0
    raised_failed: int = 0
    faults: int = 0
    errors: list[str] = field(default_factory=list)


class Load:
    """Starts a planned mix of instances, raises events, and remembers which calls were acknowledged."""

    def __init__(self, address: str, gate: Path | None = None, partitions: int = PARTITIONS,
                 prefix: str = "fw") -> None:
        self.address = address
        self.gate = gate
        self.partitions = partitions
        self.prefix = prefix
        self.channel = grpc.insecure_channel(address)
        self.stub = stubs.TaskHubSidecarServiceStub(self.channel)
        self.client = TaskHubGrpcClient(host_address=address)
        self.stats = Stats()
        self.instances: dict[str, Planned] = {}
        self.acked: set[str] = set()
        self.events_acked: dict[str, list[str]] = {}  # fw_events instance -> payloads acknowledged, in order
        self.events_tried: dict[str, set[str]] = {}  # ... every payload attempted (acknowledged or not)
        self.receivers: dict[str, list[str]] = {}  # fw_receiver instance -> its senders' tags
        self._lock = threading.Lock()
        self._n = 0

    def close(self) -> None:
        self.client.close()
        self.channel.close()

    def reconnect(self, address: str | None = None) -> None:
        """New channels (after the runtime restarted on the same port, the old ones recover too; this is faster)."""
        self.close()
        self.address = address or self.address
        self.channel = grpc.insecure_channel(self.address)
        self.stub = stubs.TaskHubSidecarServiceStub(self.channel)
        self.client = TaskHubGrpcClient(host_address=self.address)

    # planning
    def _tag(self, kind: str) -> str:
        with self._lock:
            self._n += 1
            return new_id(f"{self.prefix}-{kind}{self._n}")

    def plan_seq(self, timer_s: float = 0, gated: bool = False) -> Planned:
        iid = self._tag("seq")
        inp: dict[str, Any] = {"tag": iid, "timer_s": timer_s}
        if gated:
            assert self.gate is not None
            inp["gate"] = str(self.gate)
        return Planned(iid, "fw_seq", inp, expected_seq(inp))

    def plan_parent(self, gated: bool = False) -> Planned:
        iid = self._tag("par")
        child_id = id_not_on_partition(f"{iid}-child", partition_of(iid, self.partitions), self.partitions)
        child_input: dict[str, Any] = {"tag": child_id, "timer_s": 0}
        if gated:
            assert self.gate is not None
            child_input["gate"] = str(self.gate)
        inp = {"tag": iid, "child_id": child_id, "child_input": child_input}
        return Planned(iid, "fw_parent", inp, {"child": expected_seq(child_input), "own": f"{iid}/s9"})

    def plan_events(self) -> Planned:
        iid = self._tag("ev")
        self.events_acked[iid] = []
        self.events_tried[iid] = set()
        return Planned(iid, "fw_events", None)

    def plan_receiver(self, partition: int | None = None) -> Planned:
        iid = self._tag("rcv") if partition is None else id_on_partition(f"{self.prefix}-rcv", partition,
                                                                         self.partitions)
        self.receivers[iid] = []
        return Planned(iid, "fw_receiver", None)

    def plan_sender(self, receiver: str) -> Planned:
        iid = id_not_on_partition(f"{self.prefix}-snd", partition_of(receiver, self.partitions), self.partitions)
        self.receivers[receiver].append(iid)
        return Planned(iid, "fw_sender", {"tag": iid, "to": receiver}, f"{iid}/s0")

    # calls
    def start(self, planned: Planned, deadline_s: float = 60.0) -> None:
        """Start `planned`, retrying until acknowledged (OK, or ALREADY_EXISTS: an earlier attempt committed)."""
        self.instances[planned.instance_id] = planned
        request = pb.CreateInstanceRequest(instanceId=planned.instance_id, name=planned.orchestrator)
        if planned.input is not None:
            request.input.CopyFrom(wrappers_pb2.StringValue(value=json.dumps(planned.input)))
        deadline = time.monotonic() + deadline_s
        while True:
            try:
                self.stub.StartInstance(request, timeout=RPC_TIMEOUT_S)
                break
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                    break
                self.stats.start_retries += 1
                if time.monotonic() > deadline:
                    raise AssertionError(f"start of {planned.instance_id} never acknowledged: {exc}") from exc
                time.sleep(0.1 + random.random() * 0.2)
        with self._lock:
            self.acked.add(planned.instance_id)
            self.stats.started_ok += 1

    def raise_once(self, instance_id: str, payload: str) -> bool:
        """One attempt, no retry: a retried raise could be applied twice. Returns whether it was acknowledged."""
        self.events_tried[instance_id].add(payload)
        request = pb.RaiseEventRequest(instanceId=instance_id, name="ev",
                                       input=wrappers_pb2.StringValue(value=json.dumps(payload)))
        try:
            self.stub.RaiseEvent(request, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError:
            self.stats.raised_failed += 1
            return False
        self.events_acked[instance_id].append(payload)
        self.stats.raised_ok += 1
        return True

    def raise_until_ok(self, instance_id: str, name: str, deadline_s: float = 60.0) -> None:
        """For `end` / `fin`: a duplicate is harmless (the instance completes on the first one)."""
        deadline = time.monotonic() + deadline_s
        while True:
            try:
                self.stub.RaiseEvent(pb.RaiseEventRequest(instanceId=instance_id, name=name), timeout=RPC_TIMEOUT_S)
                return
            except grpc.RpcError as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"raise {name} to {instance_id} never acknowledged: {exc}") from exc
                time.sleep(0.2)

    # reading state (tolerates a gateway that is restarting)
    def state(self, instance_id: str) -> Any:
        for _ in range(50):
            try:
                return self.client.get_orchestration_state(instance_id)
            except grpc.RpcError:
                time.sleep(0.2)
        return self.client.get_orchestration_state(instance_id)

    def statuses(self, ids: list[str]) -> dict[str, OrchestrationStatus | None]:
        out = {}
        for iid in ids:
            st = self.state(iid)
            out[iid] = None if st is None else st.runtime_status
        return out


class Background(threading.Thread):
    """Runs `steps` (callables) one after another, paced, until done; exceptions are kept for the test."""

    def __init__(self, steps: list[Any], pace_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.steps = steps
        self.pace_s = pace_s
        self.done_steps = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for step in self.steps:
                step()
                self.done_steps += 1
                time.sleep(self.pace_s)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


if __name__ == "__main__":
    worker_main(sys.argv[1])
