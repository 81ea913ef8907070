"""Fixtures for the end-to-end suite: a runtime (our engine as a subprocess, or the SDK's in-memory
backend when DURABLE_E2E_BACKEND=inmemory), SDK workers and SDK clients pointed at it.

Every wait polls a condition against a deadline; nothing sleeps for a fixed time to "let things happen".
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from durabletask import client as dt_client
from durabletask import worker as dt_worker
from durabletask.internal import orchestrator_service_pb2_grpc as stubs

from .helpers import INMEMORY, PARTITIONS, hello_ok, new_worker

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_DEADLINE_S = float(os.environ.get("DURABLE_E2E_STARTUP_DEADLINE_S", "30"))
# The engine drains in-flight work for up to drain_grace_s (20 s by default) on SIGTERM.
SHUTDOWN_DEADLINE_S = float(os.environ.get("DURABLE_E2E_SHUTDOWN_DEADLINE_S", "30"))
LOG_TAIL_LINES = 80
# The module run as `python -m MODULE --partitions N --port P --host H --data-dir D`.
RUNTIME_MODULE = os.environ.get("DURABLE_E2E_RUNTIME_MODULE", "runtime")
# Debug aid: run engine_only tests against the in-memory backend too, to see how it differs.
FORCE_ENGINE_ONLY = os.environ.get("DURABLE_E2E_FORCE_ENGINE_ONLY") == "1"

# Runtimes alive right now; their log tails are attached to failing test reports.
_ACTIVE_RUNTIMES: list[Any] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: end-to-end test driving a runtime with the official SDK")
    config.addinivalue_line(
        "markers", "engine_only: needs our engine (skipped when DURABLE_E2E_BACKEND=inmemory)"
    )
    config.addinivalue_line("markers", "crash: kills / restarts the runtime (engine only)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason="engine-only behaviour; DURABLE_E2E_BACKEND=inmemory")
    for item in items:
        if here not in item.path.parents:
            continue
        item.add_marker(pytest.mark.e2e)
        if INMEMORY and item.get_closest_marker("crash"):
            item.add_marker(skip)
        elif INMEMORY and item.get_closest_marker("engine_only") and not FORCE_ENGINE_ONLY:
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    report = yield
    if report.failed:
        for rt in list(_ACTIVE_RUNTIMES):
            tail = rt.log_tail()
            if tail:
                report.sections.append((f"runtime log tail ({rt.log_path})", tail))
    return report


def subprocess_env(environ: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment for a subprocess of this suite (`environ`, default ours): this checkout first on
    PYTHONPATH, plus `extra`."""
    env = dict(os.environ if environ is None else environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_range(count: int, attempts: int = 200) -> int:
    """The first of `count` consecutive loopback ports that are free now (for --zmq-base-port)."""
    for _ in range(attempts):
        base = random.randrange(20_000, 60_000 - count)
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports found")


def _group_alive(pgid: int) -> bool:
    """True while any non-zombie process is left in process group `pgid`."""
    proc = Path("/proc")
    if proc.is_dir():
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # "pid (comm) state ppid pgrp ..." -- comm may contain spaces/parens, so split after the last ')'.
            fields = stat[stat.rfind(")") + 2:].split()
            if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                return True
        return False
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _set_parent_death_signal() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG


class EngineRuntime:
    """Our engine as a subprocess in its own session: `python -m runtime --partitions N --port P ...`."""

    kind = "engine"
    supports_restart = True

    def __init__(self, data_dir: Path, partitions: int = PARTITIONS, port: int | None = None,
                 extra_args: Iterable[str] = ()) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.partitions = partitions
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.address = f"{self.host}:{self.port}"
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-runtime.log"
        self.extra_args = list(extra_args) + os.environ.get("DURABLE_E2E_RUNTIME_ARGS", "").split()
        if "tcp" in self.extra_args and "--zmq-base-port" not in self.extra_args:  # every node its own ports
            self.extra_args += ["--zmq-base-port", str(free_port_range(partitions))]
        self.proc: subprocess.Popen[bytes] | None = None
        self.pgid: int | None = None
        self.starts = 0

    # -- process control -------------------------------------------------------------------------
    def command(self) -> list[str]:
        return [
            sys.executable, "-m", RUNTIME_MODULE,
            "--partitions", str(self.partitions),
            "--port", str(self.port),
            "--host", self.host,
            "--data-dir", str(self.data_dir),
            *self.extra_args,
        ]

    def start(self) -> EngineRuntime:
        assert self.proc is None or self.proc.poll() is not None, "runtime already running"
        env = subprocess_env()
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start #{self.starts}: {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(),
                cwd=str(REPO_ROOT),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_set_parent_death_signal if sys.platform.startswith("linux") else None,
            )
        self.pgid = self.proc.pid  # a new session makes the child its own process-group leader
        if self not in _ACTIVE_RUNTIMES:
            _ACTIVE_RUNTIMES.append(self)
        self.wait_ready()
        return self

    def run_refused(self, flags: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
        """This runtime's command with `flags` set to other values (and `extra` added), run in the foreground
        until it exits: for a start that must be refused. A start that is not refused times out."""
        command = self.command()
        for flag, value in flags.items():
            command[command.index(flag) + 1] = value
        return subprocess.run([*command, *extra], cwd=REPO_ROOT, env=subprocess_env(), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=STARTUP_DEADLINE_S)

    def wait_ready(self, timeout: float = STARTUP_DEADLINE_S) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"runtime exited with code {self.proc.returncode} during startup\n{self.log_tail()}"
                )
            if hello_ok(self.address, timeout=1.0):
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(f"runtime not ready on {self.address} after {timeout}s\n{self.log_tail()}")
            time.sleep(0.1)

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _wait_group_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.pgid is not None and _group_alive(self.pgid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def kill(self) -> None:
        """SIGKILL the whole process group (gateway + partitions), like a machine crash."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        self.proc.wait(timeout=SHUTDOWN_DEADLINE_S)
        if not self._wait_group_gone(SHUTDOWN_DEADLINE_S):
            raise RuntimeError(f"processes of group {self.pgid} survived SIGKILL")

    def terminate(self, timeout: float = SHUTDOWN_DEADLINE_S) -> int | None:
        """SIGTERM, then SIGKILL the group after `timeout`. Returns the exit code (None if it had to be killed)."""
        if self.proc is None or self.proc.poll() is not None:
            if self.pgid is not None and _group_alive(self.pgid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pgid, signal.SIGKILL)
                self._wait_group_gone(SHUTDOWN_DEADLINE_S)
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        # Whatever is left of the group (stuck main process or orphaned children) is killed.
        if not self._wait_group_gone(5.0 if code is not None else 0.0):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGKILL)
            self.proc.wait(timeout=SHUTDOWN_DEADLINE_S)
            self._wait_group_gone(SHUTDOWN_DEADLINE_S)
        return code

    def restart(self) -> EngineRuntime:
        """Start again on the same data dir and port (after kill() or terminate())."""
        if self.is_running():
            self.terminate()
        return self.start()

    def close(self) -> None:
        self.terminate()
        if self in _ACTIVE_RUNTIMES:
            _ACTIVE_RUNTIMES.remove(self)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class InMemoryRuntime:
    """The SDK's in-memory backend, in-process, with the same surface (minus crash/restart)."""

    kind = "inmemory"
    supports_restart = False

    def __init__(self, data_dir: Path, partitions: int = PARTITIONS, port: int | None = None,
                 extra_args: Iterable[str] = ()) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.partitions = partitions
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = self.data_dir / "inmemory.log"
        self.backend: Any = None

    def start(self) -> InMemoryRuntime:
        from concurrent import futures

        from durabletask.testing import InMemoryOrchestrationBackend

        # Like create_test_backend(port=...), but with a larger gRPC thread pool: every pending
        # WaitForInstance* call and every worker stream pins one of the stock 10 threads.
        self.backend = InMemoryOrchestrationBackend(port=self.port)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
        stubs.add_TaskHubSidecarServiceServicer_to_server(self.backend, server)
        if server.add_insecure_port(self.address) == 0:
            raise RuntimeError(f"could not bind {self.address}")
        self.backend._server = server  # backend.stop() shuts this server down
        server.start()
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while not hello_ok(self.address):
            if time.monotonic() >= deadline:
                raise RuntimeError(f"in-memory backend not ready on {self.address}")
            time.sleep(0.05)
        return self

    def is_running(self) -> bool:
        return self.backend is not None

    def kill(self) -> None:
        pytest.skip("the in-memory backend cannot be killed/restarted")

    restart = kill

    def terminate(self, timeout: float = SHUTDOWN_DEADLINE_S) -> int | None:
        if self.backend is not None:
            self.backend.stop(grace=1.0)
            self.backend = None
        return 0

    def close(self) -> None:
        self.terminate()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return ""


def make_runtime(data_dir: Path, **kwargs: Any) -> EngineRuntime | InMemoryRuntime:
    cls = InMemoryRuntime if INMEMORY else EngineRuntime
    return cls(data_dir, **kwargs)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineRuntime | InMemoryRuntime]:
    """One runtime per test module (tests that kill it use `fresh_runtime` instead)."""
    rt = make_runtime(tmp_path_factory.mktemp("runtime") / "data")
    rt.start()
    try:
        yield rt
    finally:
        rt.close()


@pytest.fixture
def fresh_runtime(tmp_path: Path) -> Iterator[EngineRuntime | InMemoryRuntime]:
    """A private runtime for one test, free to be killed and restarted."""
    rt = make_runtime(tmp_path / "data")
    rt.start()
    try:
        yield rt
    finally:
        rt.close()


@pytest.fixture(scope="module")
def worker_factory(runtime: Any) -> Iterator[Callable[..., dt_worker.TaskHubGrpcWorker]]:
    """`worker_factory(orchestrators, activities)` starts a worker on the module runtime; all are stopped at
    module teardown (before the runtime goes away)."""
    started: list[dt_worker.TaskHubGrpcWorker] = []

    def make(orchestrators: Iterable[Callable[..., Any]] = (), activities: Iterable[Callable[..., Any]] = (),
             **kwargs: Any) -> dt_worker.TaskHubGrpcWorker:
        w = new_worker(runtime.address, orchestrators, activities, **kwargs)
        started.append(w)
        return w

    try:
        yield make
    finally:
        for w in started:
            w.stop()


@pytest.fixture(scope="module")
def client(runtime: Any) -> Iterator[dt_client.TaskHubGrpcClient]:
    c = dt_client.TaskHubGrpcClient(host_address=runtime.address)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def raw_stub(runtime: Any) -> Iterator[stubs.TaskHubSidecarServiceStub]:
    """A raw generated stub, for requests the SDK client would never send."""
    channel = grpc.insecure_channel(runtime.address)
    try:
        yield stubs.TaskHubSidecarServiceStub(channel)
    finally:
        channel.close()


@pytest.fixture(scope="module")
def raw_channel(runtime: Any) -> Iterator[grpc.Channel]:
    channel = grpc.insecure_channel(runtime.address)
    try:
        yield channel
    finally:
        channel.close()

