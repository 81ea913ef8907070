"""Benchmark driver: `python -m bench.run --help` (see bench/README.md).

Process layout per run (all on 127.0.0.1, each in its own process group):
  backend  : `python -m runtime ...` (our engine) or `python -m bench.inmemory_server`
  worker   : `python -m bench.sdk_worker` (official SDK) or `python -m bench.proto_worker` (raw gRPC)
  client   : this process (grpc.aio), keeping C instances in flight
Every (scenario, repeat, backend) run gets a fresh backend + worker; backends are
interleaved within each repeat so that drift hits both equally.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import durabletask.internal.orchestrator_service_pb2 as pb
import durabletask.internal.orchestrator_service_pb2_grpc as stubs
import grpc
from google.protobuf import empty_pb2, wrappers_pb2

from bench.common import (
    EXPECTED_OUTPUT,
    HOST,
    ORCH_INPUT,
    ORCH_NAME,
    free_port,
    group_cpu_seconds,
    quiet_logger,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("sdk", "protocol")
BACKENDS = ("inmemory", "runtime")   # baseline first


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------- processes

@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pgid(self) -> int:
        return self.popen.pid  # start_new_session=True -> pid == pgid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu(self) -> float:
        return group_cpu_seconds(self.pgid)

    def log_tail(self, n: int = 25) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "<no log>"
        return "\n".join("    | " + ln for ln in lines[-n:])

    def stop(self, grace: float) -> str:
        """SIGTERM the process group, SIGKILL after `grace` s. Returns a short description."""
        if self.popen.poll() is not None:
            desc = f"had already exited rc={self.popen.returncode}"
        else:
            _killpg(self.pgid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=1.0 if _STOPPING else grace)
                desc = f"exited rc={self.popen.returncode} after SIGTERM"
            except subprocess.TimeoutExpired:
                desc = f"did NOT exit within {grace:.0f}s of SIGTERM -> SIGKILL"
        _killpg(self.pgid, signal.SIGKILL)  # stragglers in the group
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        _LIVE.discard(self)
        return desc

    def __hash__(self) -> int:
        return id(self)


_LIVE: set[Proc] = set()
_STOPPING = False  # set on Ctrl-C / SIGTERM: tear down fast


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_all() -> None:
    for p in list(_LIVE):
        _killpg(p.pgid, signal.SIGKILL)
        try:
            p.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        _LIVE.discard(p)


def spawn(name: str, cmd: list[str], log_dir: Path) -> Proc:
    log_path = log_dir / f"{name}.log"
    logf = open(log_path, "wb")
    full = [sys.executable, "-m", "bench._launch", str(os.getpid()), "--", *cmd]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    popen = subprocess.Popen(full, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=logf,
                             stderr=subprocess.STDOUT, start_new_session=True, env=env)
    logf.close()
    p = Proc(name, popen, log_path)
    _LIVE.add(p)
    return p


def wait_hello(port: int, proc: Proc, deadline_s: float) -> float:
    """Poll Hello until it succeeds; returns seconds it took."""
    t0 = time.monotonic()
    with grpc.insecure_channel(f"{HOST}:{port}") as ch:
        stub = stubs.TaskHubSidecarServiceStub(ch)
        while True:
            if not proc.alive():
                raise BenchError(f"{proc.name} exited with rc={proc.popen.returncode} before becoming "
                                 f"ready; log {proc.log_path}:\n{proc.log_tail()}")
            try:
                stub.Hello(empty_pb2.Empty(), timeout=1.0)
                return time.monotonic() - t0
            except grpc.RpcError:
                pass
            if time.monotonic() - t0 > deadline_s:
                raise BenchError(f"{proc.name} not ready (Hello) within {deadline_s:.0f}s; "
                                 f"log {proc.log_path}:\n{proc.log_tail()}")
            time.sleep(0.1)


def start_backend(backend: str, port: int, args, run_dir: Path) -> Proc:
    if backend == "runtime":
        data_dir = run_dir / "data"
        data_dir.mkdir()
        cmd = [sys.executable, "-m", "runtime", "--partitions", str(args.partitions),
               "--port", str(port), "--host", HOST, "--data-dir", str(data_dir)]
    else:
        cmd = [sys.executable, "-m", "bench.inmemory_server", "--port", str(port),
               "--max-workers", str(inmemory_threads(args))]
    return spawn(f"backend-{backend}", cmd, run_dir)


def inmemory_threads(args) -> int:
    return args.concurrency + 32


def start_worker(scenario: str, port: int, run_dir: Path, sdk_threads: int | None = None) -> Proc:
    mod = "bench.sdk_worker" if scenario == "sdk" else "bench.proto_worker"
    cmd = [sys.executable, "-m", mod, "--port", str(port)]
    if scenario == "sdk" and sdk_threads:
        cmd += ["--threads", str(sdk_threads)]
    return spawn(f"worker-{scenario}", cmd, run_dir)


# --------------------------------------------------------------------------- client side

# one instance: returns None if correct, else a failure reason
InstanceFn = Callable[[str], Awaitable[str | None]]


def make_sdk_client(port: int, instance_timeout: float):
    from durabletask.client import AsyncTaskHubGrpcClient, OrchestrationStatus
    client = AsyncTaskHubGrpcClient(host_address=f"{HOST}:{port}", logger=quiet_logger("bench-client"))

    async def one(iid: str) -> str | None:
        await client.schedule_new_orchestration(ORCH_NAME, input=ORCH_INPUT, instance_id=iid)
        st = await client.wait_for_orchestration_completion(iid, timeout=instance_timeout)
        if st is None:
            return "instance not found"
        if st.runtime_status != OrchestrationStatus.COMPLETED:
            return f"status {st.runtime_status.name} ({st.failure_details})"
        if st.serialized_output != EXPECTED_OUTPUT:
            return f"output {st.serialized_output!r} != {EXPECTED_OUTPUT!r}"
        return None

    return one, client.close


def make_raw_client(port: int, instance_timeout: float):
    channel = grpc.aio.insecure_channel(f"{HOST}:{port}")
    stub = stubs.TaskHubSidecarServiceStub(channel)
    inp = wrappers_pb2.StringValue(value=json.dumps(ORCH_INPUT))

    async def one(iid: str) -> str | None:
        await stub.StartInstance(pb.CreateInstanceRequest(instanceId=iid, name=ORCH_NAME, input=inp),
                                 timeout=instance_timeout)
        res = await stub.WaitForInstanceCompletion(
            pb.GetInstanceRequest(instanceId=iid, getInputsAndOutputs=True), timeout=instance_timeout)
        if not res.exists:
            return "instance not found"
        st = res.orchestrationState
        if st.orchestrationStatus != pb.ORCHESTRATION_STATUS_COMPLETED:
            return (f"status {pb.OrchestrationStatus.Name(st.orchestrationStatus)} "
                    f"{st.failureDetails.errorMessage!r}")
        if st.output.value != EXPECTED_OUTPUT:
            return f"output {st.output.value!r} != {EXPECTED_OUTPUT!r}"
        return None

    async def close():
        await channel.close()

    return one, close


@dataclass
class LoadResult:
    n: int
    latencies: list[float] = field(default_factory=list)   # seconds, correct instances only
    failures: list[tuple[str, str]] = field(default_factory=list)
    wall: float = 0.0


async def drive(one: InstanceFn, n: int, concurrency: int, prefix: str, run_timeout: float) -> LoadResult:
    """C lanes, each looping start -> wait-for-completion until n instances have been issued."""
    res = LoadResult(n)
    next_idx = 0
    done = 0

    async def lane() -> None:
        nonlocal next_idx, done
        while next_idx < n:
            iid = f"{prefix}-{next_idx}"
            next_idx += 1
            t0 = time.perf_counter()
            try:
                err = await one(iid)
            except grpc.aio.AioRpcError as ex:
                err = f"gRPC {ex.code().name}: {ex.details()}"[:300]
            except Exception as ex:
                err = f"{type(ex).__name__}: {str(ex).splitlines()[0] if str(ex) else ''}"[:300]
            dt = time.perf_counter() - t0
            done += 1
            if err is None:
                res.latencies.append(dt)
            else:
                res.failures.append((iid, err))

    t0 = time.perf_counter()
    lanes = [asyncio.ensure_future(lane()) for _ in range(min(concurrency, n))]
    finished, unfinished = await asyncio.wait(lanes, timeout=run_timeout)
    res.wall = time.perf_counter() - t0
    for t in unfinished:
        t.cancel()
    if unfinished:
        await asyncio.wait(unfinished, timeout=5)
        missing = n - done
        res.failures.append((f"{prefix}-*", f"{missing} instance(s) not finished within run timeout "
                                            f"{run_timeout:.0f}s"))
        res.failures.extend((f"{prefix}-?", "unfinished") for _ in range(missing - 1))
    for t in finished:
        if t.exception() is not None:  # should not happen: lane() catches everything
            raise t.exception()
    return res


def pct(sorted_vals: list[float], p: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = max(0, min(len(sorted_vals) - 1, int(round(p / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]  # nearest-rank


async def client_session(scenario: str, port: int, args, backend_proc: Proc, worker_proc: Proc) -> dict:
    maker = make_sdk_client if scenario == "sdk" else make_raw_client
    one, close = maker(port, args.instance_timeout)
    tag = uuid.uuid4().hex[:8]
    failures: list[tuple[str, str]] = []
    try:
        # 1) readiness probe: one instance end to end (also waits for the worker to connect)
        probe = await drive(one, 1, 1, f"bench-{tag}-probe", args.ready_timeout)
        if probe.failures:
            raise BenchError(f"probe instance failed: {probe.failures[0][1]}")
        # 2) warmup
        if args.warmup > 0:
            warm = await drive(one, args.warmup, min(args.concurrency, args.warmup),
                               f"bench-{tag}-warm", args.run_timeout)
            failures += warm.failures
        # 3) measured phase
        cpu0 = (backend_proc.cpu(), worker_proc.cpu(), time.process_time())
        meas = await drive(one, args.instances, args.concurrency, f"bench-{tag}-run", args.run_timeout)
        cpu1 = (backend_proc.cpu(), worker_proc.cpu(), time.process_time())
        failures += meas.failures
    finally:
        await close()
    lat = sorted(meas.latencies)
    ok = len(lat)
    wall = meas.wall
    cpu = [100.0 * (b - a) / wall if wall > 0 else float("nan") for a, b in zip(cpu0, cpu1, strict=True)]
    return {
        "ok": ok,
        "failures": len(failures),
        "failure_examples": [f"{i}: {e}" for i, e in failures[:5]],
        "wall_s": round(wall, 3),
        "throughput": ok / wall if wall > 0 else 0.0,
        "p50_ms": 1000 * pct(lat, 50),
        "p90_ms": 1000 * pct(lat, 90),
        "p99_ms": 1000 * pct(lat, 99),
        "max_ms": 1000 * lat[-1] if lat else float("nan"),
        "mean_ms": 1000 * statistics.fmean(lat) if lat else float("nan"),
        "cpu_server_pct": cpu[0],
        "cpu_worker_pct": cpu[1],
        "cpu_client_pct": cpu[2],
    }


def one_run(scenario: str, backend: str, args, work_root: Path, label: str) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"{scenario}-{backend}-", dir=work_root))
    port = free_port()
    backend_proc = worker_proc = None
    result: dict = {}
    try:
        backend_proc = start_backend(backend, port, args, run_dir)
        result["ready_s"] = round(wait_hello(port, backend_proc, args.ready_timeout), 2)
        worker_proc = start_worker(scenario, port, run_dir, args.sdk_threads)
        try:
            result.update(asyncio.run(client_session(scenario, port, args, backend_proc, worker_proc)))
        except BenchError as ex:
            raise BenchError(f"{ex}\n  backend log {backend_proc.log_path}:\n{backend_proc.log_tail()}\n"
                             f"  worker log {worker_proc.log_path}:\n{worker_proc.log_tail()}") from None
    finally:
        if worker_proc is not None:
            worker_proc.stop(grace=5)
        if backend_proc is not None:
            result["shutdown"] = backend_proc.stop(grace=10)
        if (backend_proc is not None and backend == "runtime"
                and "SIGTERM" in result.get("shutdown", "") and "rc=0" not in result["shutdown"]):
            print(f"  warning: runtime {result['shutdown']}", flush=True)
        if not args.keep and not result.get("failures"):
            shutil.rmtree(run_dir / "data", ignore_errors=True)
    result["run_dir"] = str(run_dir)
    return result


# --------------------------------------------------------------------------- reporting

def fmt(v: float, nd: int = 1) -> str:
    return "-" if v is None or v != v else f"{v:.{nd}f}"


def summarize(runs: list[dict]) -> dict | None:
    good = [r for r in runs if "throughput" in r]
    if not good:
        return None
    med = lambda k: statistics.median(r[k] for r in good)  # noqa: E731
    return {k: med(k) for k in ("throughput", "p50_ms", "p99_ms", "cpu_server_pct",
                                "cpu_worker_pct", "cpu_client_pct")} | {
        "failures": sum(r.get("failures", 0) for r in runs), "runs": len(good)}


def print_tables(results: dict, args) -> dict:
    ratios: dict = {}
    for scenario, per_backend in results.items():
        print(f"\n=== scenario: {scenario}  (n={args.instances}, c={args.concurrency}, "
              f"warmup={args.warmup}, repeat={args.repeat}, partitions={args.partitions}"
              f"{f', sdk threads={args.sdk_threads}' if args.sdk_threads and scenario == 'sdk' else ''}; "
              f"medians over repeats) ===")
        hdr = (f"{'backend':<9} {'inst/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'fail':>5}   "
               f"{'cpu% server':>11} {'worker':>6} {'client':>6}   per-run inst/s")
        print(hdr)
        print("-" * len(hdr))
        sums = {}
        for backend, runs in per_backend.items():
            s = summarize(runs)
            sums[backend] = s
            per = " ".join(fmt(r.get("throughput"), 0) if "throughput" in r else "ERR" for r in runs)
            if s is None:
                if not runs:
                    print(f"{backend:<9} {'-':>8}   (not run)")
                    continue
                print(f"{backend:<9} {'ERROR':>8}   ({runs[-1].get('error', '?').splitlines()[0][:90]})")
                continue
            print(f"{backend:<9} {fmt(s['throughput']):>8} {fmt(s['p50_ms']):>8} {fmt(s['p99_ms']):>8} "
                  f"{s['failures']:>5}   {fmt(s['cpu_server_pct'], 0):>11} "
                  f"{fmt(s['cpu_worker_pct'], 0):>6} {fmt(s['cpu_client_pct'], 0):>6}   {per}")
        rt, im = sums.get("runtime"), sums.get("inmemory")
        if rt and im:
            r = {"throughput": rt["throughput"] / im["throughput"] if im["throughput"] else float("nan"),
                 "p50": rt["p50_ms"] / im["p50_ms"] if im["p50_ms"] else float("nan"),
                 "p99": rt["p99_ms"] / im["p99_ms"] if im["p99_ms"] else float("nan")}
            ratios[scenario] = r
            print(f"ratio runtime/inmemory: throughput x{r['throughput']:.2f} (>1 = runtime faster), "
                  f"p50 x{r['p50']:.2f}, p99 x{r['p99']:.2f} (<1 = runtime lower latency)")
    return ratios


# --------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.run",
                                 description="Durable Task engine benchmark (runtime vs SDK in-memory backend)")
    ap.add_argument("--scenario", choices=("sdk", "protocol", "all"), default="all")
    ap.add_argument("--backend", choices=("runtime", "inmemory", "both"), default="both")
    ap.add_argument("-n", "--instances", type=int, default=500, help="measured instances per run")
    ap.add_argument("-c", "--concurrency", type=int, default=50, help="instances kept in flight by the client")
    ap.add_argument("--partitions", type=int, default=max(2, os.cpu_count() or 2),
                    help="runtime --partitions (default: one per core, at least 2; more than the cores"
                         " buys isolation, not speed)")
    ap.add_argument("--sdk-threads", type=int, default=None,
                    help="the SDK worker's maximum_thread_pool_workers (default: the SDK's, cpu+4)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per (scenario, backend); medians reported")
    ap.add_argument("--warmup", type=int, default=50, help="unmeasured instances before each measured run")
    ap.add_argument("--json", action="store_true", help="also print machine-readable results")
    ap.add_argument("--instance-timeout", type=float, default=60.0, help="per-RPC/instance deadline (s)")
    ap.add_argument("--run-timeout", type=float, default=120.0, help="deadline for each load phase (s)")
    ap.add_argument("--ready-timeout", type=float, default=30.0,
                    help="deadline for backend Hello and for the first probe instance (s)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data dirs)")
    args = ap.parse_args(argv)
    if args.instances < 1 or args.concurrency < 1 or args.repeat < 1 or args.warmup < 0:
        ap.error("instances, concurrency and repeat must be >= 1, warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    scenarios = SCENARIOS if args.scenario == "all" else (args.scenario,)
    backends = BACKENDS if args.backend == "both" else (args.backend,)
    cmdline = shlex.join([sys.executable, "-m", "bench.run", *(sys.argv[1:] if argv is None else argv)])

    import durabletask
    try:
        from importlib.metadata import version
        dt_ver = version("durabletask")
    except Exception:
        dt_ver = getattr(durabletask, "__version__", "?")
    print(f"$ cd {os.getcwd()} && {cmdline}")
    print(f"# host: {platform.node()} cpus={os.cpu_count()} python={platform.python_version()} "
          f"grpcio={grpc.__version__} durabletask={dt_ver}; inmemory server threads={inmemory_threads(args)}",
          flush=True)

    def on_term(signum, frame):
        global _STOPPING
        if not _STOPPING:
            _STOPPING = True
            raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)  # also when started with SIGINT ignored (e.g. `cmd &`)

    work_root = Path(tempfile.mkdtemp(prefix="durable-bench-"))
    results: dict = {s: {b: [] for b in backends} for s in scenarios}
    broken: set[tuple[str, str]] = set()
    t_start = time.monotonic()
    interrupted = False
    try:
        for scenario in scenarios:
            for rep in range(args.repeat):
                for backend in backends:
                    if (scenario, backend) in broken:
                        continue
                    label = f"[{scenario}/{backend} {rep + 1}/{args.repeat}]"
                    try:
                        r = one_run(scenario, backend, args, work_root, label)
                    except BenchError as ex:
                        r = {"error": str(ex)}
                        broken.add((scenario, backend))  # don't burn the time budget on a broken setup
                        print(f"{label} ERROR: {ex}", flush=True)
                    results[scenario][backend].append(r)
                    if "throughput" in r:
                        print(f"{label} {r['ok']}/{args.instances} ok in {r['wall_s']:.2f}s: "
                              f"{r['throughput']:.1f} inst/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
                              f"max {r['max_ms']:.1f} ms | cpu% server {r['cpu_server_pct']:.0f} "
                              f"worker {r['cpu_worker_pct']:.0f} client {r['cpu_client_pct']:.0f}"
                              + (f" | FAILURES {r['failures']}" if r["failures"] else ""), flush=True)
                        for ex in r["failure_examples"]:
                            print(f"    failure: {ex}", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted; tearing down", flush=True)
    finally:
        kill_all()

    ratios = print_tables(results, args)
    total_fail = sum(r.get("failures", 0) for per in results.values() for runs in per.values() for r in runs)
    errors = [(s, b) for s, per in results.items() for b, runs in per.items() if any("error" in r for r in runs)]
    print(f"\ntotal time {time.monotonic() - t_start:.1f}s")

    rc = 0
    if total_fail:
        print(f"\n*** CORRECTNESS FAILURE: {total_fail} instance(s) did not complete with status "
              f"COMPLETED and output {EXPECTED_OUTPUT} ***", flush=True)
        rc = 1
    if errors:
        print(f"\n*** ERRORS in {', '.join(f'{s}/{b}' for s, b in errors)} (see messages above) ***", flush=True)
        rc = 1
    if interrupted:
        rc = 130
    if rc == 0 and not args.keep:
        shutil.rmtree(work_root, ignore_errors=True)
    else:
        print(f"logs kept in {work_root}")
    if args.json:  # always the last line of stdout: `... --json | tail -n1`
        doc = {"command": cmdline, "exit_code": rc, "config": vars(args), "results": results,
               "medians": {s: {b: summarize(runs) for b, runs in per.items()} for s, per in results.items()},
               "ratios_runtime_over_inmemory": ratios}
        print(json.dumps(_json_clean(doc), separators=(",", ":"), default=str), flush=True)
    return rc


def _json_clean(o):
    if isinstance(o, float):
        return None if o != o else round(o, 3)
    if isinstance(o, dict):
        return {k: _json_clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_clean(v) for v in o]
    return o


if __name__ == "__main__":
    sys.exit(main())
