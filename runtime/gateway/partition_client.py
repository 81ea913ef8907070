"""The gateway's side of the router: one DEALER socket per partition, requests matched to replies."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import uuid
from collections.abc import Callable
from typing import Any

import zmq

from runtime.config import Config
from runtime.errors import PartitionUnavailableError, error_from_wire
from runtime.hashing import partition_for
from runtime.router.channel import Message, ZmqChannel

log = logging.getLogger(__name__)


class PartitionClient:
    """Sends commands to the partition owning an instance and awaits the committed answer."""

    def __init__(self, config: Config, on_message: Callable[[int, Message], None]) -> None:
        self.config = config
        self.identity = f"g{os.getpid()}-{uuid.uuid4().hex[:8]}".encode()
        self.ctx = zmq.Context()
        self.channels = [
            ZmqChannel.dealer(self.ctx, config.partition_endpoint(p), self.identity) for p in range(config.partitions)
        ]
        self.epochs: list[int | None] = [None] * config.partitions
        self.last_heard: list[float] = [0.0] * config.partitions
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[int, asyncio.Future[Any], Message]] = {}
        # After a restart: barrier heartbeat id -> (partition, requests of unknown fate); see _partition_restarted.
        self._doubtful: dict[int, tuple[int, set[int]]] = {}
        self._barriers = itertools.count(1)
        self._on_message = on_message
        self._tasks: list[asyncio.Task[None]] = []
        self.on_restart: Callable[[int], None] = lambda partition: None
        # The work-item tokens this gateway's streams hold, by partition: heartbeats renew exactly those.
        self.held_leases: Callable[[], dict[int, list[str]]] = dict

    def partition_of(self, instance_id: str) -> int:
        return partition_for(instance_id, self.config.partitions)

    def start(self) -> None:
        for partition, channel in enumerate(self.channels):
            channel.subscribe(functools.partial(self._receive, partition))
        self._tasks.append(asyncio.create_task(self._heartbeat()))

    def send(self, partition: int, message: Message) -> None:
        self.channels[partition].send(message)

    async def request(self, partition: int, message: Message, timeout_s: float) -> Any:
        """Send a command and wait for its reply; raises the partition's error, or UNAVAILABLE on timeout."""
        rid = next(self._ids)
        message["rid"] = rid
        if self.epochs[partition] is not None:
            # A partition refuses a change addressed to an epoch it is not in: one that waited in the socket
            # while the partition restarted comes back refused, unapplied, and is sent again (_resolve).
            message["gep"] = self.epochs[partition]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending[rid] = (partition, future, message)
        self.channels[partition].send(message)
        timer = loop.call_later(max(timeout_s, 0.001), _expire, future, partition, timeout_s)
        try:
            return await future
        finally:
            timer.cancel()
            self._pending.pop(rid, None)
            if message.get("op") == "wait" and (
                not future.done() or future.cancelled() or future.exception() is not None
            ):
                # The caller went away (or gave up): the partition's waiter would otherwise live to its deadline.
                self.channels[partition].send({"op": "unwait", "i": message.get("i"), "rid": rid})

    def ready(self) -> bool:
        """Every partition has answered a heartbeat, and none has been silent for --gateway-timeout-s (after
        which it would drop this gateway too): requests to a partition that is down, stuck or cut off fail."""
        return all(epoch is not None for epoch in self.epochs) and not self.silent_partitions()

    def silent_partitions(self) -> list[int]:
        silent_since = asyncio.get_running_loop().time() - self.config.gateway_timeout_s
        return [p for p, heard in enumerate(self.last_heard) if heard < silent_since]

    def _receive(self, partition: int, messages: list[tuple[bytes | None, Message]]) -> None:
        self.last_heard[partition] = asyncio.get_running_loop().time()
        for _, message in messages:
            try:
                op = message.get("op")
                if op == "reply":
                    if "ep" in message:  # a refusal for a past epoch says which epoch the partition is in
                        self._note_epoch(partition, int(message["ep"]))
                    self._resolve(partition, message)
                elif op == "hb":
                    self._note_epoch(partition, int(message["ep"]))
                    if "bar" in message:
                        self._passed_barrier(partition, int(message["bar"]))
                elif op == "forgot":
                    log.warning("partition %d dropped this gateway after a silence; granting it work again", partition)
                    self._note_epoch(partition, int(message["ep"]))
                    self._resend_reads(partition, ("wait",))  # it dropped our parked waits with us
                    self.on_restart(partition)
                else:
                    if "ep" in message:
                        self._note_epoch(partition, int(message["ep"]))
                    self._on_message(partition, message)
            except Exception:  # one bad message must not cost the others in its frame
                log.exception("gateway: could not handle %r from partition %d", message.get("op"), partition)

    def _resolve(self, partition: int, message: Message) -> None:
        rid = message.get("rid", -1)
        entry = self._pending.get(rid)
        if entry is None or entry[1].done():
            return
        future, request = entry[1], entry[2]
        if "err" in message:
            code, text = message["err"]
            if code == "stale_epoch" and request.get("gep") != self.epochs[partition]:
                # Refused unapplied by the restarted partition: send it again, for the epoch it is in now.
                for _, doubtful in self._doubtful.values():
                    doubtful.discard(rid)
                request["gep"] = self.epochs[partition]
                self.channels[partition].send(request)
                return
            future.set_exception(PartitionUnavailableError(text) if code == "stale_epoch" else error_from_wire(code, text))
        else:
            future.set_result(message.get("ok"))

    def _note_epoch(self, partition: int, epoch: int) -> None:
        previous = self.epochs[partition]
        self.epochs[partition] = epoch
        if previous is not None and previous != epoch:
            log.warning("partition %d restarted (epoch %d -> %d)", partition, previous, epoch)
            self._partition_restarted(partition)

    def _partition_restarted(self, partition: int) -> None:
        """Waits and gets are idempotent: they are sent again. Any other request in flight either reached the
        old process (which may or may not have committed it before it died), or waited in the socket and
        reaches the new one, which refuses it unapplied because it names the old epoch; then it is sent
        again. Which one is known once a heartbeat sent now comes back: the partition answers in order."""
        for barrier in [b for b, (p, _) in self._doubtful.items() if p == partition]:
            del self._doubtful[barrier]  # restarted again before answering it: its requests are counted below
        self._resend_reads(partition, ("wait", "get"))
        doubtful = set()
        for rid, (p, future, message) in list(self._pending.items()):
            if p != partition or future.done() or message.get("op") in ("wait", "get"):
                continue
            if "gep" in message:
                doubtful.add(rid)
            else:  # sent before we knew any epoch of this partition
                future.set_exception(_maybe_lost(partition))
        if doubtful:
            barrier = next(self._barriers)
            self._doubtful[barrier] = (partition, doubtful)
            self.channels[partition].send({"op": "hb", "bar": barrier})
        self.on_restart(partition)

    def _resend_reads(self, partition: int, ops: tuple[str, ...]) -> None:
        """Send the pending requests with these ops to `partition` again: they only read, and a partition parks
        a wait it already holds only once."""
        for p, future, message in list(self._pending.values()):
            if p == partition and not future.done() and message.get("op") in ops:
                self.channels[partition].send(message)

    def _passed_barrier(self, partition: int, barrier: int) -> None:
        """Requests of unknown fate that the new process has not refused by now went to the old one."""
        for rid in self._doubtful.pop(barrier, (partition, set()))[1]:
            entry = self._pending.get(rid)
            if entry is not None and not entry[1].done():
                entry[1].set_exception(_maybe_lost(partition))

    async def _heartbeat(self) -> None:
        while True:
            held = self.held_leases()
            for partition, channel in enumerate(self.channels):
                channel.send({"op": "hb", "held": held.get(partition, [])})
            await asyncio.sleep(self.config.heartbeat_interval_s)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for channel in self.channels:
            channel.close()
        self.ctx.term()


def _maybe_lost(partition: int) -> PartitionUnavailableError:
    return PartitionUnavailableError(f"partition {partition} restarted; the request may not have taken effect")


def _expire(future: asyncio.Future[Any], partition: int, timeout_s: float) -> None:
    if not future.done():
        future.set_exception(
            PartitionUnavailableError(f"partition {partition} did not answer within {timeout_s:.1f}s")
        )
