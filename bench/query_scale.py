"""Management queries at scale: `python -m bench.query_scale [-n 100000] [--partitions 4] ...`

Starts the engine (`python -m runtime`, fresh data dir, own process group, PDEATHSIG launcher as in
bench/run.py), then

1. creates `-n` instances `q-000000`, `q-000001`, ... with NO worker connected, via many concurrent
   StartInstance calls (grpc.aio, `--concurrency` in flight). They get a scheduled start a day ahead,
   so they stay PENDING and are never dispatched;
2. runs `--completed` more instances `c-...` to COMPLETED with a minimal inline protocol worker, which
   is disconnected again before anything is timed (so ListInstanceIds has something to list);
3. times each query `--repeat` times (after one warm-up) and prints the medians in ms:
   QueryInstances by status (page of 100: the first page, and one half-way down the continuation
   chain), by an id prefix matching 100 instances, by a created-time range (page of 100),
   ListInstanceIds (first page of 100), plus a few wider requests for context.

A benchmark, not a test: nothing is asserted about times; result counts are printed next to them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import durabletask.internal.orchestrator_service_pb2 as pb
import durabletask.internal.orchestrator_service_pb2_grpc as stubs
import grpc
from google.protobuf import empty_pb2, timestamp_pb2, wrappers_pb2

from bench.common import HOST, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
ORCH_NAME = "query_scale"
RPC_TIMEOUT_S = 120.0
PAGE = 100


# --------------------------------------------------------------------------- the engine process


class Engine:
    """`python -m runtime` in its own process group, behind bench._launch (PDEATHSIG)."""

    def __init__(self, partitions: int, work_dir: Path) -> None:
        self.port = free_port()
        self.address = f"{HOST}:{self.port}"
        self.data_dir = work_dir / "data"
        self.log_path = work_dir / "runtime.log"
        cmd = [sys.executable, "-m", "runtime", "--partitions", str(partitions), "--port", str(self.port),
               "--host", HOST, "--data-dir", str(self.data_dir)]
        full = [sys.executable, "-m", "bench._launch", str(os.getpid()), "--", *cmd]
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(full, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def wait_ready(self, deadline_s: float = 60.0) -> None:
        t0 = time.monotonic()
        with grpc.insecure_channel(self.address) as ch:
            stub = stubs.TaskHubSidecarServiceStub(ch)
            while True:
                if self.popen.poll() is not None:
                    raise SystemExit(f"engine exited with rc={self.popen.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(grpc.RpcError):
                    stub.Hello(empty_pb2.Empty(), timeout=1.0)
                    return
                if time.monotonic() - t0 > deadline_s:
                    raise SystemExit(f"engine not ready within {deadline_s:.0f}s:\n{self.log_tail()}")
                time.sleep(0.1)

    def stop(self, grace_s: float = 25.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=grace_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # stragglers in the group
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"

    def data_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.data_dir.rglob("*") if f.is_file())


# --------------------------------------------------------------------------- loading


def engine_rss(root_pid: int) -> dict[str, int]:
    """VmRSS in bytes of every engine process below `root_pid` (gateways and partitions), by role."""
    out: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
        except OSError:
            continue
        if b"--index" not in cmdline or not any(b in cmdline for b in (b"partitions", b"runtime.gateway")):
            continue
        if f"PPid:\t{root_pid}\n" not in status and not _descends_from(int(entry.name), root_pid):
            continue
        role = "gateway" if b"runtime.gateway" in cmdline else "partition"
        index = cmdline[cmdline.index(b"--index") + 1].decode()
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                out[f"{role}-{index}"] = int(line.split()[1]) * 1024
    return out


def _descends_from(pid: int, ancestor: int) -> bool:
    for _ in range(16):
        try:
            ppid = int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                            if line.startswith("PPid:")).split()[1])
        except (OSError, StopIteration):
            return False
        if ppid == ancestor:
            return True
        if ppid <= 1:
            return False
        pid = ppid
    return False


def _ts(ms: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def _ms(ts: timestamp_pb2.Timestamp) -> int:
    return ts.seconds * 1000 + ts.nanos // 1_000_000


async def start_all(stub: Any, ids: list[str], concurrency: int, scheduled_ms: int | None, label: str) -> None:
    """StartInstance for every id, `concurrency` in flight; retried on UNAVAILABLE / DEADLINE_EXCEEDED."""
    todo = iter(ids)
    done = 0
    step = max(1, len(ids) // 10)
    t0 = time.monotonic()

    async def lane() -> None:
        nonlocal done
        for iid in todo:  # one shared iterator: each id is taken by exactly one lane
            req = pb.CreateInstanceRequest(instanceId=iid, name=ORCH_NAME, input=wrappers_pb2.StringValue(value="0"),
                                           scheduledStartTimestamp=_ts(scheduled_ms) if scheduled_ms else None)
            for attempt in range(6):
                try:
                    await stub.StartInstance(req, timeout=RPC_TIMEOUT_S)
                    break
                except grpc.aio.AioRpcError as e:
                    if e.code() == grpc.StatusCode.ALREADY_EXISTS and attempt:
                        break  # an earlier attempt did get through
                    if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) or attempt == 5:
                        raise
                    await asyncio.sleep(0.2 * (attempt + 1))
            done += 1
            if done % step == 0:
                print(f"  {label}: {done}/{len(ids)} started ({time.monotonic() - t0:.1f}s)", flush=True)

    await asyncio.gather(*(lane() for _ in range(min(concurrency, len(ids)))))


async def complete_all(stub: Any, ids: list[str], concurrency: int) -> None:
    """Start `ids` and answer each orchestrator work item with completeOrchestration(COMPLETED), then
    disconnect the worker stream."""
    remaining = set(ids)
    all_done = asyncio.Event()
    if not remaining:
        return

    async def answer(item: pb.WorkItem) -> None:
        req = item.orchestratorRequest
        done = pb.CompleteOrchestrationAction(orchestrationStatus=pb.ORCHESTRATION_STATUS_COMPLETED,
                                              result=wrappers_pb2.StringValue(value='"done"'))
        resp = pb.OrchestratorResponse(instanceId=req.instanceId, completionToken=item.completionToken,
                                       actions=[pb.OrchestratorAction(id=0, completeOrchestration=done)])
        await stub.CompleteOrchestratorTask(resp, timeout=RPC_TIMEOUT_S)
        remaining.discard(req.instanceId)
        if not remaining:
            all_done.set()

    call = stub.GetWorkItems(pb.GetWorkItemsRequest(maxConcurrentOrchestrationWorkItems=1000,
                                                    maxConcurrentActivityWorkItems=1))
    tasks: set[asyncio.Task] = set()

    async def pump() -> None:
        async for item in call:
            if item.HasField("orchestratorRequest"):
                t = asyncio.create_task(answer(item))
                tasks.add(t)
                t.add_done_callback(tasks.discard)

    pumper = asyncio.create_task(pump())
    try:
        await start_all(stub, ids, concurrency, None, "completed set")
        await asyncio.wait_for(all_done.wait(), timeout=RPC_TIMEOUT_S)
    finally:
        call.cancel()
        pumper.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await pumper
        if tasks:
            await asyncio.wait(tasks, timeout=10)


async def load(address: str, ids: list[str], completed: list[str], concurrency: int) -> tuple[float, float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = stubs.TaskHubSidecarServiceStub(channel)
        t0 = time.monotonic()
        await start_all(stub, ids, concurrency, int(time.time() * 1000) + 86_400_000, "pending set")
        create_s = time.monotonic() - t0
        t0 = time.monotonic()
        await complete_all(stub, completed, concurrency)
        return create_s, time.monotonic() - t0


# --------------------------------------------------------------------------- timing


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median wall time in ms over `repeat` calls (after one warm-up call), and the last result."""
    result = fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples), result


def run_queries(address: str, n: int, ids: list[str], repeat: int) -> list[tuple[str, float, str]]:
    rows: list[tuple[str, float, str]] = []
    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        stub = stubs.TaskHubSidecarServiceStub(ch)

        def query(**kw: Any) -> pb.QueryInstancesResponse:
            return stub.QueryInstances(pb.QueryInstancesRequest(query=pb.InstanceQuery(**kw)), timeout=RPC_TIMEOUT_S)

        def add(name: str, fn: Callable[[], Any], describe: Callable[[Any], str]) -> Any:
            median, result = timed(fn, repeat)
            rows.append((name, median, describe(result)))
            print(f"  {name:66s} {median:9.2f} ms   {describe(result)}", flush=True)
            return result

        def states(r: pb.QueryInstancesResponse) -> str:
            token = r.continuationToken.value if r.HasField("continuationToken") else None
            return f"{len(r.orchestrationState)} states, {'a' if token else 'no'} continuation token"

        pending = [pb.ORCHESTRATION_STATUS_PENDING]
        add("QueryInstances status=PENDING, page 100, first page",
            lambda: query(runtimeStatus=pending, maxInstanceCount=PAGE), states)

        # Walk half-way down the chain (pages of 1000 to get there sooner: a token is a position).
        t0 = time.perf_counter()
        token, walked = None, 0
        while walked < n // 2:
            r = query(runtimeStatus=pending, maxInstanceCount=1000, continuationToken=token)
            walked += len(r.orchestrationState)
            if not r.HasField("continuationToken"):
                break
            token = r.continuationToken
        walk_ms = (time.perf_counter() - t0) * 1000
        print(f"  (walked {walked} states in pages of 1000 to reach the deep token: {walk_ms:.0f} ms, "
              f"{walk_ms / max(1, walked / 1000):.1f} ms per page of 1000)", flush=True)
        add(f"QueryInstances status=PENDING, page 100, after {walked} states",
            lambda: query(runtimeStatus=pending, maxInstanceCount=PAGE, continuationToken=token), states)

        middle = min(n - 1, n // 2)
        prefix = ids[middle][: len(ids[middle]) - 2]  # 'q-0500' -> q-050000 .. q-050099
        add(f"QueryInstances prefix '{prefix}' (100 ids), one page",
            lambda: query(instanceIdPrefix=wrappers_pb2.StringValue(value=prefix), maxInstanceCount=1000), states)

        def created(iid: str) -> int:
            res = stub.GetInstance(pb.GetInstanceRequest(instanceId=iid), timeout=RPC_TIMEOUT_S)
            return _ms(res.orchestrationState.createdTimestamp)

        lo_i, hi_i = n // 4, min(n - 1, n // 4 + 1000)
        lo, hi = created(ids[lo_i]), created(ids[hi_i])
        if hi <= lo:
            hi = lo + 1
        add(f"QueryInstances created in [{lo_i}th, {hi_i}th creation), page 100",
            lambda: query(createdTimeFrom=_ts(lo), createdTimeTo=_ts(hi), maxInstanceCount=PAGE), states)

        add("ListInstanceIds first page of 100",
            lambda: stub.ListInstanceIds(pb.ListInstanceIdsRequest(pageSize=PAGE), timeout=RPC_TIMEOUT_S),
            lambda r: f"{len(r.instanceIds)} ids, {'a' if r.HasField('lastInstanceKey') else 'no'} continuation key")

        print("  -- for context --", flush=True)
        add("GetInstance (point lookup)",
            lambda: stub.GetInstance(pb.GetInstanceRequest(instanceId=ids[middle]), timeout=RPC_TIMEOUT_S),
            lambda r: f"exists={r.exists}")
        add("QueryInstances no filter, page 100, first page", lambda: query(maxInstanceCount=PAGE), states)
        add("QueryInstances status=COMPLETED, page 100, first page",
            lambda: query(runtimeStatus=[pb.ORCHESTRATION_STATUS_COMPLETED], maxInstanceCount=PAGE), states)
        add("QueryInstances prefix 'q-' (all of them), page 100",
            lambda: query(instanceIdPrefix=wrappers_pb2.StringValue(value="q-"), maxInstanceCount=PAGE), states)
        add("PurgeInstances by filter status=FAILED (matches none)",
            lambda: stub.PurgeInstances(pb.PurgeInstancesRequest(purgeInstanceFilter=pb.PurgeInstanceFilter(
                runtimeStatus=[pb.ORCHESTRATION_STATUS_FAILED])), timeout=RPC_TIMEOUT_S),
            lambda r: f"deleted {r.deletedInstanceCount}, complete={r.isComplete.value}")
    return rows


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.query_scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--instances", type=int, default=100_000, help="pending instances to create (100000)")
    ap.add_argument("--completed", type=int, default=2000, help="instances run to COMPLETED for ListInstanceIds (2000)")
    ap.add_argument("--partitions", type=int, default=4, help="engine partitions (4)")
    ap.add_argument("-c", "--concurrency", type=int, default=256, help="StartInstance calls in flight (256)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per query; the median is printed (5)")
    ap.add_argument("--keep", action="store_true", help="keep the data dir and engine log")
    args = ap.parse_args(argv)
    if not 100 <= args.instances <= 1_000_000 or args.completed < 0 or args.repeat < 1 or args.concurrency < 1:
        ap.error("need 100 <= -n <= 1000000, --completed >= 0, --repeat >= 1, --concurrency >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cmdline = shlex.join([sys.executable, "-m", "bench.query_scale", *(sys.argv[1:] if argv is None else argv)])
    print(f"$ {cmdline}")
    print(f"# cpus={os.cpu_count()} partitions={args.partitions} n={args.instances} completed={args.completed} "
          f"concurrency={args.concurrency} repeat={args.repeat}", flush=True)
    ids = [f"q-{i:06d}" for i in range(args.instances)]
    completed = [f"c-{i:06d}" for i in range(args.completed)]
    work_dir = Path(tempfile.mkdtemp(prefix="durable-query-scale-"))
    engine = Engine(args.partitions, work_dir)
    t_start = time.monotonic()
    rc = 0

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        engine.wait_ready()
        rss_before = engine_rss(engine.popen.pid)
        print("creating instances (no worker connected)...", flush=True)
        create_s, complete_s = asyncio.run(load(engine.address, ids, completed, args.concurrency))
        rss_after = engine_rss(engine.popen.pid)
        print("resident memory (VmRSS) before -> after creating them, per engine process:", flush=True)
        for name in sorted(rss_after):
            print(f"  {name:24s} {rss_before.get(name, 0) / 2**20:7.1f} -> {rss_after[name] / 2**20:7.1f} MiB", flush=True)
        print(f"creation phase: {args.instances} instances in {create_s:.1f} s "
              f"({args.instances / create_s:.0f}/s, {args.concurrency} in flight)", flush=True)
        if completed:
            print(f"completed set: {len(completed)} instances started and completed in {complete_s:.1f} s "
                  "(worker now disconnected)", flush=True)
        print(f"data dir: {engine.data_bytes() / 2**20:.0f} MiB on disk", flush=True)
        print(f"medians of {args.repeat} (after one warm-up), one request at a time:", flush=True)
        run_queries(engine.address, args.instances, ids, args.repeat)
    except KeyboardInterrupt:
        print("\ninterrupted", flush=True)
        rc = 130
    except Exception as exc:
        print(f"\nERROR: {exc!r}\nengine log tail:\n{engine.log_tail()}", flush=True)
        rc = 1
    finally:
        engine.stop()
    print(f"total time {time.monotonic() - t_start:.1f} s")
    if args.keep or rc:
        print(f"data and log kept in {work_dir}")
    else:
        shutil.rmtree(work_dir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
