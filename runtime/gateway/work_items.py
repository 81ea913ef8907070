"""Work-item flow control at the gateway: worker streams, their limits, and credits to partitions.

The gateway never grants more credits than its connected streams have free slots, so work waits in
LMDB rather than in memory, and no stream gets more than its maxConcurrent* allows.

- Standing credits: each partition may hold a small share (`keep`) of the free capacity, so new work
  is dispatched straight after its commit, without a round trip to ask for credit.
- Demand: a partition that has more ready work than credits says how much; the gateway grants more
  from the capacity nobody holds. Credits above `keep` that a partition cannot spend come back.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from runtime.gateway.partition_client import PartitionClient
from runtime.router.channel import Message

log = logging.getLogger(__name__)

KINDS = ("o", "a", "e")  # orchestrations, activities, entities


@dataclass(eq=False)
class WorkerStream:
    """One GetWorkItems call: its limits, the tokens it holds, and the items waiting to be written."""

    limits: dict[str, int]
    inflight: dict[str, set[str]] = field(default_factory=lambda: {kind: set() for kind in KINDS})
    queue: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)

    def free(self, kind: str) -> int:
        return self.limits[kind] - len(self.inflight[kind])


class WorkDispatcher:
    def __init__(self, client: PartitionClient) -> None:
        self.client = client
        count = client.config.partitions
        self.streams: list[WorkerStream] = []
        self.outstanding = [dict.fromkeys(KINDS, 0) for _ in range(count)]
        self.demand = [dict.fromkeys(KINDS, 0) for _ in range(count)]
        self.keep = dict.fromkeys(KINDS, 0)
        self.owner: dict[str, tuple[WorkerStream, str, int]] = {}
        self._rotation = 0
        self.accepting = True  # False while draining: no new credits, standing credits are withdrawn

    # streams
    def add_stream(self, stream: WorkerStream) -> None:
        self.streams.append(stream)
        self.grant()

    def remove_stream(self, stream: WorkerStream) -> None:
        """The stream ended: whatever it held goes back to its partition's queue at once."""
        if stream in self.streams:
            self.streams.remove(stream)
        for kind in KINDS:
            for token in stream.inflight[kind]:
                entry = self.owner.pop(token, None)
                if entry is not None:
                    self.client.send(entry[2], {"op": "abandon", "tok": token, "quiet": True})
            stream.inflight[kind].clear()
        self.grant()

    def completed(self, token: str) -> None:
        """A Complete* or Abandon* call for `token` arrived: its slot is free again."""
        entry = self.owner.pop(token, None)
        if entry is not None:
            stream, kind, _ = entry
            stream.inflight[kind].discard(token)
            self.grant()

    # messages from partitions
    def on_message(self, partition: int, message: Message) -> None:
        op = message.get("op")
        kind = message.get("k", "")
        if op == "wi":
            self.outstanding[partition][kind] = max(0, self.outstanding[partition][kind] - 1)
            self._deliver(partition, kind, message["tok"], message["wi"])
        elif op == "ret":
            count = int(message.get("n", 0))
            self.outstanding[partition][kind] = max(0, self.outstanding[partition][kind] - count)
            self.grant()
        elif op == "demand":
            for k in KINDS:
                self.demand[partition][k] = int(message.get(k, 0))
            self.grant()

    def on_partition_restart(self, partition: int) -> None:
        self.outstanding[partition] = dict.fromkeys(KINDS, 0)
        self.demand[partition] = dict.fromkeys(KINDS, 0)

    def _deliver(self, partition: int, kind: str, token: str, item: bytes) -> None:
        best = max(self.streams, key=lambda s: s.free(kind), default=None)
        if best is None or best.free(kind) <= 0 or not self.accepting:
            self.client.send(partition, {"op": "abandon", "tok": token, "quiet": True})
            return
        best.inflight[kind].add(token)
        self.owner[token] = (best, kind, partition)
        best.queue.put_nowait(item)

    def grant(self) -> None:
        """Grant unmet demand first, then top every partition up to the standing level."""
        count = len(self.outstanding)
        self._rotation = (self._rotation + 1) % count
        order = [(self._rotation + offset) % count for offset in range(count)]
        for kind in KINDS:
            capacity = sum(max(0, s.free(kind)) for s in self.streams) if self.accepting else 0
            free = capacity - sum(o[kind] for o in self.outstanding)
            keep = (capacity + sum(len(s.inflight[kind]) for s in self.streams)) // (4 * count)
            keep = keep if self.accepting else 0
            grants = [0] * count
            for partition in order:
                want = min(self.demand[partition][kind], free)
                if want > 0:
                    grants[partition] += want
                    free -= want
                    self.demand[partition][kind] -= want
            for partition in order:
                top_up = min(keep - self.outstanding[partition][kind] - grants[partition], free)
                if top_up > 0:
                    grants[partition] += top_up
                    free -= top_up
            keep_changed = keep != self.keep[kind]
            self.keep[kind] = keep
            for partition, given in enumerate(grants):
                if given or keep_changed:
                    self.outstanding[partition][kind] += given
                    self.client.send(partition, {"op": "credit", "k": kind, "n": given, "keep": keep})

    def held_count(self) -> int:
        return len(self.owner)
