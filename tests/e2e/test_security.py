"""Access control: TLS and mutual TLS on the gateway, the API token, and CurveZMQ between processes.

Certificates are made at test time with the `openssl` CLI (a throw-away CA, a server certificate for
127.0.0.1/localhost, client certificates from that CA and from an untrusted one). Everything runs on
loopback; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import zmq
from durabletask import task
from durabletask import worker as dt_worker
from durabletask.client import OrchestrationStatus, TaskHubGrpcClient
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.internal import orchestrator_service_pb2_grpc as stubs
from google.protobuf import empty_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from zmq.utils.monitor import recv_monitor_message

from runtime.router.channel import CurveKeys, ZmqChannel

from .conftest import REPO_ROOT, STARTUP_DEADLINE_S, EngineRuntime, free_port, free_port_range, subprocess_env
from .helpers import DEADLINE_S, PARTITIONS, hello_ok, ids_on_different_partitions, partition_of

pytestmark = [pytest.mark.engine_only]

TOKEN = "s3cret-token-for-the-e2e-suite-0123456789"


# ---------------------------------------------------------------------------------------------------------
# orchestrations
# ---------------------------------------------------------------------------------------------------------
def shout(ctx: task.ActivityContext, text: str) -> str:
    return text.upper()


def child(ctx: task.OrchestrationContext, text: str):
    return (yield ctx.call_activity(shout, input=text))


def parent(ctx: task.OrchestrationContext, inp: dict[str, str]):
    mine = yield ctx.call_activity(shout, input=inp["text"])
    theirs = yield ctx.call_sub_orchestrator(child, input=inp["text"] + "!", instance_id=inp["child_id"])
    return [mine, theirs]


def run_parent(client: TaskHubGrpcClient, partitions: int = PARTITIONS) -> None:
    """Parent and child on different partitions: exercises gateway->partition and partition->partition."""
    parent_id, child_id = ids_on_different_partitions("sec-parent", "sec-child", partitions)
    assert partition_of(parent_id, partitions) != partition_of(child_id, partitions)
    client.schedule_new_orchestration(parent, input={"text": "hi", "child_id": child_id}, instance_id=parent_id)
    state = client.wait_for_orchestration_completion(parent_id, timeout=DEADLINE_S)
    assert state is not None and state.runtime_status == OrchestrationStatus.COMPLETED, state and state.failure_details
    assert state.get_output() == ["HI", "HI!"]


def sdk_worker(**kwargs: Any) -> dt_worker.TaskHubGrpcWorker:
    w = dt_worker.TaskHubGrpcWorker(**kwargs)
    w.add_orchestrator(parent)
    w.add_orchestrator(child)
    w.add_activity(shout)
    w.start()
    return w


# ---------------------------------------------------------------------------------------------------------
# certificates
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def read(self, name: str) -> bytes:
        return getattr(self, name).read_bytes()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_pki(directory: Path, label: str) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    _openssl("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
             "-subj", f"/CN=durable-runtime {label} CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    paths: dict[str, tuple[Path, Path]] = {}
    for name, usage, san in (("server", "serverAuth", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"),
                             ("client", "clientAuth", "")):
        key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.pem"
        ext = directory / f"{name}.ext"
        ext.write_text(f"basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage={usage}\n{san}")
        _openssl("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN=durable-runtime {label} {name}")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
                 "-out", str(cert), "-days", "2", "-extfile", str(ext))
        paths[name] = (cert, key)
    return Pki(ca, paths["server"][0], paths["server"][1], paths["client"][0], paths["client"][1])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make test certificates")
    return make_pki(tmp_path_factory.mktemp("pki"), "test")


@pytest.fixture(scope="module")
def rogue_pki(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Pki:
    """Certificates from a CA the runtime does not trust."""
    return make_pki(tmp_path_factory.mktemp("rogue-pki"), "rogue")


# ---------------------------------------------------------------------------------------------------------
# a runtime whose readiness probe speaks TLS and/or carries the token
# ---------------------------------------------------------------------------------------------------------
ChannelFactory = Callable[[str], grpc.Channel]


def hello(factory: ChannelFactory, address: str, metadata: Sequence[tuple[str, str]] = (),
          timeout: float = 2.0) -> grpc.RpcError | None:
    """None when Hello succeeds, else the error."""
    channel = factory(address)
    try:
        stubs.TaskHubSidecarServiceStub(channel).Hello(empty_pb2.Empty(), timeout=timeout, metadata=metadata)
        return None
    except grpc.RpcError as exc:
        return exc
    finally:
        channel.close()


class SecureRuntime(EngineRuntime):
    def __init__(self, data_dir: Path, factory: ChannelFactory, metadata: Sequence[tuple[str, str]] = (),
                 **kwargs: Any) -> None:
        super().__init__(data_dir, **kwargs)
        self.factory = factory
        self.metadata = list(metadata)

    def wait_ready(self, timeout: float = STARTUP_DEADLINE_S) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"runtime exited with code {self.proc.returncode} during startup\n{self.log_tail()}")
            if hello(self.factory, self.address, self.metadata, timeout=1.0) is None:
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(f"runtime not ready on {self.address} after {timeout}s\n{self.log_tail()}")
            time.sleep(0.1)


@pytest.fixture
def start_runtime(tmp_path: Path) -> Iterator[Callable[..., SecureRuntime]]:
    started: list[SecureRuntime] = []

    def start(args: Sequence[str], factory: ChannelFactory = grpc.insecure_channel,
              metadata: Sequence[tuple[str, str]] = (), **kwargs: Any) -> SecureRuntime:
        rt = SecureRuntime(tmp_path / f"data{len(started)}", factory, metadata, extra_args=list(args), **kwargs)
        started.append(rt)
        return rt.start()  # type: ignore[return-value]

    try:
        yield start
    finally:
        for rt in started:
            rt.close()


def tls_factory(pki: Pki, client: Pki | None = None) -> ChannelFactory:
    """Channels that trust `pki`'s CA and, with `client`, present its client certificate."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.read("ca"),
        private_key=client.read("client_key") if client else None,
        certificate_chain=client.read("client_cert") if client else None,
    )
    return lambda address: grpc.secure_channel(address, creds)


def tls_args(pki: Pki, mutual: bool = False) -> list[str]:
    args = ["--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key)]
    return args + (["--tls-client-ca-file", str(pki.ca)] if mutual else [])


def run_with_channel(factory: ChannelFactory, address: str) -> None:
    """SDK worker and client over caller-made channels (the SDK's own TLS path only trusts system roots)."""
    worker_channel, client_channel = factory(address), factory(address)
    worker = sdk_worker(channel=worker_channel)
    client = TaskHubGrpcClient(channel=client_channel)
    try:
        run_parent(client)
    finally:
        worker.stop()
        client.close()
        worker_channel.close()
        client_channel.close()


# ---------------------------------------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------------------------------------
def test_tls_client_works_and_plaintext_fails(start_runtime: Callable[..., SecureRuntime], pki: Pki):
    rt = start_runtime(tls_args(pki), factory=tls_factory(pki))
    run_with_channel(tls_factory(pki), rt.address)

    assert not hello_ok(rt.address, timeout=2.0), "a plaintext client got through to a TLS gateway"
    # A client that does not trust the server's CA refuses the connection.
    untrusted = hello(lambda a: grpc.secure_channel(a, grpc.ssl_channel_credentials()), rt.address)
    assert untrusted is not None and untrusted.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate_from_the_ca(
        start_runtime: Callable[..., SecureRuntime], pki: Pki, rogue_pki: Pki):
    rt = start_runtime(tls_args(pki, mutual=True), factory=tls_factory(pki, client=pki))
    run_with_channel(tls_factory(pki, client=pki), rt.address)

    for name, factory in (("no client certificate", tls_factory(pki)),
                          ("a certificate from another CA", tls_factory(pki, client=rogue_pki)),
                          ("plaintext", grpc.insecure_channel)):
        error = hello(factory, rt.address)
        assert error is not None, f"mutual TLS let in a client with {name}"
        assert error.code() == grpc.StatusCode.UNAVAILABLE, (name, error)


def test_sdk_secure_channel_with_token_over_tls(start_runtime: Callable[..., SecureRuntime], pki: Pki):
    """The unmodified SDK path: host_address grpcs://..., secure_channel, metadata; the CA via gRPC's roots file."""
    bearer = [("authorization", f"Bearer {TOKEN}")]
    rt = start_runtime([*tls_args(pki), "--api-token", TOKEN], factory=tls_factory(pki), metadata=bearer)
    script = textwrap.dedent(f"""
        from tests.e2e.test_security import run_parent, sdk_worker
        from durabletask.client import TaskHubGrpcClient
        meta = [("authorization", "Bearer " + {TOKEN!r})]
        w = sdk_worker(host_address="grpcs://{rt.address}", metadata=meta)
        c = TaskHubGrpcClient(host_address="{rt.address}", secure_channel=True, metadata=meta)
        try:
            run_parent(c, {PARTITIONS})
        finally:
            w.stop()
            c.close()
        print("SDK-OK")
    """)
    env = subprocess_env(GRPC_DEFAULT_SSL_ROOTS_FILE_PATH=str(pki.ca))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=2 * DEADLINE_S, cwd=str(REPO_ROOT))
    assert result.returncode == 0 and "SDK-OK" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------
# API token
# ---------------------------------------------------------------------------------------------------------
def test_api_token(start_runtime: Callable[..., SecureRuntime], monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DURABLE_RUNTIME_API_TOKEN", TOKEN)  # the env variable, inherited by the runtime
    bearer = [("authorization", f"Bearer {TOKEN}")]
    rt = start_runtime([], metadata=bearer)
    monkeypatch.delenv("DURABLE_RUNTIME_API_TOKEN")

    channel = grpc.insecure_channel(rt.address)
    try:
        stub = stubs.TaskHubSidecarServiceStub(channel)
        start = pb.CreateInstanceRequest(instanceId="token-test", name="parent")
        cases = [
            ((), "requires an API token"),
            ((("authorization", "Bearer wrong-token"),), "invalid API token"),
            ((("authorization", f"Bearer {TOKEN}x"),), "invalid API token"),
            ((("authorization", TOKEN),), "must be 'Bearer <token>'"),
        ]
        for metadata, text in cases:
            for call in (lambda m: stub.Hello(empty_pb2.Empty(), timeout=DEADLINE_S, metadata=m),
                         lambda m: stub.StartInstance(start, timeout=DEADLINE_S, metadata=m),
                         lambda m: next(stub.GetWorkItems(pb.GetWorkItemsRequest(), timeout=DEADLINE_S, metadata=m))):
                with pytest.raises(grpc.RpcError) as rejected:
                    call(metadata)
                assert rejected.value.code() == grpc.StatusCode.UNAUTHENTICATED, (metadata, rejected.value)
                assert text in rejected.value.details(), (metadata, rejected.value.details())
        # Nothing was started by the rejected calls.
        state = stub.GetInstance(pb.GetInstanceRequest(instanceId="token-test"), timeout=DEADLINE_S, metadata=bearer)
        assert not state.exists
        # The health service stays open for probes.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE_S)
        assert health.status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)
    finally:
        channel.close()

    # The SDK sends the token as metadata on every call, worker stream included.
    worker = sdk_worker(host_address=rt.address, metadata=bearer)
    client = TaskHubGrpcClient(host_address=rt.address, metadata=bearer)
    try:
        run_parent(client)
    finally:
        worker.stop()
        client.close()


# ---------------------------------------------------------------------------------------------------------
# CurveZMQ
# ---------------------------------------------------------------------------------------------------------
def keypair() -> tuple[bytes, bytes]:
    return zmq.curve_keypair()


def node_keys() -> CurveKeys:
    public, secret = keypair()
    return CurveKeys(public=public, secret=secret)


_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


async def wait_event(monitor: zmq.Socket, mask: int, timeout: float = DEADLINE_S) -> int:
    """The first monitor event in `mask` (polled against a deadline)."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        if monitor.poll(0):
            event = recv_monitor_message(monitor)["event"]
            seen.append(event)
            if event & mask:
                return event
        else:
            await asyncio.sleep(0.01)
    raise AssertionError(f"no monitor event in {mask:#x} within {timeout}s (saw {seen})")


async def exchange(server_keys: CurveKeys | None, client_keys: CurveKeys | None) -> tuple[bool, int]:
    """A ROUTER and a DEALER over tcp on loopback. Returns (round trip worked, first handshake event)."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server_ctx, client_ctx = zmq.Context(), zmq.Context()
    server = ZmqChannel.router(server_ctx, endpoint, curve=server_keys)
    monitor = server.socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | _HANDSHAKE_FAILED)
    client = ZmqChannel.dealer(client_ctx, endpoint, b"c1", curve=client_keys)
    try:
        client.send({"op": "ping", "n": 1})
        event = await wait_event(monitor, zmq.EVENT_HANDSHAKE_SUCCEEDED | _HANDSHAKE_FAILED)
        if event != zmq.EVENT_HANDSHAKE_SUCCEEDED:
            server.socket.poll(50)  # anything that could have slipped through would be queued by now
            assert server._drain() == [], "a rejected peer delivered a message"
            return False, event
        [(sender, message)] = await asyncio.wait_for(server.recv(), DEADLINE_S)
        assert sender == b"c1" and message == {"op": "ping", "n": 1}
        server.send({"op": "pong"}, to=sender)
        [(_, reply)] = await asyncio.wait_for(client.recv(), DEADLINE_S)
        assert reply == {"op": "pong"}
        return True, event
    finally:
        server.socket.disable_monitor()
        monitor.close(linger=0)
        client.close()
        server.close()
        server_ctx.term()
        client_ctx.term()


def test_curve_matching_keys_exchange_messages():
    keys = node_keys()  # one keypair shared by every node of the deployment
    assert asyncio.run(exchange(keys, keys)) == (True, zmq.EVENT_HANDSHAKE_SUCCEEDED)


def test_curve_distinct_client_keypair_on_the_allow_list():
    server_public, server_secret = keypair()
    client_public, client_secret = keypair()
    server = CurveKeys(public=server_public, secret=server_secret, allowed=frozenset({client_public}))
    client = CurveKeys(public=client_public, secret=client_secret, server_public=server_public)
    assert asyncio.run(exchange(server, client))[0]


@pytest.mark.parametrize("case", ["wrong server key", "unknown client key", "plaintext client"])
def test_curve_rejects_peers_without_the_right_keys(case: str):
    keys = node_keys()
    other = node_keys()
    client: CurveKeys | None
    if case == "wrong server key":  # the client would talk to an impostor: the handshake cannot complete
        client = CurveKeys(public=keys.public, secret=keys.secret, server_public=other.public)
    elif case == "unknown client key":  # knows the server's public key, but is not on the allow-list
        client = CurveKeys(public=other.public, secret=other.secret, server_public=keys.public)
    else:
        client = None
    worked, event = asyncio.run(exchange(keys, client))
    assert not worked and event & _HANDSHAKE_FAILED, (case, event)


def test_runtime_over_tcp_on_an_ipv6_address(start_runtime: Callable[..., SecureRuntime]):
    """`--zmq-host` may be an IPv6 address: the port check, the partitions' binds and every connection to them
    take it, in brackets where ZeroMQ wants them. (The IPv4-mapped form of 127.0.0.1 keeps the test on
    127.0.0.1; test_channel.py checks that such sockets are told to speak IPv6.)"""
    rt, base = run_parent_over_tcp(start_runtime, "--zmq-host", "::ffff:127.0.0.1")
    assert f"tcp://[::ffff:127.0.0.1]:{base}" in rt.log_tail(200)
    assert rt.terminate() == 0, rt.log_tail()


def run_parent_over_tcp(start_runtime: Callable[..., SecureRuntime], *flags: str) -> tuple[SecureRuntime, int]:
    """A node on the tcp transport (with `flags`) runs a parent and its child on another partition; returns the
    node and its first partition port."""
    partitions = max(PARTITIONS, 2)
    base = free_port_range(partitions)
    rt = start_runtime(["--zmq-transport", "tcp", "--zmq-base-port", str(base), *flags], partitions=partitions)
    worker = sdk_worker(host_address=rt.address)
    client = TaskHubGrpcClient(host_address=rt.address)
    try:
        run_parent(client, partitions)
    finally:
        worker.stop()
        client.close()
    return rt, base


def test_runtime_over_tcp_with_curve(start_runtime: Callable[..., SecureRuntime], tmp_path: Path):
    public, secret = keypair()
    secret_file, public_file = tmp_path / "node.key_secret", tmp_path / "node.key"
    secret_file.write_bytes(secret + b"\n")
    public_file.write_bytes(public + b"\n")
    secret_file.chmod(0o600)
    rt, base = run_parent_over_tcp(start_runtime, "--zmq-curve-secret-file", str(secret_file),
                                   "--zmq-curve-public-file", str(public_file))
    assert f"tcp://127.0.0.1:{base}" in rt.log_tail(200)

    # A peer without the deployment's keys cannot talk to a partition.
    async def intrude() -> int:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | _HANDSHAKE_FAILED)
        stranger = node_keys()
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = public, stranger.public, stranger.secret
        sock.connect(f"tcp://127.0.0.1:{base}")
        try:
            return await wait_event(monitor, zmq.EVENT_HANDSHAKE_SUCCEEDED | _HANDSHAKE_FAILED)
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            ctx.term()

    assert asyncio.run(intrude()) & _HANDSHAKE_FAILED
    assert rt.is_running()
    # Curve servers stop their ZAP handler on close, so partitions shut down cleanly.
    assert rt.terminate() == 0, rt.log_tail()
