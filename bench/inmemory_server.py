"""Runs the SDK's in-memory backend (durabletask.testing) as a standalone process.

    python -m bench.inmemory_server --port P [--max-workers W]

Differences from `InMemoryOrchestrationBackend.start()` (both needed for a fair,
working benchmark; the servicer logic itself is untouched):
  * binds 127.0.0.1 only (stock start() binds [::]);
  * the gRPC thread pool is sized by --max-workers. Stock start() uses 10 threads,
    and every outstanding WaitForInstanceCompletion / GetWorkItems stream pins one
    thread, so with more than ~8 instances in flight the Complete*Task calls queue
    behind blocked waits and nothing progresses until the waits time out.
Stops on SIGTERM/SIGINT.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from concurrent import futures

import durabletask.internal.orchestrator_service_pb2_grpc as stubs
import grpc
from durabletask.testing import InMemoryOrchestrationBackend

from bench.common import HOST


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--max-workers", type=int, default=128)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    backend = InMemoryOrchestrationBackend(port=args.port)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.max_workers))
    stubs.add_TaskHubSidecarServiceServicer_to_server(backend, server)
    if server.add_insecure_port(f"{HOST}:{args.port}") == 0:
        raise SystemExit(f"could not bind {HOST}:{args.port}")
    backend._server = server  # so backend.stop() shuts this server down
    server.start()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"inmemory backend listening on {HOST}:{args.port}", flush=True)
    while not stop.wait(1.0):
        pass
    backend.stop(grace=1.0)
    # Handler threads blocked in WaitForInstance* would otherwise delay interpreter exit.
    os._exit(0)


if __name__ == "__main__":
    main()
