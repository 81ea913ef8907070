"""TaskHubSidecarService: each RPC parses its request, then delegates at once to a snake_case function.

Handlers receive raw bytes (no deserializer), so a malformed request is answered with
INVALID_ARGUMENT instead of an opaque failure, and work items are passed through as the bytes the
partition built.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import empty_pb2
from google.protobuf.message import DecodeError

from protos import orchestrator_service_pb2 as pb
from runtime.config import Config
from runtime.errors import DurableRuntimeError, InvalidArgumentError
from runtime.gateway import translate
from runtime.gateway.management import Management
from runtime.gateway.partition_client import PartitionClient
from runtime.gateway.work_items import WorkDispatcher, WorkerStream

log = logging.getLogger(__name__)

SERVICE_NAME = "TaskHubSidecarService"
SERVICE = pb.DESCRIPTOR.services_by_name[SERVICE_NAME]
HEALTH_PING = pb.WorkItem(healthPing=pb.HealthPing()).SerializeToString()
DEFAULT_WORK_ITEM_LIMIT = 100
_WAIT_MARGIN_S = 0.05
_NO_DEADLINE_WAIT_S = 7 * 24 * 3600.0

STATUS_BY_CODE = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "already_exists": grpc.StatusCode.ALREADY_EXISTS,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "stale_completion": grpc.StatusCode.FAILED_PRECONDITION,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "internal": grpc.StatusCode.INTERNAL,
    "unimplemented": grpc.StatusCode.UNIMPLEMENTED,
}


def rpc(request_type: type, oversized_ok: bool = False, settles: bool = False) -> Callable[..., Any]:
    """Parse the request; map engine errors to gRPC statuses (the one mapping, DESIGN §6).

    Requests above --max-request-bytes get RESOURCE_EXHAUSTED, except completions (`oversized_ok`),
    whose handlers fail the instance or task instead. Calls that settle a work item (`settles`) are
    counted while in progress, so that a drain waits for them.
    """

    def wrap(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[bytes]]:
        @functools.wraps(fn)
        async def handler(self: Servicer, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
            if settles:
                self.settling += 1
            try:
                if len(raw) > self.config.max_request_bytes and not oversized_ok:
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"request of {len(raw)} bytes exceeds the limit of {self.config.max_request_bytes} bytes",
                    )
                try:
                    request = request_type.FromString(raw)
                except DecodeError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {request_type.__name__}: {exc}")
                try:
                    response = await fn(self, request, context, raw)
                except DurableRuntimeError as exc:
                    await context.abort(STATUS_BY_CODE.get(exc.code, grpc.StatusCode.INTERNAL), str(exc))
                return response.SerializeToString()
            finally:
                if settles:
                    self.settling -= 1

        return handler

    return wrap


class Servicer:
    def __init__(self, config: Config, client: PartitionClient, dispatcher: WorkDispatcher) -> None:
        self.config = config
        self.client = client
        self.dispatcher = dispatcher
        self.management = Management(config, client)
        self.closing = False  # draining: new worker streams are refused (set once, by begin_drain())
        self.settling = 0  # Complete*/Abandon* calls in progress

    def _timeout(self, context: grpc.aio.ServicerContext, default: float | None = None) -> float:
        remaining = context.time_remaining()
        if remaining is None:
            return default if default is not None else self.config.request_timeout_s
        return max(0.001, remaining)

    async def _call(self, command: dict[str, Any], context: grpc.aio.ServicerContext) -> Any:
        partition = self.client.partition_of(command["i"])
        return await self.client.request(partition, command, self._timeout(context))

    # client RPCs
    @rpc(empty_pb2.Empty)
    async def Hello(self, request: Any, context: Any, raw: bytes) -> empty_pb2.Empty:
        return empty_pb2.Empty()

    @rpc(pb.CreateInstanceRequest)
    async def StartInstance(self, request: Any, context: Any, raw: bytes) -> pb.CreateInstanceResponse:
        result = await self._call(translate.start_instance(request, self.config), context)
        return pb.CreateInstanceResponse(instanceId=result["i"])

    @rpc(pb.GetInstanceRequest)
    async def GetInstance(self, request: Any, context: Any, raw: bytes) -> pb.GetInstanceResponse:
        translate.check_instance_id(request.instanceId, self.config)
        command = {"op": "get", "i": request.instanceId, "pl": request.getInputsAndOutputs}
        return translate.instance_response(await self._call(command, context))

    @rpc(pb.GetInstanceRequest)
    async def WaitForInstanceStart(self, request: Any, context: Any, raw: bytes) -> pb.GetInstanceResponse:
        return await self._wait("start", request, context)

    @rpc(pb.GetInstanceRequest)
    async def WaitForInstanceCompletion(self, request: Any, context: Any, raw: bytes) -> pb.GetInstanceResponse:
        return await self._wait("done", request, context)

    async def _wait(self, kind: str, request: Any, context: Any) -> pb.GetInstanceResponse:
        """Push-based: the owning partition answers when the status changes, or the deadline ends the call."""
        translate.check_instance_id(request.instanceId, self.config)
        # The wait ends a little before the caller's deadline, so that our DEADLINE_EXCEEDED reaches the caller
        # while its call is still open; at the deadline itself gRPC ends the call first, and the status that
        # could no longer be sent was logged as an error for every wait that timed out.
        timeout = self._timeout(context, _NO_DEADLINE_WAIT_S)
        timeout -= min(_WAIT_MARGIN_S, timeout / 4)  # a short deadline keeps most of its time
        command = {
            "op": "wait",
            "i": request.instanceId,
            "k": kind,
            "pl": request.getInputsAndOutputs,
            "dl": int((time.time() + timeout) * 1000),
        }
        partition = self.client.partition_of(request.instanceId)
        try:
            state = await self.client.request(partition, command, timeout)
        except DurableRuntimeError:
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 2 * _WAIT_MARGIN_S:
                if context.cancelled():  # too late even so (a loop that ran behind): nobody to tell
                    raise asyncio.CancelledError() from None
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while waiting")
            raise
        return translate.instance_response(state)

    @rpc(pb.RaiseEventRequest)
    async def RaiseEvent(self, request: Any, context: Any, raw: bytes) -> pb.RaiseEventResponse:
        await self._call(translate.raise_event(request, self.config), context)
        return pb.RaiseEventResponse()

    @rpc(pb.TerminateRequest)
    async def TerminateInstance(self, request: Any, context: Any, raw: bytes) -> pb.TerminateResponse:
        await self._call(translate.terminate(request, self.config), context)
        return pb.TerminateResponse()

    @rpc(pb.SuspendRequest)
    async def SuspendInstance(self, request: Any, context: Any, raw: bytes) -> pb.SuspendResponse:
        await self._call(translate.suspend_or_resume("suspend", request, self.config), context)
        return pb.SuspendResponse()

    @rpc(pb.ResumeRequest)
    async def ResumeInstance(self, request: Any, context: Any, raw: bytes) -> pb.ResumeResponse:
        await self._call(translate.suspend_or_resume("resume", request, self.config), context)
        return pb.ResumeResponse()

    @rpc(pb.RewindInstanceRequest)
    async def RewindInstance(self, request: Any, context: Any, raw: bytes) -> pb.RewindInstanceResponse:
        await self._call(translate.rewind(request, self.config), context)
        return pb.RewindInstanceResponse()

    @rpc(pb.SkipGracefulOrchestrationTerminationsRequest)
    async def SkipGracefulOrchestrationTerminations(self, request: Any, context: Any, raw: bytes) -> Any:
        return await self.management.skip_graceful_terminations(request, self._timeout(context))

    @rpc(pb.CreateTaskHubRequest)
    async def CreateTaskHub(self, request: Any, context: Any, raw: bytes) -> pb.CreateTaskHubResponse:
        """The task hub exists as long as the node runs; recreateIfExists wipes it (when permitted)."""
        if request.recreateIfExists:
            await self.management.wipe_task_hub("CreateTaskHub(recreateIfExists)", self._timeout(context))
        return pb.CreateTaskHubResponse()

    @rpc(pb.DeleteTaskHubRequest)
    async def DeleteTaskHub(self, request: Any, context: Any, raw: bytes) -> pb.DeleteTaskHubResponse:
        await self.management.wipe_task_hub("DeleteTaskHub", self._timeout(context))
        return pb.DeleteTaskHubResponse()

    @rpc(pb.PurgeInstancesRequest)
    async def PurgeInstances(self, request: Any, context: Any, raw: bytes) -> pb.PurgeInstancesResponse:
        return await self.management.purge(request, self._timeout(context))

    @rpc(pb.QueryInstancesRequest)
    async def QueryInstances(self, request: Any, context: Any, raw: bytes) -> pb.QueryInstancesResponse:
        return await self.management.query_instances(request.query, self._timeout(context))

    @rpc(pb.ListInstanceIdsRequest)
    async def ListInstanceIds(self, request: Any, context: Any, raw: bytes) -> pb.ListInstanceIdsResponse:
        return await self.management.list_instance_ids(request, self._timeout(context))

    @rpc(pb.RestartInstanceRequest)
    async def RestartInstance(self, request: Any, context: Any, raw: bytes) -> pb.RestartInstanceResponse:
        return await self.management.restart(request, self._timeout(context))

    async def StreamInstanceHistory(self, raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            request = pb.StreamInstanceHistoryRequest.FromString(raw)
        except DecodeError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed StreamInstanceHistoryRequest: {exc}")
        try:
            async for chunk in self.management.history(request, self._timeout(context)):
                yield chunk
        except DurableRuntimeError as exc:
            await context.abort(STATUS_BY_CODE.get(exc.code, grpc.StatusCode.INTERNAL), str(exc))

    # worker RPCs
    async def GetWorkItems(self, raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            request = pb.GetWorkItemsRequest.FromString(raw)
        except DecodeError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed GetWorkItemsRequest: {exc}")
        if self.closing:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "this node is shutting down; connect to another node or retry"
            )
        limits = {
            "o": request.maxConcurrentOrchestrationWorkItems,
            "a": request.maxConcurrentActivityWorkItems,
            "e": request.maxConcurrentEntityWorkItems,
        }
        if min(limits.values()) < 0:  # the stream would never get work
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"maxConcurrent*WorkItems must not be negative (0 means {DEFAULT_WORK_ITEM_LIMIT}),"
                                f" got orchestrations {limits['o']}, activities {limits['a']}, entities {limits['e']}")
        stream = WorkerStream(
            filters=translate.work_item_filters(request),
            limits={kind: limit or DEFAULT_WORK_ITEM_LIMIT for kind, limit in limits.items()},
        )
        self.dispatcher.add_stream(stream)
        # The call's end removes the stream even if this generator is left suspended at a yield (grpc then
        # leaves closing it to the garbage collector). Removing it twice is harmless.
        context.add_done_callback(lambda _: self.dispatcher.remove_stream(stream))
        try:
            async for item in self._stream_items(stream):
                yield item
        finally:
            self.dispatcher.remove_stream(stream)

    async def _stream_items(self, stream: WorkerStream) -> AsyncIterator[bytes]:
        """Work items as they arrive, a healthPing after each silent interval, and an OK end on drain."""
        items = stream.items
        while True:
            if items:
                yield items.popleft()
                continue
            if stream.ended:
                return  # an OK end: the SDK reconnects at once, to another node if it can
            await stream.wait(self.config.health_ping_interval_s)
            if not items and not stream.ended:
                yield HEALTH_PING

    def begin_drain(self) -> None:
        """Refuse new worker streams; client calls and completions are still served."""
        self.closing = True

    def end_streams(self) -> None:
        """The drain is over: the open worker streams end with OK once they have written their items."""
        self.dispatcher.end_streams()

    @rpc(pb.OrchestratorResponse, oversized_ok=True, settles=True)
    async def CompleteOrchestratorTask(self, request: Any, context: Any, raw: bytes) -> pb.CompleteTaskResponse:
        self.dispatcher.completed(request.completionToken)  # first: a refused completion must not stay held
        command = translate.complete_orchestration(request, raw, self.config)
        await self._call(command, context)
        return pb.CompleteTaskResponse()

    @rpc(pb.ActivityResponse, oversized_ok=True, settles=True)
    async def CompleteActivityTask(self, request: Any, context: Any, raw: bytes) -> pb.CompleteTaskResponse:
        self.dispatcher.completed(request.completionToken)
        command = translate.complete_activity(request, self.config, len(raw))
        await self._call(command, context)
        return pb.CompleteTaskResponse()

    @rpc(pb.EntityBatchResult, oversized_ok=True, settles=True)
    async def CompleteEntityTask(self, request: Any, context: Any, raw: bytes) -> pb.CompleteTaskResponse:
        partition = _partition_of_token(request.completionToken, self.config.partitions)
        self.dispatcher.completed(request.completionToken)
        if len(raw) > self.config.max_request_bytes:
            raw = pb.EntityBatchResult(
                completionToken=request.completionToken,
                failureDetails=pb.TaskFailureDetails(
                    errorType="EntityResultTooLarge",
                    errorMessage=f"the entity batch result was {len(raw)} bytes; the limit is {self.config.max_request_bytes}",
                    isNonRetriable=True,
                ),
            ).SerializeToString()
        command = {"op": "complete_ent", "tok": request.completionToken, "resp": raw}
        await self.client.request(partition, command, self._timeout(context))
        return pb.CompleteTaskResponse()

    @rpc(pb.AbandonEntityTaskRequest, settles=True)
    async def AbandonTaskEntityWorkItem(self, request: Any, context: Any, raw: bytes) -> Any:
        await self._abandon(request.completionToken, context)
        return pb.AbandonEntityTaskResponse()

    # entity client RPCs
    @rpc(pb.SignalEntityRequest)
    async def SignalEntity(self, request: Any, context: Any, raw: bytes) -> pb.SignalEntityResponse:
        await self._call(translate.signal_entity(request, self.config), context)
        return pb.SignalEntityResponse()

    @rpc(pb.GetEntityRequest)
    async def GetEntity(self, request: Any, context: Any, raw: bytes) -> pb.GetEntityResponse:
        translate.check_entity_id(request.instanceId, self.config)
        command = {"op": "get_entity", "i": request.instanceId, "st": request.includeState}
        metadata = await self._call(command, context)
        if metadata is None:
            return pb.GetEntityResponse(exists=False)
        return pb.GetEntityResponse(exists=True, entity=translate.entity_metadata(metadata))

    @rpc(pb.QueryEntitiesRequest)
    async def QueryEntities(self, request: Any, context: Any, raw: bytes) -> pb.QueryEntitiesResponse:
        return await self.management.query_entities(request.query, self._timeout(context))

    @rpc(pb.CleanEntityStorageRequest)
    async def CleanEntityStorage(self, request: Any, context: Any, raw: bytes) -> pb.CleanEntityStorageResponse:
        return await self.management.clean_entities(request, self._timeout(context))

    @rpc(pb.AbandonOrchestrationTaskRequest, settles=True)
    async def AbandonTaskOrchestratorWorkItem(self, request: Any, context: Any, raw: bytes) -> Any:
        await self._abandon(request.completionToken, context)
        return pb.AbandonOrchestrationTaskResponse()

    @rpc(pb.AbandonActivityTaskRequest, settles=True)
    async def AbandonTaskActivityWorkItem(self, request: Any, context: Any, raw: bytes) -> Any:
        await self._abandon(request.completionToken, context)
        return pb.AbandonActivityTaskResponse()

    async def _abandon(self, token: str, context: Any) -> None:
        partition = _partition_of_token(token, self.config.partitions)
        self.dispatcher.completed(token)
        await self.client.request(partition, {"op": "abandon", "tok": token}, self._timeout(context))


def _partition_of_token(token: str, partitions: int) -> int:
    try:
        partition = int(token.split(".", 1)[0])
    except ValueError:
        partition = -1
    if not 0 <= partition < partitions:
        raise InvalidArgumentError(f"completion token '{token}' was not issued by this task hub")
    return partition


def _unimplemented(name: str) -> Callable[..., Awaitable[bytes]]:
    async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{SERVICE_NAME}/{name} is not implemented by durable-runtime yet")
        return b""

    return handler


def generic_handler(servicer: Servicer) -> grpc.GenericRpcHandler:
    """Method handlers for every RPC in the service, with raw bytes in and out."""
    handlers = {}
    for method in SERVICE.methods:
        fn = getattr(servicer, method.name, None) or _unimplemented(method.name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(fn)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(fn)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
