"""A gateway process: grpc.aio server, health service, and its connection to every partition.

Drain on SIGTERM: health turns NOT_SERVING; no new work is handed out (partitions return their
standing credits, new GetWorkItems calls get UNAVAILABLE); client RPCs and Complete*/Abandon* calls
are still served until every work item this gateway handed out is completed or abandoned, or
`drain_grace_s` passes. Then the worker streams end with OK (SDK workers reconnect at once, to
another node if there is one), the server stops and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from runtime.config import Config
from runtime.gateway import security
from runtime.gateway.partition_client import PartitionClient
from runtime.gateway.servicer import SERVICE_NAME, Servicer, generic_handler
from runtime.gateway.work_items import WorkDispatcher
from runtime.processes import STOP_SIGNAL, stop_requested
from runtime.router import channel

log = logging.getLogger(__name__)

_DRAIN_POLL_S = 0.05
_STOP_GRACE_S = 1.0  # for client calls still open after the drain (long waits end, clients retry)


class GatewayBindError(Exception):
    """The gateway cannot listen on its address: restarting it would not help (exit EXIT_CANNOT_RUN)."""


class GatewayServer:
    def __init__(self, config: Config, index: int) -> None:
        self.config = config
        self.index = index
        self.dispatcher: WorkDispatcher | None = None
        self.stopped = asyncio.Event()

    async def serve(self) -> None:
        config = self.config
        channel.configure_curve(channel.load_curve_keys(config))
        token = security.load_api_token(config)
        credentials = security.server_credentials(config)
        client = PartitionClient(config, on_message=lambda p, m: dispatcher.on_message(p, m))
        dispatcher = self.dispatcher = WorkDispatcher(client)
        client.on_restart = dispatcher.on_partition_restart
        client.held_leases = dispatcher.held_leases
        servicer = Servicer(config, client, dispatcher)
        options = [
            # The transport reads every request whole; the servicer enforces --max-request-bytes. A
            # completion the transport refused would never reach us: the SDK only logs the failure, the
            # stream would go on holding the item, and its instance would wait for ever. Read, an oversized
            # completion becomes a clear failure of the instance or task; any other RPC above the limit
            # gets RESOURCE_EXHAUSTED. (So any peer that can connect can make the gateway hold a message of
            # up to 2 GiB per call: serve only networks whose clients are trusted.)
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", max(config.max_request_bytes, 64 << 20)),
            ("grpc.so_reuseport", 1 if config.gateways > 1 else 0),
            # A worker that stops answering (frozen, paused, cut off) would hold its work items for as long as
            # its connection looks open: the heartbeats renew what its streams hold. gRPC's keepalive pings it and
            # closes the connection when no answer comes; the ping timeout is what enforces that here. It must
            # allow for a client's answer queued behind a large request it is still uploading.
            ("grpc.keepalive_time_ms", int(config.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
            ("grpc.http2.ping_timeout_ms", int(config.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
        # No interceptor unless a token is required: grpc.aio runs every call through the chain.
        interceptors = [security.TokenInterceptor(token)] if token is not None else []
        server = grpc.aio.server(options=options, interceptors=interceptors)
        server.add_generic_rpc_handlers((generic_handler(servicer),))
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        address = f"{config.host}:{config.port}"
        try:
            if credentials is None:
                server.add_insecure_port(address)
            else:
                server.add_secure_port(address, credentials)
        except RuntimeError as exc:  # grpc says no more than "failed to bind"
            raise GatewayBindError(
                f"gateway {self.index} cannot listen on {address} ({exc}): is another process, or another"
                " durable-runtime node, using that port? Stopping the node."
            ) from None
        client.start()
        await server.start()
        log.info(
            "gateway %d serving %s on %s (%s%s)", self.index, SERVICE_NAME, address,
            "plaintext" if credentials is None else "mutual TLS" if config.tls_client_ca_file else "TLS",
            ", API token required" if token is not None else "",
        )

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(STOP_SIGNAL, self.stopped.set)
        if stop_requested():  # the supervisor said stop while this process was starting
            self.stopped.set()
        readiness = asyncio.create_task(self._track_readiness(client, health_servicer))
        await self.stopped.wait()

        readiness.cancel()
        await self._drain(server, servicer, dispatcher, health_servicer)
        client.close()
        log.info("gateway %d stopped", self.index)

    async def _drain(self, server: grpc.aio.Server, servicer: Servicer, dispatcher: WorkDispatcher,
                     health_servicer: health.aio.HealthServicer) -> None:
        """Let the work already handed out settle, then end the worker streams and stop the server."""
        deadline = time.monotonic() + self.config.drain_grace_s
        servicer.begin_drain()  # before any await: nothing may slip in once the drain has begun
        dispatcher.accepting = False
        dispatcher.grant()  # keep=0: partitions hand back their standing credits
        await health_servicer.enter_graceful_shutdown()  # NOT_SERVING, and stays so
        log.info("gateway %d draining: %d work items in flight", self.index, dispatcher.held_count())
        while dispatcher.held_count() or servicer.settling:
            if time.monotonic() >= deadline:
                log.warning(
                    "gateway %d: drain grace of %.1fs over with %d work items still in flight; they go back"
                    " to their partitions' queues", self.index, self.config.drain_grace_s, dispatcher.held_count(),
                )
                break
            await asyncio.sleep(_DRAIN_POLL_S)
        else:
            log.info("gateway %d drained: every work item it handed out was completed or abandoned", self.index)
        servicer.end_streams()  # worker streams end with OK
        await server.stop(grace=_STOP_GRACE_S)

    async def _track_readiness(self, client: PartitionClient, health_servicer: health.aio.HealthServicer) -> None:
        """Readiness: SERVING while every partition answers heartbeats (see PartitionClient.ready)."""
        serving = None
        while True:
            ready = client.ready()
            if ready != serving:
                if serving and not ready:
                    log.warning("gateway %d: partition(s) %s silent for %.1fs; health NOT_SERVING until they answer",
                                self.index, client.silent_partitions(), self.config.gateway_timeout_s)
                serving = ready
                status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
                await health_servicer.set("", status)
                await health_servicer.set(SERVICE_NAME, status)
            await asyncio.sleep(0.2)
