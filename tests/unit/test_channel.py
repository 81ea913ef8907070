"""ZmqChannel over real ZeroMQ sockets (ipc in a short temp dir): batching, recv, wake and subscribe."""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
from collections.abc import Callable

import zmq

from runtime.router.channel import ZmqChannel

DEADLINE_S = 10.0


async def _until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def _run(body: Callable[[ZmqChannel, ZmqChannel], object]) -> None:
    # Unix socket paths are limited to ~100 bytes, so the socket lives in a short directory of its own.
    socket_dir = tempfile.mkdtemp(prefix="drch-")
    endpoint = f"ipc://{socket_dir}/r.sock"

    async def main() -> None:
        ctx = zmq.Context()
        router = ZmqChannel.router(ctx, endpoint)
        dealer = ZmqChannel.dealer(ctx, endpoint, b"g-test")
        try:
            await asyncio.wait_for(body(router, dealer), DEADLINE_S)  # type: ignore[arg-type]
        finally:
            dealer.close()
            router.close()
            ctx.term()

    try:
        asyncio.run(main())
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)


def test_messages_sent_in_one_turn_arrive_together_with_the_sender() -> None:
    async def body(router: ZmqChannel, dealer: ZmqChannel) -> None:
        for n in range(5):
            dealer.send({"op": "x", "n": n})
        received = await router.recv()
        assert [(sender, m["n"]) for sender, m in received] == [(b"g-test", n) for n in range(5)]
        router.send({"op": "reply", "n": 7}, to=b"g-test")
        assert [m for _, m in await dealer.recv()] == [{"op": "reply", "n": 7}]

    _run(body)


def test_wake_makes_recv_return_without_messages() -> None:
    async def body(router: ZmqChannel, dealer: ZmqChannel) -> None:
        waiting = asyncio.ensure_future(router.recv())
        await asyncio.sleep(0)
        router.wake()
        assert await waiting == []
        router.wake()  # a wake while nobody waits ends the next recv at once
        assert await router.recv() == []

    _run(body)


def test_subscribe_delivers_everything_in_order_from_the_reader() -> None:
    async def body(router: ZmqChannel, dealer: ZmqChannel) -> None:
        got: list[int] = []
        dealer.send({"op": "x", "n": -1})  # before the subscription
        dealer.flush()
        await _until(lambda: router.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN, "the first frame")
        router.subscribe(lambda messages: got.extend(m["n"] for _, m in messages))
        # More frames than one drain reads, each sent on its own, while the handler side also sends.
        for n in range(600):
            dealer.send({"op": "x", "n": n})
            dealer.flush()
            if n % 50 == 0:
                router.send({"op": "ping"}, to=b"g-test")
                await asyncio.sleep(0)
        await _until(lambda: len(got) == 601, "every message")
        assert got == list(range(-1, 600))

    _run(body)


def test_a_failing_handler_does_not_strand_what_is_still_queued() -> None:
    async def body(router: ZmqChannel, dealer: ZmqChannel) -> None:
        got: list[int] = []
        calls = 0

        def handler(messages: list[tuple[bytes | None, dict]]) -> None:
            nonlocal calls
            calls += 1
            got.extend(m["n"] for _, m in messages)
            if calls == 1:
                raise RuntimeError("handler bug")

        asyncio.get_running_loop().set_exception_handler(lambda loop, context: None)
        for n in range(400):  # more frames than one drain reads, queued before anyone listens
            dealer.send({"op": "x", "n": n})
            dealer.flush()
        await _until(lambda: router.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN, "the first frame")
        router.subscribe(handler)
        await _until(lambda: len(got) == 400, "every message, with no new arrival to prompt it")
        assert got == list(range(400))

    _run(body)


def test_an_unread_socket_does_not_keep_the_loop_busy() -> None:
    """Messages nobody receives (say, for an outbox DEALER) must not make the reader fire every turn."""

    async def body(router: ZmqChannel, dealer: ZmqChannel) -> None:
        loop = asyncio.get_running_loop()
        calls = 0
        fd = dealer.socket.getsockopt(zmq.FD)
        reader = dealer._on_readable_fd

        def counting() -> None:
            nonlocal calls
            calls += 1
            reader()

        loop.remove_reader(fd)
        loop.add_reader(fd, counting)
        dealer.send({"op": "hello"})  # the router learns the dealer's identity
        await router.recv()
        for n in range(3):
            router.send({"op": "unread", "n": n}, to=b"g-test")
            router.flush()
        await _until(lambda: calls >= 1, "the dealer's descriptor to fire")
        settled = calls
        for _ in range(200):
            await asyncio.sleep(0)
        assert calls - settled <= 2, f"the reader fired {calls - settled} more times for 3 unread messages"

    _run(body)


def test_a_handler_that_sends_and_flushes_does_not_strand_later_frames() -> None:
    """A flush inside the handler may consume the descriptor's edge; frames that arrive meanwhile
    must still be delivered without a further arrival to prompt them."""

    async def body(router: ZmqChannel, dealer: ZmqChannel) -> None:
        got: list[int] = []

        def handler(messages: list[tuple[bytes | None, dict]]) -> None:
            got.extend(m["n"] for _, m in messages)
            if got == [0]:
                router.send({"op": "go"}, to=b"g-test")  # the peer answers with 1..50 at once
                router.flush()

        router.subscribe(handler)
        dealer.send({"op": "x", "n": 0})
        dealer.flush()
        await _until(lambda: got[:1] == [0], "the first message")
        messages = await dealer.recv()
        assert [m["op"] for _, m in messages] == ["go"]
        for n in range(1, 51):
            dealer.send({"op": "x", "n": n})
            dealer.flush()
        await _until(lambda: len(got) == 51, "every message")
        assert got == list(range(51))

    _run(body)


def test_sockets_for_a_bracketed_address_speak_ipv6_and_others_do_not() -> None:
    """ZeroMQ refuses an IPv6 address (`No such device`) unless the socket is told to speak IPv6. The
    IPv4-mapped form of 127.0.0.1 keeps the exchange on 127.0.0.1."""
    port = _free_port()
    mapped = f"tcp://[::ffff:127.0.0.1]:{port}"

    async def main() -> None:
        ctx = zmq.Context()
        router = ZmqChannel.router(ctx, mapped, curve=None)
        dealer = ZmqChannel.dealer(ctx, mapped, b"g-v6", curve=None)
        plain = ZmqChannel.dealer(ctx, f"tcp://127.0.0.1:{port}", b"g-v4", curve=None)
        try:
            assert router.socket.getsockopt(zmq.IPV6) == dealer.socket.getsockopt(zmq.IPV6) == 1
            assert plain.socket.getsockopt(zmq.IPV6) == 0
            dealer.send({"op": "x"})
            received = await asyncio.wait_for(router.recv(), DEADLINE_S)
            assert received == [(b"g-v6", {"op": "x"})]
        finally:
            plain.close()
            dealer.close()
            router.close()
            ctx.term()

    asyncio.run(main())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
