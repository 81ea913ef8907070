"""Access control at the gRPC gateway: TLS / mutual TLS credentials and a shared-secret API token.

- TLS: `--tls-cert-file` + `--tls-key-file` (PEM) serve the gateway over TLS only; adding
  `--tls-client-ca-file` requires every client to present a certificate signed by that CA.
- API token: with `--api-token`, `DURABLE_RUNTIME_API_TOKEN` or `--api-token-file`, every call must
  carry the metadata `authorization: Bearer <token>`, or it fails with UNAUTHENTICATED. The
  standard health service (`grpc.health.v1.Health`) stays open so load balancers and Kubernetes
  probes work without the secret; it reveals only SERVING / NOT_SERVING.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from runtime.config import Config

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
_MIN_TOKEN_CHARS = 16


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path!r}: {exc.strerror or exc}") from None


def _pem(path: str, what: str, marker: bytes) -> bytes:
    data = _read(path, what)
    if b"-----BEGIN " not in data or marker not in data:
        raise ValueError(f"{what} {path!r} is not PEM ({marker.decode()} expected)")
    return data


def load_api_token(config: Config) -> str | None:
    """The configured API token, or None when calls need none."""
    token = config.api_token
    if config.api_token_file:
        token = _read(config.api_token_file, "--api-token-file").decode("utf-8", errors="strict").strip()
        if not token:
            raise ValueError(f"--api-token-file {config.api_token_file!r} is empty")
    if not token:
        return None
    if any(c.isspace() or not c.isprintable() for c in token):
        raise ValueError("the API token must be printable and contain no whitespace")
    if len(token) < _MIN_TOKEN_CHARS:
        log.warning("the API token has fewer than %d characters; use a long random secret", _MIN_TOKEN_CHARS)
    return token


def server_credentials(config: Config) -> grpc.ServerCredentials | None:
    """TLS (or mutual TLS) credentials for the gateway port, or None for plaintext."""
    if not config.tls_cert_file:
        return None
    chain = _pem(config.tls_cert_file, "--tls-cert-file", b"CERTIFICATE")
    key = _pem(config.tls_key_file, "--tls-key-file", b"PRIVATE KEY")
    client_ca = None
    if config.tls_client_ca_file:
        client_ca = _pem(config.tls_client_ca_file, "--tls-client-ca-file", b"CERTIFICATE")
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def check(config: Config) -> None:
    """Load every secret the gateway will need, so a bad file stops the node at once with a clear message."""
    load_api_token(config)
    server_credentials(config)
    if config.tls_cert_file:
        _check_key_pair(config.tls_cert_file, config.tls_key_file)


def _check_key_pair(cert_file: str, key_file: str) -> None:
    """gRPC only finds a key that does not match its certificate, or one that needs a password, when the
    gateway binds its port, and then says no more than 'failed to bind'."""

    def no_password() -> bytes:
        raise ValueError(f"--tls-key-file {key_file} is encrypted; give the gateway an unencrypted key")

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file, password=no_password)
    except ssl.SSLError as exc:
        raise ValueError(
            f"--tls-key-file {key_file} does not go with --tls-cert-file {cert_file} ({exc.reason or exc})"
        ) from None


def rejecting_handler(handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode,
                      details: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that fails the call with `code` before doing anything."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(code, details)
        return b""

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, details)
        yield b""  # never reached; makes this an async generator

    if handler is None or handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary)
    return grpc.stream_stream_rpc_method_handler(streaming)


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", errors="surrogateescape")).digest()


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Require `authorization: Bearer <token>` on every call except the health service.

    The comparison is constant-time over SHA-256 digests, so neither the token's content nor its
    length leaks through timing.
    """

    def __init__(self, token: str) -> None:
        self._expected = _digest(token)

    def verdict(self, metadata: Any) -> str | None:
        """None when the call may proceed, else why not."""
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            return "this durable-runtime requires an API token: send the metadata 'authorization: Bearer <token>'"
        value = values[-1]
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, credential = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            return "the 'authorization' metadata must be 'Bearer <token>'"
        if not hmac.compare_digest(_digest(credential.strip()), self._expected):
            return "invalid API token"
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if handler_call_details.method.startswith(HEALTH_PREFIX):
            return await continuation(handler_call_details)
        problem = self.verdict(handler_call_details.invocation_metadata)
        if problem is None:
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return rejecting_handler(handler, grpc.StatusCode.UNAUTHENTICATED, problem)
