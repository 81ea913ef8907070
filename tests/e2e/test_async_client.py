"""The SDK's asyncio client (AsyncTaskHubGrpcClient) against the runtime."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from durabletask import task
from durabletask.client import AsyncTaskHubGrpcClient, OrchestrationStatus

from .helpers import DEADLINE_S, new_id


def greet(ctx: task.ActivityContext, name: str) -> str:
    return f"hello {name}"


def greet_orchestrator(ctx: task.OrchestrationContext, name: str):
    greeting = yield ctx.call_activity(greet, input=name)
    return greeting


def wait_then_greet(ctx: task.OrchestrationContext, _):
    name = yield ctx.wait_for_external_event("name")
    greeting = yield ctx.call_activity(greet, input=name)
    return greeting


@pytest.fixture(scope="module", autouse=True)
def worker(worker_factory):
    return worker_factory([greet_orchestrator, wait_then_greet], [greet])


def run_async(coro_fn, address):
    async def main():
        async with AsyncTaskHubGrpcClient(host_address=address) as client:
            return await asyncio.wait_for(coro_fn(client), timeout=2 * DEADLINE_S)
    return asyncio.run(main())


def test_async_start_and_wait(runtime):
    async def scenario(client):
        iid = await client.schedule_new_orchestration(greet_orchestrator, input="async", instance_id=new_id())
        state = await client.wait_for_orchestration_completion(iid, timeout=DEADLINE_S)
        return iid, state

    iid, state = run_async(scenario, runtime.address)
    assert state.instance_id == iid
    assert state.runtime_status == OrchestrationStatus.COMPLETED, state.failure_details
    assert state.get_output() == "hello async"


def test_async_raise_event(runtime):
    async def scenario(client):
        iid = await client.schedule_new_orchestration(wait_then_greet, instance_id=new_id())
        started = await client.wait_for_orchestration_start(iid, timeout=DEADLINE_S)
        await client.raise_orchestration_event(iid, "name", data="event")
        done = await client.wait_for_orchestration_completion(iid, timeout=DEADLINE_S)
        return started, done

    started, done = run_async(scenario, runtime.address)
    assert started.runtime_status == OrchestrationStatus.RUNNING
    assert done.runtime_status == OrchestrationStatus.COMPLETED, done.failure_details
    assert done.get_output() == "hello event"


def test_async_terminate(runtime):
    async def scenario(client):
        iid = await client.schedule_new_orchestration(wait_then_greet, instance_id=new_id())
        await client.wait_for_orchestration_start(iid, timeout=DEADLINE_S)
        await client.terminate_orchestration(iid, output="terminated by async client")
        return await client.wait_for_orchestration_completion(iid, timeout=DEADLINE_S)

    state = run_async(scenario, runtime.address)
    assert state.runtime_status == OrchestrationStatus.TERMINATED
    assert state.get_output() == "terminated by async client"


def test_async_suspend_resume_and_get_state(runtime):
    async def scenario(client):
        iid = await client.schedule_new_orchestration(wait_then_greet, instance_id=new_id())
        await client.wait_for_orchestration_start(iid, timeout=DEADLINE_S)
        await client.suspend_orchestration(iid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        while (await client.get_orchestration_state(iid)).runtime_status != OrchestrationStatus.SUSPENDED:
            assert loop.time() < deadline, "never became SUSPENDED"
            await asyncio.sleep(0.05)
        await client.raise_orchestration_event(iid, "name", data="later")
        await client.resume_orchestration(iid)
        return await client.wait_for_orchestration_completion(iid, timeout=DEADLINE_S)

    state = run_async(scenario, runtime.address)
    assert state.runtime_status == OrchestrationStatus.COMPLETED, state.failure_details
    assert state.get_output() == "hello later"


def test_async_errors(runtime):
    async def scenario(client):
        missing = await client.get_orchestration_state(new_id("missing"))
        iid = await client.schedule_new_orchestration(wait_then_greet, instance_id=new_id())
        try:
            await client.schedule_new_orchestration(wait_then_greet, instance_id=iid)
            dup_code = None
        except grpc.aio.AioRpcError as e:
            dup_code = e.code()
        try:
            await client.wait_for_orchestration_completion(iid, timeout=1)
            timed_out = False
        except TimeoutError:
            timed_out = True
        await client.terminate_orchestration(iid)
        await client.wait_for_orchestration_completion(iid, timeout=DEADLINE_S)
        return missing, dup_code, timed_out

    missing, dup_code, timed_out = run_async(scenario, runtime.address)
    assert missing is None
    assert dup_code == grpc.StatusCode.ALREADY_EXISTS
    assert timed_out
