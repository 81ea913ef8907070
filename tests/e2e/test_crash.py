"""Crash and restart: SIGKILL of the whole runtime process group mid-flight, SIGTERM shutdown, restart on the
same data dir and port. Engine only (the in-memory backend keeps nothing)."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from durabletask import task
from durabletask.client import OrchestrationStatus, TaskHubGrpcClient

from .helpers import (
    DEADLINE_S,
    id_not_on_partition,
    new_id,
    new_worker,
    partition_of,
    running_worker,
    wait_until,
)

pytestmark = [pytest.mark.crash, pytest.mark.engine_only]

CRASH_DEADLINE_S = 2 * DEADLINE_S


class Gate:
    """Holds `gated_step` activities inside the worker until released, so instances are provably mid-flight."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self._lock = threading.Lock()
        self.entered: set[str] = set()

    def reset(self) -> None:
        self.open.clear()
        with self._lock:
            self.entered.clear()

    def enter(self, key: str) -> None:
        with self._lock:
            self.entered.add(key)
        self.open.wait(timeout=CRASH_DEADLINE_S)

    def entered_count(self) -> int:
        with self._lock:
            return len(self.entered)


GATE = Gate()


# ---------------------------------------------------------------------------------------------------------
# activities: outputs are pure functions of the inputs, so redelivery after a crash yields the same results
# ---------------------------------------------------------------------------------------------------------
def step(ctx: task.ActivityContext, inp: list) -> str:
    tag, i = inp
    return f"{tag}/step{i}"


def gated_step(ctx: task.ActivityContext, inp: list) -> str:
    tag, i = inp
    GATE.enter(tag)
    return f"{tag}/step{i}"


# ---------------------------------------------------------------------------------------------------------
# orchestrators
# ---------------------------------------------------------------------------------------------------------
def seq3(ctx: task.OrchestrationContext, inp: dict):
    tag, gated = inp["tag"], inp["gated"]
    out = []
    for i in range(3):
        activity = gated_step if (gated and i == 1) else step
        out.append((yield ctx.call_activity(activity, input=[tag, i])))
    return out


def timer_seq(ctx: task.OrchestrationContext, inp: dict):
    tag = inp["tag"]
    first = yield ctx.call_activity(step, input=[tag, 0])
    ctx.set_custom_status("timer-pending")
    yield ctx.create_timer(timedelta(seconds=1))
    second = yield ctx.call_activity(step, input=[tag, 1])
    return [first, "timer", second]


def parent_seq(ctx: task.OrchestrationContext, inp: dict):
    child = yield ctx.call_sub_orchestrator(seq3, input={"tag": inp["tag"] + "-child", "gated": inp["gated"]},
                                            instance_id=inp["child_id"])
    own = yield ctx.call_activity(step, input=[inp["tag"], 9])
    return {"child": child, "own": own}


def wait_event(ctx: task.OrchestrationContext, _):
    value = yield ctx.wait_for_external_event("resume")
    return value


ORCHESTRATORS = [seq3, timer_seq, parent_seq, wait_event]
ACTIVITIES = [step, gated_step]


def expected_output(kind: str, tag: str):
    if kind == "seq3":
        return [f"{tag}/step{i}" for i in range(3)]
    if kind == "timer_seq":
        return [f"{tag}/step0", "timer", f"{tag}/step1"]
    return {"child": [f"{tag}-child/step{i}" for i in range(3)], "own": f"{tag}/step9"}


def schedule(client: TaskHubGrpcClient, kind: str, n: int, gated: bool) -> tuple[str, str, str]:
    iid = new_id(f"crash-{kind}-{n}")
    tag = iid
    if kind == "seq3":
        client.schedule_new_orchestration(seq3, input={"tag": tag, "gated": gated}, instance_id=iid)
    elif kind == "timer_seq":
        client.schedule_new_orchestration(timer_seq, input={"tag": tag}, instance_id=iid)
    else:
        child_id = id_not_on_partition(f"crash-child-{n}", partition_of(iid))
        client.schedule_new_orchestration(
            parent_seq, input={"tag": tag, "gated": gated, "child_id": child_id}, instance_id=iid)
    return iid, kind, tag


def statuses(client: TaskHubGrpcClient, ids: list[str]) -> dict[str, OrchestrationStatus | None]:
    out = {}
    for iid in ids:
        st = client.get_orchestration_state(iid, fetch_payloads=False)
        out[iid] = None if st is None else st.runtime_status
    return out


@pytest.fixture(autouse=True)
def _reset_gate():
    GATE.reset()
    yield
    GATE.open.set()  # never leave worker threads parked


def test_sigkill_mid_flight_then_restart_completes_everything(fresh_runtime):
    rt = fresh_runtime
    worker = new_worker(rt.address, ORCHESTRATORS, ACTIVITIES, thread_pool=48)
    client = TaskHubGrpcClient(host_address=rt.address)
    try:
        plan = ([("seq3", n % 3 == 0) for n in range(15)]
                + [("timer_seq", False) for _ in range(8)]
                + [("parent_seq", n % 2 == 0) for n in range(7)])
        started = [schedule(client, kind, n, gated) for n, (kind, gated) in enumerate(plan)]
        ids = [iid for iid, _, _ in started]
        gated_count = sum(1 for _, gated in plan if gated)

        # Wait for a mix: some instances done, every gated one parked inside its activity.
        def mixed():
            st = statuses(client, ids)
            done = sum(1 for s in st.values() if s == OrchestrationStatus.COMPLETED)
            return done >= 5 and GATE.entered_count() >= gated_count
        wait_until(mixed, timeout=DEADLINE_S, message="some completed and all gated activities in flight")

        completed_before = {}
        for iid, _kind, _tag in started:
            st = client.get_orchestration_state(iid)
            if st.runtime_status == OrchestrationStatus.COMPLETED:
                completed_before[iid] = st.get_output()
        assert len(completed_before) < len(ids), "nothing was mid-flight at the crash"

        # Starts acknowledged just before the crash must survive it.
        late = [schedule(client, "seq3", 100 + n, False) for n in range(5)]
        started += late
        rt.kill()
    finally:
        GATE.open.set()
        client.close()
        worker.stop()

    rt.restart()
    client = TaskHubGrpcClient(host_address=rt.address)
    try:
        # Completed work is durable: visible right away, unchanged.
        for iid, output in completed_before.items():
            st = client.get_orchestration_state(iid)
            assert st is not None and st.runtime_status == OrchestrationStatus.COMPLETED, iid
            assert st.get_output() == output
        # Every acknowledged start exists after the crash.
        missing = [iid for iid, _, _ in started if client.get_orchestration_state(iid) is None]
        assert not missing, f"acknowledged starts lost in the crash: {missing}"

        with running_worker(rt.address, ORCHESTRATORS, ACTIVITIES, thread_pool=48):
            for iid, kind, tag in started:
                st = client.wait_for_orchestration_completion(iid, timeout=CRASH_DEADLINE_S)
                assert st is not None, iid
                assert st.runtime_status == OrchestrationStatus.COMPLETED, (iid, st.runtime_status,
                                                                            st.failure_details)
                assert st.get_output() == expected_output(kind, tag), iid
            for iid, kind, tag in started:
                if kind == "parent_seq":
                    child_id = client.get_orchestration_state(iid).get_input()["child_id"]
                    child = client.get_orchestration_state(child_id)
                    assert child.runtime_status == OrchestrationStatus.COMPLETED
                    assert child.get_output() == expected_output("seq3", tag + "-child")
    finally:
        client.close()


def test_sigterm_shutdown_and_restart_keeps_waiting_instances(fresh_runtime):
    rt = fresh_runtime
    with running_worker(rt.address, ORCHESTRATORS, ACTIVITIES) as _, \
            TaskHubGrpcClient(host_address=rt.address) as client:
        done_id = new_id("done")
        client.schedule_new_orchestration(seq3, input={"tag": done_id, "gated": False}, instance_id=done_id)
        assert client.wait_for_orchestration_completion(done_id, timeout=DEADLINE_S).runtime_status == \
            OrchestrationStatus.COMPLETED
        waiting = [client.schedule_new_orchestration(wait_event, instance_id=new_id("wait")) for _ in range(6)]
        for iid in waiting:
            client.wait_for_orchestration_start(iid, timeout=DEADLINE_S)
    code = rt.terminate()
    assert code == 0, f"runtime did not exit cleanly on SIGTERM (exit code {code})"

    rt.restart()
    with running_worker(rt.address, ORCHESTRATORS, ACTIVITIES) as _, \
            TaskHubGrpcClient(host_address=rt.address) as client:
        st = client.get_orchestration_state(done_id)
        assert st.runtime_status == OrchestrationStatus.COMPLETED
        assert st.get_output() == expected_output("seq3", done_id)
        for n, iid in enumerate(waiting):
            assert client.get_orchestration_state(iid).runtime_status == OrchestrationStatus.RUNNING
            client.raise_orchestration_event(iid, "resume", data=n)
        for n, iid in enumerate(waiting):
            st = client.wait_for_orchestration_completion(iid, timeout=DEADLINE_S)
            assert st.runtime_status == OrchestrationStatus.COMPLETED
            assert st.get_output() == n


def test_restart_with_another_partition_count_is_refused_and_the_data_is_kept(fresh_runtime):
    rt = fresh_runtime
    with TaskHubGrpcClient(host_address=rt.address) as client:
        kept = client.schedule_new_orchestration(wait_event, instance_id=new_id("kept"))
    assert rt.terminate() == 0

    refused = rt.run_refused({"--partitions": str(rt.partitions + 1)})
    assert refused.returncode == 2, (refused.returncode, refused.stdout, refused.stderr)
    assert (f"was created with {rt.partitions} partitions; refusing to start with --partitions {rt.partitions + 1}"
            in refused.stderr), refused.stderr

    rt.restart()  # the recorded count still works, and nothing was lost
    with running_worker(rt.address, ORCHESTRATORS, ACTIVITIES) as _, \
            TaskHubGrpcClient(host_address=rt.address) as client:
        client.wait_for_orchestration_start(kept, timeout=DEADLINE_S)
        client.raise_orchestration_event(kept, "resume", data="after")
        state = client.wait_for_orchestration_completion(kept, timeout=DEADLINE_S)
        assert state.runtime_status == OrchestrationStatus.COMPLETED
        assert state.get_output() == "after"


def test_timer_pending_at_crash_fires_after_restart(fresh_runtime):
    rt = fresh_runtime
    with running_worker(rt.address, ORCHESTRATORS, ACTIVITIES), TaskHubGrpcClient(host_address=rt.address) as client:
        iid = new_id("timer-down")
        client.schedule_new_orchestration(timer_seq, input={"tag": iid}, instance_id=iid)
        # Crash while the 1 s durable timer is pending (it is due while the runtime is down or restarting).
        wait_until(lambda: client.get_orchestration_state(iid).get_custom_status() == "timer-pending",
                   message="timer created")
        rt.kill()
    rt.restart()
    with running_worker(rt.address, ORCHESTRATORS, ACTIVITIES), TaskHubGrpcClient(host_address=rt.address) as client:
        assert client.get_orchestration_state(iid) is not None, "instance lost in the crash"
        st = client.wait_for_orchestration_completion(iid, timeout=DEADLINE_S)
        assert st.runtime_status == OrchestrationStatus.COMPLETED, st.failure_details
        assert st.get_output() == expected_output("timer_seq", iid)
