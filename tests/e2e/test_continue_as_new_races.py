"""A terminate or a suspend delivered to the worker in the same work item as the event on which the orchestrator
continues as new. The official SDK worker, stopped while both arrive so that one work item carries them.

- The SDK ignores a terminate once the orchestrator has completed (here: continued as new); the terminate was
  accepted, so the instance still ends TERMINATED, with the terminate's output.
- The suspend went to the old execution; the new one is suspended as well, and a resume then lets it run on
  (the SDK fails an instance on a resume it has no suspend for).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from durabletask import task
from durabletask.client import OrchestrationStatus

from .helpers import DEADLINE_S, new_id, wait_until

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
