"""A batched ZeroMQ channel: messages queued in one loop turn leave as one msgpack frame per peer."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import msgpack
import zmq

log = logging.getLogger(__name__)

Message = dict[str, Any]

# Generous queues: a frame is a whole batch, and a full queue drops (outbox resends, requests time out).
_HWM = 100_000
_MAX_DRAIN = 256


class Channel(Protocol):
    """What the gateway and partitions need from the router: send now-ish, receive in batches."""

    def send(self, msg: Message, to: bytes | None = None) -> None:
        """Queue `msg` for `to` (a peer identity on ROUTER sockets, None on DEALER sockets)."""

    async def recv(self) -> list[tuple[bytes | None, Message]]:
        """Wait for at least one message, then return everything already waiting."""


def encode(batch: list[Message]) -> bytes:
    return msgpack.packb(batch, use_bin_type=True)


def decode(frame: bytes) -> list[Message]:
    batch = msgpack.unpackb(frame, raw=False)
    if not isinstance(batch, list):
        raise ValueError("a frame must carry a list of messages")
    return batch


class ZmqChannel:
    """One ZeroMQ socket. ROUTER sockets address peers by identity; DEALER sockets have one peer.

    ZeroMQ signals readiness through an edge-triggered file descriptor, and any send can consume
    the edge. So the reader callback and every flush re-read ZMQ_EVENTS, and a receiver waiting
    for messages is woken whenever POLLIN is set.
    """

    def __init__(self, sock: zmq.Socket) -> None:
        self._sock = sock
        self._is_router = sock.socket_type == zmq.ROUTER
        self._pending: dict[bytes | None, list[Message]] = {}
        self._flush_scheduled = False
        self._waiter: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._fd = sock.getsockopt(zmq.FD)
        self._loop.add_reader(self._fd, self._check_readable)

    @classmethod
    def router(cls, ctx: zmq.Context, endpoint: str) -> ZmqChannel:
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer reuses its identity
        sock.setsockopt(zmq.SNDHWM, _HWM)
        sock.setsockopt(zmq.RCVHWM, _HWM)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(endpoint)
        return cls(sock)

    @classmethod
    def dealer(cls, ctx: zmq.Context, endpoint: str, identity: bytes) -> ZmqChannel:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.SNDHWM, _HWM)
        sock.setsockopt(zmq.RCVHWM, _HWM)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.connect(endpoint)
        return cls(sock)

    def send(self, msg: Message, to: bytes | None = None) -> None:
        self._pending.setdefault(to, []).append(msg)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Send every queued batch now. Called at the end of the loop turn that queued them."""
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        for to, batch in pending.items():
            frames = [to, encode(batch)] if self._is_router else [encode(batch)]
            try:
                self._sock.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again:
                log.warning("dropped a batch of %d messages: peer queue full", len(batch))
            except zmq.ZMQError as exc:
                log.warning("dropped a batch of %d messages: %s", len(batch), exc)
        self._check_readable()

    def _check_readable(self) -> None:
        try:
            readable = self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN
        except zmq.ZMQError:
            return
        if readable and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def recv(self) -> list[tuple[bytes | None, Message]]:
        while True:
            out = self._drain()
            if out:
                return out
            self._waiter = self._loop.create_future()
            self._check_readable()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _drain(self) -> list[tuple[bytes | None, Message]]:
        out: list[tuple[bytes | None, Message]] = []
        for _ in range(_MAX_DRAIN):
            try:
                frames = self._sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            self._decode_into(out, frames)
        return out

    def _decode_into(self, out: list[tuple[bytes | None, Message]], frames: list[bytes]) -> None:
        sender = frames[0] if self._is_router else None
        try:
            batch = decode(frames[-1])
        except Exception:  # a malformed frame must not take the process down
            log.warning("discarded a malformed frame from %r", sender)
            return
        out.extend((sender, m) for m in batch if isinstance(m, dict))

    def close(self) -> None:
        self.flush()
        self._loop.remove_reader(self._fd)
        self._sock.close(linger=0)
