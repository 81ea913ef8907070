"""A batched ZeroMQ channel: messages queued in one loop turn leave as one msgpack frame per peer.

With the tcp transport the sockets can be authenticated and encrypted with CurveZMQ: every node of a
deployment shares one keypair. ROUTER sockets (servers) are Curve servers holding the secret key and
let in only clients that present the deployment's public key (checked by a ZAP handler); DEALER
sockets (clients) verify the server's public key and present the same keypair. ipc sockets never use
Curve.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack
import zmq
from zmq.utils import z85

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


def _encode_leniently(batch: list[Message]) -> bytes:
    """Encode a batch; if one message cannot be encoded, drop only that one (and say so)."""
    try:
        return encode(batch)
    except (TypeError, ValueError, OverflowError):
        kept = []
        for message in batch:
            try:
                encode([message])
            except (TypeError, ValueError, OverflowError) as exc:
                log.error("dropped a message that cannot be encoded (op %r): %s", message.get("op"), exc)
                continue
            kept.append(message)
        return encode(kept)


def decode(frame: bytes) -> list[Message]:
    batch = msgpack.unpackb(frame, raw=False)
    if not isinstance(batch, list):
        raise ValueError("a frame must carry a list of messages")
    return batch


@dataclass(frozen=True)
class CurveKeys:
    """Z85-encoded CurveZMQ keys (40 ASCII bytes each).

    `public`/`secret` are this node's keypair. Servers admit clients whose public key is in
    `allowed` (default: just `public`); clients expect the server to hold `server_public` (default:
    `public`). With one keypair per deployment both defaults apply.
    """

    public: bytes
    secret: bytes = field(repr=False)
    server_public: bytes | None = None
    allowed: frozenset[bytes] = frozenset()

    def admitted(self) -> frozenset[bytes]:
        return self.allowed or frozenset({self.public})


def read_curve_key(path: str, secret: bool) -> bytes:
    """A Z85 key from a file: either the 40 characters alone or a zmq.auth certificate."""
    with open(path, "rb") as f:
        text = f.read()
    if b"public-key" in text:
        import zmq.auth

        public, secret_key = zmq.auth.load_certificate(path)
        key = secret_key if secret else public
        if key is None:
            raise ValueError(f"{path} is a public certificate; a secret key is needed here")
    else:
        key = text.strip()
    try:
        if len(key) != 40 or len(z85.decode(key)) != 32:
            raise ValueError
    except Exception:
        kind = "secret" if secret else "public"
        raise ValueError(f"{path} does not hold a CurveZMQ {kind} key (40 Z85 characters)") from None
    return key


def load_curve_keys(config: Any) -> CurveKeys | None:
    """The node keypair named by the config, or None when Curve is not configured."""
    if not getattr(config, "zmq_curve_secret_file", ""):
        return None
    if not zmq.has("curve"):
        raise ValueError("this libzmq was built without CurveZMQ support")
    secret = read_curve_key(config.zmq_curve_secret_file, secret=True)
    public = zmq.curve_public(secret)
    if config.zmq_curve_public_file:
        given = read_curve_key(config.zmq_curve_public_file, secret=False)
        if given != public:
            raise ValueError(
                f"{config.zmq_curve_public_file} does not match the secret key in {config.zmq_curve_secret_file}"
            )
    return CurveKeys(public=public, secret=secret)


_UNSET: Any = object()
_process_keys: Any = _UNSET
_process_lock = threading.Lock()


def configure_curve(keys: CurveKeys | None) -> None:
    """Set the keys tcp channels of this process use when their caller passes none."""
    global _process_keys
    with _process_lock:
        _process_keys = keys


def _process_curve_keys() -> CurveKeys | None:
    """The process's keys: as configured, else from the config the supervisor handed this process."""
    global _process_keys
    with _process_lock:
        if _process_keys is _UNSET:
            from runtime.processes import CONFIG_ENV, config_from_env

            _process_keys = load_curve_keys(config_from_env()) if CONFIG_ENV in os.environ else None
        return _process_keys


def _curve_for(endpoint: str, curve: Any) -> CurveKeys | None:
    if curve is not _UNSET:
        return curve
    return _process_curve_keys() if endpoint.startswith("tcp://") else None


class _Allowlist:
    """ZAP credentials provider: admit the public keys the context's servers allow."""

    def __init__(self) -> None:
        self.keys: dict[bytes, int] = {}
        self.rejected: set[bytes] = set()  # logged once each: a rejected peer retries every few ms

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = key in self.keys
        if not allowed and key not in self.rejected and len(self.rejected) < 1000:
            self.rejected.add(key)
            log.warning("rejected a CurveZMQ peer with unknown public key %s", key.decode(errors="replace"))
        return allowed


class _ZapHandlers:
    """One ZAP handler thread per context, shared by its Curve servers, stopped with the last one."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_ctx: dict[int, tuple[Any, _Allowlist, int]] = {}

    def acquire(self, ctx: zmq.Context, keys: frozenset[bytes]) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        with self.lock:
            entry = self.by_ctx.get(id(ctx))
            if entry is None:
                allowlist = _Allowlist()
                auth = ThreadAuthenticator(ctx, log=logging.getLogger(__name__ + ".zap"))
                auth.start()
                auth.configure_curve_callback("*", credentials_provider=allowlist)
                entry = (auth, allowlist, 0)
            auth, allowlist, users = entry
            for key in keys:
                allowlist.keys[key] = allowlist.keys.get(key, 0) + 1
            self.by_ctx[id(ctx)] = (auth, allowlist, users + 1)

    def release(self, ctx: zmq.Context, keys: frozenset[bytes]) -> None:
        with self.lock:
            entry = self.by_ctx.get(id(ctx))
            if entry is None:
                return
            auth, allowlist, users = entry
            for key in keys:
                left = allowlist.keys.get(key, 0) - 1
                if left > 0:
                    allowlist.keys[key] = left
                else:
                    allowlist.keys.pop(key, None)
            if users > 1:
                self.by_ctx[id(ctx)] = (auth, allowlist, users - 1)
                return
            del self.by_ctx[id(ctx)]
        auth.stop()


_ZAP = _ZapHandlers()


def _allow_ipv6(sock: zmq.Socket, endpoint: str) -> None:
    """ZeroMQ sockets speak IPv4 only unless told otherwise; an IPv6 address comes in brackets."""
    if endpoint.startswith("tcp://["):
        sock.setsockopt(zmq.IPV6, 1)


class ZmqChannel:
    """One ZeroMQ socket. ROUTER sockets address peers by identity; DEALER sockets have one peer.

    ZeroMQ signals readiness through an edge-triggered file descriptor, and any send can consume
    the edge. So the reader callback and every flush re-read ZMQ_EVENTS, and a receiver waiting
    for messages is woken whenever POLLIN is set.
    """

    def __init__(self, sock: zmq.Socket, on_close: Any = None) -> None:
        self._sock = sock
        self._on_close = on_close
        self._is_router = sock.type == zmq.ROUTER
        self._pending: dict[bytes | None, list[Message]] = {}
        self._flush_scheduled = False
        self._waiter: asyncio.Future[None] | None = None
        self._woken = False
        self._handler: Callable[[list[tuple[bytes | None, Message]]], None] | None = None
        self._delivering = False
        self._look_again = False
        self._emptied = False
        self._loop = asyncio.get_running_loop()
        self._fd = sock.getsockopt(zmq.FD)
        self._loop.add_reader(self._fd, self._on_readable_fd)

    @classmethod
    def router(cls, ctx: zmq.Context, endpoint: str, curve: CurveKeys | None = _UNSET) -> ZmqChannel:
        """A bound ROUTER. `curve`: keys to require (default: the process's keys for tcp endpoints)."""
        keys = _curve_for(endpoint, curve)
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer reuses its identity
        sock.setsockopt(zmq.SNDHWM, _HWM)
        sock.setsockopt(zmq.RCVHWM, _HWM)
        sock.setsockopt(zmq.LINGER, 0)
        _allow_ipv6(sock, endpoint)
        on_close = None
        if keys is not None:
            admitted = keys.admitted()
            _ZAP.acquire(ctx, admitted)  # before bind: no peer may handshake without the allow-list
            on_close = functools.partial(_ZAP.release, ctx, admitted)
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
        try:
            sock.bind(endpoint)
        except BaseException:
            sock.close(linger=0)
            if on_close is not None:
                on_close()
            raise
        return cls(sock, on_close)

    @classmethod
    def dealer(cls, ctx: zmq.Context, endpoint: str, identity: bytes,
               curve: CurveKeys | None = _UNSET) -> ZmqChannel:
        """A DEALER connected to `endpoint`. `curve`: keys to authenticate with, as for router()."""
        keys = _curve_for(endpoint, curve)
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.SNDHWM, _HWM)
        sock.setsockopt(zmq.RCVHWM, _HWM)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        _allow_ipv6(sock, endpoint)
        if keys is not None:
            sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public or keys.public)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
        sock.connect(endpoint)
        return cls(sock)

    @property
    def socket(self) -> zmq.Socket:
        return self._sock

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
            payload = _encode_leniently(batch)
            frames = [to, payload] if self._is_router else [payload]
            try:
                self._sock.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again:
                log.warning("dropped a batch of %d messages: peer queue full", len(batch))
            except zmq.ZMQError as exc:
                log.warning("dropped a batch of %d messages: %s", len(batch), exc)
        self._check_readable()

    def subscribe(self, handler: Callable[[list[tuple[bytes | None, Message]]], None]) -> None:
        """Hand arriving messages to `handler` straight from the reader callback, instead of recv().

        A busy loop (the gateway's) then answers a reply without first queueing a task step behind
        everything else that is ready.
        """
        self._handler = handler
        self._loop.call_soon(self._deliver)  # whatever arrived before we subscribed

    def _deliver(self) -> None:
        if self._handler is None:
            return
        if self._delivering:  # re-entered from the handler (say, it flushed): look again afterwards
            self._look_again = True
            return
        self._delivering = True
        messages: list[tuple[bytes | None, Message]] = []
        try:
            messages = self._drain()
            if messages:
                self._handler(messages)
        finally:
            self._delivering = False
            # The drain stopped at its bound, or a send during the handler may have taken the edge.
            if (messages and not self._emptied) or self._look_again:
                self._look_again = False
                self._loop.call_soon(self._check_readable)

    def wake(self) -> None:
        """Make the pending (or the next) recv() return, even with no messages."""
        self._woken = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _on_readable_fd(self) -> None:
        """The loop saw the descriptor signal. ZeroMQ asks for ZMQ_EVENTS to be read after every
        signal, so it is read here whether or not a receiver waits."""
        if self._handler is not None:
            self._deliver()
            return
        try:
            readable = self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN
        except zmq.ZMQError:
            return
        if readable and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _check_readable(self) -> None:
        """After a send (which may consume the edge) or before waiting: deliver, or wake a waiting receiver."""
        if self._handler is None and (self._waiter is None or self._waiter.done()):
            return  # nobody waits: the receiver drains the socket before it waits again
        self._on_readable_fd()

    async def recv(self) -> list[tuple[bytes | None, Message]]:
        """The messages waiting now, at least one; or none, if wake() was called meanwhile."""
        while True:
            out = self._drain()
            if out or self._woken:
                self._woken = False
                return out
            self._waiter = self._loop.create_future()
            self._check_readable()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _drain(self) -> list[tuple[bytes | None, Message]]:
        """Up to _MAX_DRAIN frames; `_emptied` tells whether the socket was read dry."""
        out: list[tuple[bytes | None, Message]] = []
        self._emptied = False
        for _ in range(_MAX_DRAIN):
            try:
                frames = self._sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                self._emptied = True
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
        self._handler = None
        self._loop.remove_reader(self._fd)
        self._sock.close(linger=0)
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()
