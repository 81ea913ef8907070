"""Management RPCs that span partitions: queries, purge, restart and history, merged at the gateway."""

from __future__ import annotations

import asyncio
import heapq
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from google.protobuf import wrappers_pb2

from protos import orchestrator_service_pb2 as pb
from runtime.config import Config
from runtime.errors import InstanceNotCompletedError, InstanceNotFoundError, InvalidArgumentError
from runtime.gateway import translate
from runtime.gateway.partition_client import PartitionClient
from runtime.wire import MAX_MS, length_delimited, timestamp_ms

TERMINAL_STATUSES = frozenset(
    {
        pb.ORCHESTRATION_STATUS_COMPLETED,
        pb.ORCHESTRATION_STATUS_FAILED,
        pb.ORCHESTRATION_STATUS_CANCELED,
        pb.ORCHESTRATION_STATUS_TERMINATED,
    }
)
MAX_PAGE = 1000
_MAX_PURGE_DEPTH = 64
_STILL_RUNNING = object()  # a tree a recursive purge leaves alone: an instance below its root still runs
_RUNS_ITSELF = object()  # ...its root still runs: not deleted, as without `recursive`
_HISTORY_CHUNK_BYTES = 1 << 20


def _ms(message: Any, name: str) -> int | None:
    """An optional Timestamp field in ms (clamped, so before 1970 counts as 0), or None when unset."""
    return timestamp_ms(getattr(message, name)) if message.HasField(name) else None


def _parse_token(token: str, by_id: bool = False) -> list[Any]:
    """Continuation tokens are '<ms>:<instance id>' of the last item returned ('i:<id>' for prefix queries,
    which are in id order). A token of the other kind would restart or skip the listing: it is refused."""
    ms, sep, instance_id = token.partition(":")
    if by_id:
        if ms != "i" or not sep:
            raise InvalidArgumentError(f"continuation token '{token}' does not belong to a query by instance id prefix")
        return [-1, instance_id]
    if ms == "i" and sep:
        raise InvalidArgumentError(f"continuation token '{token}' belongs to a query by instance id prefix")
    if not sep or not (ms.isascii() and ms.isdigit()) or int(ms) > MAX_MS:
        raise InvalidArgumentError(f"malformed continuation token '{token}'")
    return [int(ms), instance_id]


def _statuses(values: Any) -> list[int]:
    known = set(pb.OrchestrationStatus.values())
    bad = [v for v in values if v not in known]
    if bad:
        raise InvalidArgumentError(f"unknown runtime status value(s) {bad}")
    return list(values)


def _that_fit(messages: list[Any], limit_bytes: int) -> list[Any]:
    """The first `messages` whose encoding fits in `limit_bytes` (at least one): the SDK's client receives 4 MiB
    unless configured otherwise, and a page of large inputs, outputs or entity states must not exceed it."""
    size = 64  # the continuation token, generously
    for count, message in enumerate(messages):
        size += message.ByteSize() + 6
        if size > limit_bytes and count > 0:
            return messages[:count]
    return messages


def _page_size(requested: int) -> int:
    """Zero or a negative size means the default (and largest) page."""
    return min(requested, MAX_PAGE) if requested > 0 else MAX_PAGE


# Requests one call fans out to, in flight at once. A batch of a few hundred thousand ids (4 MiB of them) then
# goes through in a steady stream, and the gateway's loop keeps serving everything else (heartbeats included)
# meanwhile, instead of first building a coroutine and a request for every id.
_IN_FLIGHT = 128

T = TypeVar("T")
R = TypeVar("R")


async def _each(items: Sequence[T], run: Callable[[T], Awaitable[R]]) -> list[R]:
    """`run(item)` for every item, at most _IN_FLIGHT at once; the results in the items' order. The first
    failure cancels the rest."""
    results: list[Any] = [None] * len(items)
    pending = iter(enumerate(items))

    async def lane() -> None:
        for index, item in pending:
            results[index] = await run(item)

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(_IN_FLIGHT, len(items))):
                group.create_task(lane())
    except BaseExceptionGroup as failed:  # the first failure, as a single call would have raised it
        raise failed.exceptions[0] from None
    return results


class Management:
    def __init__(self, config: Config, client: PartitionClient) -> None:
        self.config = config
        self.client = client

    async def _all(self, command: dict[str, Any], timeout: float) -> list[Any]:
        """The same command on every partition, answers in partition order."""
        return await asyncio.gather(
            *(self.client.request(p, dict(command), timeout) for p in range(self.config.partitions))
        )

    async def query_instances(self, query: pb.InstanceQuery, timeout: float) -> pb.QueryInstancesResponse:
        limit = _page_size(query.maxInstanceCount)
        prefix = query.instanceIdPrefix.value if query.HasField("instanceIdPrefix") else None
        command = {
            "op": "query",
            "statuses": _statuses(query.runtimeStatus),
            "cf": _ms(query, "createdTimeFrom"),
            "ct": _ms(query, "createdTimeTo"),
            "prefix": prefix,
            "after": _parse_token(query.continuationToken.value, bool(prefix)) if query.continuationToken.value else None,
            "limit": limit,
            "pl": query.fetchInputsAndOutputs,
        }
        pages = await self._all(command, timeout)
        order = (lambda s: s["i"]) if prefix else (lambda s: (s["c"], s["i"]))
        merged = list(heapq.merge(*pages, key=order))
        page = merged[:limit]
        more = len(merged) > limit or any(len(p) >= limit for p in pages)
        states = _that_fit([translate.orchestration_state(s) for s in page], self.config.max_request_bytes)
        more = more or len(states) < len(page)
        page = page[: len(states)]
        token = None
        if more and page:
            last = page[-1]
            token = wrappers_pb2.StringValue(value=f"i:{last['i']}" if prefix else f"{last['c']}:{last['i']}")
        return pb.QueryInstancesResponse(orchestrationState=states, continuationToken=token)

    async def list_instance_ids(self, request: pb.ListInstanceIdsRequest, timeout: float) -> pb.ListInstanceIdsResponse:
        limit = _page_size(request.pageSize)
        last = request.lastInstanceKey.value if request.HasField("lastInstanceKey") else ""
        command = {
            "op": "list_ids",
            "statuses": _statuses(request.runtimeStatus),
            "df": _ms(request, "completedTimeFrom"),
            "dt": _ms(request, "completedTimeTo"),
            "after": _parse_token(last) if last else None,
            "limit": limit,
        }
        pages = await self._all(command, timeout)
        merged = list(heapq.merge(*pages, key=lambda row: (row[0], row[1])))
        page = merged[:limit]
        more = len(merged) > limit or any(len(p) >= limit for p in pages)
        token = wrappers_pb2.StringValue(value=f"{page[-1][0]}:{page[-1][1]}") if more and page else None
        return pb.ListInstanceIdsResponse(instanceIds=[row[1] for row in page], lastInstanceKey=token)

    async def purge(self, request: pb.PurgeInstancesRequest, timeout: float) -> pb.PurgeInstancesResponse:
        if request.HasField("purgeInstanceFilter"):
            return await self._purge_by_filter(request.purgeInstanceFilter, request.recursive, timeout)
        if request.HasField("instanceBatch"):
            ids = [translate.check_instance_id(i, self.config) for i in request.instanceBatch.instanceIds]
        else:
            ids = [translate.check_instance_id(request.instanceId, self.config)]
        outcomes = await _each(ids, lambda i: self.purge_instance(i, request.recursive, timeout))
        return pb.PurgeInstancesResponse(deletedInstanceCount=sum(deleted for deleted, _ in outcomes),
                                         isComplete=wrappers_pb2.BoolValue(value=all(whole for _, whole in outcomes)))

    async def purge_instance(
        self, instance_id: str, recursive: bool, timeout: float, parent: str | None = None
    ) -> tuple[int, bool]:
        """(instances deleted, whether the purge is whole). A recursive purge looks at the whole tree first, and
        purges it, children first (so an interrupted purge can simply be retried), only if every instance in it
        has finished: a finished parent's child may still run (it was not awaited, or the parent failed first),
        and purging the parent would leave that child where no recursive purge can reach it. Such a tree is left
        as it is, and the purge is reported not whole (isComplete=false). A running instance named itself
        counts as not deleted, as without `recursive`.

        The walk and the purge are not one instant: an instance in the tree may be rewound, restarted or replaced
        in between. Each purge therefore names the children and the execution the walk saw, and a partition keeps
        an instance that runs again, has run again or has a child the walk did not see; its ancestors are then
        kept too, so nothing is left unreachable, and the purge is reported not whole.
        """
        if not recursive:
            return (await self._purge_one(instance_id, parent, None, timeout))[0], True
        tree = await self._finished_tree(instance_id, parent, timeout, 0)
        if tree is None or tree is _RUNS_ITSELF:
            return 0, True
        if tree is _STILL_RUNNING:
            return 0, False
        return await self._purge_tree(tree, timeout)

    async def _finished_tree(self, instance_id: str, parent: str | None, timeout: float, depth: int) -> Any:
        """(id, parent, what the walk saw, [subtrees]) if the instance and all its descendants have finished;
        _RUNS_ITSELF or _STILL_RUNNING if one has not; None if the instance is gone (or is not `parent`'s child:
        a child list can name an id whose start failed because another instance had it)."""
        of_parent = {} if parent is None else {"pp": parent}
        info = await self.client.request(self.client.partition_of(instance_id),
                                         {"op": "get_children", "i": instance_id, **of_parent}, timeout)
        if info is None:
            return None
        if info["s"] not in TERMINAL_STATUSES:
            return _RUNS_ITSELF if depth == 0 else _STILL_RUNNING
        # Deeper ones are not walked, which bounds the walk; the instance that has them is then kept (not whole).
        children = info["ch"] if depth < _MAX_PURGE_DEPTH else []
        subtrees = await _each(children, lambda c: self._finished_tree(c, instance_id, timeout, depth + 1))
        if any(subtree is _STILL_RUNNING for subtree in subtrees):
            return _STILL_RUNNING
        seen = {"seen": children, "sx": info["x"]} if "x" in info else {"seen": children}
        return instance_id, parent, seen, [subtree for subtree in subtrees if subtree is not None]

    async def _purge_tree(self, tree: Any, timeout: float) -> tuple[int, bool]:
        """(instances deleted, whether the whole tree went). An instance is purged only after all of its
        subtrees went."""
        instance_id, parent, seen, subtrees = tree
        outcomes = await _each(subtrees, lambda subtree: self._purge_tree(subtree, timeout))
        deleted = sum(count for count, _ in outcomes)
        if not all(whole for _, whole in outcomes):
            return deleted, False
        count, kept = await self._purge_one(instance_id, parent, seen, timeout)
        return deleted + count, not kept

    async def _purge_one(
        self, instance_id: str, parent: str | None, seen: dict[str, Any] | None, timeout: float
    ) -> tuple[int, bool]:
        """(1 if deleted else 0, whether the instance was kept because it changed since the walk saw it: `seen`
        names its children and execution as the walk saw them)."""
        command: dict[str, Any] = {"op": "purge", "i": instance_id, **(seen or {})}
        if parent is not None:
            command["pp"] = parent
        result = await self.client.request(self.client.partition_of(instance_id), command, timeout)
        return result["deleted"], bool(result.get("kept"))

    async def _purge_by_filter(self, flt: pb.PurgeInstanceFilter, recursive: bool, timeout: float) -> pb.PurgeInstancesResponse:
        """Bounded batches on every partition until done, or until the filter's timeout (isComplete=false).
        With `recursive`, a matching instance that started sub-orchestrations is purged as a tree, as by id: whole,
        or not at all while an instance in it still runs (isComplete=false)."""
        budget = flt.timeout.seconds + flt.timeout.nanos / 1e9 if flt.HasField("timeout") else timeout
        deadline = time.monotonic() + min(budget, timeout)
        command = {
            "op": "purge_filter",
            "cf": _ms(flt, "createdTimeFrom"),
            "ct": _ms(flt, "createdTimeTo"),
            "statuses": _statuses(flt.runtimeStatus),
            "r": recursive,
        }

        async def drain(partition: int) -> tuple[int, bool]:
            """The filter's timeout decides whether another batch starts; a started batch is awaited."""
            deleted, whole, after = 0, True, None
            while True:
                if time.monotonic() >= deadline:
                    return deleted, False
                result = await self.client.request(partition, {**command, "after": after}, timeout)
                deleted += result["deleted"]
                outcomes = await _each(result.get("trees") or [], lambda root: self.purge_instance(root, True, timeout))
                deleted += sum(count for count, _ in outcomes)
                whole = whole and all(tree_whole for _, tree_whole in outcomes)
                for child, parent in result.get("children") or ():  # a partition of an earlier version
                    deleted += (await self.purge_instance(child, True, timeout, parent=parent))[0]
                if not result["more"]:
                    return deleted, whole
                after = result.get("last")

        results = await asyncio.gather(*(drain(p) for p in range(self.config.partitions)))
        return pb.PurgeInstancesResponse(
            deletedInstanceCount=sum(r[0] for r in results),
            isComplete=wrappers_pb2.BoolValue(value=all(r[1] for r in results)),
        )

    async def restart(self, request: pb.RestartInstanceRequest, timeout: float) -> pb.RestartInstanceResponse:
        """Start a terminal instance again with its original name, version, input and tags."""
        instance_id = translate.check_instance_id(request.instanceId, self.config)
        partition = self.client.partition_of(instance_id)
        if not request.restartWithNewInstanceId:  # checked and started in one command: concurrent restarts, or a
            # restart and a purge, give one new execution or a clear refusal
            command = {"op": "restart", "i": instance_id, "x": uuid.uuid4().hex}
            result = await self.client.request(partition, command, timeout)
            return pb.RestartInstanceResponse(instanceId=result["i"])
        state = await self.client.request(partition, {"op": "get", "i": instance_id, "pl": True}, timeout)
        if state is None:
            raise InstanceNotFoundError(f"no orchestration instance with id '{instance_id}'")
        if state["s"] not in TERMINAL_STATUSES:
            raise InstanceNotCompletedError(f"instance '{instance_id}' is not in a terminal state; it cannot be restarted")
        new_id = uuid.uuid4().hex
        command = {
            "op": "start",
            "i": new_id,
            "n": state["n"],
            "v": state.get("v"),
            "in": state.get("in"),
            "ss": 0,
            "tg": state.get("tg") or {},
            "reuse": sorted(TERMINAL_STATUSES),
            "x": uuid.uuid4().hex,
        }
        result = await self.client.request(self.client.partition_of(new_id), command, timeout)
        return pb.RestartInstanceResponse(instanceId=result["i"])

    async def skip_graceful_terminations(
        self, request: pb.SkipGracefulOrchestrationTerminationsRequest, timeout: float
    ) -> pb.SkipGracefulOrchestrationTerminationsResponse:
        """Terminate each instance at once, without waiting for a worker; report the ones left alone. An id named
        twice is terminated once: its second copy would find it ended, by this very call."""
        reason = request.reason.value if request.HasField("reason") else None
        ids = list(dict.fromkeys(translate.check_instance_id(i, self.config) for i in request.instanceBatch.instanceIds))
        results = await _each(ids, lambda i: self.client.request(
            self.client.partition_of(i), {"op": "force_terminate", "i": i, "out": reason}, timeout))
        left = [i for i, result in zip(ids, results, strict=True) if not result["terminated"]]
        return pb.SkipGracefulOrchestrationTerminationsResponse(unterminatedInstanceIds=left)

    async def wipe_task_hub(self, what: str, timeout: float) -> None:
        if not self.config.allow_task_hub_deletion:
            raise InstanceNotCompletedError(
                f"{what} would delete every instance; start the node with --allow-task-hub-deletion to permit it"
            )
        # Each wipe is a newer generation, so that partitions can tell messages sent before it from later ones.
        await self._all({"op": "wipe", "gen": time.time_ns()}, timeout)

    async def query_entities(self, query: pb.EntityQuery, timeout: float) -> pb.QueryEntitiesResponse:
        """Entities of every partition merged in id order; the continuation token is the last id."""
        limit = _page_size(query.pageSize.value if query.HasField("pageSize") else 0)
        command = {
            "op": "query_entities",
            "prefix": query.instanceIdStartsWith.value if query.HasField("instanceIdStartsWith") else "@",
            "after": query.continuationToken.value if query.HasField("continuationToken") else "",
            "lf": _ms(query, "lastModifiedFrom"),
            "lt": _ms(query, "lastModifiedTo"),
            "st": query.includeState,
            "tr": query.includeTransient,
            "limit": limit,
        }
        if not command["prefix"].startswith("@"):
            command["prefix"] = "@" + command["prefix"]
        pages = await self._all(command, timeout)
        merged = list(heapq.merge(*pages, key=lambda m: m["i"]))
        page = merged[:limit]
        more = len(merged) > limit or any(len(p) >= limit for p in pages)
        entities = _that_fit([translate.entity_metadata(m) for m in page], self.config.max_request_bytes)
        more = more or len(entities) < len(page)
        page = page[: len(entities)]
        token = wrappers_pb2.StringValue(value=page[-1]["i"]) if more and page else None
        return pb.QueryEntitiesResponse(entities=entities, continuationToken=token)

    async def clean_entities(self, request: pb.CleanEntityStorageRequest, timeout: float) -> pb.CleanEntityStorageResponse:
        """Remove empty entities; release locks whose owning orchestration no longer runs."""
        results = await self._all({"op": "clean_entities", "empty": request.removeEmptyEntities}, timeout)
        released = 0
        if request.releaseOrphanedLocks:
            for entity_id, owner, *section in (lock for result in results for lock in result["locks"]):
                state = await self.client.request(self.client.partition_of(owner), {"op": "get", "i": owner}, timeout)
                if state is None or state["s"] in TERMINAL_STATUSES:
                    release = {"op": "release_lock", "i": entity_id, "owner": owner, **({"cs": section[0]} if section else {})}
                    answer = await self.client.request(self.client.partition_of(entity_id), release, timeout)
                    released += int(answer["released"])
        return pb.CleanEntityStorageResponse(
            emptyEntitiesRemoved=sum(r["removed"] for r in results), orphanedLocksReleased=released
        )

    async def history(self, request: pb.StreamInstanceHistoryRequest, timeout: float) -> AsyncIterator[bytes]:
        """The committed history in chunks of about 1 MiB, as serialized HistoryChunk messages."""
        instance_id = translate.check_instance_id(request.instanceId, self.config)
        command = {"op": "history", "i": instance_id, "x": request.executionId.value or None}
        result = await self.client.request(self.client.partition_of(instance_id), command, timeout)
        if result is None:
            raise InstanceNotFoundError(f"no history for instance '{instance_id}' (or for that execution id)")
        chunk: list[bytes] = []
        size = 0
        for event in result["events"]:
            if chunk and size + len(event) > _HISTORY_CHUNK_BYTES:
                yield _history_chunk(chunk)
                chunk, size = [], 0
            chunk.append(event)
            size += len(event)
        yield _history_chunk(chunk)


def _history_chunk(events: list[bytes]) -> bytes:
    """HistoryChunk.events is field 1: each event is appended as it is stored, with no decoding."""
    return b"".join(length_delimited(1, event) for event in events)
