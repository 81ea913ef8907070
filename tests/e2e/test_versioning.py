"""Orchestration versions through the official SDK, end to end.

- The version given to schedule_new_orchestration(version=...) is the executionStarted.version the
  orchestrator sees (ctx.version), what GetInstance reports and what the history holds; the same for
  call_sub_orchestrator(version=...), VersioningOptions.default_version and continue_as_new(new_version=...).
- Activity versions: the SDK never sets ScheduleTaskAction.version, so a raw work-item stream sets one and
  checks that it reaches the ActivityRequest and the taskScheduled history event.
- The worker's version checks: a mismatch with VersionFailureStrategy.FAIL fails the instance (VersionMismatch);
  with REJECT the worker abandons the work item, the instance stays PENDING, and a worker of the matching
  version that connects later completes it.

Every wait polls against a deadline; the only fixed waits are short windows that show something does not happen.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
import pytest
from durabletask import client as dt_client
from durabletask import task
from durabletask import worker as dt_worker
from durabletask.internal import helpers as ph
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.worker import VersionFailureStrategy, VersioningOptions, VersionMatchStrategy

from .helpers import DEADLINE_S, RawStream, cleanup, new_id, status_of, wait_until

OrchestrationStatus = dt_client.OrchestrationStatus

# The engine holds an abandoned item back 1 s, then 2 s, 4 s, ...: retries ~1 s, ~3 s and ~7 s after the first.
REJECT_DEADLINE_S = 10.0


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------
class LogCapture(logging.Handler):
    """Keeps the messages a worker logs, so a test can see e.g. that it abandoned a work item."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self._mutex = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._mutex:
            self.messages.append(record.getMessage())

    def count(self, text: str) -> int:
        with self._mutex:
            return sum(text in m for m in self.messages)


@contextlib.contextmanager
def sdk_worker(address: str, orchestrators: Iterable[Callable[..., Any]] = (),
               activities: Iterable[Callable[..., Any]] = (),
               versioning: VersioningOptions | None = None) -> Iterator[tuple[dt_worker.TaskHubGrpcWorker, LogCapture]]:
    """A started worker (its log captured) that is stopped when the block ends."""
    capture = LogCapture()
    logger = logging.Logger(f"e2e-versioning-worker-{uuid.uuid4().hex[:6]}", logging.INFO)
    logger.addHandler(capture)
    w = dt_worker.TaskHubGrpcWorker(host_address=address, logger=logger)
    for fn in orchestrators:
        w.add_orchestrator(fn)
    for fn in activities:
        w.add_activity(fn)
    if versioning is not None:
        w.use_versioning(versioning)
    w.start()
    try:
        yield w, capture
    finally:
        w.stop()


def stored_version(raw_stub: Any, instance_id: str) -> str | None:
    """The version GetInstance reports (the SDK's OrchestrationState has no version field)."""
    res = raw_stub.GetInstance(pb.GetInstanceRequest(instanceId=instance_id), timeout=DEADLINE_S)
    assert res.exists, instance_id
    state = res.orchestrationState
    return state.version.value if state.HasField("version") else None


def completed(client: dt_client.TaskHubGrpcClient, instance_id: str,
              timeout: float = DEADLINE_S) -> dt_client.OrchestrationState:
    state = client.wait_for_orchestration_completion(instance_id, timeout=int(timeout))
    assert state is not None, instance_id
    return state


# ---------------------------------------------------------------------------------------------------------
# the version reaches the orchestrator, GetInstance and the history
# ---------------------------------------------------------------------------------------------------------
# The SDK's in-memory backend reports no version in GetInstance and no parent instance: engine only.
@pytest.mark.engine_only
def test_version_flows_to_orchestrator_get_instance_and_history(runtime: Any, client: Any, raw_stub: Any) -> None:
    def v_report(ctx: task.OrchestrationContext, _: Any) -> Any:
        return {"version": ctx.version}

    with sdk_worker(runtime.address, [v_report]):
        versioned = client.schedule_new_orchestration(v_report, instance_id=new_id("ver"), version="1.2")
        plain = client.schedule_new_orchestration(v_report, instance_id=new_id("ver-none"))
        state = completed(client, versioned)
        assert state.runtime_status == OrchestrationStatus.COMPLETED, state.failure_details
        assert state.get_output() == {"version": "1.2"}
        plain_state = completed(client, plain)
        assert plain_state.runtime_status == OrchestrationStatus.COMPLETED, plain_state.failure_details
        assert plain_state.get_output() == {"version": None}

    assert stored_version(raw_stub, versioned) == "1.2"
    assert stored_version(raw_stub, plain) is None

    started = [e for e in client.get_orchestration_history(versioned) if type(e).__name__ == "ExecutionStartedEvent"]
    assert len(started) == 1 and started[0].version == "1.2", started
    plain_started = [e for e in client.get_orchestration_history(plain)
                     if type(e).__name__ == "ExecutionStartedEvent"]
    assert len(plain_started) == 1 and not plain_started[0].version, plain_started


# The SDK's in-memory backend reports no version in GetInstance and no parent instance: engine only.
@pytest.mark.engine_only
def test_sub_orchestrator_version_and_worker_default_version(runtime: Any, client: Any, raw_stub: Any) -> None:
    def v_child(ctx: task.OrchestrationContext, _: Any) -> Any:
        return {"version": ctx.version, "parent": ctx.parent_instance_id}

    def v_parent(ctx: task.OrchestrationContext, _: Any) -> Any:
        explicit = yield ctx.call_sub_orchestrator(v_child, instance_id=f"{ctx.instance_id}-explicit", version="3.1")
        default = yield ctx.call_sub_orchestrator(v_child, instance_id=f"{ctx.instance_id}-default")
        return {"parent": ctx.version, "explicit": explicit, "default": default}

    # match_strategy NONE: no check; default_version is what call_sub_orchestrator uses without a version.
    options = VersioningOptions(version="1.0", default_version="9.0", match_strategy=VersionMatchStrategy.NONE)
    with sdk_worker(runtime.address, [v_parent, v_child], versioning=options):
        parent = client.schedule_new_orchestration(v_parent, instance_id=new_id("ver-parent"), version="1.0")
        state = completed(client, parent)
    assert state.runtime_status == OrchestrationStatus.COMPLETED, state.failure_details
    assert state.get_output() == {
        "parent": "1.0",
        "explicit": {"version": "3.1", "parent": parent},
        "default": {"version": "9.0", "parent": parent},
    }
    assert stored_version(raw_stub, f"{parent}-explicit") == "3.1"
    assert stored_version(raw_stub, f"{parent}-default") == "9.0"
    created = {e.instance_id: e.version for e in client.get_orchestration_history(parent)
               if type(e).__name__ == "SubOrchestrationInstanceCreatedEvent"}
    assert created == {f"{parent}-explicit": "3.1", f"{parent}-default": "9.0"}


# The SDK's in-memory backend reports no version in GetInstance and no parent instance: engine only.
@pytest.mark.engine_only
def test_continue_as_new_with_new_version(runtime: Any, client: Any, raw_stub: Any) -> None:
    def v_upgrade(ctx: task.OrchestrationContext, seen: list[str | None]) -> Any:
        seen = [*seen, ctx.version]
        if ctx.version == "1.0":
            ctx.continue_as_new(seen, new_version="2.0")
            return None
        return seen

    with sdk_worker(runtime.address, [v_upgrade]):
        instance_id = client.schedule_new_orchestration(v_upgrade, input=[], instance_id=new_id("ver-can"),
                                                        version="1.0")
        state = completed(client, instance_id)
    assert state.runtime_status == OrchestrationStatus.COMPLETED, state.failure_details
    assert state.get_output() == ["1.0", "2.0"]
    assert stored_version(raw_stub, instance_id) == "2.0"


# ---------------------------------------------------------------------------------------------------------
# activity versions (the SDK does not set them; a raw stream does)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.engine_only
def test_activity_version_reaches_activity_request_and_history(runtime: Any, client: Any, raw_stub: Any,
                                                              raw_channel: grpc.Channel) -> None:
    orch_name, act_name = f"raw_v_orch_{uuid.uuid4().hex[:6]}", f"raw_v_act_{uuid.uuid4().hex[:6]}"
    filters = pb.WorkItemFilters(orchestrations=[pb.OrchestrationFilter(name=orch_name)],
                                 activities=[pb.ActivityFilter(name=act_name)])
    stream = RawStream(raw_channel, pb.GetWorkItemsRequest(workItemFilters=filters))
    instance_id = new_id("ver-act")
    try:
        # Pending until the stream is registered at the gateway, then dispatched to it.
        client.schedule_new_orchestration(orch_name, instance_id=instance_id, version="1.0")
        first = stream.next()
        assert first.HasField("orchestratorRequest") and first.orchestratorRequest.instanceId == instance_id
        schedule = ph.new_schedule_task_action(0, act_name, '"in"', None)
        schedule.scheduleTask.version.value = "2.5"
        raw_stub.CompleteOrchestratorTask(pb.OrchestratorResponse(
            instanceId=instance_id, actions=[schedule], completionToken=first.completionToken), timeout=DEADLINE_S)

        activity = stream.next()
        assert activity.HasField("activityRequest"), activity
        request = activity.activityRequest
        assert (request.name, request.taskId, request.input.value) == (act_name, 0, '"in"')
        assert request.HasField("version") and request.version.value == "2.5"
        raw_stub.CompleteActivityTask(pb.ActivityResponse(
            instanceId=instance_id, taskId=0, result=ph.get_string_value('"out"'),
            completionToken=activity.completionToken), timeout=DEADLINE_S)

        second = stream.next()
        assert second.HasField("orchestratorRequest"), second
        scheduled = [e.taskScheduled for e in second.orchestratorRequest.pastEvents if e.HasField("taskScheduled")]
        assert len(scheduled) == 1 and scheduled[0].version.value == "2.5", scheduled
        started = [e.executionStarted for e in second.orchestratorRequest.pastEvents
                   if e.HasField("executionStarted")]
        assert len(started) == 1 and started[0].version.value == "1.0"
        done = ph.new_complete_orchestration_action(1, pb.ORCHESTRATION_STATUS_COMPLETED, '"done"')
        raw_stub.CompleteOrchestratorTask(pb.OrchestratorResponse(
            instanceId=instance_id, actions=[done], completionToken=second.completionToken), timeout=DEADLINE_S)
        state = completed(client, instance_id)
        assert state.runtime_status == OrchestrationStatus.COMPLETED and state.serialized_output == '"done"'
        history = client.get_orchestration_history(instance_id)
        assert [e.version for e in history if type(e).__name__ == "TaskScheduledEvent"] == ["2.5"]
    finally:
        stream.close()
        cleanup(client, instance_id)


# ---------------------------------------------------------------------------------------------------------
# the worker's version checks
# ---------------------------------------------------------------------------------------------------------
def test_fail_strategy_fails_mismatched_versions(runtime: Any, client: Any) -> None:
    def v_strict(ctx: task.OrchestrationContext, _: Any) -> Any:
        return ctx.version

    def v_older(ctx: task.OrchestrationContext, _: Any) -> Any:
        return ctx.version

    strict = VersioningOptions(version="1.0", match_strategy=VersionMatchStrategy.STRICT,
                               failure_strategy=VersionFailureStrategy.FAIL)
    older = VersioningOptions(version="1.0", match_strategy=VersionMatchStrategy.CURRENT_OR_OLDER,
                              failure_strategy=VersionFailureStrategy.FAIL)
    with sdk_worker(runtime.address, [v_strict], versioning=strict):
        ok = client.schedule_new_orchestration(v_strict, instance_id=new_id("ver-ok"), version="1.0")
        bad = client.schedule_new_orchestration(v_strict, instance_id=new_id("ver-bad"), version="2.0")
        none = client.schedule_new_orchestration(v_strict, instance_id=new_id("ver-nov"))
        ok_state, bad_state, none_state = completed(client, ok), completed(client, bad), completed(client, none)
    assert ok_state.runtime_status == OrchestrationStatus.COMPLETED and ok_state.get_output() == "1.0"
    for state, shown in ((bad_state, "'2.0'"), (none_state, "'None'")):
        assert state.runtime_status == OrchestrationStatus.FAILED, state
        assert state.failure_details is not None
        assert state.failure_details.error_type == "VersionMismatch", state.failure_details
        assert shown in state.failure_details.message and "'1.0'" in state.failure_details.message

    with sdk_worker(runtime.address, [v_older], versioning=older):
        same = client.schedule_new_orchestration(v_older, instance_id=new_id("ver-same"), version="1.0")
        lower = client.schedule_new_orchestration(v_older, instance_id=new_id("ver-low"), version="0.9")
        higher = client.schedule_new_orchestration(v_older, instance_id=new_id("ver-high"), version="1.1")
        states = {name: completed(client, iid) for name, iid in (("same", same), ("lower", lower), ("higher", higher))}
    assert states["same"].get_output() == "1.0" and states["lower"].get_output() == "0.9"
    high = states["higher"]
    assert high.runtime_status == OrchestrationStatus.FAILED and high.failure_details is not None
    assert high.failure_details.error_type == "VersionMismatch"
    assert "greater than the worker version '1.0'" in high.failure_details.message


REJECT_OLD = VersioningOptions(version="1.0", match_strategy=VersionMatchStrategy.STRICT,
                               failure_strategy=VersionFailureStrategy.REJECT)
REJECT_NEW = VersioningOptions(version="2.0", match_strategy=VersionMatchStrategy.STRICT,
                               failure_strategy=VersionFailureStrategy.REJECT)


def _reject_then_match(runtime: Any, client: Any, keep_old_worker: bool) -> None:
    """A 2.0 instance goes to a 1.0 REJECT worker first; a 2.0 worker connects after the first rejection (the
    1.0 worker stays connected, or leaves first, as in a rolling upgrade) and must complete it."""
    runs: list[str] = []

    def v_rejected(ctx: task.OrchestrationContext, _: Any) -> Any:
        if not ctx.is_replaying:
            runs.append(ctx.version or "")
        return f"ran {ctx.version}"

    instance_id = new_id("ver-reject")
    abandoned = f"Abandoning orchestration. InstanceId = '{instance_id}'"
    try:
        with contextlib.ExitStack() as stack:
            old_worker, old_log = stack.enter_context(sdk_worker(runtime.address, [v_rejected], versioning=REJECT_OLD))
            client.schedule_new_orchestration(v_rejected, instance_id=instance_id, version="2.0")
            wait_until(lambda: old_log.count(abandoned) >= 1, timeout=DEADLINE_S,
                       message="the 1.0 worker to abandon the 2.0 instance")
            # Rejected, not failed: the instance has not started, and nothing ran.
            assert status_of(client, instance_id) == OrchestrationStatus.PENDING
            assert runs == []
            if not keep_old_worker:
                old_worker.stop()
            _, new_log = stack.enter_context(sdk_worker(runtime.address, [v_rejected], versioning=REJECT_NEW))
            start = time.monotonic()
            wait_until(
                lambda: status_of(client, instance_id) not in (OrchestrationStatus.PENDING, OrchestrationStatus.RUNNING),
                timeout=REJECT_DEADLINE_S,
                message=lambda: (f"the 2.0 worker to complete {instance_id}: status {status_of(client, instance_id)},"
                                 f" abandoned {old_log.count(abandoned)}x by the 1.0 worker and"
                                 f" {new_log.count(abandoned)}x by the 2.0 worker, runs {runs}"),
            )
            state = completed(client, instance_id, timeout=5)
            assert state.runtime_status == OrchestrationStatus.COMPLETED, (state, time.monotonic() - start)
            assert state.get_output() == "ran 2.0"
            assert new_log.count(abandoned) == 0
        assert runs == ["2.0"]
    finally:
        cleanup(client, instance_id)


def test_reject_strategy_pending_until_matching_worker_connects_after_old_worker_left(runtime: Any, client: Any) -> None:
    _reject_then_match(runtime, client, keep_old_worker=False)


def test_reject_strategy_pending_until_matching_worker_connects_while_old_worker_stays(runtime: Any,
                                                                                       client: Any) -> None:
    _reject_then_match(runtime, client, keep_old_worker=True)
