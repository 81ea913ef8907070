"""The outbox's send window (partitions/outbox.py), over a real LMDB store and real ZeroMQ sockets.

A peer that does not acknowledge gets at most WINDOW_ROWS rows per resend interval, not the whole backlog
again each time; each ack lets the rows behind it go.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import zmq

from partitions.outbox import WINDOW_ROWS, Outbox
from partitions.state_machine.state import CoreState
from partitions.store.lmdb_store import LmdbStore
from runtime.config import Config
from runtime.router.channel import ZmqChannel

DEADLINE_S = 10.0
BACKLOG = 3 * WINDOW_ROWS + 7


class Sender:
    """What the outbox uses of its partition process: the store, the ZeroMQ context, the index and the state."""

    def __init__(self, store: LmdbStore, ctx: zmq.Context) -> None:
        self.store, self.ctx, self.partition = store, ctx, 0
        self.state = CoreState(partition=0, partition_count=2, epoch=1)


def test_an_unacknowledged_backlog_goes_one_window_at_a_time(tmp_path: Path) -> None:
    config = Config(data_dir=str(tmp_path / "data"), partitions=2)
    os.makedirs(config.runtime_dir(), exist_ok=True)
    store = LmdbStore(str(tmp_path / "store"), 1 << 30)
    txn = store.begin(write=True)
    for seq in range(1, BACKLOG + 1):
        txn.put_outbox(1, seq, {"op": "raise", "n": seq})
    txn.commit()

    async def main() -> None:
        ctx = zmq.Context()
        peer = ZmqChannel.router(ctx, config.partition_endpoint(1))
        outbox = Outbox(Sender(store, ctx), config)

        def flush_after_batches() -> None:
            """What the partition does after each batch, for as many batches as the outbox wants to send."""
            for _ in range(100):
                if not outbox.dirty:
                    return
                read = store.begin()
                try:
                    outbox.flush_new(read)
                finally:
                    read.abort()
            raise AssertionError("the outbox kept asking to send")

        async def arrive(count: int) -> list[int]:
            seqs: list[int] = []
            while len(seqs) < count:
                for _, message in await peer.recv():
                    seqs.extend(seq for seq, _ in message["msgs"])
            return seqs

        try:
            outbox.start()  # as after a restart: the whole outbox is unacknowledged
            flush_after_batches()
            assert outbox.sent[1] == WINDOW_ROWS
            assert await arrive(WINDOW_ROWS) == list(range(1, WINDOW_ROWS + 1))

            # No ack within the resend interval: it starts again at the first row, and again sends one window.
            outbox.resend_due(int(time.time() * 1000) + int(config.outbox_resend_interval_s * 1000))
            flush_after_batches()
            assert outbox.sent[1] == WINDOW_ROWS
            assert await arrive(WINDOW_ROWS) == list(range(1, WINDOW_ROWS + 1))

            # An ack lets exactly as many rows go as it acknowledged.
            commands: list[dict[str, object]] = []
            outbox.on_ack(1, 100, commands)
            assert commands == [{"op": "acked", "dest": 1, "seq": 100}]
            flush_after_batches()
            assert outbox.sent[1] == WINDOW_ROWS + 100
            assert await arrive(100) == list(range(WINDOW_ROWS + 1, WINDOW_ROWS + 101))
        finally:
            outbox.close()
            peer.close()
            ctx.term()

    try:
        asyncio.run(asyncio.wait_for(main(), DEADLINE_S))
    finally:
        store.close()
