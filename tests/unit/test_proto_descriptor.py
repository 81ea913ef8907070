"""Check that protos/orchestrator_service.proto matches the durabletask SDK's protocol."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

# Our generated module and the SDK's define the same top-level symbols in protobuf's global pool,
# so they cannot be imported into one process. The other unit tests import ours (the engine does),
# so neither is imported here: our .proto is compiled to a FileDescriptorSet, and the SDK's
# descriptor is read in a subprocess.

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_PATH = REPO_ROOT / "protos" / "orchestrator_service.proto"
SERVICE_NAME = "TaskHubSidecarService"

FieldProto = descriptor_pb2.FieldDescriptorProto


# ---------------------------------------------------------------------------
# Loading descriptors
# ---------------------------------------------------------------------------


def compile_proto(proto_path: Path, out_dir: Path) -> descriptor_pb2.FileDescriptorProto:
    """Compile one .proto with grpc_tools.protoc and return its FileDescriptorProto."""
    out_file = out_dir / f"{proto_path.stem}.desc"
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{proto_path.parent}",
        f"--descriptor_set_out={out_file}",
        proto_path.name,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"protoc failed for {proto_path}:\n{result.stderr}"
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(out_file.read_bytes())
    assert len(descriptor_set.file) == 1, "expected exactly one file in the descriptor set"
    return descriptor_set.file[0]


_SDK_DESCRIPTOR_SCRIPT = """
import sys
from durabletask.internal import orchestrator_service_pb2 as sdk_pb2
from google.protobuf import descriptor_pb2

def fill_json_names(message, descriptor):
    # CopyToProto leaves json_name unset: copy it from the live descriptors.
    for field in message.field:
        field.json_name = descriptor.fields_by_name[field.name].json_name
    for nested in message.nested_type:
        fill_json_names(nested, descriptor.nested_types_by_name[nested.name])

file_proto = descriptor_pb2.FileDescriptorProto()
sdk_pb2.DESCRIPTOR.CopyToProto(file_proto)
for message in file_proto.message_type:
    fill_json_names(message, sdk_pb2.DESCRIPTOR.message_types_by_name[message.name])
sys.stdout.buffer.write(file_proto.SerializeToString())
"""


def sdk_file_proto() -> descriptor_pb2.FileDescriptorProto:
    """Return the SDK's compiled descriptor as a FileDescriptorProto (loaded in a subprocess)."""
    result = subprocess.run([sys.executable, "-c", _SDK_DESCRIPTOR_SCRIPT], capture_output=True, check=False)
    assert result.returncode == 0, f"loading the SDK descriptor failed:\n{result.stderr.decode()}"
    return descriptor_pb2.FileDescriptorProto.FromString(result.stdout)


# ---------------------------------------------------------------------------
# Indexing helpers
# ---------------------------------------------------------------------------


def _type_name(name: str) -> str:
    return name.lstrip(".")


def index_messages(file_proto) -> dict:
    """Map every message's dotted name (nested ones included) to its DescriptorProto."""
    index = {}
    pending = [(m.name, m) for m in file_proto.message_type]
    while pending:
        name, message = pending.pop()
        index[name] = message
        pending.extend((f"{name}.{n.name}", n) for n in message.nested_type)
    return index


def index_enums(file_proto) -> dict:
    """Map every enum's dotted name (nested ones included) to its EnumDescriptorProto."""
    index = {e.name: e for e in file_proto.enum_type}
    for name, message in index_messages(file_proto).items():
        index.update({f"{name}.{e.name}": e for e in message.enum_type})
    return index


def _name_set_differences(kind: str, ours, sdk) -> list:
    problems = [f"{kind} {n!r} is in the SDK but missing from ours" for n in sorted(set(sdk) - set(ours))]
    problems += [f"{kind} {n!r} is ours only, not in the SDK" for n in sorted(set(ours) - set(sdk))]
    return problems


# ---------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------


def _oneof_name(message, field):
    if not field.HasField("oneof_index"):
        return None
    return message.oneof_decl[field.oneof_index].name


def field_signature(message, field) -> dict:
    """The wire-relevant properties of one field, in a comparable, readable form."""
    return {
        "number": field.number,
        "type": FieldProto.Type.Name(field.type),
        "type_name": _type_name(field.type_name),
        "label": FieldProto.Label.Name(field.label),
        "oneof": _oneof_name(message, field),
        "proto3_optional": field.proto3_optional,
        "json_name": field.json_name,
    }


def compare_fields(name: str, ours, sdk) -> list:
    """Differences between the fields of two versions of message `name`."""
    ours_fields = {f.name: f for f in ours.field}
    sdk_fields = {f.name: f for f in sdk.field}
    problems = _name_set_differences(f"{name}: field", ours_fields, sdk_fields)
    for field_name in sorted(set(ours_fields) & set(sdk_fields)):
        ours_sig = field_signature(ours, ours_fields[field_name])
        sdk_sig = field_signature(sdk, sdk_fields[field_name])
        problems += [
            f"{name}.{field_name}: {key} differs: ours={ours_sig[key]!r}, sdk={sdk_sig[key]!r}"
            for key in ours_sig
            if ours_sig[key] != sdk_sig[key]
        ]
    return problems


def _reserved(message) -> tuple:
    ranges = sorted((r.start, r.end) for r in message.reserved_range)
    return ranges, sorted(message.reserved_name)


def compare_message(name: str, ours, sdk) -> list:
    """Differences between two versions of message `name` (fields, oneofs, nesting)."""
    problems = compare_fields(name, ours, sdk)
    problems += _name_set_differences(
        f"{name}: oneof", [o.name for o in ours.oneof_decl], [o.name for o in sdk.oneof_decl]
    )
    problems += _name_set_differences(
        f"{name}: nested type", [n.name for n in ours.nested_type], [n.name for n in sdk.nested_type]
    )
    # map_entry is the one option that changes the shape of the schema (map<> vs message).
    if ours.options.map_entry != sdk.options.map_entry:
        problems.append(
            f"{name}: map_entry differs: ours={ours.options.map_entry}, sdk={sdk.options.map_entry}"
        )
    if _reserved(ours) != _reserved(sdk):
        problems.append(f"{name}: reserved differs: ours={_reserved(ours)}, sdk={_reserved(sdk)}")
    return problems


def compare_enum(name: str, ours, sdk) -> list:
    """Differences between two versions of enum `name` (value names and numbers)."""
    ours_values = {v.name: v.number for v in ours.value}
    sdk_values = {v.name: v.number for v in sdk.value}
    problems = _name_set_differences(f"{name}: value", ours_values, sdk_values)
    problems += [
        f"{name}.{value}: number differs: ours={ours_values[value]}, sdk={sdk_values[value]}"
        for value in sorted(set(ours_values) & set(sdk_values))
        if ours_values[value] != sdk_values[value]
    ]
    return problems


def method_signature(method) -> dict:
    """The wire-relevant properties of one RPC."""
    return {
        "input_type": _type_name(method.input_type),
        "output_type": _type_name(method.output_type),
        "client_streaming": method.client_streaming,
        "server_streaming": method.server_streaming,
    }


def compare_services(ours_file, sdk_file) -> list:
    """Differences between the services (and their RPCs) of two files."""
    ours_services = {s.name: s for s in ours_file.service}
    sdk_services = {s.name: s for s in sdk_file.service}
    problems = _name_set_differences("service", ours_services, sdk_services)
    for service_name in sorted(set(ours_services) & set(sdk_services)):
        ours_methods = {m.name: method_signature(m) for m in ours_services[service_name].method}
        sdk_methods = {m.name: method_signature(m) for m in sdk_services[service_name].method}
        problems += _name_set_differences(f"{service_name}: rpc", ours_methods, sdk_methods)
        for method in sorted(set(ours_methods) & set(sdk_methods)):
            ours_sig, sdk_sig = ours_methods[method], sdk_methods[method]
            problems += [
                f"{service_name}.{method}: {key} differs: ours={ours_sig[key]!r}, sdk={sdk_sig[key]!r}"
                for key in ours_sig
                if ours_sig[key] != sdk_sig[key]
            ]
    return problems


def compare_file_header(ours_file, sdk_file) -> list:
    """Differences in syntax, package and imports (file name and options are ignored)."""
    problems = []
    for key in ("syntax", "package"):
        if getattr(ours_file, key) != getattr(sdk_file, key):
            problems.append(
                f"file {key} differs: ours={getattr(ours_file, key)!r}, sdk={getattr(sdk_file, key)!r}"
            )
    problems += _name_set_differences("import", ours_file.dependency, sdk_file.dependency)
    return problems


def _compare_indexed(ours_index: dict, sdk_index: dict, kind: str, compare) -> list:
    problems = _name_set_differences(kind, ours_index, sdk_index)
    for name in sorted(set(ours_index) & set(sdk_index)):
        problems += compare(name, ours_index[name], sdk_index[name])
    return problems


def file_differences(ours_file, sdk_file) -> list:
    """Every difference between two FileDescriptorProtos that matters on the wire."""
    problems = compare_file_header(ours_file, sdk_file)
    problems += _compare_indexed(
        index_messages(ours_file), index_messages(sdk_file), "message", compare_message
    )
    problems += _compare_indexed(index_enums(ours_file), index_enums(sdk_file), "enum", compare_enum)
    return problems + compare_services(ours_file, sdk_file)


def proto_differences(proto_path: Path, work_dir: Path) -> list:
    """Compile `proto_path` and list its differences from the SDK's descriptor."""
    return file_differences(compile_proto(proto_path, work_dir), sdk_file_proto())


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------

SDK_FILE = sdk_file_proto()
SDK_MESSAGES = index_messages(SDK_FILE)
SDK_ENUMS = index_enums(SDK_FILE)


@pytest.fixture(scope="module")
def ours_file(tmp_path_factory):
    return compile_proto(PROTO_PATH, tmp_path_factory.mktemp("descriptor"))


def _report(problems: list) -> str:
    return "\n".join(problems)


# ---------------------------------------------------------------------------
# Tests against the real proto
# ---------------------------------------------------------------------------


def test_file_header_matches(ours_file):
    problems = compare_file_header(ours_file, SDK_FILE)
    assert not problems, _report(problems)


def test_message_names_match_both_ways(ours_file):
    problems = _name_set_differences("message", index_messages(ours_file), SDK_MESSAGES)
    assert not problems, _report(problems)


def test_enum_names_match_both_ways(ours_file):
    problems = _name_set_differences("enum", index_enums(ours_file), SDK_ENUMS)
    assert not problems, _report(problems)


@pytest.mark.parametrize("name", sorted(SDK_MESSAGES))
def test_message_matches_sdk(ours_file, name):
    ours = index_messages(ours_file).get(name)
    assert ours is not None, f"message {name!r} is missing from ours"
    problems = compare_message(name, ours, SDK_MESSAGES[name])
    assert not problems, _report(problems)


@pytest.mark.parametrize("name", sorted(SDK_ENUMS))
def test_enum_matches_sdk(ours_file, name):
    ours = index_enums(ours_file).get(name)
    assert ours is not None, f"enum {name!r} is missing from ours"
    problems = compare_enum(name, ours, SDK_ENUMS[name])
    assert not problems, _report(problems)


def test_service_matches_sdk(ours_file):
    assert any(s.name == SERVICE_NAME for s in ours_file.service), f"service {SERVICE_NAME} missing"
    problems = compare_services(ours_file, SDK_FILE)
    assert not problems, _report(problems)


def test_whole_file_has_no_differences(tmp_path):
    problems = proto_differences(PROTO_PATH, tmp_path)
    assert not problems, _report(problems)


# ---------------------------------------------------------------------------
# The comparison must catch real differences
# ---------------------------------------------------------------------------

MUTATIONS = [
    pytest.param(
        "  string completionToken = 10;\n}",
        "  string completionToken = 11;\n}",
        ["WorkItem.completionToken", "number", "ours=11", "sdk=10"],
        id="field-number",
    ),
    pytest.param(
        "  int32 taskScheduledId = 1;\n  google.protobuf.StringValue name = 2;",
        "  int64 taskScheduledId = 1;\n  google.protobuf.StringValue name = 2;",
        ["ParentInstanceInfo.taskScheduledId", "type", "TYPE_INT64"],
        id="field-type",
    ),
    pytest.param(
        "  bool recursive = 3;\n  bool isOrchestration = 5;",
        "  bool recursive = 3;\n  bool isOrchestration = 6;",
        ["PurgeInstancesRequest.isOrchestration", "number"],
        id="field-number-next-to-oneof",
    ),
    pytest.param(
        "  WORKER_CAPABILITY_LARGE_PAYLOADS = 3;",
        "  WORKER_CAPABILITY_LARGE_PAYLOADS = 4;",
        ["WorkerCapability.WORKER_CAPABILITY_LARGE_PAYLOADS", "number"],
        id="enum-value",
    ),
    pytest.param(
        "returns (stream HistoryChunk);",
        "returns (HistoryChunk);",
        ["TaskHubSidecarService.StreamInstanceHistory", "server_streaming"],
        id="rpc-streaming",
    ),
]


@pytest.mark.parametrize(("old", "new", "expected"), MUTATIONS)
def test_comparison_reports_mutation(tmp_path, old, new, expected):
    text = PROTO_PATH.read_text()
    assert text.count(old) == 1, f"mutation anchor not unique in proto: {old!r}"
    mutated = tmp_path / PROTO_PATH.name
    mutated.write_text(text.replace(old, new))
    problems = proto_differences(mutated, tmp_path)
    assert len(problems) == 1, _report(problems)
    for fragment in expected:
        assert fragment in problems[0], problems[0]


# ---------------------------------------------------------------------------
# Generated code
# ---------------------------------------------------------------------------


def test_generated_module_imports_cleanly():
    code = "from protos import orchestrator_service_pb2, orchestrator_service_pb2_grpc"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_generated_code_is_up_to_date():
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", "scripts/check_protos.sh"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
