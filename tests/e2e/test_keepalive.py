"""The gateway's keepalive: it pings each client connection every --keepalive-s and closes one that does not
answer within --keepalive-timeout-s (a frozen worker: test_faults.py). A live client's answer to a ping waits
behind a request it is still uploading, so a slow upload must not count as silence."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.internal import orchestrator_service_pb2_grpc as stubs
from google.protobuf import wrappers_pb2

from .conftest import EngineRuntime
from .helpers import DEADLINE_S

pytestmark = pytest.mark.engine_only

UPLOAD_BYTES_PER_S = 1 << 20


@contextlib.contextmanager
def throttled_proxy(target_port: int, bytes_per_s: int) -> Iterator[int]:
    """A loopback TCP proxy that passes what the client sends at `bytes_per_s`, and answers at full speed."""
    loop = asyncio.new_event_loop()
    ready: list[int] = []
    started = threading.Event()

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: int | None) -> None:
        try:
            while chunk := await reader.read(16 << 10):
                writer.write(chunk)
                await writer.drain()
                if rate:
                    await asyncio.sleep(len(chunk) / rate)  # the throttle itself, not a wait for a condition
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pump(client_reader, server_writer, bytes_per_s), pump(server_reader, client_writer, None))

    stop = asyncio.Event()

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        ready.append(server.sockets[0].getsockname()[1])
        started.set()
        await stop.wait()
        server.close()
        pumps = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)

    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True)
    thread.start()
    assert started.wait(DEADLINE_S)
    try:
        yield ready[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(DEADLINE_S)
        loop.close()


def test_a_request_uploading_for_longer_than_the_ping_interval_is_answered(tmp_path: Path):
    """3 MiB at 1 MiB/s: three seconds of upload, three pings of a 1 s keepalive waiting behind it, all within
    the 10 s timeout. (With the timeout as short as the interval, the gateway closed the connection after a
    second: UNAVAILABLE "ping timeout".)"""
    rt = EngineRuntime(tmp_path / "data", extra_args=["--keepalive-s", "1", "--keepalive-timeout-s", "10"])
    rt.start()
    try:
        with throttled_proxy(rt.port, UPLOAD_BYTES_PER_S) as port, grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            big = wrappers_pb2.StringValue(value="x" * (3 << 20))
            with pytest.raises(grpc.RpcError) as err:
                stubs.TaskHubSidecarServiceStub(ch).RaiseEvent(
                    pb.RaiseEventRequest(instanceId="nobody-here", name="big", input=big), timeout=DEADLINE_S)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value  # the engine's answer, not a dropped link
    finally:
        rt.close()
