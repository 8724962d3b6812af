"""Access control and transport security shared by every service.

Write RPCs (Upsert, Delete, AddListing, RemoveListing) need ``authorization: Bearer <token>``
metadata matching the configured WRITE_TOKEN, compared in constant time: a missing token is
UNAUTHENTICATED, a wrong one PERMISSION_DENIED. Read RPCs stay open. WRITE_TOKEN_FILE names a
file holding the token instead (a Docker or Kubernetes secret, e.g. /run/secrets/write_token;
surrounding whitespace is ignored); setting both is an error. When neither is set, writes are
open and the server logs a warning at start-up (local development only). `secret_from_env` reads
any such NAME / NAME_FILE pair (the gateway's GATEWAY_DB_PASSWORD too).

TLS is optional: TLS_CERT + TLS_KEY make a server speak TLS; adding TLS_CLIENT_CA makes it
require client certificates signed by that CA (mutual TLS). Clients use TLS_CA (and
TLS_CLIENT_CERT + TLS_CLIENT_KEY for mutual TLS) to reach such servers.
"""
from __future__ import annotations

import hmac
import logging
import os
import ssl
from pathlib import Path

import grpc

from common.config import ConfigError

log = logging.getLogger(__name__)
AUTH_HEADER = "authorization"


def write_token() -> str | None:
    """The write token from WRITE_TOKEN or the file WRITE_TOKEN_FILE names; None when neither is set."""
    return secret_from_env("WRITE_TOKEN")


def secret_from_env(name: str) -> str | None:
    """The secret in the environment variable NAME, or in the file NAME_FILE names (a Docker or
    Kubernetes secret; surrounding whitespace ignored); None when neither is set, ConfigError
    when both are, or the file cannot be read or is empty."""
    value, file = os.environ.get(name) or None, os.environ.get(f"{name}_FILE") or None
    if file is None:
        return value
    if value is not None:
        raise ConfigError(f"{name} and {name}_FILE are both set: keep one")
    try:
        secret = Path(file).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name}_FILE={file} cannot be read ({exc.__class__.__name__}): "
                          "mount the secret there") from None
    if not secret:
        raise ConfigError(f"{name}_FILE={file} is empty: put the secret in it")
    return secret


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return ((AUTH_HEADER, f"Bearer {token}"),) if token else ()


def _deny(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    def abort(_request, context):
        context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(abort)


class WriteTokenInterceptor(grpc.ServerInterceptor):
    """Lets a write RPC through only with the right bearer token."""

    def __init__(self, write_methods: set[str], token: str | None) -> None:
        self.write_methods = write_methods
        self.expected = token.encode() if token else None

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if self.expected is None or method not in self.write_methods:
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        header = metadata.get(AUTH_HEADER, "")
        if not header.startswith("Bearer "):
            return _deny(grpc.StatusCode.UNAUTHENTICATED,
                         f"{method} changes stored data and needs 'authorization: Bearer <token>' "
                         "metadata (the server's WRITE_TOKEN)")
        if not hmac.compare_digest(header[len("Bearer "):].encode(), self.expected):
            return _deny(grpc.StatusCode.PERMISSION_DENIED, f"{method}: the bearer token is not valid")
        return continuation(handler_call_details)


def write_token_interceptor(write_methods: set[str]) -> WriteTokenInterceptor:
    token = write_token()
    if token is None:
        log.warning("WRITE_TOKEN is not set: write RPCs are open to every caller")
    return WriteTokenInterceptor(write_methods, token)


def _read(name: str) -> bytes | None:
    value = os.environ.get(name)
    if not value:
        return None
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"{name}={value} is not a readable file")
    return path.read_bytes()


def check_key_pair(cert_name: str, key_name: str) -> None:
    """ConfigError unless the files named by the two variables are a PEM certificate (chain) and
    its private key. gRPC itself only says "Failed to bind to address" for a bad pair."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(os.environ[cert_name],
                                                                os.environ[key_name])
    except ssl.SSLError as exc:
        why = ("the key does not belong to the certificate" if exc.reason == "KEY_VALUES_MISMATCH"
               else "expected a PEM certificate (chain) and its unencrypted PEM private key")
        raise ConfigError(f"{cert_name}={os.environ[cert_name]} / {key_name}="
                          f"{os.environ[key_name]}: {why}") from None


def check_ca(name: str, pem: bytes) -> None:
    """ConfigError unless ``pem`` (the file named by ``name``) holds PEM CA certificates."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError):
        raise ConfigError(f"{name}={os.environ[name]}: expected PEM CA certificate(s)") from None


def server_credentials() -> grpc.ServerCredentials | None:
    """TLS (or mutual TLS) credentials from TLS_CERT/TLS_KEY/TLS_CLIENT_CA; None for plaintext.
    The files are checked here, so a wrong one is named in a ConfigError."""
    cert, key, client_ca = _read("TLS_CERT"), _read("TLS_KEY"), _read("TLS_CLIENT_CA")
    if cert is None and key is None:
        if client_ca is not None:
            raise ConfigError("TLS_CLIENT_CA needs TLS_CERT and TLS_KEY as well")
        return None
    if cert is None or key is None:
        raise ConfigError("TLS needs both TLS_CERT and TLS_KEY")
    check_key_pair("TLS_CERT", "TLS_KEY")
    if client_ca is not None:
        check_ca("TLS_CLIENT_CA", client_ca)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def open_channel(target: str, options: list[tuple[str, object]] | None = None) -> grpc.Channel:
    """A channel to ``target``: TLS when TLS_CA is set (with a client certificate for mutual TLS
    when TLS_CLIENT_CERT/TLS_CLIENT_KEY are set), plaintext otherwise."""
    ca = _read("TLS_CA")
    if ca is None:
        return grpc.insecure_channel(target, options=options)
    check_ca("TLS_CA", ca)
    client_cert, client_key = _read("TLS_CLIENT_CERT"), _read("TLS_CLIENT_KEY")
    if (client_cert is None) != (client_key is None):
        raise ConfigError("mutual TLS needs both TLS_CLIENT_CERT and TLS_CLIENT_KEY")
    if client_cert is not None:
        check_key_pair("TLS_CLIENT_CERT", "TLS_CLIENT_KEY")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=client_key, certificate_chain=client_cert)
    return grpc.secure_channel(target, credentials, options=options)
