"""Work-item leases last as long as a worker stream holds them: each gateway heartbeat lists the tokens its
streams hold, and the partition renews exactly those. One the gateway does not list (its work item never reached
it, or its completion was lost on the way) expires and runs again."""

from __future__ import annotations

import asyncio

from partitions.process import PartitionProcess, now_ms
from partitions.state_machine.state import Lease
from runtime.config import Config
from runtime.gateway.partition_client import PartitionClient
from runtime.gateway.work_items import WorkDispatcher, WorkerStream


def test_a_heartbeat_renews_only_the_leases_its_gateway_lists(process: PartitionProcess) -> None:
    now = now_ms()
    lease_ms = process.lease_ms
    leases = {
        "held": Lease(token="held", kind="a", key=1, gateway=b"g-1", expires_ms=now + 10),
        "lost": Lease(token="lost", kind="a", key=2, gateway=b"g-1", expires_ms=now + 10),  # never reached g-1
        "other": Lease(token="other", kind="a", key=3, gateway=b"g-2", expires_ms=now + 10),
        "orch": Lease(token="orch", kind="o", key="i", gateway=b"g-1", expires_ms=now + 10),
        "entity": Lease(token="entity", kind="e", key="@e@k", gateway=b"g-1", expires_ms=now + 10),
    }
    for lease in leases.values():
        process.state.add_lease(lease)

    async def body() -> None:
        process.channel = process.bind()
        later = now + 5_000
        process.classify(b"g-1", {"op": "hb", "held": ["held", "other", "orch", "entity", "unknown", 7]}, later, [])
        assert leases["held"].expires_ms == later + lease_ms
        assert leases["entity"].expires_ms == later + lease_ms
        assert leases["lost"].expires_ms == now + 10
        assert leases["other"].expires_ms == now + 10  # g-2's, whatever g-1 says
        assert leases["orch"].expires_ms == later + lease_ms  # a turn may wait in the worker's queue for long

        commands: list = []
        process.housekeeping(now + lease_ms, commands)  # "lost" has run out; "held" has not
        assert {"op": "abandon", "tok": "lost", "quiet": True} in commands
        assert not any(c.get("tok") == "held" for c in commands)

    asyncio.run(body())


def test_the_gateway_lists_the_tokens_its_streams_hold_by_partition(tmp_path) -> None:
    config = Config(data_dir=str(tmp_path / "data"), partitions=2, heartbeat_interval_s=3600.0)

    async def body() -> None:
        client = PartitionClient(config, on_message=lambda p, m: None)
        try:
            dispatcher = WorkDispatcher(client)
            stream = WorkerStream(limits={"o": 10, "a": 10, "e": 10})
            dispatcher.add_stream(stream)
            items = [(0, "a", "0.1.1"), (1, "a", "1.1.1"), (1, "e", "1.1.2"), (0, "o", "0.1.2")]
            for partition, kind, token in items:
                dispatcher.on_message(partition, {"op": "wi", "k": kind, "g": "*", "tok": token, "wi": b""})
            assert dict(dispatcher.held_leases()) == {0: ["0.1.1", "0.1.2"], 1: ["1.1.1", "1.1.2"]}
            dispatcher.completed("1.1.1")
            dispatcher.on_message(0, {"op": "expired", "tok": "0.1.1"})
            assert dict(dispatcher.held_leases()) == {0: ["0.1.2"], 1: ["1.1.2"]}
        finally:
            client.close()

    asyncio.run(body())


def test_after_a_late_tick_gateways_and_leases_wait_one_tick_to_be_judged(process: PartitionProcess) -> None:
    """A partition that was stopped (SIGSTOP, a stalled disk, a suspended host) could not read the heartbeats
    queued for it. Its first tick after that once found every gateway silent and every lease expired, released
    them all, and activities still running on live streams ran twice. A late tick now judges neither; the next
    one does, with the heartbeats read meanwhile. Never two ticks in a row, so a dead gateway or a lost lease
    is found at most one tick later, however busy the partition is."""
    now = now_ms()
    held = Lease(token="held", kind="a", key=1, gateway=b"g-1", expires_ms=now + 1_000)
    lost = Lease(token="lost", kind="a", key=2, gateway=b"g-2", expires_ms=now + 1_000)
    for lease in (held, lost):
        process.state.add_lease(lease)

    async def body() -> None:
        process.channel = process.bind()
        for gateway in (b"g-1", b"g-2"):
            process.classify(gateway, {"op": "hb"}, now, [])
        later = now + 20_000  # past the leases and the 10 s gateway timeout, all of it spent stopped
        commands: list = []
        process.classify(None, {"op": "_tick", "late_s": 19.5}, later, commands)
        assert not commands, commands

        process.classify(b"g-1", {"op": "hb", "held": ["held"]}, later + 5, commands)  # queued while stopped
        process.classify(None, {"op": "_tick", "late_s": 1.5}, later + 200, commands)  # late again: judged now
        assert commands == [{"op": "release_gateway", "g": b"g-2"}, {"op": "abandon", "tok": "lost", "quiet": True}]
        assert b"g-1" in process.gateways and held.expires_ms > later

    asyncio.run(body())
