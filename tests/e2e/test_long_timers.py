"""A durable timer longer than the SDK worker's `maximum_timer_interval` (3 days by default) is created as a
chain of shorter timers: after each one fires, the SDK compares timerFired.fireAt with the time it asked for
and creates the next while they differ. So the engine echoes fireAt to the nanosecond, and never fires early.
Here the interval is 1 s and the timer 2.0005 s, a fire time with sub-millisecond precision."""

from __future__ import annotations

from datetime import timedelta

import pytest
from durabletask import task
from durabletask import worker as dt_worker
from durabletask.client import OrchestrationStatus

from .helpers import DEADLINE_S, new_id


def chunked_timer(ctx: task.OrchestrationContext, _):
    started = ctx.current_utc_datetime
    due = started + timedelta(seconds=2, microseconds=500)
    yield ctx.create_timer(due)
    return (ctx.current_utc_datetime - started).total_seconds()


@pytest.fixture(scope="module", autouse=True)
def worker(runtime):
    w = dt_worker.TaskHubGrpcWorker(host_address=runtime.address, maximum_timer_interval=timedelta(seconds=1))
    w.add_orchestrator(chunked_timer)
    w.start()
    try:
        yield w
    finally:
        w.stop()


def test_a_timer_split_into_chunks_ends_at_its_sub_millisecond_fire_time(client):
    instance_id = client.schedule_new_orchestration(chunked_timer, instance_id=new_id("chunks"))
    state = client.wait_for_orchestration_completion(instance_id, timeout=DEADLINE_S)
    assert state.runtime_status == OrchestrationStatus.COMPLETED, state.failure_details
    assert float(state.serialized_output) >= 2.0005
    created = [e for e in client.get_orchestration_history(instance_id) if type(e).__name__ == "TimerCreatedEvent"]
    assert 2 <= len(created) <= 4  # 1 s chunks of 2.0005 s (the SDK may count the last one differently)
