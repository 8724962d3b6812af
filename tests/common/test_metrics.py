"""The shared gRPC metrics (`common.metrics`) on a real server and channel, read over HTTP from
the real ``/metrics`` endpoint: names and labels of go-grpc-prometheus, exact counts per code."""

from __future__ import annotations

import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.metrics import GrpcClientMetrics, MetricsPortError, ServiceMetrics, split_method
from common.serving import create_server
from tests.support.metrics import scrape, value

HEALTH = "grpc.health.v1.Health"


@pytest.fixture()
def server():
    metrics = ServiceMetrics("127.0.0.1", 0, "TEST_METRICS_PORT")
    started = create_server(lambda _server: [], "127.0.0.1:0", metrics=metrics)
    started.set_serving(True)
    yield started
    started.stop(None)


def test_split_method():
    assert split_method("/marketplace.gateway.v1.Gateway/SearchByImage") == (
        "marketplace.gateway.v1.Gateway",
        "SearchByImage",
    )


def test_server_counts_each_call_by_code_and_times_it(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = health_pb2_grpc.HealthStub(channel)
    for _ in range(3):
        stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
    for _ in range(2):  # unknown service: NOT_FOUND
        with pytest.raises(grpc.RpcError) as raised:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    channel.close()

    samples = scrape(server.metrics.bound_port)
    method = dict(grpc_type="unary", grpc_service=HEALTH, grpc_method="Check")
    assert value(samples, "grpc_server_started_total", **method) == 5
    assert value(samples, "grpc_server_handled_total", grpc_code="OK", **method) == 3
    assert value(samples, "grpc_server_handled_total", grpc_code="NOT_FOUND", **method) == 2
    assert value(samples, "grpc_server_handling_seconds_count", **method) == 5
    assert value(samples, "grpc_server_handling_seconds_bucket", le="+Inf", **method) == 5
    assert 0 < value(samples, "grpc_server_handling_seconds_sum", **method) < 5
    # methods never called exist with zero counts (rates work from the start)
    watch = dict(grpc_type="server_stream", grpc_service=HEALTH, grpc_method="Watch")
    assert ("grpc_server_started_total", tuple(sorted(watch.items()))) in samples
    assert value(samples, "grpc_server_started_total", **watch) == 0


def test_undecodable_request_is_counted_as_invalid_argument(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    check = channel.unary_unary(f"/{HEALTH}/Check")  # raw bytes: not a HealthCheckRequest
    with pytest.raises(grpc.RpcError) as raised:
        check(b"\xff\xff\xff", timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    channel.close()
    samples = scrape(server.metrics.bound_port)
    assert value(samples, "grpc_server_handled_total", grpc_method="Check", grpc_code="INVALID_ARGUMENT") == 1


def test_client_metrics_label_the_downstream(server):
    metrics = ServiceMetrics("127.0.0.1", 0, "TEST_METRICS_PORT")
    client = metrics.client()
    assert isinstance(client, GrpcClientMetrics) and metrics.client() is client
    target = f"127.0.0.1:{server.port}"
    channel = client.instrument(grpc.insecure_channel(target), "indexer shard 0", target)
    stub = health_pb2_grpc.HealthStub(channel)
    stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
    stub.Check.future(health_pb2.HealthCheckRequest(), timeout=10).result()
    with pytest.raises(grpc.RpcError):
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    channel.close()
    metrics.serve()
    try:
        samples = scrape(metrics.bound_port)
    finally:
        metrics.close()
    labels = dict(grpc_service=HEALTH, grpc_method="Check", downstream="indexer shard 0", target=target)
    assert value(samples, "grpc_client_started_total", **labels) == 3
    assert value(samples, "grpc_client_handled_total", grpc_code="OK", **labels) == 2
    assert value(samples, "grpc_client_handled_total", grpc_code="NOT_FOUND", **labels) == 1
    assert value(samples, "grpc_client_handling_seconds_count", **labels) == 3


def test_metrics_port_in_use_stops_the_start_with_the_setting_named():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        metrics = ServiceMetrics("127.0.0.1", port, "INDEXER_METRICS_PORT")
        with pytest.raises(MetricsPortError, match="INDEXER_METRICS_PORT"):
            create_server(lambda _server: [], "127.0.0.1:0", metrics=metrics)


def test_port_zero_means_metrics_off():
    assert ServiceMetrics.for_port("127.0.0.1", 0, "GATEWAY_METRICS_PORT") is None
