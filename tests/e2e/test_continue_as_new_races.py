"""A terminate or a suspend delivered to the worker in the same work item as the event on which the orchestrator
continues as new. The official SDK worker, stopped while both arrive so that one work item carries them.

- The SDK ignores a terminate once the orchestrator has completed (here: continued as new); the terminate was
  accepted, so the instance still ends TERMINATED, with the terminate's output.
- The suspend went to the old execution; the new one is suspended as well, and a resume then lets it run on
  (the SDK fails an instance on a resume it has no suspend for).

And a result of the old execution that arrives while the turn continuing as new is out: it stays with the old
execution, or the new one, numbering its tasks from 0 again, would take it for its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from durabletask import task
from durabletask.client import OrchestrationStatus, TaskHubGrpcClient

from .conftest import EngineRuntime
from .helpers import DEADLINE_S, new_id, new_worker, wait_until

pytestmark = pytest.mark.engine_only


def generations(ctx: task.OrchestrationContext, generation: int):
    ctx.set_custom_status(f"waiting-{generation}")
    if generation == 0:
        yield ctx.wait_for_external_event("next")
        ctx.continue_as_new(1)
        return None
    value = yield ctx.wait_for_external_event("finish")
    return value


def status_is(client, instance_id: str, custom: str) -> Callable[[], bool]:
    def check() -> bool:
        state = client.get_orchestration_state(instance_id)
        return state is not None and state.serialized_custom_status == f'"{custom}"'
    return check


def first_turn_then_stop(client, worker_factory) -> str:
    """An instance that has run its first turn, with no worker connected any more."""
    worker = worker_factory([generations])
    instance_id = client.schedule_new_orchestration(generations, input=0, instance_id=new_id("can"))
    wait_until(status_is(client, instance_id, "waiting-0"), message="the first turn")
    worker.stop()
    return instance_id


def test_a_terminate_that_arrives_with_the_continue_as_new_event_ends_the_instance(client, worker_factory):
    instance_id = first_turn_then_stop(client, worker_factory)
    client.raise_orchestration_event(instance_id, "next")
    client.terminate_orchestration(instance_id, output="stop")
    worker_factory([generations])
    state = client.wait_for_orchestration_completion(instance_id, timeout=DEADLINE_S)
    assert state.runtime_status == OrchestrationStatus.TERMINATED
    assert state.serialized_output == '"stop"'


def test_a_suspend_that_arrives_with_the_continue_as_new_event_suspends_the_new_execution(client, worker_factory):
    instance_id = first_turn_then_stop(client, worker_factory)
    client.raise_orchestration_event(instance_id, "next")
    client.suspend_orchestration(instance_id)
    worker_factory([generations])
    wait_until(lambda: (s := client.get_orchestration_state(instance_id)) and s.serialized_input == "1",
               message="the continue-as-new")
    assert client.get_orchestration_state(instance_id).runtime_status == OrchestrationStatus.SUSPENDED
    client.resume_orchestration(instance_id)
    wait_until(status_is(client, instance_id, "waiting-1"), message="the new execution's first turn")
    client.raise_orchestration_event(instance_id, "finish", data="done")
    state = client.wait_for_orchestration_completion(instance_id, timeout=DEADLINE_S)
    assert state.runtime_status == OrchestrationStatus.COMPLETED, state.failure_details
    assert state.serialized_output == '"done"'


# the old execution's result, held back until the turn that continues as new is out
TURN_OUT, RESULT_IN = threading.Event(), threading.Event()
RELEASE = {0: threading.Event(), 1: threading.Event()}


def can_held_activity(ctx: task.ActivityContext, generation: int) -> int:
    RELEASE[generation].wait(DEADLINE_S)
    return generation


def can_results(ctx: task.OrchestrationContext, generation: int):
    work = ctx.call_activity(can_held_activity, input=generation)  # task 0, in every generation
    if generation == 0:
        yield ctx.create_timer(timedelta(0))
        if not ctx.is_replaying:  # the turn that continues as new: held until the old result is in
            TURN_OUT.set()
            RESULT_IN.wait(DEADLINE_S)
        ctx.continue_as_new(1)
        return None
    result = yield work
    return result


def test_a_result_of_the_old_execution_is_not_taken_by_the_new_one(tmp_path: Path):
    for event in (TURN_OUT, RESULT_IN, *RELEASE.values()):
        event.clear()
    RELEASE[1].set()
    rt = EngineRuntime(tmp_path / "data")
    rt.start()
    worker = new_worker(rt.address, [can_results], [can_held_activity], thread_pool=4)
    client = TaskHubGrpcClient(host_address=rt.address)
    try:
        instance_id = client.schedule_new_orchestration(can_results, input=0, instance_id=new_id("can-result"))
        assert TURN_OUT.wait(DEADLINE_S), "the turn that continues as new never ran"
        before = client.get_orchestration_state(instance_id).last_updated_at
        RELEASE[0].set()  # generation 0's activity returns 0 while that turn is out
        wait_until(lambda: client.get_orchestration_state(instance_id).last_updated_at > before,
                   message="the old execution's result to be stored")
        RESULT_IN.set()
        state = client.wait_for_orchestration_completion(instance_id, timeout=DEADLINE_S)
        assert state.runtime_status == OrchestrationStatus.COMPLETED, state.failure_details
        assert state.serialized_output == "1", "the new execution took the old one's result"
    finally:
        for event in (TURN_OUT, RESULT_IN, *RELEASE.values()):
            event.set()
        worker.stop()
        client.close()
        rt.close()
