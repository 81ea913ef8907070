"""A gateway process: grpc.aio server, health service, and its connection to every partition."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from runtime.config import Config
from runtime.gateway.partition_client import PartitionClient
from runtime.gateway.servicer import SERVICE_NAME, Servicer, generic_handler
from runtime.gateway.work_items import WorkDispatcher

log = logging.getLogger(__name__)


class GatewayServer:
    def __init__(self, config: Config, index: int) -> None:
        self.config = config
        self.index = index
        self.dispatcher: WorkDispatcher | None = None
        self.stopped = asyncio.Event()

    async def serve(self) -> None:
        config = self.config
        client = PartitionClient(config, on_message=lambda p, m: dispatcher.on_message(p, m))
        dispatcher = self.dispatcher = WorkDispatcher(client)
        client.on_restart = dispatcher.on_partition_restart
        servicer = Servicer(config, client, dispatcher)
        options = [
            ("grpc.max_receive_message_length", config.max_request_bytes),
            ("grpc.max_send_message_length", max(config.max_request_bytes, 64 << 20)),
            ("grpc.so_reuseport", 1 if config.gateways > 1 else 0),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers((generic_handler(servicer),))
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        address = f"{config.host}:{config.port}"
        server.add_insecure_port(address)
        client.start()
        await server.start()
        log.info("gateway %d serving %s on %s", self.index, SERVICE_NAME, address)

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopped.set)
        loop.add_signal_handler(signal.SIGINT, self.stopped.set)
        readiness = asyncio.create_task(self._track_readiness(client, health_servicer))
        await self.stopped.wait()

        log.info("gateway %d draining", self.index)
        readiness.cancel()
        await health_servicer.enter_graceful_shutdown()
        dispatcher.accepting = False
        servicer.draining.set()
        await server.stop(grace=config.drain_grace_s)
        client.close()
        log.info("gateway %d stopped", self.index)

    async def _track_readiness(self, client: PartitionClient, health_servicer: health.aio.HealthServicer) -> None:
        """Readiness: SERVING once every partition answered a heartbeat."""
        serving = None
        while True:
            ready = client.ready()
            if ready != serving:
                serving = ready
                status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
                await health_servicer.set("", status)
                await health_servicer.set(SERVICE_NAME, status)
            await asyncio.sleep(0.2)
