"""Fault injection under a sustained mixed load: SIGKILL of one partition, of the gateway, of the whole runtime,
and of the SDK worker mid-work-item. After each fault every acknowledged start completes with its exact output,
every acknowledged raise is reflected exactly once, and cross-partition messages take effect exactly once.

The load (tests/e2e/faults_workload.py) folds what each orchestration observes into its output: activity results
in order, the payloads of the external events it received, the tags of the instances that sent it events. An
exact COMPLETED output therefore proves its history has no missing or duplicated event.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from durabletask.client import OrchestrationStatus

from .conftest import REPO_ROOT, subprocess_env
from .faults_workload import (
    Background,
    Load,
    Planned,
    gateway_pid,
    partition_pid,
    start_worker,
)
from .helpers import PARTITIONS, hello_ok, partition_of, wait_until

pytestmark = [pytest.mark.crash, pytest.mark.engine_only]

WAIT_S = 60.0
TERMINAL = (OrchestrationStatus.COMPLETED, OrchestrationStatus.FAILED, OrchestrationStatus.TERMINATED)
#: When set, each test appends its figures (instances, faults, losses) to this JSON-lines file.
FIGURES_PATH = os.environ.get("DURABLE_E2E_FIGURES")


# ---------------------------------------------------------------------------------------------------------
# the scenario: plan, first wave, background load, fault, checks
# ---------------------------------------------------------------------------------------------------------
class Scenario:
    def __init__(self, rt: Any, tmp_path: Path) -> None:
        self.rt = rt
        self.gate = tmp_path / "gate"
        self.gate.mkdir()
        self.load = Load(rt.address, self.gate)
        load = self.load
        receivers = [load.plan_receiver(p % PARTITIONS) for p in range(2)]
        self.receivers = [r.instance_id for r in receivers]
        self.events = [load.plan_events() for _ in range(4)]
        # First wave: started before the fault; two gated activities park in the worker.
        self.first: list[Planned] = [
            *receivers, *self.events,
            load.plan_seq(gated=True), load.plan_seq(timer_s=1.5), load.plan_seq(), load.plan_seq(),
            load.plan_parent(gated=True), load.plan_parent(), load.plan_parent(),
            *(load.plan_sender(self.receivers[n % 2]) for n in range(3)),
        ]
        self.gated_first = 2
        # Second wave, started by a background thread while the fault happens, with events raised in between.
        second: list[Planned] = [
            load.plan_seq(timer_s=1.0), load.plan_seq(), load.plan_seq(timer_s=2.0), load.plan_seq(),
            load.plan_seq(), load.plan_seq(), load.plan_parent(), load.plan_parent(), load.plan_parent(),
            *(load.plan_sender(self.receivers[n % 2]) for n in range(3)),
        ]
        steps: list[Callable[[], None]] = []
        for k in range(6):
            for e in self.events:
                steps.append(lambda iid=e.instance_id, k=k: load.raise_once(iid, f"{iid}#{k}"))
            for planned in second[2 * k:2 * k + 2]:
                steps.append(lambda p=planned: load.start(p))
        self.background = Background(steps)

    def gated_entered(self) -> list[Path]:
        return list(self.gate.glob("entered-*"))

    def run_first_wave(self) -> None:
        for planned in self.first:
            self.load.start(planned)
        self.background.start()
        wait_until(lambda: len(self.gated_entered()) >= self.gated_first
                   and self.background.done_steps >= len(self.background.steps) // 3,
                   timeout=WAIT_S, message="gated activities parked and the background load under way")

    def finish_load(self) -> None:
        self.background.join(timeout=2 * WAIT_S)
        assert not self.background.is_alive(), "background load did not finish"
        if self.background.error is not None:
            raise self.background.error
        (self.gate / "open").touch()

    def close_streams(self) -> None:
        """`fin` to each receiver once all its senders completed and it counted them; `end` to event takers."""
        load = self.load
        for receiver, senders in load.receivers.items():
            wait_until(lambda s=senders: all(v == OrchestrationStatus.COMPLETED for v in load.statuses(s).values()),
                       timeout=WAIT_S, message=lambda s=senders: f"senders completed: {load.statuses(s)}")
            count = len(senders)
            wait_until(lambda r=receiver, n=count: (load.state(r).get_custom_status() or 0) >= n,
                       timeout=WAIT_S, message=f"receiver {receiver} counted its senders")
            load.raise_until_ok(receiver, "fin")
        for e in self.events:
            load.raise_until_ok(e.instance_id, "end")

    def complete_and_check(self) -> dict[str, Any]:
        """After the fault: the rest of the load, the streams' ends, then the checks; returns the figures."""
        self.finish_load()
        self.close_streams()
        return self.check()

    def close(self, worker: Any) -> None:
        """Always, fault or not: open the gate (no activity stays parked), stop the worker, close clients."""
        (self.gate / "open").touch()
        stop_worker(worker)
        self.load.close()

    def check(self) -> dict[str, Any]:
        """Every acknowledged start completes with the exact output; returns the figures."""
        load = self.load
        ids = sorted(load.acked)
        assert set(ids) == set(load.instances), "a planned start was never acknowledged"
        children = {p.input["child_id"]: p.input["child_input"] for p in load.instances.values()
                    if p.orchestrator == "fw_parent"}

        def all_terminal() -> bool:
            st = load.statuses(ids + list(children))
            return all(s in TERMINAL for s in st.values())
        wait_until(all_terminal, timeout=WAIT_S, interval=0.2,
                   message=lambda: f"all instances terminal: {self._not_done(ids + list(children))}")

        problems: list[str] = []
        for iid in ids:
            planned = load.instances[iid]
            st = load.state(iid)
            if st is None:
                problems.append(f"{iid}: acknowledged start lost")
                continue
            if st.runtime_status != OrchestrationStatus.COMPLETED:
                problems.append(f"{iid}: {st.runtime_status} {st.failure_details}")
                continue
            output = st.get_output()
            if planned.orchestrator == "fw_events":
                problems += _check_events(iid, output, load.events_acked[iid], load.events_tried[iid])
            elif planned.orchestrator == "fw_receiver":
                if sorted(output) != sorted(load.receivers[iid]):
                    problems.append(f"{iid}: received {sorted(output)}, senders {sorted(load.receivers[iid])}")
            elif output != planned.expected:
                problems.append(f"{iid}: output {output!r} != {planned.expected!r}")
        for child_id in children:
            st = load.state(child_id)
            if st is None or st.runtime_status != OrchestrationStatus.COMPLETED:
                problems.append(f"child {child_id}: {st and st.runtime_status}")
        figures = {
            "instances": len(ids) + len(children),
            "events_acked": load.stats.raised_ok,
            "events_unacked": load.stats.raised_failed,
            "start_retries": load.stats.start_retries,
            "cross_partition_sends": sum(len(s) for s in load.receivers.values()),
            "lost": len(problems),
        }
        assert not problems, "\n".join(problems)
        return figures

    def _not_done(self, ids: list[str]) -> dict[str, Any]:
        return {i: s for i, s in self.load.statuses(ids).items() if s not in TERMINAL}


def _check_events(iid: str, got: list[str], acked: list[str], tried: set[str]) -> list[str]:
    problems = []
    if len(got) != len(set(got)):
        problems.append(f"{iid}: an event was applied twice: {got}")
    if not set(acked) <= set(got):
        problems.append(f"{iid}: acknowledged events lost: {sorted(set(acked) - set(got))}")
    if not set(got) <= tried:
        problems.append(f"{iid}: events never raised: {sorted(set(got) - tried)}")
    if [p for p in got if p in set(acked)] != acked:
        problems.append(f"{iid}: acknowledged events out of order: {got} vs {acked}")
    return problems


def record(test: str, figures: dict[str, Any], faults: int) -> None:
    figures = {"test": test, "faults": faults, **figures}
    print(f"figures: {json.dumps(figures)}")
    if FIGURES_PATH:
        with open(FIGURES_PATH, "a") as f:
            f.write(json.dumps(figures) + "\n")


def kill_and_wait_restart(find_pid: Callable[[], int | None], what: str) -> None:
    """SIGKILL the process `find_pid` returns, then wait until the supervisor has started a new one."""
    old = wait_until(find_pid, timeout=WAIT_S, message=f"{what} running")
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: (pid := find_pid()) is not None and pid != old, timeout=WAIT_S,
               message=f"{what} restarted by the supervisor")


def stop_worker(w: Any) -> None:
    if w is not None:
        w.stop()


# ---------------------------------------------------------------------------------------------------------
# the faults
# ---------------------------------------------------------------------------------------------------------
def test_sigkill_one_partition_under_load(fresh_runtime, tmp_path):
    rt = fresh_runtime
    sc = Scenario(rt, tmp_path)
    worker = start_worker(rt.address)
    try:
        sc.run_first_wave()
        # The partition owning receiver 0 (inbound cross-partition messages), then another one (its senders'
        # outboxes), each while instances are mid-flight.
        first = partition_of(sc.receivers[0])
        kill_and_wait_restart(lambda: partition_pid(rt, first), f"partition-{first}")
        wait_until(lambda: sc.background.done_steps >= 2 * len(sc.background.steps) // 3 or
                   not sc.background.is_alive(), timeout=WAIT_S, message="load resumed after the first kill")
        second = (first + 1) % PARTITIONS
        kill_and_wait_restart(lambda: partition_pid(rt, second), f"partition-{second}")
        figures = sc.complete_and_check()
    finally:
        sc.close(worker)
    assert "exited with -9" in rt.log_tail(400)
    record("test_sigkill_one_partition_under_load", figures, faults=2)


def test_sigkill_gateway_under_load(fresh_runtime, tmp_path):
    rt = fresh_runtime
    sc = Scenario(rt, tmp_path)
    worker = start_worker(rt.address)
    try:
        sc.run_first_wave()
        # The worker holds the gated activities' work items when the gateway dies; it reconnects by itself.
        kill_and_wait_restart(lambda: gateway_pid(rt), "gateway-0")
        wait_until(lambda: hello_ok(rt.address), timeout=WAIT_S, message="gateway serving again")
        figures = sc.complete_and_check()
    finally:
        sc.close(worker)
    record("test_sigkill_gateway_under_load", figures, faults=1)


def test_sigkill_whole_runtime_then_restart_under_load(fresh_runtime, tmp_path):
    rt = fresh_runtime
    sc = Scenario(rt, tmp_path)
    worker = start_worker(rt.address)  # kept running: it reconnects to the restarted runtime
    try:
        sc.run_first_wave()
        rt.kill()
        rt.restart()
        figures = sc.complete_and_check()
    finally:
        sc.close(worker)
    record("test_sigkill_whole_runtime_then_restart_under_load", figures, faults=1)


def _worker_subprocess(address: str, log_path: Path) -> subprocess.Popen[bytes]:
    env = subprocess_env()
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "tests.e2e.faults_workload", address], cwd=str(REPO_ROOT),
                                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def test_sigkill_worker_mid_work_item_then_new_worker(fresh_runtime, tmp_path):
    rt = fresh_runtime
    sc = Scenario(rt, tmp_path)
    proc = _worker_subprocess(rt.address, tmp_path / "worker.log")
    worker = None
    try:
        sc.run_first_wave()
        parked = sc.gated_entered()
        assert not list(sc.gate.glob("done-*")), "a gated activity returned before the kill"
        proc.kill()  # SIGKILL while the gated activities' work items are provably in progress
        proc.wait(timeout=WAIT_S)
        worker = start_worker(rt.address)
        figures = sc.complete_and_check()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sc.close(worker)
    # The activities in progress in the killed worker ran again, to completion, in the new one.
    parked_tags = {p.name.split("-", 1)[1].rsplit(".", 2)[0] for p in parked}
    done_tags = {p.name.split("-", 1)[1].rsplit(".", 2)[0] for p in sc.gate.glob("done-*")
                 if int(p.name.rsplit(".", 2)[1]) == os.getpid()}
    assert parked_tags <= done_tags, f"parked {parked_tags}, re-run {done_tags}"
    record("test_sigkill_worker_mid_work_item_then_new_worker", figures, faults=1)


def test_a_frozen_worker_gives_its_work_items_back(tmp_path):
    """A worker process that stops (SIGSTOP: paused, hung, cut off) keeps its connection looking open, and the
    heartbeats renew what its streams hold: it held its items, and kept being sent new ones, while a healthy
    worker sat idle, for as long as it stayed frozen. The gateway's keepalive pings go unanswered for
    --keepalive-timeout-s, so it closes that connection: the frozen worker's streams end, and every instance completes on
    the healthy one."""
    from durabletask.client import TaskHubGrpcClient

    from .conftest import EngineRuntime
    from .faults_workload import expected_seq, fw_seq

    rt = EngineRuntime(tmp_path / "data", extra_args=["--keepalive-s", "1", "--keepalive-timeout-s", "1"])
    rt.start()
    client = TaskHubGrpcClient(host_address=rt.address)
    frozen = _worker_subprocess(rt.address, tmp_path / "frozen-worker.log")
    healthy = None
    try:
        probe = {"tag": "probe"}
        client.schedule_new_orchestration(fw_seq, input=probe, instance_id="frozen-probe")
        state = client.wait_for_orchestration_completion("frozen-probe", timeout=WAIT_S)  # the frozen one is in
        assert state is not None and state.runtime_status == OrchestrationStatus.COMPLETED, state
        os.kill(frozen.pid, signal.SIGSTOP)
        healthy = start_worker(rt.address)
        inputs = {f"frozen-{n}": {"tag": f"t{n}"} for n in range(20)}
        for instance_id, inp in inputs.items():
            client.schedule_new_orchestration(fw_seq, input=inp, instance_id=instance_id)
        for instance_id, inp in inputs.items():
            state = client.wait_for_orchestration_completion(instance_id, timeout=WAIT_S)
            assert state is not None and state.runtime_status == OrchestrationStatus.COMPLETED, (instance_id, state)
            assert json.loads(state.serialized_output) == expected_seq(inp)
    finally:
        frozen.kill()
        frozen.wait()
        if healthy is not None:
            healthy.stop()
        client.close()
        rt.close()
