"""The gateway's metrics over its real /metrics endpoint: catalogue size, readiness per
downstream (a shard going away shows as 0), client-side counts per downstream."""

from __future__ import annotations

import time

import pytest

from common.metrics import DEFAULT_PORTS
from scripts.stack import free_port
from services.embedder.config import EmbedderConfig
from services.gateway.config import GatewayConfig
from services.indexer.config import IndexerConfig
from tests.gateway.test_gateway_readiness import Stack
from tests.support.metrics import scrape, value

pytestmark = pytest.mark.timeout(120)


def test_readiness_per_downstream_and_catalogue_size(tmp_path):
    stack = Stack(tmp_path, metrics_port=free_port())
    try:
        port = stack.gateway.metrics.bound_port
        samples = scrape(port)
        assert value(samples, "gateway_catalogue_listings") == 0
        for downstream in ("embedder", "indexer shard 0", "indexer shard 1"):
            assert value(samples, "gateway_downstream_ready", downstream=downstream) == 1
        assert value(samples, "gateway_ready") == 1
        # the readiness probes themselves went through the instrumented channels
        assert (
            value(
                samples,
                "grpc_client_handled_total",
                downstream="indexer shard 1",
                grpc_method="Check",
                grpc_code="OK",
            )
            >= 1
        )

        stack.shards[1].stop(0)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            samples = scrape(port)
            if value(samples, "gateway_downstream_ready", downstream="indexer shard 1") == 0:
                break
            time.sleep(0.1)
        assert value(samples, "gateway_downstream_ready", downstream="indexer shard 1") == 0
        assert value(samples, "gateway_downstream_ready", downstream="indexer shard 0") == 1
        assert value(samples, "gateway_ready") == 0
    finally:
        stack.close()
    with pytest.raises(OSError):  # stopping the gateway closed its metrics endpoint
        scrape(port)


def test_metrics_ports_from_environment(monkeypatch, tmp_path):
    for name in ("GATEWAY_METRICS_PORT", "EMBEDDER_METRICS_PORT", "INDEXER_METRICS_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EMBEDDER_ARTIFACT_DIR", str(tmp_path))
    assert GatewayConfig.from_env([]).metrics_port == DEFAULT_PORTS["gateway"] == 9450
    assert EmbedderConfig.from_env([]).metrics_port == DEFAULT_PORTS["embedder"] == 9451
    assert IndexerConfig.from_env([]).metrics_port == DEFAULT_PORTS["indexer"] == 9452
    monkeypatch.setenv("GATEWAY_METRICS_PORT", "0")
    monkeypatch.setenv("EMBEDDER_METRICS_PORT", "19451")
    assert GatewayConfig.from_env([]).metrics_port == 0
    assert EmbedderConfig.from_env([]).metrics_port == 19451
    assert IndexerConfig.from_env(["--metrics-port", "19452"]).metrics_port == 19452
    monkeypatch.setenv("INDEXER_METRICS_PORT", "-1")
    with pytest.raises(SystemExit, match="INDEXER_METRICS_PORT"):
        IndexerConfig.from_env([])
    with pytest.raises(SystemExit, match="metrics_port"):
        GatewayConfig(metrics_port=70000)
