"""A real gateway PartitionClient facing a partition whose side of the wire the test plays, message by message,
on a real ZeroMQ ROUTER socket."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import zmq

from runtime.config import Config
from runtime.gateway.partition_client import PartitionClient
from runtime.router.channel import Message, ZmqChannel

DEADLINE_S = 10.0
NextOp = Callable[[str], Awaitable[tuple[bytes, Message]]]


def drive(tmp_path: Path, body: Callable[[PartitionClient, ZmqChannel, NextOp], Awaitable[None]]) -> None:
    """Run `body(client, partition, next_op)` once the client knows the partition's epoch, 1. `next_op(op)` is the
    next message with `op` the partition socket received (with its sender), those before it passed over."""
    config = Config(data_dir=str(tmp_path / "data"), partitions=1, heartbeat_interval_s=3600.0)
    os.makedirs(config.runtime_dir(), exist_ok=True)

    async def main() -> None:
        ctx = zmq.Context()
        partition = ZmqChannel.router(ctx, config.partition_endpoint(0))
        client = PartitionClient(config, on_message=lambda p, m: None)
        client.start()
        received: list[tuple[bytes, Message]] = []  # in arrival order, not yet looked at

        async def next_op(op: str) -> tuple[bytes, Message]:
            while True:
                while received:
                    sender, message = received.pop(0)
                    if message.get("op") == op:
                        return sender, message
                received.extend(await partition.recv())  # type: ignore[arg-type]

        try:
            gateway, _ = await next_op("hb")  # the client's first heartbeat
            partition.send({"op": "hb", "p": 0, "ep": 1}, to=gateway)
            while not client.ready():
                await asyncio.sleep(0.005)
            await body(client, partition, next_op)
        finally:
            client.close()
            partition.close()
            ctx.term()

    try:
        asyncio.run(asyncio.wait_for(main(), DEADLINE_S))
    finally:
        shutil.rmtree(config.runtime_dir(), ignore_errors=True)
