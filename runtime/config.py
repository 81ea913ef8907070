"""Configuration: one frozen dataclass, filled from flags and DURABLE_RUNTIME_* environment variables."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import tempfile
from dataclasses import dataclass, field, fields
from typing import Any

ENV_PREFIX = "DURABLE_RUNTIME_"


def _opt(default: Any, help_text: str) -> Any:
    return field(default=default, metadata={"help": help_text})


def _secret(default: Any, help_text: str) -> Any:
    """A field left out of repr(), so a logged Config never shows it."""
    return field(default=default, repr=False, metadata={"help": help_text})


@dataclass(frozen=True)
class Config:
    """Every knob of a node. Units are in the field names."""

    partitions: int = _opt(8, "number of partitions; fixed when the data directory is created")
    host: str = _opt("127.0.0.1", "address the gRPC gateway listens on")
    port: int = _opt(4001, "port the gRPC gateway listens on")
    data_dir: str = _opt("./durable-data", "directory holding one LMDB environment per partition")
    gateways: int = _opt(1, "number of gateway processes sharing the gRPC port (SO_REUSEPORT)")
    lease_timeout_s: float = _opt(120.0, "a dispatched work item returns to the queue when its lease is not renewed for this long")
    gateway_timeout_s: float = _opt(10.0, "a partition releases the work items of a gateway it has not heard from for this long")
    heartbeat_interval_s: float = _opt(1.0, "how often gateways and partitions exchange heartbeats")
    health_ping_interval_s: float = _opt(30.0, "idle worker streams get a healthPing work item this often")
    keepalive_s: float = _opt(20.0, "the gateway pings each client connection this often (see --keepalive-timeout-s)")
    keepalive_timeout_s: float = _opt(
        60.0,
        "a client connection that does not answer a ping within this is closed: the streams of a frozen or vanished"
        " worker end and their work items go back to the queue. A client's answer waits behind a request it is"
        " still sending, so allow for uploading --max-request-bytes over the slowest link",
    )
    request_timeout_s: float = _opt(30.0, "gateway-side limit for a client RPC that carries no deadline")
    max_request_bytes: int = _opt(
        4 * 1024 * 1024,
        "largest gRPC message accepted, and largest work item sent (SDK workers receive 4 MiB unless set otherwise)",
    )
    max_instance_id_length: int = _opt(256, "longest instance id accepted, in characters")
    max_history_events: int = _opt(100_000, "an orchestration whose history would grow past this fails")
    map_size_bytes: int = _opt(1 << 30, "initial LMDB map size per partition; it grows when full")
    max_batch_commands: int = _opt(2000, "most commands a partition applies in one write transaction")
    outbox_resend_interval_s: float = _opt(1.0, "unacknowledged messages to other partitions are resent this often")
    zmq_transport: str = _opt("ipc", "ipc (one machine) or tcp (partitions on several nodes)")
    zmq_host: str = _opt("127.0.0.1", "address partitions bind to with the tcp transport (IPv4 or IPv6)")
    zmq_base_port: int = _opt(5600, "partition p listens on zmq_base_port + p with the tcp transport")
    drain_grace_s: float = _opt(20.0, "on SIGTERM, work items already handed to workers may complete for this long before exit")
    tls_cert_file: str = _opt("", "PEM certificate chain of the gRPC gateway; with --tls-key-file enables TLS")
    tls_key_file: str = _opt("", "PEM private key of the gRPC gateway")
    tls_client_ca_file: str = _opt("", "PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)")
    api_token: str = _secret("", "shared secret every gRPC call must carry as 'authorization: Bearer <token>' (the health service stays open); prefer the env variable or --api-token-file, flags show up in ps")
    api_token_file: str = _opt("", "file holding the API token (surrounding whitespace is ignored)")
    zmq_curve_secret_file: str = _opt("", "CurveZMQ secret key of the deployment's node keypair (Z85 text or a zmq.auth secret certificate); authenticates and encrypts the tcp transport")
    zmq_curve_public_file: str = _opt("", "optional CurveZMQ public key matching --zmq-curve-secret-file (checked against it)")
    log_level: str = _opt("INFO", "logging level")
    allow_task_hub_deletion: bool = _opt(False, "let DeleteTaskHub and CreateTaskHub(recreateIfExists) wipe all data")

    def runtime_dir(self) -> str:
        """A short per-data-dir directory for ipc sockets (unix socket paths are limited to ~100 bytes)."""
        digest = hashlib.sha1(os.path.abspath(self.data_dir).encode()).hexdigest()[:12]
        return os.path.join(tempfile.gettempdir(), f"durable-runtime-{digest}")

    def partition_endpoint(self, partition: int) -> str:
        """Where partition `partition` binds its ZeroMQ ROUTER socket; gateways and peers connect here."""
        if self.zmq_transport == "tcp":
            host = self.zmq_host.strip("[]")
            if ":" in host:  # an IPv6 address: ZeroMQ wants it in brackets
                host = f"[{host}]"
            return f"tcp://{host}:{self.zmq_base_port + partition}"
        return f"ipc://{self.runtime_dir()}/p{partition}.sock"

    def partition_data_dir(self, partition: int) -> str:
        return os.path.join(self.data_dir, f"partition-{partition:03d}")


def parse_bool(text: str) -> bool:
    """Flags and environment variables spell booleans as 1/0, true/false, yes/no or on/off."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _field_type(default: Any) -> Any:
    return parse_bool if isinstance(default, bool) else type(default)


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def build_parser(prog: str = "durable-runtime") -> argparse.ArgumentParser:
    """The node's command line. Each flag defaults to its DURABLE_RUNTIME_* variable, then the built-in default."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a durable-runtime node: a gRPC gateway serving TaskHubSidecarService plus partition processes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(Config):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=_field_type(f.default),
            default=None,
            help=f"{f.metadata['help']} (env {_env_name(f.name)}, default {f.default})",
        )
    return parser


def config_from(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Config:
    """Resolve every field: flag, then environment variable, then default."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        value = getattr(args, f.name, None)
        if value is None and _env_name(f.name) in environ:
            raw = environ[_env_name(f.name)]
            try:
                value = _field_type(f.default)(raw)
            except ValueError:
                raise ValueError(
                    f"{_env_name(f.name)}={raw!r} is not a valid {_field_type(f.default).__name__}"
                ) from None
        if value is not None:
            values[f.name] = value
    config = Config(**values)
    validate(config)
    return config


_MAX_SECONDS = 1_000_000.0  # about 11.5 days; gRPC takes its durations in int32 milliseconds


def validate(config: Config) -> None:
    for f in fields(Config):
        value = getattr(config, f.name)
        if f.name.endswith("_s") and not (math.isfinite(value) and value <= _MAX_SECONDS):
            raise ValueError(f"--{f.name.replace('_', '-')} must be a number of seconds up to {_MAX_SECONDS:,.0f},"
                             f" got {value}")
    if not 1 <= config.partitions <= 1024:
        raise ValueError(f"--partitions must be between 1 and 1024, got {config.partitions}")
    if not 1 <= config.gateways <= 64:
        raise ValueError(f"--gateways must be between 1 and 64, got {config.gateways}")
    if config.zmq_transport not in ("ipc", "tcp"):
        raise ValueError(f"--zmq-transport must be ipc or tcp, got {config.zmq_transport!r}")
    if config.lease_timeout_s <= 0 or config.heartbeat_interval_s <= 0:
        raise ValueError("--lease-timeout-s and --heartbeat-interval-s must be positive")
    if config.drain_grace_s < 0:
        raise ValueError(f"--drain-grace-s must not be negative, got {config.drain_grace_s}")
    if not 0 <= config.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {config.port}")
    if config.zmq_transport == "tcp" and not (1 <= config.zmq_base_port and config.zmq_base_port + config.partitions - 1 <= 65535):
        raise ValueError(
            f"--zmq-base-port {config.zmq_base_port} leaves no room for {config.partitions} partition ports below 65536"
        )
    for flag, value in (
        ("--health-ping-interval-s", config.health_ping_interval_s),
        ("--keepalive-s", config.keepalive_s),
        ("--keepalive-timeout-s", config.keepalive_timeout_s),
        ("--request-timeout-s", config.request_timeout_s),
        ("--gateway-timeout-s", config.gateway_timeout_s),
        ("--outbox-resend-interval-s", config.outbox_resend_interval_s),
    ):
        if not value >= 0.001:  # (and gRPC would read less than a millisecond as 0: no keepalive at all)
            raise ValueError(f"{flag} must be positive (at least 0.001), got {value}")
    for flag, value, otherwise in (
        ("--lease-timeout-s", config.lease_timeout_s,
         "work items that streams hold expire between the heartbeats that renew them"),
        ("--gateway-timeout-s", config.gateway_timeout_s, "partitions drop live gateways between their heartbeats"),
    ):
        if value <= config.heartbeat_interval_s:
            raise ValueError(f"{flag} ({value}) must be longer than --heartbeat-interval-s"
                             f" ({config.heartbeat_interval_s}), or {otherwise}")
    for flag, value, least in (
        ("--max-request-bytes", config.max_request_bytes, 64 << 10),
        ("--max-instance-id-length", config.max_instance_id_length, 1),
        ("--max-history-events", config.max_history_events, 10),
        ("--map-size-bytes", config.map_size_bytes, 1 << 20),
        ("--max-batch-commands", config.max_batch_commands, 1),
    ):
        if value < least:
            raise ValueError(f"{flag} must be at least {least}, got {value}")
    if config.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"--log-level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL; got {config.log_level!r}")
    _validate_security(config)


def _validate_security(config: Config) -> None:
    """Flag combinations and file presence; the files' contents are checked when they are loaded."""
    if bool(config.tls_cert_file) != bool(config.tls_key_file):
        raise ValueError("--tls-cert-file and --tls-key-file must be given together")
    if config.tls_client_ca_file and not config.tls_cert_file:
        raise ValueError("--tls-client-ca-file (mutual TLS) needs --tls-cert-file and --tls-key-file")
    if config.api_token and config.api_token_file:
        raise ValueError("give the API token once: --api-token (or DURABLE_RUNTIME_API_TOKEN) or --api-token-file")
    if config.api_token and config.api_token != config.api_token.strip():
        raise ValueError("--api-token must not start or end with whitespace")
    if config.zmq_curve_public_file and not config.zmq_curve_secret_file:
        raise ValueError("--zmq-curve-public-file needs --zmq-curve-secret-file")
    if config.zmq_curve_secret_file and config.zmq_transport != "tcp":
        raise ValueError("CurveZMQ keys apply to --zmq-transport tcp only (ipc sockets are local files)")
    for flag, path in (
        ("--tls-cert-file", config.tls_cert_file),
        ("--tls-key-file", config.tls_key_file),
        ("--tls-client-ca-file", config.tls_client_ca_file),
        ("--api-token-file", config.api_token_file),
        ("--zmq-curve-secret-file", config.zmq_curve_secret_file),
        ("--zmq-curve-public-file", config.zmq_curve_public_file),
    ):
        if path and not os.path.isfile(path):
            raise ValueError(f"{flag} {path!r} is not a readable file")
