"""Configuration: flags, DURABLE_RUNTIME_* variables, validation, and loading the security material."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import pytest
import zmq
import zmq.auth

from runtime.config import Config, build_parser, config_from, validate
from runtime.gateway import security
from runtime.processes import CONFIG_ENV, config_from_env, config_to_env
from runtime.router import channel
from runtime.supervisor import check_security


def parse(argv: list[str], environ: dict[str, str] | None = None) -> Config:
    return config_from(build_parser().parse_args(argv), environ or {})


@pytest.fixture
def files(tmp_path: Path):
    def make(name: str, content: str | bytes = "x") -> str:
        path = tmp_path / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(path)

    return make


# flags and environment
def test_defaults() -> None:
    config = parse([])
    assert config == Config()
    assert config.drain_grace_s == 20.0 and config.drain_grace_s < 30  # inside Kubernetes' default grace
    assert config.zmq_transport == "ipc" and config.zmq_host == "127.0.0.1"
    assert not (config.tls_cert_file or config.api_token or config.api_token_file or config.zmq_curve_secret_file)


def test_every_field_has_a_flag_and_help() -> None:
    help_text = build_parser().format_help()
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        assert flag in help_text
        assert "DURABLE_RUNTIME_" + f.name.upper() in help_text


def test_flags_are_typed() -> None:
    config = parse(["--partitions", "4", "--drain-grace-s", "2.5", "--port", "5000", "--zmq-transport", "tcp"])
    assert (config.partitions, config.drain_grace_s, config.port, config.zmq_transport) == (4, 2.5, 5000, "tcp")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--partitions", "four"])


@pytest.mark.parametrize(("host", "endpoint"), [
    ("127.0.0.1", "tcp://127.0.0.1:5600"),
    ("node-0.durable", "tcp://node-0.durable:5600"),
    ("::1", "tcp://[::1]:5600"),
    ("[fd00::7]", "tcp://[fd00::7]:5600"),
])
def test_tcp_endpoints_put_an_ipv6_address_in_brackets(host: str, endpoint: str) -> None:
    config = Config(zmq_transport="tcp", zmq_host=host, zmq_base_port=5600)
    assert config.partition_endpoint(0) == endpoint


def test_environment_then_flag_precedence() -> None:
    environ = {"DURABLE_RUNTIME_PARTITIONS": "6", "DURABLE_RUNTIME_API_TOKEN": "from-env-0123456789",
               "DURABLE_RUNTIME_DRAIN_GRACE_S": "3"}
    config = parse([], environ)
    assert (config.partitions, config.api_token, config.drain_grace_s) == (6, "from-env-0123456789", 3.0)
    assert parse(["--partitions", "2"], environ).partitions == 2  # the flag wins
    with pytest.raises(ValueError):
        parse([], {"DURABLE_RUNTIME_PORT": "not-a-number"})


def test_token_is_not_in_repr() -> None:
    config = parse(["--api-token", "very-secret-token-value"])
    assert config.api_token == "very-secret-token-value"
    assert "very-secret-token-value" not in repr(config)


def test_config_round_trips_to_children(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse(["--api-token", "abcdefghijklmnopqrstuvwxyz", "--drain-grace-s", "7"])
    monkeypatch.setenv(CONFIG_ENV, config_to_env(config))
    assert config_from_env() == config


# validation
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--partitions", "0"], "--partitions"),
        (["--gateways", "65"], "--gateways"),
        (["--zmq-transport", "udp"], "--zmq-transport"),
        (["--drain-grace-s", "-1"], "--drain-grace-s"),
        (["--lease-timeout-s", "0"], "--lease-timeout-s"),
        (["--keepalive-s", "inf"], "--keepalive-s must be a number of seconds up to 1,000,000"),
        (["--keepalive-timeout-s", "nan"], "--keepalive-timeout-s must be a number of seconds"),
        (["--keepalive-s", "3000000"], "up to 1,000,000"),
        (["--keepalive-timeout-s", "0.0004"], "--keepalive-timeout-s must be positive"),
        (["--lease-timeout-s", "nan"], "--lease-timeout-s must be a number of seconds"),
        (["--lease-timeout-s", "1", "--heartbeat-interval-s", "1"], "expire between the heartbeats"),
        (["--tls-cert-file", "{cert}"], "given together"),
        (["--tls-key-file", "{key}"], "given together"),
        (["--tls-client-ca-file", "{ca}"], "needs --tls-cert-file"),
        (["--api-token", "abcdefghijklmnopqrstuvwxyz", "--api-token-file", "{token}"], "once"),
        (["--api-token", " padded-token-abcdefghijkl"], "whitespace"),
        (["--zmq-curve-secret-file", "{secret}"], "tcp only"),
        (["--zmq-transport", "tcp", "--zmq-curve-public-file", "{public}"], "needs --zmq-curve-secret-file"),
        (["--tls-cert-file", "{missing}", "--tls-key-file", "{key}"], "not a readable file"),
        (["--api-token-file", "{missing}"], "not a readable file"),
        (["--zmq-transport", "tcp", "--zmq-curve-secret-file", "{missing}"], "not a readable file"),
        (["--port", "103817"], "--port must be between 0 and 65535"),
        (["--zmq-transport", "tcp", "--zmq-base-port", "65535", "--partitions", "2"], "no room for 2 partition"),
        (["--health-ping-interval-s", "0"], "--health-ping-interval-s must be positive"),
        (["--request-timeout-s", "-1"], "--request-timeout-s must be positive"),
        (["--gateway-timeout-s", "1", "--heartbeat-interval-s", "1"], "must be longer than --heartbeat-interval-s"),
        (["--max-request-bytes", "100"], "--max-request-bytes must be at least"),
        (["--max-batch-commands", "0"], "--max-batch-commands must be at least 1"),
        (["--log-level", "LOUD"], "--log-level must be one of"),
    ],
)
def test_validation_errors(argv: list[str], message: str, files, tmp_path: Path) -> None:
    names = {n: files(n) for n in ("cert", "key", "ca", "token", "secret", "public")}
    names["missing"] = str(tmp_path / "missing.pem")
    with pytest.raises(ValueError, match=message):
        parse([a.format(**names) for a in argv])


def test_a_bad_environment_value_names_its_variable() -> None:
    with pytest.raises(ValueError, match="DURABLE_RUNTIME_PORT='4001x' is not a valid int"):
        config_from(build_parser().parse_args([]), {"DURABLE_RUNTIME_PORT": "4001x"})


def test_valid_security_combinations(files) -> None:
    cert, key, ca = files("c.pem"), files("k.pem"), files("ca.pem")
    parse(["--tls-cert-file", cert, "--tls-key-file", key])
    parse(["--tls-cert-file", cert, "--tls-key-file", key, "--tls-client-ca-file", ca])
    parse(["--zmq-transport", "tcp", "--zmq-curve-secret-file", files("s")])
    validate(Config(api_token_file=files("t")))


# loading the material
def test_api_token_from_flag_file_or_nothing(files) -> None:
    assert security.load_api_token(Config()) is None
    assert security.load_api_token(Config(api_token="abcdefghijklmnopqrstuvwxyz")) == "abcdefghijklmnopqrstuvwxyz"
    assert security.load_api_token(Config(api_token_file=files("t", "  from-a-file-0123456789\n"))) == \
        "from-a-file-0123456789"
    with pytest.raises(ValueError, match="empty"):
        security.load_api_token(Config(api_token_file=files("e", "\n")))
    with pytest.raises(ValueError, match="whitespace"):
        security.load_api_token(Config(api_token_file=files("w", "two words-0123456789")))


def test_tls_files_must_be_pem(files) -> None:
    assert security.server_credentials(Config()) is None
    bad = Config(tls_cert_file=files("c", "not pem"), tls_key_file=files("k", "not pem"))
    with pytest.raises(ValueError, match="--tls-cert-file .* is not PEM"):
        security.server_credentials(bad)
    cert = files("cert.pem", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    key = files("key.pem", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    assert isinstance(security.server_credentials(Config(tls_cert_file=cert, tls_key_file=key)),
                      grpc.ServerCredentials)
    with pytest.raises(ValueError, match="--tls-client-ca-file"):
        security.server_credentials(Config(tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=key))


def test_curve_keys_from_z85_or_certificate_files(files, tmp_path: Path) -> None:
    public, secret = zmq.curve_keypair()
    config = Config(zmq_transport="tcp", zmq_curve_secret_file=files("s", secret + b"\n"),
                    zmq_curve_public_file=files("p", public))
    keys = channel.load_curve_keys(config)
    assert keys == channel.CurveKeys(public=public, secret=secret)
    assert secret not in repr(keys).encode()
    assert keys.admitted() == frozenset({public})
    assert channel.load_curve_keys(Config()) is None

    cert_public, cert_secret = zmq.auth.create_certificates(str(tmp_path), "node")  # the zmq.auth format too
    keys = channel.load_curve_keys(Config(zmq_transport="tcp", zmq_curve_secret_file=cert_secret,
                                          zmq_curve_public_file=cert_public))
    assert keys is not None and keys.public == zmq.auth.load_certificate(cert_public)[0]

    other_public, _ = zmq.curve_keypair()
    with pytest.raises(ValueError, match="does not match"):
        channel.load_curve_keys(dataclasses.replace(config, zmq_curve_public_file=files("o", other_public)))
    with pytest.raises(ValueError, match="secret key"):
        channel.load_curve_keys(dataclasses.replace(config, zmq_curve_secret_file=files("bad", "too short")))
    with pytest.raises(ValueError, match="a secret key is needed"):
        channel.load_curve_keys(dataclasses.replace(config, zmq_curve_secret_file=cert_public,
                                                    zmq_curve_public_file=""))


def test_supervisor_checks_security_material_up_front(files) -> None:
    check_security(Config())
    with pytest.raises(ValueError, match="is empty"):
        check_security(Config(api_token_file=files("t", "")))
    with pytest.raises(ValueError, match="CurveZMQ secret key"):
        check_security(Config(zmq_transport="tcp", zmq_curve_secret_file=files("s", "nope")))


def test_channels_use_curve_only_for_tcp(files, monkeypatch: pytest.MonkeyPatch) -> None:
    public, secret = zmq.curve_keypair()
    config = Config(zmq_transport="tcp", zmq_curve_secret_file=files("s", secret))
    monkeypatch.setenv(CONFIG_ENV, config_to_env(config))
    monkeypatch.setattr(channel, "_process_keys", channel._UNSET)
    assert channel._curve_for("ipc:///tmp/x.sock", channel._UNSET) is None
    assert channel._curve_for("tcp://127.0.0.1:1", channel._UNSET) == channel.CurveKeys(public, secret)
    assert channel._curve_for("tcp://127.0.0.1:1", None) is None  # an explicit choice wins
    channel.configure_curve(None)
    assert channel._curve_for("tcp://127.0.0.1:1", channel._UNSET) is None


# the token check
@pytest.mark.parametrize(
    ("metadata", "problem"),
    [
        ((), "requires an API token"),
        ((("x-other", "1"),), "requires an API token"),
        ((("authorization", "Bearer the-right-token-123"),), None),
        ((("authorization", "bearer the-right-token-123"),), None),
        ((("authorization", "Bearer the-right-token-1234"),), "invalid API token"),
        ((("authorization", "Bearer "),), "must be 'Bearer <token>'"),
        ((("authorization", "Basic dXNlcjpwYXNz"),), "must be 'Bearer <token>'"),
        ((("authorization", "the-right-token-123"),), "must be 'Bearer <token>'"),
    ],
)
def test_token_verdict(metadata: tuple, problem: str | None) -> None:
    verdict = security.TokenInterceptor("the-right-token-123").verdict(metadata)
    if problem is None:
        assert verdict is None
    else:
        assert verdict is not None and problem in verdict


def test_a_corrupt_layout_file_is_a_startup_error_not_a_traceback(tmp_path: Path) -> None:
    from runtime.supervisor import LAYOUT_FILE, StartupError, check_data_dir

    (tmp_path / LAYOUT_FILE).write_text("{garbage")
    with pytest.raises(StartupError, match=f"cannot read .*{LAYOUT_FILE}.*partition count"):
        check_data_dir(Config(data_dir=str(tmp_path), partitions=2))


def test_a_missing_layout_file_is_not_rewritten_with_another_count(tmp_path: Path) -> None:
    """Partition stores without the layout file (a backup of the stores alone): only their own count may write
    the file again; another would stick, and every partition would then refuse the node."""
    from runtime.supervisor import LAYOUT_FILE, StartupError, check_data_dir

    for p in range(3):
        (tmp_path / f"partition-{p:03d}").mkdir()
    with pytest.raises(StartupError, match="holds the stores of 3 partitions"):
        check_data_dir(Config(data_dir=str(tmp_path), partitions=2))
    assert not (tmp_path / LAYOUT_FILE).exists()
    check_data_dir(Config(data_dir=str(tmp_path), partitions=3))
    assert (tmp_path / LAYOUT_FILE).exists()


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("localhost", True), ("::1", True), ("[::1]", True), ("::ffff:127.0.0.1", True),
    ("0.0.0.0", False), ("10.1.2.3", False), ("fd00::7", False), ("node-0.durable", False),
])
def test_the_plaintext_warnings_know_every_spelling_of_loopback(host: str, loopback: bool) -> None:
    from runtime.supervisor import _is_loopback

    assert _is_loopback(host) is loopback
