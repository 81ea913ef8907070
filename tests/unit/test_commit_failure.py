"""A batch whose commit fails (here: the store may not grow, as on a full disk) answers every request in it
UNAVAILABLE, and nothing else: a refusal that rested on an earlier command of the batch is not sent.
A real partition store and real ZeroMQ sockets; the failure is a real one (RLIMIT_FSIZE)."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import zmq

from partitions.process import PartitionProcess, now_ms
from runtime.router.channel import decode, encode

GATEWAY = b"g-commit-test"
BIG_INPUT = '"' + "x" * (256 << 10) + '"'  # needs fresh pages: the store must grow to hold it


@contextmanager
def store_cannot_grow(path: str) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_refusal_in_a_batch_whose_commit_fails_is_not_sent(process: PartitionProcess) -> None:
    async def body() -> list[dict]:
        process.channel = process.bind()
        ctx = zmq.Context()
        gateway = ctx.socket(zmq.DEALER)
        gateway.setsockopt(zmq.IDENTITY, GATEWAY)
        gateway.setsockopt(zmq.LINGER, 0)
        gateway.connect(process.config.partition_endpoint(0))
        try:
            gateway.send(encode([{"op": "hb"}]))
            assert await asyncio.wait_for(process.channel.recv(), 5.0)  # the partition can answer us now
            # A start, and its retry in the same batch: the retry is refused ALREADY_EXISTS because of the first.
            start = {"op": "start", "i": "b", "n": "Orch", "in": BIG_INPUT, "_from": GATEWAY}
            commands = [{**start, "rid": 1}, {**start, "rid": 2}]
            data_file = os.path.join(process.config.partition_data_dir(0), "data.mdb")
            with store_cannot_grow(data_file):
                assert process.apply_batch(commands, now_ms()) == []
            process.channel.flush()
            replies: list[dict] = []
            while len(replies) < 2:
                assert gateway.poll(5000), f"only {replies} arrived"
                replies.extend(m for m in decode(gateway.recv()) if m.get("op") == "reply")
            assert not gateway.poll(200)  # and nothing after them
            return replies
        finally:
            gateway.close()
            ctx.term()

    replies = asyncio.run(body())
    assert [(r["rid"], r["err"][0]) for r in replies] == [(1, "unavailable"), (2, "unavailable")]
    assert "could not commit" in replies[0]["err"][1]
    assert process.crash_requested  # in-memory state may be ahead of the store: the process restarts
    txn = process.store.begin()
    try:
        assert txn.get_instance("b") is None
    finally:
        txn.abort()
