"""Graceful drain on SIGTERM: work already handed to a worker completes and commits, nothing new is handed
out, the runtime exits 0, and after a restart on the same data dir everything continues. Engine only.

Activities block on a gate *file* and count their executions in a file, so "ran exactly once" survives
the restart and is checked from outside the engine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from durabletask import task
from durabletask.client import OrchestrationStatus, TaskHubGrpcClient
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.internal import orchestrator_service_pb2_grpc as stubs
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .conftest import SHUTDOWN_DEADLINE_S, EngineRuntime, _group_alive
from .faults_workload import partition_pid
from .helpers import DEADLINE_S, new_id, new_worker, wait_until

pytestmark = [pytest.mark.crash, pytest.mark.engine_only]


# ---------------------------------------------------------------------------------------------------------
# activities and orchestrators
# ---------------------------------------------------------------------------------------------------------
def gated(ctx: task.ActivityContext, inp: dict[str, str]) -> str:
    """Record one execution, then block until the gate file exists (bounded)."""
    with open(inp["log"], "a") as f:
        f.write(inp["tag"] + "\n")
    gate = Path(inp["gate"])
    deadline = time.monotonic() + 2 * DEADLINE_S
    while not gate.exists():
        if time.monotonic() >= deadline:
            raise TimeoutError("gate never opened")
        time.sleep(0.01)
    return f"done-{inp['tag']}"


def echo(ctx: task.ActivityContext, value: Any) -> Any:
    return value


def gated_then_event(ctx: task.OrchestrationContext, inp: dict[str, str]):
    first = yield ctx.call_activity(gated, input=inp)
    event = yield ctx.wait_for_external_event("go")
    return [first, event]


def wait_event(ctx: task.OrchestrationContext, _: Any):
    return (yield ctx.wait_for_external_event("go"))


def timer_then_done(ctx: task.OrchestrationContext, seconds: float):
    yield ctx.create_timer(ctx.current_utc_datetime + timedelta(seconds=seconds))
    return "fired"


def echo_orch(ctx: task.OrchestrationContext, value: Any):
    return (yield ctx.call_activity(echo, input=value))


ORCHESTRATORS = [gated_then_event, wait_event, timer_then_done, echo_orch]
ACTIVITIES = [gated, echo]


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------
def executions(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def health_status(address: str) -> int | None:
    channel = grpc.insecure_channel(address)
    try:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
        return response.status
    except grpc.RpcError:
        return None
    finally:
        channel.close()


class Terminator:
    """rt.terminate() in a thread, so the test can act while the runtime drains."""

    def __init__(self, rt: EngineRuntime) -> None:
        self.rt = rt
        self.code: int | None = None
        self.elapsed_s = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        started = time.monotonic()
        self.code = self.rt.terminate()
        self.elapsed_s = time.monotonic() - started

    def start(self) -> Terminator:
        self._thread.start()
        return self

    def join(self) -> int | None:
        self._thread.join(timeout=SHUTDOWN_DEADLINE_S + 10)
        assert not self._thread.is_alive(), "the runtime did not stop"
        return self.code


def wait_serving(rt: EngineRuntime) -> None:
    """Health is NOT_SERVING until every partition answered, so readiness comes first."""
    wait_until(lambda: health_status(rt.address) == health_pb2.HealthCheckResponse.SERVING,
               message="health SERVING")


def wait_draining(rt: EngineRuntime) -> None:
    wait_until(lambda: health_status(rt.address) == health_pb2.HealthCheckResponse.NOT_SERVING,
               message="health NOT_SERVING after SIGTERM")


# ---------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------
def test_sigterm_drains_in_flight_activity_then_restart_continues(fresh_runtime: EngineRuntime, tmp_path: Path):
    rt = fresh_runtime
    gate, log = tmp_path / "gate", tmp_path / "executions"
    tag = new_id("drain")
    inp = {"gate": str(gate), "log": str(log), "tag": tag}

    worker = new_worker(rt.address, ORCHESTRATORS, ACTIVITIES)
    client = TaskHubGrpcClient(host_address=rt.address)
    try:
        gated_id = client.schedule_new_orchestration(gated_then_event, input=inp, instance_id=tag)
        waiting = [client.schedule_new_orchestration(wait_event, instance_id=new_id("wait")) for _ in range(4)]
        timer_id = client.schedule_new_orchestration(timer_then_done, input=1.0, instance_id=new_id("timer"))
        for iid in [*waiting, timer_id]:
            client.wait_for_orchestration_start(iid, timeout=DEADLINE_S)
        wait_until(lambda: executions(log) == 1, message="the gated activity to start")

        wait_serving(rt)
        stopper = Terminator(rt).start()
        wait_draining(rt)

        # New worker streams are refused while draining ...
        channel = grpc.insecure_channel(rt.address)
        try:
            stream = stubs.TaskHubSidecarServiceStub(channel).GetWorkItems(pb.GetWorkItemsRequest(), timeout=DEADLINE_S)
            with pytest.raises(grpc.RpcError) as refused:
                next(stream)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
        finally:
            channel.close()
        # ... client RPCs are still served (new work is accepted, to run after the restart) ...
        late_id = client.schedule_new_orchestration(echo_orch, input="late", instance_id=new_id("late"))
        assert client.get_orchestration_state(gated_id).runtime_status == OrchestrationStatus.RUNNING
        # ... and the runtime waits for the work item it handed out.
        assert rt.is_running()

        gate.touch()
        code = stopper.join()
        assert code == 0, f"runtime did not exit 0 after a clean drain (exit code {code})\n{rt.log_tail()}"
        assert "drained" in rt.log_tail(), rt.log_tail()
    finally:
        worker.stop()
        client.close()

    rt.start()
    worker = new_worker(rt.address, ORCHESTRATORS, ACTIVITIES)
    client = TaskHubGrpcClient(host_address=rt.address)
    try:
        client.raise_orchestration_event(gated_id, "go", data="after")
        state = client.wait_for_orchestration_completion(gated_id, timeout=DEADLINE_S)
        assert state.runtime_status == OrchestrationStatus.COMPLETED, state.failure_details
        assert state.get_output() == [f"done-{tag}", "after"]
        assert executions(log) == 1, "the activity completed during the drain ran again after the restart"

        for n, iid in enumerate(waiting):
            client.raise_orchestration_event(iid, "go", data=n)
        for n, iid in enumerate(waiting):
            state = client.wait_for_orchestration_completion(iid, timeout=DEADLINE_S)
            assert state.runtime_status == OrchestrationStatus.COMPLETED and state.get_output() == n
        for iid, output in ((timer_id, "fired"), (late_id, "late")):
            state = client.wait_for_orchestration_completion(iid, timeout=DEADLINE_S)
            assert state.runtime_status == OrchestrationStatus.COMPLETED, (iid, state.failure_details)
            assert state.get_output() == output
    finally:
        worker.stop()
        client.close()


@contextlib.contextmanager
def gated_activity_running(rt: EngineRuntime, tmp_path: Path, prefix: str) -> Iterator[tuple[str, Path]]:
    """An instance of `gated_then_event` whose activity has started and waits for its gate, with the worker
    running it: (its id, the executions log). On the way out the gate opens and the worker and client stop."""
    gate, log = tmp_path / "gate", tmp_path / "executions"
    tag = new_id(prefix)
    worker = new_worker(rt.address, ORCHESTRATORS, ACTIVITIES)
    client = TaskHubGrpcClient(host_address=rt.address)
    try:
        client.schedule_new_orchestration(gated_then_event, input={"gate": str(gate), "log": str(log), "tag": tag},
                                          instance_id=tag)
        wait_until(lambda: executions(log) == 1, message="the gated activity to start")
        yield tag, log
    finally:
        gate.touch()
        worker.stop()
        client.close()


def test_drain_grace_bounds_the_wait_and_unfinished_work_runs_again(tmp_path: Path):
    grace_s = 1.0
    rt = EngineRuntime(tmp_path / "data", extra_args=["--drain-grace-s", str(grace_s)])
    try:
        rt.start()
        with gated_activity_running(rt, tmp_path, "grace") as (iid, log):
            stopper = Terminator(rt).start()
            code = stopper.join()  # the gate stays shut: the drain gives up after the grace
            assert code == 0, f"exit code {code}\n{rt.log_tail()}"
            assert stopper.elapsed_s < grace_s + 10, stopper.elapsed_s
            assert "drain grace" in rt.log_tail(), rt.log_tail()

        rt.start()
        with TaskHubGrpcClient(host_address=rt.address) as client:
            worker = new_worker(rt.address, ORCHESTRATORS, ACTIVITIES)
            try:
                wait_until(lambda: executions(log) == 2, message="the unfinished activity to run again")
                client.raise_orchestration_event(iid, "go", data="x")
                state = client.wait_for_orchestration_completion(iid, timeout=DEADLINE_S)
                assert state.runtime_status == OrchestrationStatus.COMPLETED, state.failure_details
                assert state.get_output() == [f"done-{iid}", "x"]
            finally:
                worker.stop()
    finally:
        rt.close()


def test_when_the_supervisor_is_killed_its_gateway_does_not_drain_for_the_grace(tmp_path: Path):
    """The partitions die with the supervisor, so a drain could only hold the port (and block the node's
    restart) for its grace, waiting for work that can no longer be committed: the gateway goes at once."""
    rt = EngineRuntime(tmp_path / "data", extra_args=["--drain-grace-s", "600"])
    try:
        rt.start()
        with gated_activity_running(rt, tmp_path, "orphan"):
            assert rt.proc is not None and rt.pgid is not None
            rt.proc.kill()  # the supervisor alone
            rt.proc.wait(timeout=SHUTDOWN_DEADLINE_S)
            wait_until(lambda: not _group_alive(rt.pgid), timeout=SHUTDOWN_DEADLINE_S,
                       message="the supervisor's children to go (a draining gateway would stay for 600 s)")
        rt.start()  # and the node starts again at once on the same port and data
    finally:
        rt.close()


def test_health_is_not_serving_while_a_partition_is_silent(tmp_path: Path):
    """Readiness follows the partitions: one that stops answering (here SIGSTOP) for --gateway-timeout-s makes
    the gateway NOT_SERVING, since requests for its instances would fail; it serves again once it answers."""
    rt = EngineRuntime(tmp_path / "data", extra_args=["--gateway-timeout-s", "2"])
    try:
        rt.start()
        wait_until(lambda: health_status(rt.address) == health_pb2.HealthCheckResponse.SERVING, message="SERVING")
        stopped = partition_pid(rt, 0)
        assert stopped is not None
        os.kill(stopped, signal.SIGSTOP)
        try:
            wait_until(lambda: health_status(rt.address) == health_pb2.HealthCheckResponse.NOT_SERVING,
                       message="NOT_SERVING while partition 0 is stopped")
        finally:
            os.kill(stopped, signal.SIGCONT)
        wait_until(lambda: health_status(rt.address) == health_pb2.HealthCheckResponse.SERVING,
                   message="SERVING again once partition 0 answers")
        assert "silent for" in rt.log_path.read_text(errors="replace")
    finally:
        rt.close()
