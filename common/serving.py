"""What every gRPC server of the stack shares: health, reflection, limits, request logging,
error mapping, Prometheus metrics (`common.metrics`) and graceful shutdown.

Servicers stay thin and never need to know about these; a service calls ``create_server`` with
its servicers, marks itself SERVING once its model or index is loaded, and ``serve_until_signal``.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
import time
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common import logs
from common.errors import ServiceError
from common.metrics import ServiceMetrics

log = logging.getLogger(__name__)

MiB = 1024 * 1024
#: Longest status message a server sends, in UTF-8 bytes. Messages may echo a caller's input (an
#: unknown id, a bad field name); gRPC carries them in a header, and a client drops a response
#: whose headers pass its metadata limit (8 KiB soft, 16 KiB hard) as RESOURCE_EXHAUSTED.
MAX_DETAILS_BYTES = 1024


def clip_details(message: str, limit: int = MAX_DETAILS_BYTES) -> str:
    """``message`` cut to at most about ``limit`` UTF-8 bytes, saying how long it was."""
    data = message.encode("utf-8", "replace")
    if len(data) <= limit:
        return message
    return data[: max(0, limit - 48)].decode("utf-8", "ignore") + f"... ({len(data)} bytes, clipped)"


@contextmanager
def service_errors(context: grpc.ServicerContext) -> Iterator[None]:
    """The one mapping of errors to statuses, for every servicer: a `ServiceError` aborts the RPC
    with its status and its message as details (clipped: a message may echo a caller's long
    input). Any other exception passes on to the server's interceptor: INTERNAL, traceback logged."""
    try:
        yield
    except ServiceError as exc:
        details = clip_details(str(exc))
        log.info("request failed: %s: %s", exc.status, details)
        context.abort(getattr(grpc.StatusCode, exc.status), details)


def maps_service_errors(method: Callable) -> Callable:
    """`service_errors` around a servicer method ``(self, request, context)``."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        with service_errors(context):
            return method(self, request, context)

    return wrapper


@dataclass(frozen=True)
class ServerLimits:
    """Limits set deliberately on every server (not gRPC's 4 MiB default by accident)."""

    max_receive_bytes: int = 16 * MiB
    max_send_bytes: int = 16 * MiB
    max_concurrent_rpcs: int = 64
    max_workers: int = 16
    #: Close each client connection (GOAWAY, in-flight calls finish within the grace) after this
    #: long, so clients reconnect and re-resolve their target: a gateway with
    #: ``dns:///embedder:50051`` then finds replicas added by ``--scale`` instead of keeping its
    #: first connections for ever. None: connections live as long as the client keeps them.
    max_connection_age_s: float | None = None
    max_connection_age_grace_s: float = 30.0


@dataclass
class Server:
    """A started gRPC server, the port it bound and its health servicer."""

    grpc_server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: list[str] = field(default_factory=list)
    #: The service's metrics and their ``/metrics`` endpoint; None when metrics are off.
    metrics: ServiceMetrics | None = field(default=None, kw_only=True)

    def set_serving(self, serving: bool = True) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.service_names]:
            self.health.set(name, status)

    def stop(self, grace: float | None = 5.0) -> None:
        self.set_serving(False)
        self.grpc_server.stop(grace).wait()
        if self.metrics is not None:
            self.metrics.close()


class _Undecodable:
    """Stands in for a request whose bytes are not a valid message of the method's type."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable | None) -> Callable | None:
    """Wrap a request deserializer so bad bytes reach the handler as `_Undecodable` (answered
    INVALID_ARGUMENT) instead of gRPC's own INTERNAL "Exception deserializing request!"."""
    if deserializer is None:
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf DecodeError, invalid UTF-8 in a string field, ...
            return _Undecodable(exc)

    return parse


class RequestContextInterceptor(grpc.ServerInterceptor):
    """Per request: take or create the request id, log one line at debug level, answer a request
    that does not parse as INVALID_ARGUMENT, and turn any uncaught exception into INTERNAL with
    its message instead of a bare UNKNOWN."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method
        metadata = dict(handler_call_details.invocation_metadata or ())
        behaviour = handler.unary_unary

        def wrapped(request, context):
            token = logs.set_request_id(metadata.get(logs.REQUEST_ID_KEY) or logs.new_request_id())
            start = time.perf_counter()
            try:
                if isinstance(request, _Undecodable):
                    context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        clip_details(
                            f"the request is not a valid {method} request message: "
                            f"{type(request.error).__name__}: {request.error}"
                        ),
                    )
                return behaviour(request, context)
            except Exception as exc:
                if context.code() is None:  # not an intentional abort
                    log.exception("unhandled error in %s", method)
                    context.abort(
                        grpc.StatusCode.INTERNAL,
                        clip_details(f"internal error in {method}: {type(exc).__name__}: {exc}"),
                    )
                raise
            finally:
                code = context.code() or grpc.StatusCode.OK
                log.debug(
                    "rpc",
                    extra={
                        "fields": {
                            "method": method,
                            "code": code.name,
                            "ms": round((time.perf_counter() - start) * 1000, 2),
                        }
                    },
                )
                logs.reset_request_id(token)

        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )


def _server_options(limits: ServerLimits) -> list[tuple[str, int]]:
    options = [
        ("grpc.max_receive_message_length", limits.max_receive_bytes),
        ("grpc.max_send_message_length", limits.max_send_bytes),
        ("grpc.so_reuseport", 0),
    ]
    if limits.max_connection_age_s:
        options += [
            ("grpc.max_connection_age_ms", int(limits.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(limits.max_connection_age_grace_s * 1000)),
        ]
    return options


def create_server(
    register: Callable[[grpc.Server], Iterable[str]],
    address: str = "127.0.0.1:0",
    *,
    limits: ServerLimits = ServerLimits(),
    interceptors: Iterable[grpc.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
    metrics: ServiceMetrics | None = None,
) -> Server:
    """Build and start a server on ``address`` (port 0 picks a free port).

    ``register`` adds the service's servicers and returns their full service names, which get
    health entries (NOT_SERVING until the caller says otherwise) and reflection. With
    ``metrics``, every RPC is counted and timed (outermost, so with the status the caller sees)
    and ``/metrics`` is served on the metrics port; a metrics port that cannot be bound stops
    the start (`common.metrics.MetricsPortError`).
    """
    observed = [metrics.server.interceptor()] if metrics is not None else []
    grpc_server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=limits.max_workers),
        interceptors=[*observed, RequestContextInterceptor(), *interceptors],
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
        options=_server_options(limits),
    )
    service_names = list(register(grpc_server))
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    reflection.enable_server_reflection(
        [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], grpc_server
    )
    if credentials is None:
        port = grpc_server.add_insecure_port(address)
    else:
        port = grpc_server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"could not bind {address}")
    if metrics is not None:
        metrics.server.initialize([*service_names, health.SERVICE_NAME])
        try:
            metrics.serve()
        except OSError:
            grpc_server.stop(None)
            raise
    grpc_server.start()
    log.info(
        "listening on port %d (%s)",
        port,
        "TLS" if credentials is not None else "plaintext",
        extra={
            "fields": {
                "services": service_names,
                "max_receive_bytes": limits.max_receive_bytes,
                "max_send_bytes": limits.max_send_bytes,
                "max_concurrent_rpcs": limits.max_concurrent_rpcs,
                "max_workers": limits.max_workers,
                "max_connection_age_s": limits.max_connection_age_s,
            }
        },
    )
    server = Server(grpc_server, port, health_servicer, service_names, metrics=metrics)
    server.set_serving(False)
    return server


def serve_until_signal(
    server: Server, *, grace: float = 5.0, on_stop: Callable[[], None] | None = None
) -> None:
    """Block until SIGTERM or SIGINT, then stop accepting work, let in-flight RPCs finish for
    ``grace`` seconds and run ``on_stop`` (e.g. a final snapshot)."""
    stopping = threading.Event()

    def handle(signum, _frame):
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    while not stopping.wait(0.5):
        pass
    server.stop(grace)
    if on_stop is not None:
        on_stop()
    log.info("stopped")
