"""What the gateway's PartitionClient answers for a request in flight when its partition restarts.

The partition's side of the wire is played by the test (tests/unit/gateway_wire.py), as partitions/process.py
behaves: a heartbeat answered with the epoch (and the barrier id it carried), a change
addressed to another epoch refused unapplied with "stale_epoch" and the current epoch.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from runtime.errors import PartitionUnavailableError
from tests.unit.gateway_wire import DEADLINE_S, drive

START = {"op": "start", "i": "x", "n": "Orch"}


def test_a_request_refused_by_the_restarted_partition_is_sent_again_and_answered(tmp_path: Path) -> None:
    async def body(client, partition, next_op) -> None:
        request = asyncio.ensure_future(client.request(0, dict(START), DEADLINE_S))
        gateway, first = await next_op("start")
        assert first["gep"] == 1
        # The restarted process (epoch 2) got it from the socket: refused, unapplied.
        partition.send({"op": "reply", "rid": first["rid"], "ep": 2,
                        "err": ["stale_epoch", "partition 0 restarted before this request reached it"]}, to=gateway)
        # Seeing epoch 2, the client sends a barrier heartbeat (for requests of unknown fate, of which this one
        # is no longer one), then the request again, for epoch 2.
        _, barrier = await next_op("hb")
        _, second = await next_op("start")
        assert (second["rid"], second["gep"]) == (first["rid"], 2)
        partition.send({"op": "hb", "p": 0, "ep": 2, "bar": barrier["bar"]}, to=gateway)
        partition.send({"op": "reply", "rid": second["rid"], "ok": {"created": True}}, to=gateway)
        assert await request == {"created": True}

    drive(tmp_path, body)


def test_a_request_the_old_process_took_with_it_may_not_have_taken_effect(tmp_path: Path) -> None:
    async def body(client, partition, next_op) -> None:
        request = asyncio.ensure_future(client.request(0, dict(START), DEADLINE_S))
        gateway, sent = await next_op("start")  # taken in by the process that then died: no answer will come
        partition.send({"op": "hb", "p": 0, "ep": 2}, to=gateway)  # the restarted process
        _, barrier = await next_op("hb")
        assert not request.done()  # its fate is known only once the barrier comes back
        partition.send({"op": "hb", "p": 0, "ep": 2, "bar": barrier["bar"]}, to=gateway)
        with pytest.raises(PartitionUnavailableError, match="restarted; the request may not have taken effect"):
            await request

    drive(tmp_path, body)
