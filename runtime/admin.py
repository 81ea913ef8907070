"""`durable-runtime instances ...` and `durable-runtime entities ...`: an admin CLI for a running node.

It speaks TaskHubSidecarService over a plain synchronous gRPC channel with the generated stubs in
`protos` (no SDK). Exit codes: 0 ok, 1 when the server answers with an error (printed as
`error: <StatusCode name>: <details>`), 2 for usage errors (argparse).
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format, timestamp_pb2, wrappers_pb2

from protos import orchestrator_service_pb2 as pb
from protos import orchestrator_service_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:4001"
STATUS_PREFIX = "ORCHESTRATION_STATUS_"
STATUSES = [name.removeprefix(STATUS_PREFIX) for name in pb.OrchestrationStatus.keys()]
PAGE_MAX = 1000
PAYLOAD_KEYS = frozenset({"input", "output", "result", "data", "customStatus", "serializedState"})
DETAIL_SKIP = frozenset({"parentTraceContext", "orchestrationSpanID", "tags", "orchestrationInstance", "parentInstance"})


class NotFound(Exception):
    """GetInstance/GetEntity answered exists=false."""


# ------------------------------------------------------------------------------------------------ formatting
def status_name(value: int) -> str:
    return pb.OrchestrationStatus.Name(value).removeprefix(STATUS_PREFIX)


def iso(ts: timestamp_pb2.Timestamp) -> str:
    dt = ts.ToDatetime(tzinfo=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{dt.microsecond // 1000:03d}Z"


def ts_field(message: Any, name: str) -> str | None:
    return iso(getattr(message, name)) if message.HasField(name) else None


def sv_field(message: Any, name: str) -> str | None:
    return getattr(message, name).value if message.HasField(name) else None


def payload(text: str | None) -> Any:
    """A JSON payload parsed when it is valid JSON, else kept as the string."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def short(text: str, width: int) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 3] + "..."


def table(headers: list[str], rows: Iterable[list[str]]) -> str:
    """Fixed-width columns, two spaces apart; the last column is not padded."""
    rows = [headers, *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def fields(pairs: list[tuple[str, str | None]]) -> str:
    """'Label:  value' lines for the values that are set."""
    width = max(len(k) for k, _ in pairs) + 2
    pairs = [(k, v) for k, v in pairs if v not in (None, "")]
    return "\n".join(f"{(k + ':').ljust(width)}{v}".replace("\n", "\n" + " " * width) for k, v in pairs)


def failure_text(fd: pb.TaskFailureDetails) -> str:
    return f"{fd.errorType}: {fd.errorMessage}" if fd.errorType else fd.errorMessage


def emit_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def parse_payloads(data: dict[str, Any]) -> dict[str, Any]:
    return {k: payload(v) if k in PAYLOAD_KEYS and isinstance(v, str) else v for k, v in data.items()}


# ------------------------------------------------------------------------------------------------ instances
def instance_dict(s: pb.OrchestrationState) -> dict[str, Any]:
    fd = json_format.MessageToDict(s.failureDetails) if s.HasField("failureDetails") else None
    return {
        "instanceId": s.instanceId,
        "name": s.name,
        "version": sv_field(s, "version"),
        "status": status_name(s.orchestrationStatus),
        "executionId": sv_field(s, "executionId"),
        "parentInstanceId": sv_field(s, "parentInstanceId"),
        "createdTimestamp": ts_field(s, "createdTimestamp"),
        "lastUpdatedTimestamp": ts_field(s, "lastUpdatedTimestamp"),
        "completedTimestamp": ts_field(s, "completedTimestamp"),
        "scheduledStartTimestamp": ts_field(s, "scheduledStartTimestamp"),
        "input": payload(sv_field(s, "input")),
        "output": payload(sv_field(s, "output")),
        "customStatus": payload(sv_field(s, "customStatus")),
        "failureDetails": fd,
        "tags": dict(s.tags),
    }


def instance_text(s: pb.OrchestrationState) -> str:
    fd = s.failureDetails if s.HasField("failureDetails") else None
    text = fields([
        ("Instance ID", s.instanceId),
        ("Name", s.name),
        ("Version", sv_field(s, "version")),
        ("Status", status_name(s.orchestrationStatus)),
        ("Execution ID", sv_field(s, "executionId")),
        ("Parent instance", sv_field(s, "parentInstanceId")),
        ("Created", ts_field(s, "createdTimestamp")),
        ("Last updated", ts_field(s, "lastUpdatedTimestamp")),
        ("Completed", ts_field(s, "completedTimestamp")),
        ("Scheduled start", ts_field(s, "scheduledStartTimestamp")),
        ("Tags", ", ".join(f"{k}={v}" for k, v in sorted(s.tags.items()))),
        ("Input", sv_field(s, "input")),
        ("Output", sv_field(s, "output")),
        ("Custom status", sv_field(s, "customStatus")),
        ("Failure", failure_text(fd) if fd else None),
    ])
    if fd is not None and fd.HasField("stackTrace"):
        text += "\nStack trace:\n" + "\n".join("  " + line for line in fd.stackTrace.value.splitlines())
    return text


def instance_row(s: pb.OrchestrationState) -> list[str]:
    created, updated = ts_field(s, "createdTimestamp"), ts_field(s, "lastUpdatedTimestamp")
    return [s.instanceId, s.name, status_name(s.orchestrationStatus), created or "-", updated or "-"]


def event_detail(value: Any) -> str | None:
    if isinstance(value, wrappers_pb2.StringValue):
        return short(value.value, 40)
    if isinstance(value, timestamp_pb2.Timestamp):
        return iso(value)
    if isinstance(value, pb.TaskFailureDetails):
        return short(failure_text(value), 60)
    if isinstance(value, (str, int, bool)):
        return str(value)
    return None


def event_details(inner: Any) -> str:
    parts = []
    for fd, value in inner.ListFields():
        if fd.name in DETAIL_SKIP:
            continue
        if fd.name == "orchestrationStatus":
            text = status_name(value)
        elif fd.is_repeated:
            text = ",".join(map(str, value))
        else:
            text = event_detail(value)
        if text is not None:
            parts.append(f"{fd.name}={text}")
    return short(" ".join(parts), 100)


def event_parts(event: pb.HistoryEvent) -> tuple[str, Any]:
    kind = event.WhichOneof("eventType") or "unknown"
    inner = getattr(event, kind) if kind != "unknown" else None
    return kind[:1].upper() + kind[1:], inner


# ------------------------------------------------------------------------------------------------ entities
def entity_dict(e: pb.EntityMetadata, include_state: bool) -> dict[str, Any]:
    data = {
        "instanceId": e.instanceId,
        "lastModifiedTime": ts_field(e, "lastModifiedTime"),
        "backlogQueueSize": e.backlogQueueSize,
        "lockedBy": sv_field(e, "lockedBy"),
    }
    if include_state:
        data["state"] = payload(sv_field(e, "serializedState"))
    return data


def entity_row(e: pb.EntityMetadata, include_state: bool) -> list[str]:
    row = [e.instanceId, ts_field(e, "lastModifiedTime") or "-", str(e.backlogQueueSize), sv_field(e, "lockedBy") or "-"]
    if include_state:
        row.append(short(sv_field(e, "serializedState") or "-", 60))
    return row


# ------------------------------------------------------------------------------------------------ gRPC
class Admin:
    """One channel to the node; every call carries the deadline and the API token."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.channel = open_channel(args)
        self.stub = pb_grpc.TaskHubSidecarServiceStub(self.channel)
        token = read_token(args)
        self.metadata = [("authorization", f"Bearer {token}")] if token else None

    def call(self, method: str, request: Any) -> Any:
        """A unary answer, or the iterator of a server stream."""
        return getattr(self.stub, method)(request, timeout=self.args.timeout, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()


def read_token(args: argparse.Namespace) -> str:
    """The API token, from its file or the flag/variable, without surrounding whitespace (as the node reads it).
    gRPC metadata is printable ASCII: anything else is a usage error here, not an INTERNAL error from gRPC."""
    try:
        token = (Path(args.api_token_file).read_text(encoding="utf-8") if args.api_token_file else args.api_token or "")
    except UnicodeDecodeError:
        raise ValueError(f"--api-token-file {args.api_token_file} is not UTF-8 text") from None
    token = token.strip()
    if token and not (token.isascii() and token.isprintable()):
        raise ValueError("the API token must be printable ASCII (it travels as gRPC metadata)")
    return token


def system_roots() -> bytes | None:
    """The system's trusted CAs, as OpenSSL finds them (SSL_CERT_FILE, else the distribution's bundle). gRPC
    would otherwise use the set it ships with, which lacks a corporate CA installed on the machine. None (gRPC's
    choice) when GRPC_DEFAULT_SSL_ROOTS_FILE_PATH names a file, or no bundle is found."""
    if os.environ.get("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"):
        return None
    bundle = ssl.get_default_verify_paths().cafile
    return Path(bundle).read_bytes() if bundle and os.path.isfile(bundle) else None


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    options = [("grpc.max_receive_message_length", -1)]
    if not (args.tls or args.tls_ca_file):
        return grpc.insecure_channel(args.address, options=options)
    if args.tls_server_name:
        options.append(("grpc.ssl_target_name_override", args.tls_server_name))
    client = args.tls_client_cert_file and args.tls_client_key_file
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(args.tls_ca_file).read_bytes() if args.tls_ca_file else system_roots(),
        private_key=Path(args.tls_client_key_file).read_bytes() if client else None,
        certificate_chain=Path(args.tls_client_cert_file).read_bytes() if client else None,
    )
    return grpc.secure_channel(args.address, creds, options=options)


def paged(fetch: Callable[[str | None, int], tuple[list[Any], str | None]], limit: int, everything: bool):
    """Follow continuation tokens until `limit` items (or all of them). Returns (items, maybe_more)."""
    items: list[Any] = []
    token: str | None = None
    while True:
        want = PAGE_MAX if everything else min(limit - len(items), PAGE_MAX)
        page, token = fetch(token, want)
        items.extend(page)
        if not token:
            return items, False
        if not everything and len(items) >= limit:
            return items[:limit], True


# ------------------------------------------------------------------------------------------------ commands
def get_instance(admin: Admin, instance_id: str, payloads: bool) -> pb.OrchestrationState:
    res = admin.call("GetInstance", pb.GetInstanceRequest(instanceId=instance_id, getInputsAndOutputs=payloads))
    if not res.exists:
        raise NotFound(f"no orchestration instance with id '{instance_id}'")
    return res.orchestrationState


def cmd_list(admin: Admin, a: argparse.Namespace) -> None:
    def fetch(token: str | None, want: int) -> tuple[list[Any], str | None]:
        query = pb.InstanceQuery(runtimeStatus=a.status, maxInstanceCount=want)
        set_time_range(query, a, "createdTimeFrom", "createdTimeTo")
        if a.prefix:
            query.instanceIdPrefix.value = a.prefix
        if token:
            query.continuationToken.value = token
        res = admin.call("QueryInstances", pb.QueryInstancesRequest(query=query))
        return list(res.orchestrationState), sv_field(res, "continuationToken")

    states, more = paged(fetch, a.limit, a.all)
    if a.json:
        emit_json([instance_dict(s) for s in states])
    else:
        print(table(["INSTANCE ID", "NAME", "STATUS", "CREATED", "LAST UPDATED"], map(instance_row, states)))
    if more:
        print(f"(first {len(states)} shown; more may exist: use --limit N or --all)", file=sys.stderr)


def cmd_show(admin: Admin, a: argparse.Namespace) -> None:
    state = get_instance(admin, a.id, a.payloads)
    emit_json(instance_dict(state)) if a.json else print(instance_text(state))


def cmd_history(admin: Admin, a: argparse.Namespace) -> None:
    request = pb.StreamInstanceHistoryRequest(instanceId=a.id)
    if a.execution_id:
        request.executionId.value = a.execution_id
    events = [e for chunk in admin.call("StreamInstanceHistory", request) for e in chunk.events]
    rows, items = [], []
    for index, event in enumerate(events):
        kind, inner = event_parts(event)
        stamp = ts_field(event, "timestamp") or "-"
        if a.json:
            details = parse_payloads(json_format.MessageToDict(inner)) if inner is not None else {}
            items.append({"index": index, "eventId": event.eventId, "type": kind, "timestamp": stamp, "details": details})
        else:
            rows.append([str(index), str(event.eventId), kind, stamp, event_details(inner) if inner else ""])
    emit_json(items) if a.json else print(table(["INDEX", "EVENT ID", "TYPE", "TIMESTAMP", "DETAILS"], rows))


def done(a: argparse.Namespace, action: str, text: str, **extra: Any) -> None:
    emit_json({"instanceId": a.id, "action": action, **extra}) if a.json else print(text)


ACTIONS = {  # action: (request type, RPC, field the --reason goes into)
    "terminate": (pb.TerminateRequest, "TerminateInstance", "output"),
    "suspend": (pb.SuspendRequest, "SuspendInstance", "reason"),
    "resume": (pb.ResumeRequest, "ResumeInstance", "reason"),
    "rewind": (pb.RewindInstanceRequest, "RewindInstance", "reason"),
}


def cmd_action(admin: Admin, a: argparse.Namespace) -> None:
    request_type, method, reason_field = ACTIONS[a.action]
    request = request_type(instanceId=a.id)
    if a.action == "terminate":
        request.recursive = not a.no_recursive
    if a.reason is not None:  # the SDKs send the termination output as JSON, the other reasons as text
        getattr(request, reason_field).value = json.dumps(a.reason) if a.action == "terminate" else a.reason
    admin.call(method, request)
    done(a, a.action, f"{a.action} requested: {a.id}")


def cmd_restart(admin: Admin, a: argparse.Namespace) -> None:
    res = admin.call("RestartInstance", pb.RestartInstanceRequest(instanceId=a.id, restartWithNewInstanceId=a.new_id))
    done(a, "restart", f"restarted {a.id} as {res.instanceId}", newInstanceId=res.instanceId)


def cmd_purge(admin: Admin, a: argparse.Namespace) -> None:
    request = pb.PurgeInstancesRequest(recursive=a.recursive, isOrchestration=True)
    if a.id is not None:
        request.instanceId = a.id
    else:
        flt = request.purgeInstanceFilter
        flt.runtimeStatus.extend(a.status)
        set_time_range(flt, a, "createdTimeFrom", "createdTimeTo")
        flt.timeout.FromMilliseconds(int(a.timeout * 800))  # answer (isComplete=false) before our deadline
    res = admin.call("PurgeInstances", request)
    complete = res.isComplete.value if res.HasField("isComplete") else True
    if a.json:
        emit_json({"deletedInstanceCount": res.deletedInstanceCount, "isComplete": complete})
        return
    print(f"purged {res.deletedInstanceCount} instance(s)")
    if a.id is not None and not res.deletedInstanceCount:
        print("(only an existing instance in a terminal state is purged)", file=sys.stderr)
    if not complete:
        why = "a sub-orchestration still runs" if a.id is not None else "time ran out, or a sub-orchestration still runs"
        print(f"purge incomplete ({why}; such a tree is left whole): run the command again later", file=sys.stderr)


def set_time_range(message: Any, a: argparse.Namespace, from_name: str, to_name: str) -> None:
    if a.created_from is not None:
        getattr(message, from_name).FromDatetime(a.created_from)
    if a.created_to is not None:
        getattr(message, to_name).FromDatetime(a.created_to)


def cmd_entities_list(admin: Admin, a: argparse.Namespace) -> None:
    def fetch(token: str | None, want: int) -> tuple[list[Any], str | None]:
        query = pb.EntityQuery(includeState=a.include_state, pageSize=wrappers_pb2.Int32Value(value=want))
        if a.prefix:
            query.instanceIdStartsWith.value = a.prefix
        if token:
            query.continuationToken.value = token
        res = admin.call("QueryEntities", pb.QueryEntitiesRequest(query=query))
        return list(res.entities), sv_field(res, "continuationToken")

    entities, more = paged(fetch, a.limit, a.all)
    if a.json:
        emit_json([entity_dict(e, a.include_state) for e in entities])
    else:
        headers = ["ENTITY ID", "LAST MODIFIED", "BACKLOG", "LOCKED BY"] + (["STATE"] if a.include_state else [])
        print(table(headers, (entity_row(e, a.include_state) for e in entities)))
    if more:
        print(f"(first {len(entities)} shown; more may exist: use --limit N or --all)", file=sys.stderr)


def cmd_entities_show(admin: Admin, a: argparse.Namespace) -> None:
    res = admin.call("GetEntity", pb.GetEntityRequest(instanceId=a.id, includeState=a.include_state))
    if not res.exists:
        raise NotFound(f"no entity with id '{a.id}'")
    data = entity_dict(res.entity, a.include_state)
    if a.json:
        emit_json(data)
        return
    state = sv_field(res.entity, "serializedState") if a.include_state else None
    print(fields([("Entity ID", data["instanceId"]), ("Last modified", data["lastModifiedTime"]),
                  ("Backlog", str(data["backlogQueueSize"])), ("Locked by", data["lockedBy"]), ("State", state)]))


# ------------------------------------------------------------------------------------------------ command line
def status_arg(text: str) -> int:
    name = text.strip().upper().removeprefix(STATUS_PREFIX)
    if name not in STATUSES:
        raise argparse.ArgumentTypeError(f"unknown status {text!r} (choose from {', '.join(STATUSES)})")
    return pb.OrchestrationStatus.Value(STATUS_PREFIX + name)


def time_arg(text: str) -> datetime:
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)  # naive times are UTC


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def common_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection and output")
    env = os.environ.get
    g.add_argument("--address", default=env("DURABLE_RUNTIME_ADDRESS", DEFAULT_ADDRESS),
                   help="host:port of the node's gRPC gateway (env DURABLE_RUNTIME_ADDRESS, default %(default)s)")
    g.add_argument("--api-token", default=env("DURABLE_RUNTIME_API_TOKEN", ""),
                   help="sent as 'authorization: Bearer <token>' (env DURABLE_RUNTIME_API_TOKEN)")
    g.add_argument("--api-token-file", default="", help="file holding the API token (instead of --api-token)")
    g.add_argument("--tls", action="store_true",
                   help="connect over TLS, trusting the system's root CAs (SSL_CERT_FILE, or GRPC_DEFAULT_SSL_ROOTS_FILE_PATH)")
    g.add_argument("--tls-ca-file", default=env("DURABLE_RUNTIME_TLS_CA_FILE", ""),
                   help="PEM root CA: connect over TLS, trusting this CA (env DURABLE_RUNTIME_TLS_CA_FILE)")
    g.add_argument("--tls-server-name", default="", help="expected name in the server certificate (TLS)")
    g.add_argument("--tls-client-cert-file", default="", help="PEM client certificate chain, for mutual TLS")
    g.add_argument("--tls-client-key-file", default="", help="PEM client private key, for mutual TLS")
    g.add_argument("--json", action="store_true", help="machine-readable JSON output")
    g.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default %(default)s)")
    return p


def filter_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--status", type=status_arg, nargs="+", action="extend", default=[], metavar="S",
                   help=f"runtime status, repeatable: {', '.join(STATUSES)}")
    p.add_argument("--created-from", type=time_arg, metavar="ISO", help="created at or after (ISO 8601; UTC if no zone)")
    p.add_argument("--created-to", type=time_arg, metavar="ISO", help="created before (ISO 8601; UTC if no zone)")


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    parser = argparse.ArgumentParser(prog="durable-runtime", description="Administer a running durable-runtime node over gRPC.")
    groups = parser.add_subparsers(dest="group", required=True, metavar="{instances,entities}")
    inst = groups.add_parser("instances", help="orchestration instances").add_subparsers(dest="cmd", required=True)
    ents = groups.add_parser("entities", help="durable entities").add_subparsers(dest="cmd", required=True)

    def sub(group: Any, name: str, func: Callable[..., None], help_text: str, with_id: bool = True) -> Any:
        p = group.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(func=func, action=name, parser=p)
        if with_id:
            p.add_argument("id", help="instance id" if group is inst else "entity id, e.g. @counter@key")
        return p

    p = sub(inst, "list", cmd_list, "list instances: oldest first, or by id with --prefix", with_id=False)
    filter_options(p)
    p.add_argument("--prefix", help="instance id prefix")
    p.add_argument("--limit", type=positive_int, default=100, help="most instances shown (default %(default)s)")
    p.add_argument("--all", action="store_true", help="every matching instance (ignores --limit)")
    sub(inst, "show", cmd_show, "show one instance").add_argument(
        "--payloads", action="store_true", help="also fetch input and output")
    sub(inst, "history", cmd_history, "show an instance's history, one row per event").add_argument(
        "--execution-id", help="an earlier execution (continue-as-new)")
    p = sub(inst, "terminate", cmd_action, "terminate an instance (and, by default, its sub-orchestrations)")
    p.add_argument("--reason", help="termination output")
    p.add_argument("--no-recursive", action="store_true", help="leave sub-orchestrations running")
    for name, text in (("suspend", "suspend a running instance"), ("resume", "resume a suspended instance"),
                       ("rewind", "rewind a failed instance, retrying what failed")):
        sub(inst, name, cmd_action, text).add_argument("--reason", help="reason recorded in the history")
    p = sub(inst, "purge", cmd_purge, "delete terminal instances: one by id, or all matching a filter", with_id=False)
    p.add_argument("id", nargs="?", help="instance id (or give a filter instead)")
    filter_options(p)
    p.add_argument("--recursive", action="store_true", help="also purge sub-orchestrations")
    sub(inst, "restart", cmd_restart, "start a terminal instance again with its original input").add_argument(
        "--new-id", action="store_true", help="under a new instance id")

    p = sub(ents, "list", cmd_entities_list, "list entities", with_id=False)
    p.add_argument("--prefix", help="entity id prefix, e.g. @counter@")
    p.add_argument("--include-state", action="store_true", help="also fetch each entity's state")
    p.add_argument("--limit", type=positive_int, default=100, help="most entities shown (default %(default)s)")
    p.add_argument("--all", action="store_true", help="every matching entity (ignores --limit)")
    sub(ents, "show", cmd_entities_show, "show one entity").add_argument(
        "--include-state", action="store_true", help="also fetch its state")
    return parser


def check_usage(a: argparse.Namespace) -> None:
    if a.func is cmd_purge:
        has_filter = bool(a.status) or a.created_from is not None or a.created_to is not None
        if a.id is not None and has_filter:
            a.parser.error("give an instance id or a filter (--status/--created-from/--created-to), not both")
        if a.id is None and not has_filter:
            a.parser.error("give an instance id, or a filter: --status, --created-from and/or --created-to")
    if bool(a.tls_client_cert_file) != bool(a.tls_client_key_file):
        a.parser.error("--tls-client-cert-file and --tls-client-key-file go together")
    if (a.tls_client_cert_file or a.tls_server_name) and not (a.tls or a.tls_ca_file):
        # Without TLS the connection would be plaintext, and these flags silently unused.
        a.parser.error("--tls-client-cert-file and --tls-server-name need TLS: --tls (the system's CAs) or"
                       " --tls-ca-file (the CA that signed the node's certificate)")
    if a.timeout <= 0:
        a.parser.error("--timeout must be positive")


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    check_usage(a)
    try:
        admin = Admin(a)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        a.func(admin, a)
        return 0
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except NotFound as exc:
        print(f"error: NOT_FOUND: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `| head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        admin.close()
