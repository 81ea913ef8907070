"""Activities: sequences, fan-out/fan-in, payloads, failures and SDK retry policies."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from durabletask import task
from durabletask.client import OrchestrationStatus

from .helpers import DEADLINE_S, new_id

# ---------------------------------------------------------------------------------------------------------
# activities
# ---------------------------------------------------------------------------------------------------------
_counter_lock = threading.Lock()


def append_letter(ctx: task.ActivityContext, inp: list) -> str:
    text, letter = inp
    return text + letter


def square(ctx: task.ActivityContext, n: int) -> int:
    return n * n


def echo(ctx: task.ActivityContext, value):
    return value


def return_none(ctx: task.ActivityContext, _):
    return None


def describe_call(ctx: task.ActivityContext, value):
    return {"orchestration_id": ctx.orchestration_id, "task_id": ctx.task_id, "input": value}


def fail_with(ctx: task.ActivityContext, message: str):
    raise ValueError(message)


def count_attempt(ctx: task.ActivityContext, inp: dict) -> int:
    """Increments a counter file; fails until the counter reaches inp["succeed_on"]."""
    path = Path(inp["path"])
    with _counter_lock:
        n = (int(path.read_text()) if path.exists() else 0) + 1
        path.write_text(str(n))
    if n < inp["succeed_on"]:
        raise RuntimeError(f"attempt {n} failed on purpose")
    return n


# ---------------------------------------------------------------------------------------------------------
# orchestrators
# ---------------------------------------------------------------------------------------------------------
def sequence3(ctx: task.OrchestrationContext, start: str):
    a = yield ctx.call_activity(append_letter, input=[start, "a"])
    b = yield ctx.call_activity(append_letter, input=[a, "b"])
    c = yield ctx.call_activity(append_letter, input=[b, "c"])
    return [a, b, c]


def fan_out_fan_in(ctx: task.OrchestrationContext, n: int):
    tasks = [ctx.call_activity(square, input=i) for i in range(n)]
    results = yield task.when_all(tasks)
    return {"results": results, "sum": sum(results)}


def payload_roundtrip(ctx: task.OrchestrationContext, value):
    echoed = yield ctx.call_activity(echo, input=value)
    nothing = yield ctx.call_activity(return_none, input=None)
    described = yield ctx.call_activity(describe_call, input="x")
    return {"echoed": echoed, "nothing": nothing, "described": described}


def catch_activity_failure(ctx: task.OrchestrationContext, message: str):
    try:
        yield ctx.call_activity(fail_with, input=message)
    except task.TaskFailedError as e:
        after = yield ctx.call_activity(echo, input="after-failure")
        return {
            "error_type": e.details.error_type,
            "message": e.details.message,
            "caused_by_value_error": e.details.is_caused_by(ValueError),
            "after": after,
        }
    return "not reached"


def uncaught_activity_failure(ctx: task.OrchestrationContext, message: str):
    yield ctx.call_activity(fail_with, input=message)
    return "not reached"


def call_unregistered_activity(ctx: task.OrchestrationContext, _):
    try:
        yield ctx.call_activity("no_such_activity_registered", input=1)
    except task.TaskFailedError as e:
        return {"error_type": e.details.error_type, "message": e.details.message}
    return "not reached"


def retry_activity(ctx: task.OrchestrationContext, inp: dict):
    policy = task.RetryPolicy(
        first_retry_interval=timedelta(milliseconds=200),
        max_number_of_attempts=inp["max_attempts"],
        backoff_coefficient=1.0,
    )
    try:
        attempts = yield ctx.call_activity(count_attempt, input=inp, retry_policy=policy)
        return {"ok": True, "attempts": attempts}
    except task.TaskFailedError as e:
        return {"ok": False, "message": e.details.message}


ORCHESTRATORS = [sequence3, fan_out_fan_in, payload_roundtrip, catch_activity_failure,
                 uncaught_activity_failure, call_unregistered_activity, retry_activity]
ACTIVITIES = [append_letter, square, echo, return_none, describe_call, fail_with, count_attempt]


@pytest.fixture(scope="module", autouse=True)
def worker(worker_factory):
    return worker_factory(ORCHESTRATORS, ACTIVITIES)


def run(client, orchestrator, inp=None, instance_id=None, timeout=DEADLINE_S):
    iid = client.schedule_new_orchestration(orchestrator, input=inp, instance_id=instance_id or new_id())
    state = client.wait_for_orchestration_completion(iid, timeout=timeout)
    assert state is not None, f"instance {iid} vanished"
    return iid, state


# ---------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------
def test_activity_sequence_of_three(client):
    iid, state = run(client, sequence3, "x")
    assert state.runtime_status == OrchestrationStatus.COMPLETED, state.failure_details
    assert state.get_output() == ["xa", "xab", "xabc"]
    assert state.get_input() == "x"
    assert state.name == "sequence3"
    assert state.instance_id == iid
    assert state.failure_details is None


def test_fan_out_fan_in_ten_activities(client):
    _, state = run(client, fan_out_fan_in, 10)
    assert state.runtime_status == OrchestrationStatus.COMPLETED, state.failure_details
    out = state.get_output()
    assert out["results"] == [i * i for i in range(10)]  # when_all keeps the scheduling order
    assert out["sum"] == 285


def test_many_concurrent_instances(client):
    ids = [client.schedule_new_orchestration(sequence3, input=f"i{n}", instance_id=new_id("many"))
           for n in range(20)]
    for n, iid in enumerate(ids):
        state = client.wait_for_orchestration_completion(iid, timeout=DEADLINE_S)
        assert state.runtime_status == OrchestrationStatus.COMPLETED, state.failure_details
        assert state.get_output() == [f"i{n}a", f"i{n}ab", f"i{n}abc"]


@pytest.mark.parametrize(
    "value",
    [
        {"nested": {"list": [1, 2.5, None, True], "text": "héllo ✓ 日本"}},
        "plain string with \"quotes\" and \\ backslash",
        0,
        [],
        "x" * 200_000,  # a large payload, well under the 4 MiB message limit
    ],
    ids=["dict", "string", "zero", "empty-list", "200kB"],
)
def test_payload_roundtrip(client, value):
    iid, state = run(client, payload_roundtrip, value)
    assert state.runtime_status == OrchestrationStatus.COMPLETED, state.failure_details
    out = state.get_output()
    assert out["echoed"] == value
    assert out["nothing"] is None
    assert out["described"]["orchestration_id"] == iid
    assert out["described"]["input"] == "x"
    assert isinstance(out["described"]["task_id"], int)
    assert state.get_input() == value
    # The serialized output is the SDK's JSON, stored and returned verbatim.
    assert json.loads(state.serialized_output) == out


def test_activity_failure_is_caught_by_orchestrator(client):
    _, state = run(client, catch_activity_failure, "bad thing 42")
    assert state.runtime_status == OrchestrationStatus.COMPLETED, state.failure_details
    out = state.get_output()
    assert out["error_type"] == "builtins.ValueError"
    assert "bad thing 42" in out["message"]
    assert out["caused_by_value_error"] is True
    assert out["after"] == "after-failure"


def test_uncaught_activity_failure_fails_instance(client):
    _, state = run(client, uncaught_activity_failure, "kaboom 7")
    assert state.runtime_status == OrchestrationStatus.FAILED
    assert state.failure_details is not None
    assert "kaboom 7" in state.failure_details.message
    assert state.failure_details.error_type  # e.g. durabletask.task.TaskFailedError
    assert state.get_output() is None


def test_unregistered_activity_fails_the_task(client):
    _, state = run(client, call_unregistered_activity)
    assert state.runtime_status == OrchestrationStatus.COMPLETED, state.failure_details
    out = state.get_output()
    assert "no_such_activity_registered" in out["message"]
    assert out["error_type"].endswith("ActivityNotRegisteredError")


def test_activity_retry_policy_succeeds_on_third_attempt(client, tmp_path):
    counter = tmp_path / "attempts.txt"
    _, state = run(client, retry_activity, {"path": str(counter), "succeed_on": 3, "max_attempts": 5})
    assert state.runtime_status == OrchestrationStatus.COMPLETED, state.failure_details
    assert state.get_output() == {"ok": True, "attempts": 3}
    assert counter.read_text() == "3"


def test_activity_retry_policy_gives_up_after_max_attempts(client, tmp_path):
    counter = tmp_path / "attempts.txt"
    _, state = run(client, retry_activity, {"path": str(counter), "succeed_on": 99, "max_attempts": 3})
    assert state.runtime_status == OrchestrationStatus.COMPLETED, state.failure_details
    out = state.get_output()
    assert out["ok"] is False
    assert "attempt 3 failed on purpose" in out["message"]
    assert counter.read_text() == "3"
