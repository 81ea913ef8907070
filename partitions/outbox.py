"""Sending a partition's outbox to its peers: in order, resent until acknowledged.

The rows were written in the same transaction as their cause. The receiver applies them and records
the sender's sequence number in one transaction, then acks; deleting acked rows is a command of the
next batch. Together that makes every cross-partition effect exactly-once.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from partitions.store.lmdb_store import StoreTxn
from runtime.config import Config
from runtime.router.channel import ZmqChannel

if TYPE_CHECKING:
    from partitions.process import PartitionProcess

log = logging.getLogger(__name__)

_MAX_ROWS_PER_FRAME = 500
# Rows sent and not yet acknowledged, per destination. An ack makes room for more. Without a bound, a
# resend to a peer that is down would queue its whole backlog again every resend interval.
WINDOW_ROWS = 4 * _MAX_ROWS_PER_FRAME


class Outbox:
    def __init__(self, process: PartitionProcess, config: Config) -> None:
        self.process = process
        self.config = config
        self.peers: dict[int, ZmqChannel] = {}
        self.sent: dict[int, int] = {}  # highest seq sent per destination
        self.acked: dict[int, int] = {}  # highest seq acknowledged per destination
        self.progress_ms: dict[int, int] = {}
        self.dirty: set[int] = set()

    def start(self) -> None:
        """After a restart, everything still in the outbox is unacknowledged: send it again."""
        txn = self.process.store.begin()
        try:
            for destination in txn.outbox_destinations():
                first = txn.outbox_from(destination, 0, 1)
                base = first[0][0] - 1 if first else 0
                self.sent[destination] = self.acked[destination] = base
                self.dirty.add(destination)
            self.flush_new(txn)
        finally:
            txn.abort()

    def peer(self, destination: int) -> ZmqChannel:
        channel = self.peers.get(destination)
        if channel is None:
            identity = b"p%d" % self.process.partition
            channel = ZmqChannel.dealer(
                self.process.ctx, self.config.partition_endpoint(destination), identity
            )
            self.peers[destination] = channel
        return channel

    def wake(self, destination: int) -> None:
        self.dirty.add(destination)

    def flush_new(self, txn: StoreTxn) -> None:
        """Send rows written since the last send, for every destination that has some."""
        if not self.dirty:
            return
        dirty, self.dirty = self.dirty, set()
        for destination in dirty:
            after = self.sent.get(destination, 0)
            acked = self.acked.get(destination, 0)
            limit = min(_MAX_ROWS_PER_FRAME, acked + WINDOW_ROWS - after)
            if limit <= 0:
                continue  # the window is full: the next ack marks the destination dirty again
            rows = txn.outbox_from(destination, after, limit)
            if not rows:
                continue
            if after <= acked:
                self.progress_ms[destination] = _now_ms()  # nothing was in flight: the resend clock starts now
            self.sent[destination] = rows[-1][0]
            self.peer(destination).send({
                "op": "deliver", "from": self.process.partition, "gen": self.process.state.hub_generation,
                "msgs": [[seq, body] for seq, body in rows],
            })
            if len(rows) == limit:
                self.dirty.add(destination)

    def on_ack(self, destination: int, seq: int, commands: list[dict[str, Any]]) -> None:
        if seq > self.acked.get(destination, 0):
            self.acked[destination] = seq
            self.progress_ms[destination] = _now_ms()
            self.sent[destination] = max(self.sent.get(destination, 0), seq)
            self.dirty.add(destination)  # room in the window for rows that waited
            commands.append({"op": "acked", "dest": destination, "seq": seq})

    def resend_due(self, now_ms: int) -> None:
        """Rows sent but not acked for a resend interval go again, from the first unacked one."""
        interval_ms = int(self.config.outbox_resend_interval_s * 1000)
        for destination, sent in self.sent.items():
            acked = self.acked.get(destination, 0)
            if sent > acked and now_ms - self.progress_ms.get(destination, 0) >= interval_ms:
                log.info("partition %d: resending outbox to %d from seq %d", self.process.partition, destination, acked + 1)
                self.sent[destination] = acked
                self.progress_ms[destination] = now_ms
                self.dirty.add(destination)

    def send_ack(self, sender: int, seq: int) -> None:
        self.peer(sender).send({"op": "ack", "from": self.process.partition, "seq": seq})

    def close(self) -> None:
        for channel in self.peers.values():
            channel.close()


def _now_ms() -> int:
    return int(time.time() * 1000)
