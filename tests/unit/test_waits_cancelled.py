"""A wait whose caller went away: the gateway tells the partition, which forgets the waiter at once instead of
keeping it (and answering it) until its deadline, which is a week when the client set none. Real ZeroMQ sockets
and a real partition store."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from partitions.process import PartitionProcess, now_ms
from partitions.state_machine import apply
from tests.unit.gateway_wire import drive

WEEK_MS = 7 * 24 * 3600 * 1000


def test_a_cancelled_wait_is_withdrawn_from_its_partition(tmp_path: Path) -> None:
    async def body(client, partition, next_op) -> None:
        waiting = asyncio.ensure_future(client.request(0, {"op": "wait", "i": "x", "k": "done"}, 3600.0))
        _, wait = await next_op("wait")
        waiting.cancel()
        _, unwait = await next_op("unwait")
        assert unwait == {"op": "unwait", "i": "x", "rid": wait["rid"]}

    drive(tmp_path, body)


def start(process: PartitionProcess, instance_id: str, now: int) -> None:
    txn = process.store.begin(write=True)
    apply(txn, {"op": "start", "i": instance_id, "n": "Orch", "in": None}, now, process.state)
    txn.commit()


def park(process: PartitionProcess, gateway: bytes, rid: int, instance_id: str, now: int) -> None:
    """A wait from `gateway` on `instance_id`, applied by the partition's own state machine and store."""
    txn = process.store.begin(write=True)
    apply(txn, {"op": "wait", "i": instance_id, "k": "done", "dl": now + WEEK_MS, "rid": rid, "_from": gateway},
          now, process.state)
    txn.commit()


def waiters(process: PartitionProcess) -> list[tuple[bytes, int]]:
    return sorted((w.sender, w.request_id) for ws in process.state.waiters.values() for w in ws)


def test_unwait_forgets_exactly_that_waiter(process: PartitionProcess) -> None:
    now = int(time.time() * 1000)
    start(process, "a", now)
    start(process, "b", now)
    park(process, b"g-1", 1, "a", now)
    park(process, b"g-1", 2, "a", now)
    park(process, b"g-2", 1, "b", now)
    commands: list[dict] = []
    process.classify(b"g-1", {"op": "unwait", "i": "a", "rid": 1}, now, commands)
    process.classify(b"g-2", {"op": "unwait", "i": "b", "rid": 7}, now, commands)  # not one of g-2's waits
    assert commands == []
    assert waiters(process) == [(b"g-1", 2), (b"g-2", 1)]


def test_a_gateway_dropped_for_silence_takes_its_waiters_with_it(process: PartitionProcess) -> None:
    now = int(time.time() * 1000)
    for gateway in (b"g-1", b"g-2"):  # the partition hears from both
        process.classify(gateway, {"op": "credit", "k": "o", "n": 0, "keep": 0}, now, [])
    start(process, "a", now)
    park(process, b"g-1", 1, "a", now)
    park(process, b"g-2", 1, "a", now)
    process.gateways[b"g-2"].last_seen_ms = now + 20_000  # g-2 spoke recently; g-1 has been silent for 20 s
    commands: list[dict] = []
    process.housekeeping(now + 20_000, commands)
    assert {"op": "release_gateway", "g": b"g-1"} in commands
    assert waiters(process) == [(b"g-2", 1)]


def test_a_gateway_the_partition_forgot_parks_its_waits_again(tmp_path: Path) -> None:
    """A partition that dropped a silent gateway dropped its parked waits too; when it says so ("forgot"), the
    gateway sends every wait still pending there again, and the caller is answered when the instance ends."""

    async def body(client, partition, next_op) -> None:
        waiting = asyncio.ensure_future(client.request(0, {"op": "wait", "i": "x", "k": "done"}, 3600.0))
        gateway, wait = await next_op("wait")
        partition.send({"op": "forgot", "p": 0, "ep": 1}, to=gateway)
        _, again = await next_op("wait")
        assert again == wait
        partition.send({"op": "reply", "rid": wait["rid"], "ok": {"i": "x", "s": 1}}, to=gateway)
        assert await waiting == {"i": "x", "s": 1}

    drive(tmp_path, body)


def test_a_heartbeat_that_waited_through_a_stall_counts_before_the_tick(process: PartitionProcess) -> None:
    """After a stall longer than the gateway timeout, the heartbeat that waited in the socket meanwhile is
    counted before the housekeeping tick judges the gateway's silence: the gateway keeps its waits."""
    gateway = b"g-1"

    async def body() -> None:
        process.channel = process.bind()
        now = now_ms()
        process.classify(gateway, {"op": "credit", "k": "o", "n": 0, "keep": 0}, now, [])
        start(process, "a", now)
        park(process, gateway, 1, "a", now)
        process.gateways[gateway].last_seen_ms = now - int(process.config.gateway_timeout_s * 1000) - 5_000
        process.pending.append((None, {"op": "_tick"}))  # the ticker's, posted when the stall ended
        process.process(process.next_batch([(gateway, {"op": "hb"})]))

    asyncio.run(body())
    assert gateway in process.gateways and gateway not in process.forgotten
    assert waiters(process) == [(gateway, 1)]
