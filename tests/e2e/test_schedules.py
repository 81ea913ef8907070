"""The SDK's scheduled tasks (durabletask.scheduled) against the engine.

A schedule is a durable entity (`@schedule@<id>`) driven by an operation orchestrator
(`execute_schedule_operation_orchestrator`, which call_entity's the operation) and by scheduled self-signals
(`run_schedule` with signal_time = next run); each run is `schedule_new_orchestration` from entity code, with
instance id `<schedule id>-<run time isoformat>`. `configure_scheduled_tasks()` registers the entity and
orchestrator and advertises WORKER_CAPABILITY_SCHEDULED_TASKS. The SDK's minimum interval is 1 s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from durabletask import task
from durabletask import worker as dt_worker
from durabletask.client import AsyncTaskHubGrpcClient, OrchestrationQuery, OrchestrationStatus
from durabletask.entities import EntityInstanceId
from durabletask.scheduled import (
    AsyncScheduledTaskClient,
    ScheduleCreationOptions,
    ScheduledTaskClient,
    ScheduleQuery,
    ScheduleStatus,
    ScheduleUpdateOptions,
)
from durabletask.scheduled.models import MINIMUM_INTERVAL

from .helpers import DEADLINE_S, new_id, wait_until

pytestmark = pytest.mark.engine_only

INTERVAL = timedelta(seconds=1)


def scheduled_job(ctx: task.OrchestrationContext, payload):
    return {"payload": payload}


@pytest.fixture(scope="module", autouse=True)
def worker(runtime) -> Iterator[dt_worker.TaskHubGrpcWorker]:
    w = dt_worker.TaskHubGrpcWorker(
        host_address=runtime.address,
        concurrency_options=dt_worker.ConcurrencyOptions(maximum_thread_pool_workers=16),
    )
    w.add_orchestrator(scheduled_job)
    w.configure_scheduled_tasks()
    w.start()
    try:
        yield w
    finally:
        w.stop()


@pytest.fixture(scope="module")
def schedules(client) -> ScheduledTaskClient:
    return ScheduledTaskClient(client, operation_timeout=DEADLINE_S)


def run_times(client, schedule_id: str) -> dict[datetime, str]:
    """The runs of a schedule so far: run time (parsed from the instance id) -> instance id."""
    prefix = f"{schedule_id}-"
    states = client.get_all_orchestration_states(OrchestrationQuery(instance_id_prefix=prefix))
    return {datetime.fromisoformat(s.instance_id[len(prefix):]): s.instance_id for s in states}


def test_minimum_interval_is_one_second():
    assert MINIMUM_INTERVAL == timedelta(seconds=1)
    with pytest.raises(ValueError):
        ScheduleCreationOptions(schedule_id="x", orchestration_name="scheduled_job", interval=timedelta(seconds=0.5))


def test_schedule_fires_pauses_resumes_and_is_deleted(client, schedules):
    sid = new_id("sched")
    handle = schedules.create_schedule(ScheduleCreationOptions(
        schedule_id=sid, orchestration_name="scheduled_job", interval=INTERVAL,
        orchestration_input={"from": sid}, start_immediately_if_late=True,
    ))

    # runs fire: instances, each completing with the schedule's input
    runs = wait_until(lambda: (r := run_times(client, sid)) and len(r) >= 3 and r, timeout=DEADLINE_S,
                      message="three scheduled runs")
    for instance_id in runs.values():
        state = client.wait_for_orchestration_completion(instance_id, timeout=DEADLINE_S)
        assert state.runtime_status == OrchestrationStatus.COMPLETED, state.failure_details
        assert state.get_output() == {"payload": {"from": sid}}
        assert state.name == "scheduled_job"
    # the first run is immediate (start_immediately_if_late); later ones are one interval apart
    ordered = sorted(runs)
    assert abs((ordered[2] - ordered[1]) - INTERVAL) < timedelta(milliseconds=50), ordered

    description = handle.describe()
    assert description.schedule_id == sid and description.status == ScheduleStatus.ACTIVE
    assert description.interval == INTERVAL and description.orchestration_name == "scheduled_job"
    assert description.last_run_at is not None
    listed = schedules.list_schedules(ScheduleQuery(schedule_id_prefix=sid))
    assert [d.schedule_id for d in listed] == [sid]

    # pause: the last run is known; no run after it appears while paused
    handle.pause()
    paused = handle.describe()
    assert paused.status == ScheduleStatus.PAUSED and paused.next_run_at is None
    last = paused.last_run_at
    wait_until(lambda: last in run_times(client, sid), message="the last run before the pause to exist")
    window_end = time.monotonic() + 2.5 * INTERVAL.total_seconds()  # bounded observation: ~2.5 intervals
    while time.monotonic() < window_end:
        late = [t for t in run_times(client, sid) if t > last]
        assert not late, f"runs fired while paused: {late}"
        time.sleep(0.1)
    before_resume = run_times(client, sid)
    assert max(before_resume) == last

    # resume: runs fire again
    handle.resume()
    assert handle.describe().status == ScheduleStatus.ACTIVE
    wait_until(lambda: len([t for t in run_times(client, sid) if t > last]) >= 2, timeout=DEADLINE_S,
               message="two runs after resume")

    # delete
    handle.delete()
    assert schedules.get_schedule(sid) is None
    assert schedules.list_schedules(ScheduleQuery(schedule_id_prefix=sid)) == []
    entity = EntityInstanceId("schedule", sid)
    wait_until(lambda: client.get_entity(entity) is None, message="the schedule entity to be gone")


def test_list_filters_update_and_invalid_transitions(runtime, client, schedules):
    tag = new_id("lst")
    far = datetime.now(UTC) + timedelta(hours=1)  # start_at in the future: no run fires here
    a = schedules.create_schedule(ScheduleCreationOptions(
        schedule_id=f"{tag}-a", orchestration_name="scheduled_job", interval=timedelta(minutes=5), start_at=far))
    b = schedules.create_schedule(ScheduleCreationOptions(
        schedule_id=f"{tag}-b", orchestration_name="scheduled_job", interval=timedelta(minutes=5), start_at=far))
    b.pause()

    ids = sorted(d.schedule_id for d in schedules.list_schedules(ScheduleQuery(schedule_id_prefix=tag)))
    assert ids == [f"{tag}-a", f"{tag}-b"]
    active = schedules.list_schedules(ScheduleQuery(schedule_id_prefix=tag, status=ScheduleStatus.ACTIVE))
    assert [d.schedule_id for d in active] == [f"{tag}-a"]
    paused = schedules.list_schedules(ScheduleQuery(schedule_id_prefix=tag, status=ScheduleStatus.PAUSED, page_size=1))
    assert [d.schedule_id for d in paused] == [f"{tag}-b"]
    assert schedules.list_schedules(ScheduleQuery(schedule_id_prefix=f"{tag}-zzz")) == []

    described = a.describe()
    assert described.next_run_at is not None and abs((described.next_run_at - far).total_seconds()) < 1

    a.update(ScheduleUpdateOptions(interval=timedelta(minutes=7), orchestration_input="v2"))
    updated = a.describe()
    assert updated.interval == timedelta(minutes=7) and updated.orchestration_input == "v2"

    # operations the entity refuses fail the operation orchestration; the client raises
    with pytest.raises(RuntimeError, match="resume_schedule"):
        a.resume()  # already active
    with pytest.raises(RuntimeError, match="pause_schedule"):
        b.pause()  # already paused
    assert a.describe().status == ScheduleStatus.ACTIVE and b.describe().status == ScheduleStatus.PAUSED

    # the async client sees the same schedules
    async def async_view():
        async with AsyncTaskHubGrpcClient(host_address=runtime.address) as aclient:
            async_schedules = AsyncScheduledTaskClient(aclient, operation_timeout=DEADLINE_S)
            listed = await async_schedules.list_schedules(ScheduleQuery(schedule_id_prefix=tag))
            handle = async_schedules.get_schedule_client(f"{tag}-b")
            await handle.resume()
            status = (await async_schedules.get_schedule(f"{tag}-b")).status
            await handle.delete()
            return sorted(d.schedule_id for d in listed), status, await async_schedules.get_schedule(f"{tag}-b")

    listed, status, gone = asyncio.run(asyncio.wait_for(async_view(), timeout=2 * DEADLINE_S))
    assert listed == [f"{tag}-a", f"{tag}-b"] and status == ScheduleStatus.ACTIVE and gone is None

    a.delete()
    assert schedules.list_schedules(ScheduleQuery(schedule_id_prefix=tag)) == []
    assert run_times(client, f"{tag}-a") == {} and run_times(client, f"{tag}-b") == {}


def test_schedule_with_end_time_deletes_itself(client, schedules):
    sid = new_id("ends")
    end_at = datetime.now(UTC) + timedelta(seconds=2.5)
    schedules.create_schedule(ScheduleCreationOptions(
        schedule_id=sid, orchestration_name="scheduled_job", interval=INTERVAL, end_at=end_at,
        orchestration_instance_id=None, start_immediately_if_late=True,
    ))
    wait_until(lambda: schedules.get_schedule(sid) is None, timeout=DEADLINE_S,
               message="the schedule to delete itself after end_at")
    runs = run_times(client, sid)
    assert 1 <= len(runs) <= 4, runs
    assert all(t <= end_at for t in runs), (runs, end_at)
