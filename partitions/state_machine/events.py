"""Builders for the history events the engine writes, in the SDK's protobuf form."""

from __future__ import annotations

from google.protobuf import timestamp_pb2, wrappers_pb2

from protos import orchestrator_service_pb2 as pb
from runtime.wire import MAX_MS
from runtime.wire import (
    ms_timestamp as timestamp,  # milliseconds -> Timestamp, re-exported for the core's modules
)
from runtime.wire import timestamp_ms as timestamp_ms  # re-exported for the core's modules

RUNNING = pb.ORCHESTRATION_STATUS_RUNNING
COMPLETED = pb.ORCHESTRATION_STATUS_COMPLETED
CONTINUED_AS_NEW = pb.ORCHESTRATION_STATUS_CONTINUED_AS_NEW
FAILED = pb.ORCHESTRATION_STATUS_FAILED
CANCELED = pb.ORCHESTRATION_STATUS_CANCELED
TERMINATED = pb.ORCHESTRATION_STATUS_TERMINATED
PENDING = pb.ORCHESTRATION_STATUS_PENDING
SUSPENDED = pb.ORCHESTRATION_STATUS_SUSPENDED

TERMINAL = frozenset({COMPLETED, FAILED, CANCELED, TERMINATED})


def string_value(value: str | None) -> wrappers_pb2.StringValue | None:
    return None if value is None else wrappers_pb2.StringValue(value=value)


def history_event(now_ms: int, event_id: int = -1, **payload: object) -> pb.HistoryEvent:
    return pb.HistoryEvent(eventId=event_id, timestamp=timestamp(now_ms), **payload)  # type: ignore[arg-type]


def orchestrator_started(now_ms: int) -> bytes:
    return history_event(now_ms, orchestratorStarted=pb.OrchestratorStartedEvent()).SerializeToString()


def execution_started(now_ms: int, instance_id: str, execution_id: str, record: dict, data: str | None) -> bytes:
    """The executionStarted event of `record`'s current execution, whose input is `data`."""
    parent = record.get("p")
    parent_info = None
    if parent:
        parent_info = pb.ParentInstanceInfo(
            taskScheduledId=parent[2],
            name=string_value(parent[3]),
            version=string_value(parent[4]),
            orchestrationInstance=pb.OrchestrationInstance(
                instanceId=parent[0], executionId=string_value(parent[1])
            ),
        )
    started = pb.ExecutionStartedEvent(
        name=record["n"],
        version=string_value(record.get("v")),
        input=string_value(data),
        orchestrationInstance=pb.OrchestrationInstance(
            instanceId=instance_id, executionId=string_value(execution_id)
        ),
        parentInstance=parent_info,
        tags=record.get("tg") or {},
    )
    if record.get("sst"):
        started.scheduledStartTimestamp.CopyFrom(timestamp(record["sst"]))
    if record.get("tc"):
        started.parentTraceContext.ParseFromString(record["tc"])
    return history_event(now_ms, executionStarted=started).SerializeToString()


def event_raised(now_ms: int, name: str, data: str | None) -> bytes:
    raised = pb.EventRaisedEvent(name=name, input=string_value(data))
    return history_event(now_ms, eventRaised=raised).SerializeToString()


def execution_terminated(now_ms: int, output: str | None, recurse: bool) -> bytes:
    terminated = pb.ExecutionTerminatedEvent(input=string_value(output), recurse=recurse)
    return history_event(now_ms, executionTerminated=terminated).SerializeToString()


def execution_suspended(now_ms: int, reason: str | None) -> bytes:
    event = pb.ExecutionSuspendedEvent(input=string_value(reason))
    return history_event(now_ms, executionSuspended=event).SerializeToString()


def execution_resumed(now_ms: int, reason: str | None) -> bytes:
    event = pb.ExecutionResumedEvent(input=string_value(reason))
    return history_event(now_ms, executionResumed=event).SerializeToString()


def timer_fired(now_ms: int, timer_id: int, fire_at_ms: int, fire_at: list[int] | None = None) -> bytes:
    """`fire_at` is the timer's own fireAt as [seconds, nanos], echoed exactly: the SDK compares it with the
    time it asked for (a long timer in chunks goes on until they match). Rows from before it was kept: ms."""
    when = timestamp_pb2.Timestamp(seconds=fire_at[0], nanos=fire_at[1]) if fire_at else timestamp(fire_at_ms)
    fired = pb.TimerFiredEvent(timerId=timer_id, fireAt=when)
    return history_event(now_ms, timerFired=fired).SerializeToString()


def timer_row(execution_id: str, fire_at: timestamp_pb2.Timestamp) -> tuple[int, dict]:
    """A durable timer's key time and row: due at the first whole millisecond not before `fire_at`, never early."""
    fire_ms = min(max(fire_at.seconds * 1000 + -(-fire_at.nanos // 1_000_000), 0), MAX_MS)
    return fire_ms, {"x": execution_id, "fa": [fire_at.seconds, fire_at.nanos]}


def task_result(now_ms: int, task_id: int, result: str | None, failure: bytes | None) -> bytes:
    """taskCompleted, or taskFailed when the activity reported failure details."""
    if failure is not None:
        details = pb.TaskFailureDetails.FromString(failure)
        return history_event(
            now_ms, taskFailed=pb.TaskFailedEvent(taskScheduledId=task_id, failureDetails=details)
        ).SerializeToString()
    completed = pb.TaskCompletedEvent(taskScheduledId=task_id, result=string_value(result))
    return history_event(now_ms, taskCompleted=completed).SerializeToString()


def child_result(now_ms: int, task_id: int, status: int, result: str | None, failure: bytes | None) -> bytes:
    """subOrchestrationInstanceCompleted, or ...Failed for any other terminal status."""
    if status == COMPLETED:
        completed = pb.SubOrchestrationInstanceCompletedEvent(taskScheduledId=task_id, result=string_value(result))
        return history_event(now_ms, subOrchestrationInstanceCompleted=completed).SerializeToString()
    details = pb.TaskFailureDetails.FromString(failure) if failure else pb.TaskFailureDetails(
        errorType="OrchestrationTerminated" if status == TERMINATED else "OrchestrationFailed",
        errorMessage=f"sub-orchestration ended with status {pb.OrchestrationStatus.Name(status)}",
    )
    failed = pb.SubOrchestrationInstanceFailedEvent(taskScheduledId=task_id, failureDetails=details)
    return history_event(now_ms, subOrchestrationInstanceFailed=failed).SerializeToString()


def failure_details(error_type: str, message: str) -> bytes:
    return pb.TaskFailureDetails(errorType=error_type, errorMessage=message, isNonRetriable=True).SerializeToString()
