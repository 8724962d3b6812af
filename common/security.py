"""Access control and transport security shared by every service.

The settings (WRITE_TOKEN, WRITE_TOKEN_FILE, TLS_*) are declared here once and read with each
service's other settings into its config object.

Write RPCs (Upsert, Delete, AddListing, RemoveListing) need ``authorization: Bearer <token>``
metadata matching the configured WRITE_TOKEN, compared in constant time: a missing token is
UNAUTHENTICATED, a wrong one PERMISSION_DENIED. Read RPCs stay open. WRITE_TOKEN_FILE names a
file holding the token instead (a Docker or Kubernetes secret, e.g. /run/secrets/write_token;
surrounding whitespace is ignored); setting both is an error. When neither is set, writes are
open and the server logs a warning at start-up (local development only). `resolve_secret` makes
one secret of any such NAME / NAME_FILE pair of settings (the gateway's GATEWAY_DB_PASSWORD too).

TLS is optional: TLS_CERT + TLS_KEY make a server speak TLS; adding TLS_CLIENT_CA makes it
require client certificates signed by that CA (mutual TLS). Clients use TLS_CA (and
TLS_CLIENT_CERT + TLS_CLIENT_KEY for mutual TLS) to reach such servers.
"""

from __future__ import annotations

import hmac
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from common.config import ConfigError, Setting, Settings

log = logging.getLogger(__name__)
AUTH_HEADER = "authorization"


WRITE_TOKEN = Setting(
    "WRITE_TOKEN",
    "write_token",
    secret=True,
    help="bearer token required by write RPCs (Upsert, Delete, AddListing, RemoveListing); "
    "the gateway sends it to the indexers. Unset: writes are open (a warning at start)",
)
WRITE_TOKEN_FILE = Setting(
    "WRITE_TOKEN_FILE",
    "write_token_file",
    Path,
    help="file holding that token instead (a Docker or Kubernetes secret); not both",
)
#: The write token's two settings; `resolve_write_token` makes one token of them.
WRITE_TOKEN_SETTINGS = (WRITE_TOKEN, WRITE_TOKEN_FILE)

TLS_CERT = Setting(
    "TLS_CERT",
    "tls_cert",
    Path,
    help="PEM certificate (chain) of this server: TLS on its port (with TLS_KEY)",
)
TLS_KEY = Setting("TLS_KEY", "tls_key", Path, help="unencrypted PEM private key of TLS_CERT")
TLS_CLIENT_CA = Setting(
    "TLS_CLIENT_CA",
    "tls_client_ca",
    Path,
    help="CA whose client certificates the server requires (mutual TLS)",
)
TLS_CA = Setting(
    "TLS_CA", "tls_ca", Path, help="trust roots of TLS channels to other services (plaintext when unset)"
)
TLS_CLIENT_CERT = Setting(
    "TLS_CLIENT_CERT", "tls_client_cert", Path, help="client certificate sent on TLS channels (mutual TLS)"
)
TLS_CLIENT_KEY = Setting(
    "TLS_CLIENT_KEY", "tls_client_key", Path, help="unencrypted PEM private key of TLS_CLIENT_CERT"
)
#: A server's TLS settings, then a client's.
TLS_SERVER_SETTINGS = (TLS_CERT, TLS_KEY, TLS_CLIENT_CA)
TLS_CLIENT_SETTINGS = (TLS_CA, TLS_CLIENT_CERT, TLS_CLIENT_KEY)
TLS_SETTINGS = Settings(*TLS_SERVER_SETTINGS, *TLS_CLIENT_SETTINGS)


def resolve_write_token(value: str | None, file: Path | None) -> str | None:
    """The write token from WRITE_TOKEN or the file WRITE_TOKEN_FILE names; None when neither."""
    return resolve_secret("WRITE_TOKEN", value, file)


def resolve_secret(name: str, value: str | None, file: Path | None) -> str | None:
    """The secret ``value`` of the variable NAME, or the content of the file NAME_FILE names (a
    Docker or Kubernetes secret; surrounding whitespace ignored); None when neither is set,
    ConfigError when both are, or the file cannot be read or is empty."""
    if file is None:
        return value or None
    if value:
        raise ConfigError(f"{name} and {name}_FILE are both set: keep one")
    try:
        secret = Path(file).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{name}_FILE={file} cannot be read ({exc.__class__.__name__}): mount the secret there"
        ) from None
    if not secret:
        raise ConfigError(f"{name}_FILE={file} is empty: put the secret in it")
    return secret


def write_token() -> str | None:
    """The write token from the environment (WRITE_TOKEN or WRITE_TOKEN_FILE); None when unset.
    For what builds no config object of its own (the Python client, benchmarks)."""
    return resolve_write_token(WRITE_TOKEN.from_environment(), WRITE_TOKEN_FILE.from_environment())


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
            return _deny(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{method} changes stored data and needs 'authorization: Bearer <token>' "
                "metadata (the server's WRITE_TOKEN)",
            )
        if not hmac.compare_digest(header[len("Bearer ") :].encode(), self.expected):
            return _deny(grpc.StatusCode.PERMISSION_DENIED, f"{method}: the bearer token is not valid")
        return continuation(handler_call_details)


def write_token_interceptor(write_methods: set[str], token: str | None) -> WriteTokenInterceptor:
    if token is None:
        log.warning("WRITE_TOKEN is not set: write RPCs are open to every caller")
    return WriteTokenInterceptor(write_methods, token)


def _read(name: str, path: Path | None) -> bytes | None:
    if path is None:
        return None
    if not path.is_file():
        raise ConfigError(f"{name}={path} is not a readable file")
    return path.read_bytes()


def check_key_pair(cert_name: str, cert: Path, key_name: str, key: Path) -> None:
    """ConfigError unless the files ``cert`` and ``key`` are a PEM certificate (chain) and its
    private key. gRPC itself only says "Failed to bind to address" for a bad pair."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        why = (
            "the key does not belong to the certificate"
            if exc.reason == "KEY_VALUES_MISMATCH"
            else "expected a PEM certificate (chain) and its unencrypted PEM private key"
        )
        raise ConfigError(f"{cert_name}={cert} / {key_name}={key}: {why}") from None


def check_ca(name: str, path: Path, pem: bytes) -> None:
    """ConfigError unless ``pem`` (the file ``path`` named by ``name``) holds PEM CA certificates."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError):
        raise ConfigError(f"{name}={path}: expected PEM CA certificate(s)") from None


@dataclass(frozen=True)
class TlsFiles:
    """The TLS settings: a server's certificate, key and client CA; a client's trust roots and
    certificate. All unset: plaintext. Built with the config object of each service."""

    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    tls_ca: Path | None = None
    tls_client_cert: Path | None = None
    tls_client_key: Path | None = None

    @classmethod
    def from_env(cls) -> "TlsFiles":
        return cls(**TLS_SETTINGS.read())

    @classmethod
    def from_values(cls, values: dict) -> "TlsFiles":
        """The TLS entries of a `Settings.read` result (removed from it; a server reads only
        TLS_SERVER_SETTINGS, a client only TLS_CLIENT_SETTINGS)."""
        return cls(
            **{
                setting.field: values.pop(setting.field)
                for setting in TLS_SETTINGS
                if setting.field in values
            }
        )

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS (or mutual TLS) credentials from TLS_CERT/TLS_KEY/TLS_CLIENT_CA; None for plaintext.
        The files are checked here, so a wrong one is named in a ConfigError."""
        cert, key = _read("TLS_CERT", self.tls_cert), _read("TLS_KEY", self.tls_key)
        client_ca = _read("TLS_CLIENT_CA", self.tls_client_ca)
        if cert is None and key is None:
            if client_ca is not None:
                raise ConfigError("TLS_CLIENT_CA needs TLS_CERT and TLS_KEY as well")
            return None
        if cert is None or key is None:
            raise ConfigError("TLS needs both TLS_CERT and TLS_KEY")
        check_key_pair("TLS_CERT", self.tls_cert, "TLS_KEY", self.tls_key)
        if client_ca is not None:
            check_ca("TLS_CLIENT_CA", self.tls_client_ca, client_ca)
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )

    def open_channel(self, target: str, options: list[tuple[str, object]] | None = None) -> grpc.Channel:
        """A channel to ``target``: TLS when TLS_CA is set (with a client certificate for mutual
        TLS when TLS_CLIENT_CERT/TLS_CLIENT_KEY are set), plaintext otherwise."""
        ca = _read("TLS_CA", self.tls_ca)
        if ca is None:
            return grpc.insecure_channel(target, options=options)
        check_ca("TLS_CA", self.tls_ca, ca)
        client_cert = _read("TLS_CLIENT_CERT", self.tls_client_cert)
        client_key = _read("TLS_CLIENT_KEY", self.tls_client_key)
        if (client_cert is None) != (client_key is None):
            raise ConfigError("mutual TLS needs both TLS_CLIENT_CERT and TLS_CLIENT_KEY")
        if client_cert is not None:
            check_key_pair("TLS_CLIENT_CERT", self.tls_client_cert, "TLS_CLIENT_KEY", self.tls_client_key)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=client_key, certificate_chain=client_cert
        )
        return grpc.secure_channel(target, credentials, options=options)


def open_channel(
    target: str, options: list[tuple[str, object]] | None = None, tls: TlsFiles | None = None
) -> grpc.Channel:
    """`TlsFiles.open_channel` with ``tls``, or the TLS settings from the environment for what
    builds no config object of its own (the Python client, tools, tests)."""
    return (tls or TlsFiles.from_env()).open_channel(target, options)
