"""The one place where request protos become partition commands, and stored state becomes protos."""

from __future__ import annotations

import uuid
from typing import Any

from google.protobuf import timestamp_pb2, wrappers_pb2

from partitions.store.keys import entity_id_problem, id_problem
from protos import orchestrator_service_pb2 as pb
from runtime.config import Config
from runtime.errors import InvalidArgumentError
from runtime.wire import ms_timestamp, timestamp_ms

Command = dict[str, Any]




def _ts(ms: int | None) -> timestamp_pb2.Timestamp | None:
    return ms_timestamp(ms) if ms else None


def _sv(value: str | None) -> wrappers_pb2.StringValue | None:
    return None if value is None else wrappers_pb2.StringValue(value=value)


def _opt(message: Any, name: str) -> str | None:
    return getattr(message, name).value if message.HasField(name) else None


def check_instance_id(instance_id: str, config: Config, what: str = "instance id") -> str:
    """Instance ids are non-empty, bounded, and free of control characters (NUL separates store keys)."""
    if len(instance_id) > config.max_instance_id_length:
        raise InvalidArgumentError(
            f"{what} is {len(instance_id)} characters; the limit is {config.max_instance_id_length}"
        )
    problem = id_problem(instance_id)
    if problem is not None:
        raise InvalidArgumentError(f"{what} {problem}")
    return instance_id


def check_entity_id(entity_id: str, config: Config) -> str:
    """Entity instance ids read `@name@key`."""
    check_instance_id(entity_id, config, "entity instance id")
    problem = entity_id_problem(entity_id)
    if problem is not None:
        raise InvalidArgumentError(f"entity instance id '{entity_id}' {problem}")
    return entity_id


def start_instance(request: pb.CreateInstanceRequest, config: Config) -> Command:
    instance_id = request.instanceId or uuid.uuid4().hex
    check_instance_id(instance_id, config)
    if instance_id.startswith("@"):
        raise InvalidArgumentError("orchestration instance ids must not start with '@' (reserved for entities)")
    if not request.name:
        raise InvalidArgumentError("orchestration name must not be empty")
    command: Command = {
        "op": "start",
        "i": instance_id,
        "n": request.name,
        "v": _opt(request, "version"),
        "in": _opt(request, "input"),
        "ss": timestamp_ms(request.scheduledStartTimestamp) if request.HasField("scheduledStartTimestamp") else 0,
        "tg": dict(request.tags),
        "reuse": list(request.orchestrationIdReusePolicy.replaceableStatus),
        "x": _opt(request, "executionId") or uuid.uuid4().hex,
    }
    if request.HasField("parentTraceContext"):
        command["tc"] = request.parentTraceContext.SerializeToString()
    return command


def raise_event(request: pb.RaiseEventRequest, config: Config) -> Command:
    check_instance_id(request.instanceId, config)
    if not request.name:
        raise InvalidArgumentError("event name must not be empty")
    return {"op": "raise", "i": request.instanceId, "n": request.name, "in": _opt(request, "input")}


def terminate(request: pb.TerminateRequest, config: Config) -> Command:
    check_instance_id(request.instanceId, config)
    return {"op": "terminate", "i": request.instanceId, "out": _opt(request, "output"), "r": request.recursive}


def suspend_or_resume(op: str, request: pb.SuspendRequest | pb.ResumeRequest, config: Config) -> Command:
    check_instance_id(request.instanceId, config)
    return {"op": op, "i": request.instanceId, "reason": _opt(request, "reason")}


def rewind(request: pb.RewindInstanceRequest, config: Config) -> Command:
    check_instance_id(request.instanceId, config)
    return {"op": "rewind", "i": request.instanceId, "reason": _opt(request, "reason")}


def complete_orchestration(request: pb.OrchestratorResponse, raw: bytes, config: Config) -> Command:
    """An oversized response is not applied: the instance fails with a clear message instead."""
    check_instance_id(request.instanceId, config)
    if not request.completionToken:
        raise InvalidArgumentError("completionToken must not be empty")
    command: Command = {"op": "complete_orch", "i": request.instanceId, "tok": request.completionToken, "resp": raw}
    if len(raw) > config.max_request_bytes:
        command["resp"] = b""
        command["fail"] = [
            "OrchestratorResponseTooLarge",
            f"the orchestrator's response was {len(raw)} bytes; the limit is {config.max_request_bytes}",
        ]
    return command


def complete_activity(request: pb.ActivityResponse, config: Config, size: int = 0) -> Command:
    """An oversized result becomes a task failure the orchestrator can handle."""
    check_instance_id(request.instanceId, config)
    if not request.completionToken:
        raise InvalidArgumentError("completionToken must not be empty")
    if size > config.max_request_bytes:
        too_large = pb.TaskFailureDetails(
            errorType="ActivityResultTooLarge",
            errorMessage=f"the activity's result was {size} bytes; the limit is {config.max_request_bytes}",
            isNonRetriable=True,
        )
        request = pb.ActivityResponse(
            instanceId=request.instanceId, taskId=request.taskId, completionToken=request.completionToken,
            failureDetails=too_large,
        )
    failed = request.HasField("failureDetails")
    return {
        "op": "complete_act",
        "i": request.instanceId,
        "t": request.taskId,
        "tok": request.completionToken,
        "out": _opt(request, "result"),
        "fd": request.failureDetails.SerializeToString() if failed else None,
    }


def signal_entity(request: pb.SignalEntityRequest, config: Config) -> Command:
    check_entity_id(request.instanceId, config)
    if not request.name:
        raise InvalidArgumentError("entity operation name must not be empty")
    return {
        "op": "signal_entity",
        "i": request.instanceId,
        "n": request.name,
        "in": _opt(request, "input"),
        "req": request.requestId or uuid.uuid4().hex,
        "at": timestamp_ms(request.scheduledTime) if request.HasField("scheduledTime") else 0,
    }


def entity_metadata(metadata: dict[str, Any]) -> pb.EntityMetadata:
    return pb.EntityMetadata(
        instanceId=metadata["i"],
        lastModifiedTime=_ts(metadata["lm"]),
        backlogQueueSize=metadata["q"],
        lockedBy=_sv(metadata.get("lo")),
        serializedState=_sv(metadata.get("st")),
    )


def work_item_filters(request: pb.GetWorkItemsRequest) -> dict[str, Any] | None:
    """A worker's workItemFilters as kind -> {name: versions} ([] = any version); None = no filters."""
    if not request.HasField("workItemFilters"):
        return None
    filters = request.workItemFilters
    by_kind: dict[str, dict[str, list[str]]] = {"o": {}, "a": {}, "e": {}}
    for kind, entries in (("o", filters.orchestrations), ("a", filters.activities)):
        for entry in entries:
            versions = by_kind[kind].setdefault(entry.name, [])
            versions.extend(v for v in entry.versions if v not in versions)
    for entity in filters.entities:
        by_kind["e"][entity.name] = []
    return {kind: dict(sorted(names.items())) for kind, names in by_kind.items()}


def orchestration_state(state: dict[str, Any]) -> pb.OrchestrationState:
    """Build the SDK's OrchestrationState from a partition's instance state."""
    message = pb.OrchestrationState(
        instanceId=state["i"],
        name=state["n"],
        version=_sv(state.get("v")),
        orchestrationStatus=state["s"],
        scheduledStartTimestamp=_ts(state.get("sst")),
        createdTimestamp=_ts(state.get("c")),
        lastUpdatedTimestamp=_ts(state.get("u")),
        input=_sv(state.get("in")),
        output=_sv(state.get("out")),
        customStatus=_sv(state.get("cs")),
        executionId=_sv(state.get("x")),
        completedTimestamp=_ts(state.get("d")),
        parentInstanceId=_sv(state.get("pi")),
        tags=state.get("tg") or {},
    )
    if state.get("fd"):
        message.failureDetails.ParseFromString(state["fd"])
    return message


def instance_response(state: dict[str, Any] | None) -> pb.GetInstanceResponse:
    if state is None:
        return pb.GetInstanceResponse(exists=False)
    return pb.GetInstanceResponse(exists=True, orchestrationState=orchestration_state(state))
