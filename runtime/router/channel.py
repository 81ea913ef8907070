"""A batched ZeroMQ channel: messages queued in one loop turn leave as one msgpack frame per peer."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import msgpack
import zmq
import zmq.asyncio

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
    """One ZeroMQ socket. ROUTER sockets address peers by identity; DEALER sockets have one peer."""

    def __init__(self, sock: zmq.asyncio.Socket) -> None:
        self._async = sock
        self._sync = zmq.Socket.shadow(sock.underlying)
        self._is_router = sock.socket_type == zmq.ROUTER
        self._pending: dict[bytes | None, list[Message]] = {}
        self._flush_scheduled = False

    @classmethod
    def router(cls, ctx: zmq.asyncio.Context, endpoint: str) -> ZmqChannel:
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer reuses its identity
        sock.setsockopt(zmq.SNDHWM, _HWM)
        sock.setsockopt(zmq.RCVHWM, _HWM)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(endpoint)
        return cls(sock)

    @classmethod
    def dealer(cls, ctx: zmq.asyncio.Context, endpoint: str, identity: bytes) -> ZmqChannel:
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
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Send every queued batch now. Called at the end of the loop turn that queued them."""
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        for to, batch in pending.items():
            frames = [to, encode(batch)] if self._is_router else [encode(batch)]
            try:
                self._sync.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again:
                log.warning("dropped a batch of %d messages: peer queue full", len(batch))
            except zmq.ZMQError as exc:
                log.warning("dropped a batch of %d messages: %s", len(batch), exc)

    async def recv(self) -> list[tuple[bytes | None, Message]]:
        out: list[tuple[bytes | None, Message]] = []
        self._decode_into(out, await self._async.recv_multipart(copy=True))
        for _ in range(_MAX_DRAIN):
            try:
                frames = self._sync.recv_multipart(flags=zmq.NOBLOCK)
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
        self._async.close(linger=0)
