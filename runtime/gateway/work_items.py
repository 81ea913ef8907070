"""Work-item flow control at the gateway: worker streams, their limits, and credits to partitions.

Partitions report how much ready work they hold (demand). The gateway grants credits only up to the
free capacity of its connected streams, so work waits in LMDB rather than in memory, and no stream
gets more than its maxConcurrent* allows. A partition returns credits it cannot spend.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from runtime.gateway.partition_client import PartitionClient
from runtime.router.channel import Message

log = logging.getLogger(__name__)

KINDS = ("o", "a")


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
        self.owner: dict[str, tuple[WorkerStream, str, int]] = {}
        self._rotation = 0
        self.accepting = True

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
            self.demand[partition][kind] = self.outstanding[partition][kind]  # nothing more to give until re-reported
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
        """Give credits to partitions with unmet demand, up to the streams' free capacity."""
        if not self.accepting:
            return
        count = len(self.outstanding)
        self._rotation = (self._rotation + 1) % count
        for kind in KINDS:
            free = sum(max(0, s.free(kind)) for s in self.streams)
            free -= sum(o[kind] for o in self.outstanding)
            for offset in range(count):
                if free <= 0:
                    break
                partition = (self._rotation + offset) % count
                want = self.demand[partition][kind] - self.outstanding[partition][kind]
                if want > 0:
                    given = min(want, free)
                    self.outstanding[partition][kind] += given
                    free -= given
                    self.client.send(partition, {"op": "credit", "k": kind, "n": given})

    def held_count(self) -> int:
        return len(self.owner)
