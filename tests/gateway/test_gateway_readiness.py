"""The gateway's health entries over real gRPC: "" stays SERVING while the process runs, the
Gateway service's entry follows the embedder and the indexer shards (`services.gateway.readiness`)."""

from __future__ import annotations

import logging
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gateway.config import GatewayConfig, RetryPolicy
from services.gateway.server import SERVICE_NAME, start
from tests.gateway.gateway_fakes import FakeEmbedder, FakeIndexer, serve_embedder, serve_indexer


class Stack:
    def __init__(self, tmp_path, **overrides):
        self.embedder = serve_embedder(FakeEmbedder())
        self.shards = [serve_indexer(FakeIndexer()), serve_indexer(FakeIndexer())]
        self.shard_ports = [s.port for s in self.shards]
        settings = dict(
            host="127.0.0.1",
            port=0,
            db_path=tmp_path / "catalogue.sqlite3",
            embedder_addr=f"127.0.0.1:{self.embedder.port}",
            indexer_addrs=tuple(f"127.0.0.1:{p}" for p in self.shard_ports),
            retry=RetryPolicy(1, 0.01, 0.01),
            reconnect_backoff_max_s=0.2,
            readiness_interval_s=0.1,
            readiness_timeout_s=0.5,
        )
        settings.update(overrides)
        self.gateway = start(GatewayConfig.local(**settings))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.gateway.port}")
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def status(self, service: str = SERVICE_NAME) -> str:
        reply = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_for(self, status: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while (seen := self.status()) != status and time.monotonic() < deadline:
            time.sleep(0.05)
        return seen

    def close(self) -> None:
        self.channel.close()
        self.gateway.stop(0)
        for server in [self.embedder, *self.shards]:
            server.stop(0)


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path)
    yield s
    s.close()


def test_ready_when_every_downstream_serves(stack):
    assert stack.status() == "SERVING"
    assert stack.status("") == "SERVING"
    assert stack.gateway.watch.problems == []


def test_dead_shard_makes_the_gateway_not_ready_and_back(stack, caplog):
    caplog.set_level(logging.INFO, logger="services.gateway.readiness")
    stack.shards[1].stop(0)
    assert stack.wait_for("NOT_SERVING") == "NOT_SERVING"
    assert stack.status("") == "SERVING"  # liveness: the process still answers
    assert any(
        f"indexer shard 1 at 127.0.0.1:{stack.shard_ports[1]}: UNAVAILABLE" in r.getMessage()
        for r in caplog.records
    )
    # the shard comes back on its port: ready again without restarting the gateway
    stack.shards[1] = serve_indexer(FakeIndexer(), f"127.0.0.1:{stack.shard_ports[1]}")
    assert stack.wait_for("SERVING") == "SERVING"
    assert any("ready again" in r.getMessage() for r in caplog.records)


def test_embedder_reporting_not_serving_is_named(stack):
    stack.embedder.set_serving(False)
    assert stack.wait_for("NOT_SERVING") == "NOT_SERVING"
    assert stack.gateway.watch.problems == [f"embedder at 127.0.0.1:{stack.embedder.port}: NOT_SERVING"]


def test_not_ready_from_the_start_when_a_downstream_is_missing(tmp_path):
    s = Stack(tmp_path, embedder_addr="127.0.0.1:1")
    try:
        assert s.status() == "NOT_SERVING"  # decided before start() returned
        assert s.status("") == "SERVING"
    finally:
        s.close()


def test_readiness_checks_can_be_turned_off(tmp_path):
    s = Stack(tmp_path, embedder_addr="127.0.0.1:1", readiness_interval_s=0)
    try:
        assert s.gateway.watch is None
        assert s.status() == "SERVING"
    finally:
        s.close()


def test_stop_ends_the_watch(stack):
    watch = stack.gateway.watch
    assert watch._thread.is_alive()
    watch.stop()
    assert not watch._thread.is_alive()
    stack.shards[0].stop(0)
    time.sleep(0.3)  # several intervals: nobody flips the entry any more
    assert stack.status() == "SERVING"
