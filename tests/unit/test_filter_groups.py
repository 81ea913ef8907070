"""Every distinct set of work-item filters is a credit group of its own, on the gateway and in each partition.
A group whose last stream is gone is forgotten on both sides once its credits are back; before, each one stayed
(with its filters, which may be megabytes) for as long as the gateway lived."""

from __future__ import annotations

import asyncio

from partitions.process import PartitionProcess, now_ms
from runtime.config import Config
from runtime.gateway.partition_client import PartitionClient
from runtime.gateway.work_items import WorkDispatcher, WorkerStream

FILTERS = {"o": {"only_this": []}, "a": None, "e": None}


def test_a_partition_forgets_a_group_the_gateway_ends_and_hands_its_credits_back(process: PartitionProcess) -> None:
    async def body() -> None:
        process.channel = process.bind()
        sent: list[tuple[dict, bytes | None]] = []
        process.channel.send = lambda message, to=None: sent.append((message, to))  # type: ignore[method-assign]
        now = now_ms()
        process.classify(b"g-1", {"op": "hb"}, now, [])
        process.classify(b"g-1", {"op": "credit", "k": "o", "g": "grp", "n": 3, "keep": 2,
                                  "f": {"only_this": []}}, now, [])
        gateway = process.gateways[b"g-1"]
        matcher = gateway.matchers[("grp", "o")]
        process.state.scan_resume[("orch_cursor", id(matcher))] = 17
        process.state.scan_resume[("orch_cursor", 1)] = 5  # another matcher's place stays

        process.classify(b"g-1", {"op": "credit", "k": "o", "g": "grp", "n": 0, "keep": 0, "end": True}, now, [])
        assert ("grp", "o") not in gateway.credits and ("grp", "o") not in gateway.keep
        assert ("grp", "o") not in gateway.matchers
        assert process.state.scan_resume == {("orch_cursor", 1): 5}
        assert ({"op": "ret", "k": "o", "g": "grp", "n": 3, "p": 0}, b"g-1") in sent

    asyncio.run(body())


def test_a_partition_that_drops_a_silent_gateway_forgets_its_filtered_walks(process: PartitionProcess) -> None:
    """Their places are keyed by the matchers' ids, which a later matcher may be given: its first walk would
    then start at another's place."""
    async def body() -> None:
        process.channel = process.bind()
        now = now_ms()
        process.classify(b"g-1", {"op": "hb"}, now, [])
        process.classify(b"g-1", {"op": "credit", "k": "o", "g": "grp", "n": 3, "keep": 2,
                                  "f": {"only_this": []}}, now, [])
        matcher = process.gateways[b"g-1"].matchers[("grp", "o")]
        process.state.scan_resume[("orch_cursor", id(matcher))] = 17

        process.judge_gateways_and_leases(now + int(process.config.gateway_timeout_s * 1000) + 1, [])
        assert b"g-1" not in process.gateways
        assert process.state.scan_resume == {}

    asyncio.run(body())


def test_the_gateway_forgets_a_group_without_streams_once_its_credits_are_back(tmp_path) -> None:
    config = Config(data_dir=str(tmp_path / "data"), partitions=2, heartbeat_interval_s=3600.0)

    async def body() -> None:
        client = PartitionClient(config, on_message=lambda p, m: None)
        sent: list[tuple[int, dict]] = []
        client.send = lambda partition, message: sent.append((partition, message))  # type: ignore[method-assign]
        try:
            dispatcher = WorkDispatcher(client)
            stream = WorkerStream(limits={"o": 64, "a": 64, "e": 64}, filters=FILTERS)
            dispatcher.add_stream(stream)
            dispatcher.grant()
            group = stream.group
            assert any(g == group for (_, g, _) in dispatcher.outstanding)
            held = {(p, kind): n for (p, g, kind), n in dispatcher.outstanding.items() if g == group}
            assert len(held) == 6 and all(held.values()), held

            dispatcher.remove_stream(stream)
            dispatcher.grant()
            ends = [(p, m) for p, m in sent if m.get("end")]
            assert {(p, m["k"]) for p, m in ends if m["g"] == group} == set(held)
            for (partition, kind), n in held.items():  # what the partitions hand back on "end"
                dispatcher.on_message(partition, {"op": "ret", "k": kind, "g": group, "n": n, "p": partition})
            assert not [slot for slot in dispatcher.outstanding if slot[1] == group], dispatcher.outstanding
            assert not [key for key in dispatcher.keep if key[0] == group]
        finally:
            client.close()

    asyncio.run(body())
