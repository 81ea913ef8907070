"""The supervisor as pid 1, as in a container started with `CMD durable-runtime ...` and no init: its children
must not take the supervisor's pid for a sign that it died (a child of a dead parent is re-parented to pid 1).
The node runs in a pid namespace of its own (`unshare --pid`, which needs root: skipped otherwise)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from durabletask import client as dt_client
from durabletask import task
from durabletask.client import OrchestrationStatus

from .conftest import SHUTDOWN_DEADLINE_S, EngineRuntime
from .helpers import DEADLINE_S, new_id, running_worker

pytestmark = pytest.mark.engine_only


class PidOneRuntime(EngineRuntime):
    def command(self) -> list[str]:
        return ["unshare", "--pid", "--kill-child=SIGKILL", *super().command()]

    def stop_supervisor(self) -> int:
        """SIGTERM to the supervisor itself (unshare ignores it), and the exit code unshare passes on."""
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        assert len(children) == 1, children
        os.kill(int(children[0]), signal.SIGTERM)
        return self.proc.wait(timeout=SHUTDOWN_DEADLINE_S)


def pid_namespaces_available() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True).returncode == 0


def hello(ctx: task.OrchestrationContext, name: str):
    greeting = yield ctx.call_activity(greet, input=name)
    return greeting


def greet(ctx: task.ActivityContext, name: str) -> str:
    return f"hello {name}"


@pytest.mark.skipif(not pid_namespaces_available(), reason="needs root and unshare --pid")
def test_a_supervisor_running_as_pid_one_serves_and_stops_cleanly(tmp_path: Path):
    rt = PidOneRuntime(tmp_path / "data")
    rt.start()  # Hello answered: the gateway runs
    try:
        with running_worker(rt.address, [hello], [greet]):
            client = dt_client.TaskHubGrpcClient(host_address=rt.address)
            try:
                instance_id = client.schedule_new_orchestration(hello, input="pid 1", instance_id=new_id("pid1"))
                state = client.wait_for_orchestration_completion(instance_id, timeout=DEADLINE_S)
                assert state.runtime_status == OrchestrationStatus.COMPLETED
                assert state.get_output() == "hello pid 1"
            finally:
                client.close()
        assert "restarting" not in rt.log_path.read_text(errors="replace"), rt.log_tail()
        assert rt.stop_supervisor() == 0, rt.log_tail()
    finally:
        rt.close()
