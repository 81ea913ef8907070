"""Minimal protocol-level worker (raw grpc.aio, no SDK replay engine).

    python -m bench.proto_worker --port P

Opens GetWorkItems and answers every work item immediately:
  * orchestrator work item: looks at pastEvents+newEvents. With k = number of
    taskCompleted events and v = the orchestration input (k == 0) or the last
    task result, it answers scheduleTask(id=k, name=bench_inc, input=v+1) while
    k < 3, and completeOrchestration(COMPLETED, result=v) once k == 3. The n-th
    scheduled task gets action id n (0, 1, 2). A taskFailed completes the
    orchestration as FAILED.
  * activity work item: CompleteActivityTask with result = input (echo).
  * healthPing: ignored.
completionToken is echoed. Runs until SIGTERM/SIGINT; prints counters on exit.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

import durabletask.internal.orchestrator_service_pb2 as pb
import durabletask.internal.orchestrator_service_pb2_grpc as stubs
import grpc
from google.protobuf import empty_pb2, wrappers_pb2

from bench.common import ACT_NAME, CHAIN_LENGTH, HOST

MAX_CONCURRENT = 1000
RPC_TIMEOUT = 30.0

stats = {"orch": 0, "act": 0, "ping": 0, "errors": 0, "reconnects": 0}


def orchestrator_response(wi: pb.WorkItem) -> pb.OrchestratorResponse:
    req = wi.orchestratorRequest
    orch_input = None
    scheduled = 0
    completed: list[str] = []
    failed = None
    for seq in (req.pastEvents, req.newEvents):
        for e in seq:
            kind = e.WhichOneof("eventType")
            if kind == "executionStarted":
                orch_input = e.executionStarted.input.value
            elif kind == "taskScheduled":
                scheduled += 1
            elif kind == "taskCompleted":
                completed.append(e.taskCompleted.result.value)
            elif kind == "taskFailed":
                failed = e.taskFailed.failureDetails
    resp = pb.OrchestratorResponse(instanceId=req.instanceId, completionToken=wi.completionToken)
    if failed is not None:
        resp.actions.append(pb.OrchestratorAction(
            id=scheduled,
            completeOrchestration=pb.CompleteOrchestrationAction(
                orchestrationStatus=pb.ORCHESTRATION_STATUS_FAILED, failureDetails=failed)))
        return resp
    k = len(completed)
    value = json.loads(completed[-1] if k else (orch_input or "0"))
    if k >= CHAIN_LENGTH:
        resp.actions.append(pb.OrchestratorAction(
            id=scheduled,
            completeOrchestration=pb.CompleteOrchestrationAction(
                orchestrationStatus=pb.ORCHESTRATION_STATUS_COMPLETED,
                result=wrappers_pb2.StringValue(value=json.dumps(value)))))
    elif scheduled == k:
        # nothing outstanding: schedule the next activity, id = tasks scheduled so far
        resp.actions.append(pb.OrchestratorAction(
            id=k,
            scheduleTask=pb.ScheduleTaskAction(
                name=ACT_NAME, input=wrappers_pb2.StringValue(value=json.dumps(value + 1)))))
    # else: an activity is still outstanding -> no new actions
    return resp


def activity_response(wi: pb.WorkItem) -> pb.ActivityResponse:
    req = wi.activityRequest
    return pb.ActivityResponse(
        instanceId=req.orchestrationInstance.instanceId,
        taskId=req.taskId,
        result=wrappers_pb2.StringValue(value=req.input.value),
        completionToken=wi.completionToken)


async def handle(stub, wi: pb.WorkItem) -> None:
    try:
        kind = wi.WhichOneof("request")
        if kind == "orchestratorRequest":
            await stub.CompleteOrchestratorTask(orchestrator_response(wi), timeout=RPC_TIMEOUT)
            stats["orch"] += 1
        elif kind == "activityRequest":
            await stub.CompleteActivityTask(activity_response(wi), timeout=RPC_TIMEOUT)
            stats["act"] += 1
    except Exception as ex:  # keep going; the harness verifies results end-to-end
        stats["errors"] += 1
        if stats["errors"] <= 5:
            print(f"proto worker: error answering work item: {ex!r}", file=sys.stderr, flush=True)


async def run(port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pending: set[asyncio.Task] = set()
    async with grpc.aio.insecure_channel(f"{HOST}:{port}") as channel:
        stub = stubs.TaskHubSidecarServiceStub(channel)
        print("proto worker started", flush=True)
        while not stop.is_set():
            call = None
            try:
                await stub.Hello(empty_pb2.Empty(), timeout=5)
                call = stub.GetWorkItems(pb.GetWorkItemsRequest(
                    maxConcurrentOrchestrationWorkItems=MAX_CONCURRENT,
                    maxConcurrentActivityWorkItems=MAX_CONCURRENT))
                stopper = asyncio.create_task(stop.wait())
                stopper.add_done_callback(lambda _t, c=call: c.cancel())
                try:
                    async for wi in call:
                        if wi.HasField("healthPing"):
                            stats["ping"] += 1
                            continue
                        t = asyncio.create_task(handle(stub, wi))
                        pending.add(t)
                        t.add_done_callback(pending.discard)
                finally:
                    stopper.cancel()
            except grpc.aio.AioRpcError as ex:
                if stop.is_set():
                    break
                stats["reconnects"] += 1
                if ex.code() != grpc.StatusCode.UNAVAILABLE or stats["reconnects"] <= 3:
                    print(f"proto worker: stream error {ex.code()}: {ex.details()}", file=sys.stderr, flush=True)
            except asyncio.CancelledError:
                break
            if not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), timeout=0.2)
                except TimeoutError:
                    pass
        if pending:
            await asyncio.wait(pending, timeout=5)
    print(f"proto worker stats: {stats}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    asyncio.run(run(args.port))


if __name__ == "__main__":
    main()
