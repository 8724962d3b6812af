"""Prometheus metrics shared by every service: the gRPC server and client metrics and the
``/metrics`` HTTP endpoint.

The gRPC metrics have the names and labels of go-grpc-prometheus (which the Python ports
copy), so dashboards and alerts written for any gRPC service work here unchanged:

* ``grpc_server_started_total{grpc_type,grpc_service,grpc_method}``
* ``grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}``
* ``grpc_server_handling_seconds{grpc_type,grpc_service,grpc_method}`` (histogram)
* ``grpc_client_started_total`` / ``grpc_client_handled_total`` / ``grpc_client_handling_seconds``
  with the same labels plus ``downstream`` (e.g. ``indexer shard 1``) and ``target`` (its
  address): the calls a gateway makes to its embedders and indexer shards.

Each service owns one `ServiceMetrics` (its own registry, so several servers in one process,
as in the tests, never mix their series) and serves it over HTTP on its own port
(``<SERVICE>_METRICS_PORT``; 0 turns metrics off), never on the gRPC port. Every label value is
bounded: method and service names come from the protos, codes from gRPC, downstreams and
collections from configuration; never a listing id or a request id.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import grpc
from google.protobuf import descriptor_pool
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

log = logging.getLogger(__name__)

#: Seconds. Our RPCs take from ~0.1 ms (health, GetListing) over ~10-100 ms (an image through
#: the model on a CPU, a search over a million vectors) to seconds (AddListing of 16 photos
#: under load); the buckets resolve each decade in 1-2.5-5 steps.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: ``<SERVICE>_METRICS_PORT`` defaults: the gRPC port's last digit, 50050 -> 9450 and so on.
DEFAULT_PORTS = {"gateway": 9450, "embedder": 9451, "indexer": 9452}

_UNARY, _CLIENT_STREAM, _SERVER_STREAM, _BIDI = ("unary", "client_stream", "server_stream", "bidi_stream")


def split_method(full_method: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` -> (``pkg.Service``, ``Method``)."""
    _, _, rest = full_method.partition("/")
    service, _, method = rest.rpartition("/")
    return service or "unknown", method or full_method


def _grpc_type(client_streaming: bool, server_streaming: bool) -> str:
    if client_streaming and server_streaming:
        return _BIDI
    if client_streaming:
        return _CLIENT_STREAM
    return _SERVER_STREAM if server_streaming else _UNARY


# ================================================================================ server side


class _Series:
    """The started counter, handled counters (one per code) and histogram of one method: label
    lookups done once, not on every call (prometheus_client's ``labels`` takes a lock)."""

    def __init__(
        self, started: Counter, handled: Counter, seconds: Histogram, labels: tuple[str, ...]
    ) -> None:
        self.started = started.labels(*labels)
        self.seconds = seconds.labels(*labels)
        self._handled = handled
        self._labels = labels
        self._by_code: dict = {}

    def handled(self, code: grpc.StatusCode):
        child = self._by_code.get(code)
        if child is None:
            child = self._handled.labels(*self._labels, code.name)
            self._by_code[code] = child
        return child

    def done(self, code: grpc.StatusCode, seconds: float) -> None:
        self.handled(code).inc()
        self.seconds.observe(seconds)


class _SeriesTable:
    """Metric families plus a cache of per-method series, keyed by the label tuple."""

    def __init__(self, started: Counter, handled: Counter, seconds: Histogram) -> None:
        self.started, self.handled, self.seconds = started, handled, seconds
        self._series: dict[tuple[str, ...], _Series] = {}

    def series(self, *labels: str) -> _Series:
        found = self._series.get(labels)
        if found is None:
            found = _Series(self.started, self.handled, self.seconds, labels)
            self._series[labels] = found
        return found


class GrpcServerMetrics:
    """go-grpc-prometheus' server metrics on ``registry``; `interceptor` records them."""

    def __init__(self, registry: CollectorRegistry, buckets: Iterable[float] = LATENCY_BUCKETS):
        labels = ("grpc_type", "grpc_service", "grpc_method")
        self.table = _SeriesTable(
            Counter("grpc_server_started_total", "RPCs started on the server.", labels, registry=registry),
            Counter(
                "grpc_server_handled_total",
                "RPCs completed on the server, whatever their status code.",
                (*labels, "grpc_code"),
                registry=registry,
            ),
            Histogram(
                "grpc_server_handling_seconds",
                "Time from the start of an RPC to its status being set by the server.",
                labels,
                buckets=tuple(buckets),
                registry=registry,
            ),
        )

    def initialize(self, service_names: Iterable[str]) -> None:
        """Create the zero series of every method of ``service_names`` (as go-grpc-prometheus'
        ``InitializeMetrics``), so rates and ratios exist before a method's first call."""
        pool = descriptor_pool.Default()
        for name in service_names:
            try:
                service = pool.FindServiceByName(name)
            except KeyError:
                continue
            for method in service.methods:
                series = self.table.series(
                    _grpc_type(method.client_streaming, method.server_streaming), name, method.name
                )
                series.handled(grpc.StatusCode.OK)

    def interceptor(self) -> grpc.ServerInterceptor:
        return ServerMetricsInterceptor(self)


class ServerMetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times every RPC the server handles. Placed outermost, it sees the status the
    caller sees, including INVALID_ARGUMENT for undecodable requests, INTERNAL for crashes and
    UNAUTHENTICATED from the write-token check."""

    def __init__(self, metrics: GrpcServerMetrics) -> None:
        self.metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = split_method(handler_call_details.method)
        grpc_type = _grpc_type(handler.request_streaming, handler.response_streaming)
        series = self.metrics.table.series(grpc_type, service, method)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary, series), handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _unary(handler.stream_unary, series),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _streaming(handler.unary_stream, series),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            _streaming(handler.stream_stream, series),
            handler.request_deserializer,
            handler.response_serializer,
        )


def _code(context: grpc.ServicerContext, default: grpc.StatusCode) -> grpc.StatusCode:
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else default


def _unary(behaviour: Callable, series: _Series) -> Callable:
    def observed(request, context):
        series.started.inc()
        start = time.perf_counter()
        try:
            response = behaviour(request, context)
        except BaseException:
            series.done(_code(context, grpc.StatusCode.UNKNOWN), time.perf_counter() - start)
            raise
        series.done(_code(context, grpc.StatusCode.OK), time.perf_counter() - start)
        return response

    return observed


def _streaming(behaviour: Callable, series: _Series) -> Callable:
    def observed(request, context):
        series.started.inc()
        start = time.perf_counter()
        try:
            yield from behaviour(request, context)
        except GeneratorExit:  # the client went away (e.g. a cancelled health Watch)
            series.done(_code(context, grpc.StatusCode.CANCELLED), time.perf_counter() - start)
            raise
        except BaseException:
            series.done(_code(context, grpc.StatusCode.UNKNOWN), time.perf_counter() - start)
            raise
        series.done(_code(context, grpc.StatusCode.OK), time.perf_counter() - start)

    return observed


# ================================================================================ client side


class GrpcClientMetrics:
    """go-grpc-prometheus' client metrics, with the downstream and its target as labels."""

    def __init__(self, registry: CollectorRegistry, buckets: Iterable[float] = LATENCY_BUCKETS):
        labels = ("grpc_type", "grpc_service", "grpc_method", "downstream", "target")
        self.table = _SeriesTable(
            Counter("grpc_client_started_total", "RPCs started by the client.", labels, registry=registry),
            Counter(
                "grpc_client_handled_total",
                "RPCs completed by the client, whatever their status code.",
                (*labels, "grpc_code"),
                registry=registry,
            ),
            Histogram(
                "grpc_client_handling_seconds",
                "Time from the start of an RPC to its status at the client.",
                labels,
                buckets=tuple(buckets),
                registry=registry,
            ),
        )

    def interceptor(self, downstream: str, target: str) -> grpc.UnaryUnaryClientInterceptor:
        return ClientMetricsInterceptor(self, downstream, target)

    def instrument(self, channel: grpc.Channel, downstream: str, target: str) -> grpc.Channel:
        """``channel`` with every unary call counted and timed under ``downstream``."""
        return grpc.intercept_channel(channel, self.interceptor(downstream, target))


class ClientMetricsInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Counts and times unary calls (blocking and ``.future``) on a channel; a call's outcome is
    recorded when it completes, including CANCELLED for a call given up on."""

    def __init__(self, metrics: GrpcClientMetrics, downstream: str, target: str) -> None:
        self.metrics = metrics
        self.downstream = downstream
        self.target = target

    def intercept_unary_unary(self, continuation, client_call_details, request):
        service, method = split_method(client_call_details.method)
        series = self.metrics.table.series(_UNARY, service, method, self.downstream, self.target)
        series.started.inc()
        start = time.perf_counter()
        outcome = continuation(client_call_details, request)

        def record(call) -> None:
            code = call.code()
            series.done(
                code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN,
                time.perf_counter() - start,
            )

        outcome.add_done_callback(record)
        return outcome


# ================================================================================ endpoint


class MetricsPortError(OSError):
    """The metrics port cannot be bound; the message names the setting to change."""


@dataclass
class ServiceMetrics:
    """One service's registry, its gRPC server metrics and its ``/metrics`` HTTP endpoint.

    ``host``/``port`` say where `serve` listens (port 0 there picks a free port, for tests);
    ``setting`` names the environment variable, for error messages.
    """

    host: str
    port: int
    setting: str = "METRICS_PORT"
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))
    server: GrpcServerMetrics = field(init=False)
    _client: GrpcClientMetrics | None = field(default=None, init=False, repr=False)
    _http: object = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.server = GrpcServerMetrics(self.registry)

    @classmethod
    def for_port(cls, host: str, port: int, setting: str) -> "ServiceMetrics | None":
        """Metrics to serve on ``host:port``, or None when ``port`` is 0 (metrics off)."""
        return cls(host, port, setting) if port else None

    def client(self) -> GrpcClientMetrics:
        """The client-side gRPC metrics (created on first use: only the gateway calls out)."""
        if self._client is None:
            self._client = GrpcClientMetrics(self.registry)
        return self._client

    def serve(self) -> int:
        """Start the ``/metrics`` endpoint (a daemon thread); returns the bound port."""
        if self._http is not None:
            return self.bound_port
        try:
            self._http, _thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        except OSError as exc:
            raise MetricsPortError(
                f"cannot serve metrics on {self.host}:{self.port}: {exc.strerror or exc}; set "
                f"{self.setting} to a free port, or 0 to turn metrics off"
            ) from None
        log.info("metrics on http://%s:%d/metrics", self.host, self.bound_port)
        return self.bound_port

    @property
    def bound_port(self) -> int:
        return self._http.server_port if self._http is not None else 0

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
