"""Work-item flow control at the gateway: worker streams, their limits, and credits to partitions.

The gateway never grants more credits than its connected streams have free slots, so work waits in
LMDB rather than in memory, and no stream gets more than its maxConcurrent* allows.

- Groups: streams with the same workItemFilters form a group (no filters: group "*"). Credits are
  granted per (partition, group, kind), and a partition only spends a group's credits on work that
  the group's filter accepts. Work no connected group accepts stays pending in LMDB.
- Standing credits: each partition may hold a small share (`keep`) of a group's free capacity, so
  new work is dispatched straight after its commit, without a round trip to ask for credit. It is
  refilled to `keep` once it falls below half of that, so credit messages come in bulk. The price: when
  all ready work is on one partition, the shares the others hold (together under a quarter of the
  limit) are not used for it until they are spent elsewhere.
- Demand: a partition with more ready work than credits says how much; every group with free
  capacity is offered that much once. Credits above `keep` that a partition cannot spend come back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from runtime.gateway.partition_client import PartitionClient
from runtime.router.channel import Message

log = logging.getLogger(__name__)

KINDS = ("o", "a", "e")  # orchestrations, activities, entities
ALL = "*"  # the group of streams without filters

Filters = dict[str, dict[str, list[str]] | None]  # kind -> (name -> versions, [] = any) or None = all


def group_of(filters: Filters | None) -> str:
    """A stable id for a filter set; streams without filters share the group '*'."""
    if filters is None:
        return ALL
    canonical = json.dumps({k: filters.get(k) for k in KINDS}, sort_keys=True)
    return hashlib.sha1(canonical.encode()).hexdigest()[:12]


@dataclass(eq=False)
class WorkerStream:
    """One GetWorkItems call: its limits and filters, the tokens it holds, and items to be written."""

    limits: dict[str, int]
    filters: Filters | None = None
    inflight: dict[str, set[str]] = field(default_factory=lambda: {kind: set() for kind in KINDS})
    items: deque[bytes] = field(default_factory=deque)  # delivered, not yet written to the stream
    ended: bool = False  # the node is draining: write what is left, then end with OK

    def __post_init__(self) -> None:
        self.group = group_of(self.filters)
        self._waiter: asyncio.Future[None] | None = None

    def free(self, kind: str) -> int:
        return self.limits[kind] - len(self.inflight[kind])

    def push(self, item: bytes) -> None:
        self.items.append(item)
        self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    async def wait(self, timeout_s: float) -> None:
        """Until an item arrives, the stream is ended, or `timeout_s` passes (one future, one timer)."""
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = loop.call_later(timeout_s, _settle, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None:
            _settle(self._waiter)


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class WorkDispatcher:
    def __init__(self, client: PartitionClient) -> None:
        self.client = client
        self.partitions = client.config.partitions
        self.streams: list[WorkerStream] = []
        # (partition, group, kind) -> credits granted and not yet used or returned
        self.outstanding: dict[tuple[int, str, str], int] = defaultdict(int)
        self.demand = [dict.fromkeys(KINDS, 0) for _ in range(self.partitions)]
        self.keep: dict[tuple[str, str], int] = {}
        self.owner: dict[str, tuple[WorkerStream, str, int]] = {}
        self._rotation = 0
        self._turn = 0
        self._grant_scheduled = False
        self.accepting = True  # False while draining: no new credits, standing credits are withdrawn

    # streams
    def add_stream(self, stream: WorkerStream) -> None:
        self.streams.append(stream)
        self.schedule_grant()

    def end_streams(self) -> None:
        for stream in self.streams:
            stream.end()

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
        self.schedule_grant()

    def held_leases(self) -> dict[int, list[str]]:
        """The tokens the streams hold, by partition, for the heartbeats that renew their leases. A worker may
        hold an item long before it starts it (the SDK queues every kind behind one thread pool), and an
        activity or entity batch runs user code for as long as it takes."""
        held: dict[int, list[str]] = defaultdict(list)
        for token, (_, _, partition) in self.owner.items():
            held[partition].append(token)
        return held

    def completed(self, token: str) -> None:
        """A Complete* or Abandon* call for `token` arrived: its slot is free again."""
        entry = self.owner.pop(token, None)
        if entry is not None:
            stream, kind, _ = entry
            stream.inflight[kind].discard(token)
            self.schedule_grant()

    # messages from partitions
    def on_message(self, partition: int, message: Message) -> None:
        op = message.get("op")
        kind = message.get("k", "")
        group = message.get("g", ALL)
        if op == "wi":
            self._spent(partition, group, kind, 1)
            self._deliver(partition, group, kind, message["tok"], message["wi"])
        elif op == "ret":
            self._spent(partition, group, kind, int(message.get("n", 0)))
            self.schedule_grant()
        elif op == "demand":
            for k in KINDS:
                self.demand[partition][k] = int(message.get(k, 0))
            self.schedule_grant()
        elif op == "expired":
            # The partition took the item back (its lease ran out): the stream's slot is free again.
            self.completed(str(message.get("tok", "")))

    def on_partition_restart(self, partition: int) -> None:
        """The partition holds none of our credits any more: it restarted, or dropped us while we were silent."""
        for slot in [s for s in self.outstanding if s[0] == partition]:
            del self.outstanding[slot]
        self.demand[partition] = dict.fromkeys(KINDS, 0)
        self.schedule_grant()

    def _deliver(self, partition: int, group: str, kind: str, token: str, item: bytes) -> None:
        """To the group's stream with the most free slots; ties take turns, so an item one worker
        rejected (e.g. for its version) also reaches the others."""
        members = [s for s in self.streams if s.group == group]
        self._turn += 1
        ranked = [(s.free(kind), (i - self._turn) % len(members), s) for i, s in enumerate(members)]
        best = max(ranked, key=lambda r: r[:2])[2] if ranked else None
        if best is None or best.free(kind) <= 0 or not self.accepting:
            self.client.send(partition, {"op": "abandon", "tok": token, "quiet": True})
            return
        best.inflight[kind].add(token)
        self.owner[token] = (best, kind, partition)
        best.push(item)

    # credits
    def schedule_grant(self) -> None:
        """Grant once at the end of this loop turn, however many completions and messages it brought."""
        if not self._grant_scheduled:
            self._grant_scheduled = True
            asyncio.get_running_loop().call_soon(self.grant)

    def grant(self) -> None:
        """Offer unmet demand to every group with room, then top partitions up to the standing level."""
        self._grant_scheduled = False
        self._rotation = (self._rotation + 1) % self.partitions
        order = [(self._rotation + offset) % self.partitions for offset in range(self.partitions)]
        groups: dict[str, list[WorkerStream]] = defaultdict(list)
        for stream in self.streams:
            groups[stream.group].append(stream)
        for kind in KINDS:
            offered = dict.fromkeys(order, 0)
            for group, members in groups.items():
                for partition, given in self._grant_group(kind, group, members, order).items():
                    offered[partition] = max(offered[partition], given)
            for group in [g for (g, k) in self.keep if k == kind and g not in groups]:
                self._withdraw(kind, group)  # the group's last stream is gone
            for partition, given in offered.items():
                # Demand is offered to every group once. A partition reports again whenever what it
                # holds changes, so what it spends is refilled as soon as slots free up.
                self.demand[partition][kind] = max(0, self.demand[partition][kind] - given)

    def _grant_group(self, kind: str, group: str, members: list[WorkerStream], order: list[int]) -> dict[int, int]:
        """Credits for one group; returns what each partition got on account of its demand."""
        capacity = sum(max(0, s.free(kind)) for s in members) if self.accepting else 0
        free = capacity - sum(self.outstanding[(p, group, kind)] for p in order)
        keep = (capacity + sum(len(s.inflight[kind]) for s in members)) // (4 * self.partitions)
        keep = keep if self.accepting else 0
        grants = dict.fromkeys(order, 0)
        for partition in order:
            want = min(self.demand[partition][kind], free)
            if want > 0:
                grants[partition] += want
                free -= want
        for_demand = dict(grants)
        low_water = (keep + 1) // 2
        for partition in order:
            held = self.outstanding[(partition, group, kind)] + grants[partition]
            if held >= low_water:
                continue  # refill in bulk, not one credit message per dispatched item
            top_up = min(keep - held, free)
            if top_up > 0:
                grants[partition] += top_up
                free -= top_up
        keep_changed = keep != self.keep.get((group, kind))
        self.keep[(group, kind)] = keep
        spec = _filter_spec(members[0].filters, kind)
        for partition, given in grants.items():
            if given or keep_changed:
                self.outstanding[(partition, group, kind)] += given
                message: dict[str, Any] = {"op": "credit", "k": kind, "g": group, "n": given, "keep": keep}
                if group != ALL:
                    message["f"] = spec
                self.client.send(partition, message)
        return for_demand

    def _spent(self, partition: int, group: str, kind: str, n: int) -> None:
        """`n` credits of a slot came back or were used. A group without streams is forgotten once it holds none:
        every distinct set of work-item filters is a group of its own."""
        slot = (partition, group, kind)
        self.outstanding[slot] = max(0, self.outstanding[slot] - n)
        if not self.outstanding[slot] and (group, kind) not in self.keep:
            del self.outstanding[slot]

    def _withdraw(self, kind: str, group: str) -> None:
        """A group with no streams left: the partitions hand back its credits and forget it ("end")."""
        del self.keep[(group, kind)]
        for partition in range(self.partitions):
            slot = (partition, group, kind)
            self.client.send(partition, {"op": "credit", "k": kind, "g": group, "n": 0, "keep": 0, "end": True})
            if not self.outstanding.get(slot):
                self.outstanding.pop(slot, None)

    def held_count(self) -> int:
        return len(self.owner)


def _filter_spec(filters: Filters | None, kind: str) -> dict[str, list[str]] | None:
    return None if filters is None else filters.get(kind)
