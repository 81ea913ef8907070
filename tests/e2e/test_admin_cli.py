"""The admin CLI (`durable-runtime instances ...` / `entities ...`, runtime/admin.py) against a running engine.

Instances are made with the official SDK; the CLI runs as a subprocess (`python -m runtime ...`) and its
effects are checked through the SDK client. Every test uses its own id prefix; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from durabletask import entities, task
from durabletask import worker as dt_worker
from durabletask.client import OrchestrationStatus
from durabletask.internal import orchestrator_service_pb2 as pb
from google.protobuf import empty_pb2, wrappers_pb2

from .conftest import REPO_ROOT, STARTUP_DEADLINE_S, EngineRuntime, free_port, subprocess_env
from .helpers import DEADLINE_S, new_id, wait_until

pytestmark = pytest.mark.engine_only

TOKEN = "admin-cli-e2e-token-0123456789abcdef"


# ---------------------------------------------------------------------------------------------------------
# orchestrations, activities, entities
# ---------------------------------------------------------------------------------------------------------
def plus_one(ctx: task.ActivityContext, n: int) -> int:
    return n + 1


def flaky_plus_one(ctx: task.ActivityContext, inp: dict) -> int:
    if not Path(inp["marker"]).exists():
        raise ValueError("not fixed yet")
    return inp["n"] + 1


def echo(ctx: task.OrchestrationContext, inp):
    ctx.set_custom_status({"stage": "done"})
    return inp


def two_steps(ctx: task.OrchestrationContext, n: int):
    a = yield ctx.call_activity(plus_one, input=n)
    return (yield ctx.call_activity(plus_one, input=a))


def wait_for_go(ctx: task.OrchestrationContext, _):
    return (yield ctx.wait_for_external_event("go"))


def fail_now(ctx: task.OrchestrationContext, message: str):
    raise ValueError(message)


def flaky(ctx: task.OrchestrationContext, inp: dict):
    return (yield ctx.call_activity(flaky_plus_one, input=inp))


def counter(ctx: entities.EntityContext, value):
    state = ctx.get_state(int, 0)
    if ctx.operation == "add":
        ctx.set_state(state + value)
    return ctx.get_state(int, 0)


@pytest.fixture(scope="module", autouse=True)
def worker(runtime):
    w = dt_worker.TaskHubGrpcWorker(host_address=runtime.address)
    for fn in (echo, two_steps, wait_for_go, fail_now, flaky):
        w.add_orchestrator(fn)
    for fn in (plus_one, flaky_plus_one):
        w.add_activity(fn)
    w.add_entity(counter)
    w.start()
    try:
        yield w
    finally:
        w.stop()


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------
def run_cli(address: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m runtime <args>` with DURABLE_RUNTIME_ADDRESS pointing at `address`."""
    full_env = subprocess_env({k: v for k, v in os.environ.items() if not k.startswith("DURABLE_RUNTIME_")},
                              **{"DURABLE_RUNTIME_ADDRESS": address, **(env or {})})
    return subprocess.run([sys.executable, "-m", "runtime", *args], cwd=REPO_ROOT, env=full_env,
                          capture_output=True, text=True, timeout=DEADLINE_S * 2, stdin=subprocess.DEVNULL)


@pytest.fixture
def cli(runtime):
    def run(*args: str, rc: int = 0, **kwargs) -> subprocess.CompletedProcess[str]:
        result = run_cli(runtime.address, *args, **kwargs)
        assert result.returncode == rc, (args, result.returncode, result.stdout, result.stderr)
        return result

    return run


def cli_json(cli, *args: str):
    return json.loads(cli(*args, "--json").stdout)


def finish(client, iid: str, status=OrchestrationStatus.COMPLETED):
    state = client.wait_for_orchestration_completion(iid, timeout=DEADLINE_S)
    assert state is not None and state.runtime_status == status, (iid, state and state.runtime_status)
    return state


def table_rows(stdout: str) -> tuple[str, list[str]]:
    lines = stdout.rstrip("\n").splitlines()
    return lines[0], lines[1:]


def iso_ms(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{dt.microsecond // 1000:03d}Z"


# ---------------------------------------------------------------------------------------------------------
# instances list / show / history
# ---------------------------------------------------------------------------------------------------------
def test_list_table_json_filters_and_limit(client, cli):
    prefix = new_id("cli-list") + "-"
    ids = [client.schedule_new_orchestration(echo, input=n, instance_id=f"{prefix}{n}") for n in range(3)]
    states = [finish(client, iid) for iid in ids]

    header, rows = table_rows(cli("instances", "list", "--prefix", prefix).stdout)
    assert header.split() == ["INSTANCE", "ID", "NAME", "STATUS", "CREATED", "LAST", "UPDATED"]
    assert sorted(row.split()[0] for row in rows) == sorted(ids)
    for row, state in zip(sorted(rows), sorted(states, key=lambda s: s.instance_id), strict=True):
        assert row[header.index("NAME"):].split()[0] == "echo"
        assert row[header.index("STATUS"):].split()[0] == "COMPLETED"  # fixed-width columns line up
        assert row[header.index("CREATED"):].split()[0] == iso_ms(state.created_at)

    listed = cli_json(cli, "instances", "list", "--prefix", prefix)
    assert sorted(item["instanceId"] for item in listed) == sorted(ids)
    assert {item["status"] for item in listed} == {"COMPLETED"}
    assert all(item["name"] == "echo" and item["createdTimestamp"].endswith("Z") for item in listed)

    assert cli_json(cli, "instances", "list", "--prefix", prefix, "--status", "RUNNING", "failed") == []
    assert len(cli_json(cli, "instances", "list", "--prefix", prefix, "--status", "completed")) == 3
    first = min(s.created_at for s in states)
    before = (first - timedelta(hours=1)).isoformat()
    assert len(cli_json(cli, "instances", "list", "--prefix", prefix, "--created-from", before)) == 3
    assert cli_json(cli, "instances", "list", "--prefix", prefix, "--created-to", before) == []

    limited = cli("instances", "list", "--prefix", prefix, "--limit", "2", "--json")
    assert len(json.loads(limited.stdout)) == 2 and "more may exist" in limited.stderr
    assert len(cli_json(cli, "instances", "list", "--prefix", prefix, "--limit", "1", "--all")) == 3


def test_list_usage_errors(cli):
    assert "unknown status" in cli("instances", "list", "--status", "BOGUS", rc=2).stderr
    assert "ISO 8601" in cli("instances", "list", "--created-from", "yesterday", rc=2).stderr
    assert "positive integer" in cli("instances", "list", "--limit", "0", rc=2).stderr
    cli("instances", rc=2)
    cli("instances", "frobnicate", rc=2)
    # TLS flags without the CA file would otherwise be dropped, and the connection made in plaintext.
    assert "need TLS: --tls" in cli("instances", "list", "--tls-server-name", "node-1", rc=2).stderr
    assert "need TLS: --tls" in cli("instances", "list", "--tls-client-cert-file", "c.pem",
                                    "--tls-client-key-file", "c.key", rc=2).stderr


def test_show_text_json_and_payloads(client, cli):
    iid = client.schedule_new_orchestration(echo, input={"x": 1, "s": "é"}, instance_id=new_id("cli-show"))
    state = finish(client, iid)

    text = cli("instances", "show", iid).stdout
    assert "Instance ID:" in text and iid in text
    assert "Status:" in text and "COMPLETED" in text and "echo" in text
    assert "Input:" not in text
    with_payloads = cli("instances", "show", iid, "--payloads").stdout
    # the JSON strings, shown as text
    assert re.search(rf"^Input: +{re.escape(state.serialized_input)}$", with_payloads, re.M), with_payloads
    assert re.search(rf"^Output: +{re.escape(state.serialized_output)}$", with_payloads, re.M), with_payloads

    data = cli_json(cli, "instances", "show", iid, "--payloads")
    assert data["instanceId"] == iid and data["name"] == "echo" and data["status"] == "COMPLETED"
    assert data["input"] == {"x": 1, "s": "é"} and data["output"] == {"x": 1, "s": "é"}
    assert data["customStatus"] == {"stage": "done"}
    assert data["createdTimestamp"] == iso_ms(state.created_at)
    assert data["failureDetails"] is None


def test_show_payload_that_is_not_json_is_kept_as_text(raw_stub, cli):
    iid = new_id("cli-raw")
    raw_stub.StartInstance(pb.CreateInstanceRequest(instanceId=iid, name="not-registered",
                                                    input=wrappers_pb2.StringValue(value="plain {text")),
                         timeout=DEADLINE_S)
    assert cli_json(cli, "instances", "show", iid, "--payloads")["input"] == "plain {text"
    assert "plain {text" in cli("instances", "show", iid, "--payloads").stdout


def test_show_failed_instance_has_failure_details(client, cli):
    iid = client.schedule_new_orchestration(fail_now, input="kaboom", instance_id=new_id("cli-fail"))
    finish(client, iid, OrchestrationStatus.FAILED)
    assert "kaboom" in cli("instances", "show", iid).stdout
    data = cli_json(cli, "instances", "show", iid)
    assert data["status"] == "FAILED" and "kaboom" in data["failureDetails"]["errorMessage"]


def test_show_unknown_instance_is_not_found(cli):
    iid = new_id("cli-nobody")
    for extra in ((), ("--json",)):
        result = cli("instances", "show", iid, *extra, rc=1)
        assert result.stdout == ""
        assert result.stderr.startswith("error: NOT_FOUND: ") and iid in result.stderr


def test_history_table_and_json(client, raw_stub, cli):
    iid = client.schedule_new_orchestration(two_steps, input=1, instance_id=new_id("cli-hist"))
    assert finish(client, iid).serialized_output == "3"
    expected = [e for chunk in raw_stub.StreamInstanceHistory(pb.StreamInstanceHistoryRequest(instanceId=iid),
                                                              timeout=DEADLINE_S) for e in chunk.events]

    header, rows = table_rows(cli("instances", "history", iid).stdout)
    assert header.split() == ["INDEX", "EVENT", "ID", "TYPE", "TIMESTAMP", "DETAILS"]
    assert len(rows) == len(expected)
    types = [row[header.index("TYPE"):].split()[0] for row in rows]
    assert types[0] in ("OrchestratorStarted", "ExecutionStarted")
    assert "ExecutionStarted" in types and types.count("TaskScheduled") == 2 and types.count("TaskCompleted") == 2
    assert types[-1] == "ExecutionCompleted" or "ExecutionCompleted" in types
    assert [row.split()[0] for row in rows] == [str(i) for i in range(len(rows))]
    started = rows[types.index("ExecutionStarted")]
    assert "name=two_steps" in started and "input=1" in started
    assert "orchestrationStatus=COMPLETED" in rows[types.index("ExecutionCompleted")]

    events = cli_json(cli, "instances", "history", iid)
    assert [e["index"] for e in events] == list(range(len(expected)))
    assert [e["eventId"] for e in events] == [e.eventId for e in expected]
    assert [e["type"] for e in events] == types
    done = events[types.index("ExecutionCompleted")]["details"]
    assert done["orchestrationStatus"] == "ORCHESTRATION_STATUS_COMPLETED" and done["result"] == 3
    assert events[types.index("ExecutionStarted")]["details"]["input"] == 1


def test_history_of_unknown_instance_is_a_grpc_error(cli):
    result = cli("instances", "history", new_id("cli-nohist"), rc=1)
    assert result.stderr.startswith("error: NOT_FOUND: ")


# ---------------------------------------------------------------------------------------------------------
# actions
# ---------------------------------------------------------------------------------------------------------
def test_terminate_with_reason(client, cli):
    iid = client.schedule_new_orchestration(wait_for_go, instance_id=new_id("cli-term"))
    client.wait_for_orchestration_start(iid, timeout=DEADLINE_S)
    assert cli("instances", "terminate", iid, "--reason", "clean up").stdout.strip() == f"terminate requested: {iid}"
    state = finish(client, iid, OrchestrationStatus.TERMINATED)
    assert state.serialized_output == json.dumps("clean up")


def test_suspend_and_resume(client, cli):
    iid = client.schedule_new_orchestration(wait_for_go, instance_id=new_id("cli-susp"))
    client.wait_for_orchestration_start(iid, timeout=DEADLINE_S)
    assert cli_json(cli, "instances", "suspend", iid, "--reason", "maintenance") == {
        "instanceId": iid, "action": "suspend"}
    wait_until(lambda: client.get_orchestration_state(iid).runtime_status == OrchestrationStatus.SUSPENDED,
               message="SUSPENDED")
    assert cli("instances", "list", "--prefix", iid, "--status", "SUSPENDED").stdout.count(iid) == 1
    cli("instances", "resume", iid, "--reason", "done")
    wait_until(lambda: client.get_orchestration_state(iid).runtime_status == OrchestrationStatus.RUNNING,
               message="RUNNING again")
    client.raise_orchestration_event(iid, "go", data="went")
    assert finish(client, iid).serialized_output == '"went"'
    types = [e["type"] for e in cli_json(cli, "instances", "history", iid)]
    assert "ExecutionSuspended" in types and "ExecutionResumed" in types


def test_purge_by_id_and_by_filter(client, cli):
    iid = client.schedule_new_orchestration(echo, input=1, instance_id=new_id("cli-purge"))
    finish(client, iid)
    assert cli("instances", "purge", iid).stdout.strip() == "purged 1 instance(s)"
    assert client.get_orchestration_state(iid) is None

    # A filter has no prefix: only instances created after this point are this test's (one module runtime).
    prefix = new_id("cli-pf") + "-"
    failed = [client.schedule_new_orchestration(fail_now, input="x", instance_id=f"{prefix}f{n}") for n in range(2)]
    kept = client.schedule_new_orchestration(echo, input=2, instance_id=f"{prefix}ok")
    states = [finish(client, i, OrchestrationStatus.FAILED) for i in failed] + [finish(client, kept)]
    since = min(s.created_at for s in states).isoformat()  # --created-from is inclusive
    assert cli_json(cli, "instances", "purge", "--status", "FAILED", "--created-from", since) == {
        "deletedInstanceCount": 2, "isComplete": True}
    assert all(client.get_orchestration_state(i) is None for i in failed)
    assert client.get_orchestration_state(kept) is not None

    assert "not both" in cli("instances", "purge", kept, "--status", "COMPLETED", rc=2).stderr
    assert "filter" in cli("instances", "purge", rc=2).stderr


def test_restart_same_and_new_id(client, cli):
    iid = client.schedule_new_orchestration(two_steps, input=10, instance_id=new_id("cli-restart"))
    first = finish(client, iid)
    assert cli("instances", "restart", iid).stdout.strip() == f"restarted {iid} as {iid}"
    wait_until(lambda: client.get_orchestration_state(iid).created_at > first.created_at, message="restarted")
    assert finish(client, iid).serialized_output == "12"

    result = cli_json(cli, "instances", "restart", iid, "--new-id")
    assert result["instanceId"] == iid and result["action"] == "restart" and result["newInstanceId"] != iid
    assert finish(client, result["newInstanceId"]).serialized_output == "12"

    running = client.schedule_new_orchestration(wait_for_go, instance_id=new_id("cli-restart-run"))
    client.wait_for_orchestration_start(running, timeout=DEADLINE_S)
    assert cli("instances", "restart", running, rc=1).stderr.startswith("error: ")
    client.terminate_orchestration(running)


def test_rewind_failed_instance(client, cli, tmp_path):
    marker = tmp_path / "fixed"
    iid = client.schedule_new_orchestration(flaky, input={"marker": str(marker), "n": 41}, instance_id=new_id("cli-rw"))
    finish(client, iid, OrchestrationStatus.FAILED)
    marker.touch()
    assert cli("instances", "rewind", iid, "--reason", "bug fixed").stdout.strip() == f"rewind requested: {iid}"
    assert finish(client, iid).serialized_output == "42"


# ---------------------------------------------------------------------------------------------------------
# errors and the node command line
# ---------------------------------------------------------------------------------------------------------
def test_unreachable_server_is_a_clean_grpc_error():
    result = run_cli(f"127.0.0.1:{free_port()}", "instances", "list", "--timeout", "5")
    assert result.returncode == 1, result
    assert result.stderr.startswith("error: UNAVAILABLE: ") or result.stderr.startswith("error: DEADLINE_EXCEEDED")
    assert "Traceback" not in result.stderr


def test_explicit_address_flag_wins_over_env(runtime, client):
    iid = client.schedule_new_orchestration(echo, input=0, instance_id=new_id("cli-addr"))
    finish(client, iid)
    result = run_cli(f"127.0.0.1:{free_port()}", "instances", "show", iid, "--address", runtime.address)
    assert result.returncode == 0 and iid in result.stdout, result


def test_node_command_line_is_unchanged():
    help_text = run_cli("", "--help")
    assert help_text.returncode == 0 and "--partitions" in help_text.stdout
    assert "instances" in help_text.stdout and "entities" in help_text.stdout
    bad = run_cli("", "--partitions", "0")
    assert bad.returncode == 2 and "--partitions must be between" in bad.stderr


# ---------------------------------------------------------------------------------------------------------
# entities
# ---------------------------------------------------------------------------------------------------------
def test_entities_list_and_show(client, cli):
    key = new_id("k")
    entity_id = entities.EntityInstanceId("counter", key)
    client.signal_entity(entity_id, "add", 5)
    client.signal_entity(entity_id, "add", 2)
    wait_until(lambda: (client.get_entity(entity_id) or None) and client.get_entity(entity_id).get_state(int) == 7,
               message="entity state 7")
    eid = str(entity_id)

    text = cli("entities", "show", eid, "--include-state").stdout
    assert eid in text and "State:" in text and "7" in text
    data = cli_json(cli, "entities", "show", eid, "--include-state")
    assert data["instanceId"] == eid and data["state"] == 7 and data["lastModifiedTime"].endswith("Z")
    assert "state" not in cli_json(cli, "entities", "show", eid)

    header, rows = table_rows(cli("entities", "list", "--prefix", f"@counter@{key}", "--include-state").stdout)
    assert header.split()[:2] == ["ENTITY", "ID"] and "STATE" in header
    assert [row.split()[0] for row in rows] == [eid] and rows[0].rstrip().endswith("7")
    listed = cli_json(cli, "entities", "list", "--prefix", "@counter@", "--include-state", "--all")
    assert {"instanceId": eid, "state": 7}.items() <= next(e for e in listed if e["instanceId"] == eid).items()

    missing = cli("entities", "show", f"@counter@{new_id('none')}", rc=1)
    assert missing.stderr.startswith("error: NOT_FOUND: ")


# ---------------------------------------------------------------------------------------------------------
# TLS, mutual TLS and the API token
# ---------------------------------------------------------------------------------------------------------
def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_certs(d: Path) -> dict[str, Path]:
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"), "-days", "2",
             "-subj", "/CN=admin-cli test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, usage, san in (("server", "serverAuth", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"),
                             ("client", "clientAuth", "")):
        (d / f"{name}.ext").write_text(f"basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
                                       f"extendedKeyUsage={usage}\n{san}")
        _openssl("req", *ec, "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"),
                 "-subj", f"/CN=admin-cli {name}")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
                 "-CAcreateserial", "-out", str(d / f"{name}.pem"), "-days", "2", "-extfile", str(d / f"{name}.ext"))
    return {n: d / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


class SecureRuntime(EngineRuntime):
    """Ready when Hello answers over mutual TLS with the token."""

    def __init__(self, data_dir: Path, certs: dict[str, Path]) -> None:
        super().__init__(data_dir, extra_args=["--tls-cert-file", str(certs["server.pem"]),
                                               "--tls-key-file", str(certs["server.key"]),
                                               "--tls-client-ca-file", str(certs["ca.pem"]), "--api-token", TOKEN])
        self.credentials = grpc.ssl_channel_credentials(certs["ca.pem"].read_bytes(), certs["client.key"].read_bytes(),
                                                        certs["client.pem"].read_bytes())

    def _hello(self) -> bool:
        with grpc.secure_channel(self.address, self.credentials) as channel:
            try:
                channel.unary_unary("/TaskHubSidecarService/Hello", request_serializer=empty_pb2.Empty.SerializeToString,
                                    response_deserializer=empty_pb2.Empty.FromString)(
                    empty_pb2.Empty(), timeout=1.0, metadata=[("authorization", f"Bearer {TOKEN}")])
                return True
            except grpc.RpcError:
                return False

    def wait_ready(self, timeout: float = STARTUP_DEADLINE_S) -> None:
        deadline = time.monotonic() + timeout
        while not self._hello():
            assert self.proc is not None and self.proc.poll() is None, self.log_tail()
            assert time.monotonic() < deadline, f"secure runtime not ready\n{self.log_tail()}"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def secure_runtime(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make test certificates")
    certs = make_certs(tmp_path_factory.mktemp("admin-pki"))
    rt = SecureRuntime(tmp_path_factory.mktemp("admin-secure") / "data", certs)
    rt.start()
    try:
        yield rt, certs
    finally:
        rt.close()


def test_tls_mutual_tls_and_token(secure_runtime):
    rt, certs = secure_runtime
    tls = ["--tls-ca-file", str(certs["ca.pem"]),
           "--tls-client-cert-file", str(certs["client.pem"]), "--tls-client-key-file", str(certs["client.key"])]
    ok = run_cli(rt.address, "instances", "list", "--json", *tls, env={"DURABLE_RUNTIME_API_TOKEN": TOKEN})
    assert ok.returncode == 0 and json.loads(ok.stdout) == [], ok
    token_file = certs["ca.pem"].parent / "token"
    token_file.write_text(TOKEN + "\n")
    assert run_cli(rt.address, "instances", "list", *tls, "--api-token-file", str(token_file)).returncode == 0

    no_token = run_cli(rt.address, "instances", "list", *tls)
    assert no_token.returncode == 1 and no_token.stderr.startswith("error: UNAUTHENTICATED: "), no_token
    wrong = run_cli(rt.address, "instances", "list", *tls, "--api-token", "wrong-token-wrong-token")
    assert wrong.returncode == 1 and wrong.stderr.startswith("error: UNAUTHENTICATED: "), wrong
    plaintext = run_cli(rt.address, "instances", "list", "--api-token", TOKEN, "--timeout", "5")
    assert plaintext.returncode == 1 and plaintext.stderr.startswith("error: "), plaintext
    no_client_cert = run_cli(rt.address, "instances", "list", "--tls-ca-file", str(certs["ca.pem"]),
                             "--api-token", TOKEN, "--timeout", "5")
    assert no_client_cert.returncode == 1 and no_client_cert.stderr.startswith("error: "), no_client_cert
    assert "Traceback" not in plaintext.stderr + no_client_cert.stderr

    # --tls trusts the system's roots: OpenSSL's bundle, which SSL_CERT_FILE names here, or the file that
    # GRPC_DEFAULT_SSL_ROOTS_FILE_PATH names.
    client_cert = tls[2:]
    variables = ("SSL_CERT_FILE", "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH")
    for variable in variables:
        others = {other: "" for other in variables if other != variable}  # the machine may set them
        system = run_cli(rt.address, "instances", "list", "--tls", *client_cert, "--api-token", TOKEN,
                         env={**others, variable: str(certs["ca.pem"])})
        assert system.returncode == 0, (variable, system)
        untrusted = run_cli(rt.address, "instances", "list", "--tls", *client_cert, "--api-token", TOKEN,
                            "--timeout", "5", env={**others, variable: str(certs["client.pem"])})
        # (gRPC's own log line about the failed handshake may come first)
        assert untrusted.returncode == 1 and untrusted.stderr.splitlines()[-1].startswith("error: "), untrusted

    padded = run_cli(rt.address, "instances", "list", *tls, env={"DURABLE_RUNTIME_API_TOKEN": f" {TOKEN}\n"})
    assert padded.returncode == 0, padded  # surrounding whitespace is not part of the token, as for the node
    for bad, why in ((b"\xff\xfe", "not UTF-8 text"), ("tökén-tökén-tökén".encode(), "printable ASCII")):
        token_file.write_bytes(bad)
        refused = run_cli(rt.address, "instances", "list", *tls, "--api-token-file", str(token_file))
        assert refused.returncode == 2 and why in refused.stderr and "Traceback" not in refused.stderr, refused
