"""Official-SDK worker process: `python -m bench.sdk_worker --port P`.

Registers `bench_chain` (3 sequential activity calls) and `bench_inc` (input+1)
on a `TaskHubGrpcWorker` and runs until SIGTERM/SIGINT.
"""
from __future__ import annotations

import argparse
import signal
import threading

from durabletask import task
from durabletask.worker import ConcurrencyOptions, TaskHubGrpcWorker

from bench.common import CHAIN_LENGTH, HOST, quiet_logger


def bench_inc(ctx: task.ActivityContext, x: int) -> int:
    return x + 1


def bench_chain(ctx: task.OrchestrationContext, x: int):
    for _ in range(CHAIN_LENGTH):
        x = yield ctx.call_activity(bench_inc, input=x)
    return x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--threads", type=int, default=None, help="maximum_thread_pool_workers (SDK default: cpu+4)")
    args = ap.parse_args()

    worker = TaskHubGrpcWorker(host_address=f"{HOST}:{args.port}",
                               logger=quiet_logger("bench-sdk-worker"),
                               concurrency_options=ConcurrencyOptions(maximum_thread_pool_workers=args.threads))
    worker.add_orchestrator(bench_chain)
    worker.add_activity(bench_inc)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    worker.start()
    print("sdk worker started", flush=True)
    while not stop.wait(1.0):
        pass
    # worker.stop() can block up to 30s+ on pending work; the harness SIGKILLs after a grace period.
    worker.stop()


if __name__ == "__main__":
    main()
