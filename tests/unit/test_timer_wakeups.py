"""The partition's wake-up for its earliest durable timer, on a real event loop and a real ZeroMQ socket."""

from __future__ import annotations

import asyncio

from partitions.process import PartitionProcess, now_ms


def test_a_time_is_armed_again_once_its_wake_up_has_run(process: PartitionProcess) -> None:
    """A timer created after the wake-up for its millisecond ran (say, due at once, in the batch that wake-up
    started) gets a wake-up of its own, instead of waiting for the next message or the once-a-second tick."""

    async def body() -> None:
        process.channel = process.bind()
        due = now_ms() - 10
        process.next_timer_ms = due
        process.arm_timer()
        assert await asyncio.wait_for(process.channel.recv(), 5.0) == []  # woken, with no message
        assert process.armed_timer_ms is None

        process.next_timer_ms = due
        process.arm_timer()
        assert process.armed_timer_ms == due
        assert await asyncio.wait_for(process.channel.recv(), 5.0) == []

    asyncio.run(body())


def test_a_later_wake_up_does_not_disarm_an_earlier_time(process: PartitionProcess) -> None:
    async def body() -> None:
        process.channel = process.bind()
        soon = now_ms() - 5
        process.next_timer_ms = soon + 1
        process.arm_timer()
        process.timer_due(soon)  # a wake-up for a time armed before this one
        assert process.armed_timer_ms == soon + 1
        process.arm_timer()  # nothing changed: no second wake-up for the same time
        assert await asyncio.wait_for(process.channel.recv(), 5.0) == []

    asyncio.run(body())
