"""The gateway's replica metrics on its real /metrics endpoint, with real indexer replicas
(`test_gateway_replicas.ReplicatedStack`): failovers and partial results are counted by shard,
each replica's state and readiness are exported, and the client metrics name every replica."""

from __future__ import annotations

from dataclasses import replace

import grpc
import pytest

from marketplace.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from scripts.stack import free_port
from services.gateway.server import start as start_gateway
from services.gateway.shards import shard_of
from tests.gateway.test_gateway_replicas import SHARDS, ReplicatedStack, wait_until
from tests.support.metrics import scrape, value

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def stack(tmp_path):
    s = ReplicatedStack(tmp_path)
    s.channel.close()
    s.gateway.stop(0)  # the same gateway again, with its metrics served
    s.config = replace(s.config, metrics_port=free_port())
    s.gateway = start_gateway(s.config)
    s.channel = grpc.insecure_channel(f"127.0.0.1:{s.gateway.port}")
    s.stub = gateway_pb2_grpc.GatewayStub(s.channel)
    wait_until(lambda: all(r.state == "SERVING" for r in s.gateway.core.indexer.replicas), 10)
    s.probe_rarely()
    yield s
    s.close()


def test_failovers_partial_results_and_replica_states(stack):
    port = stack.gateway.metrics.bound_port
    samples = scrape(port)
    replicas = stack.gateway.core.indexer.replicas
    assert len(replicas) == SHARDS * 2
    for replica in replicas:
        where = dict(downstream=replica.downstream.name, target=replica.downstream.target)
        assert value(samples, "gateway_downstream_ready", **where) == 1
        assert value(samples, "gateway_indexer_replica_state", state="SERVING", **where) == 1
        assert value(samples, "gateway_indexer_replica_state", state="UNREACHABLE", **where) == 0

    added = [stack.add(f"M-{i}") for i in range(8)]
    for shard in range(SHARDS):
        stack.indexers[shard][0].stop(0)
    for _ in range(6):  # each read still answers; some first tries hit a dead replica
        reply = stack.stub.SimilarListings(
            gateway_pb2.SimilarListingsRequest(listing_id=added[0].id, k=3), timeout=5
        )
        assert len(reply.results) == 3 and not reply.missing_shards
    samples = scrape(port)
    failovers = sum(
        value(samples, "gateway_indexer_failovers_total", shard=str(shard), code="UNAVAILABLE")
        for shard in range(SHARDS)
    )
    assert failovers >= 1
    dead = [r for r in replicas if r.number == 0]
    for replica in dead:
        wait_until(lambda r=replica: r.state != "SERVING", 5)
    samples = scrape(port)
    for replica in dead:
        where = dict(downstream=replica.downstream.name, target=replica.downstream.target)
        assert value(samples, "gateway_downstream_ready", **where) == 0
        assert value(samples, "gateway_indexer_replica_state", state="SERVING", **where) == 0
    # the calls that failed over are in the client metrics of the dead replica's channel
    assert (
        sum(
            value(
                samples,
                "grpc_client_handled_total",
                downstream=r.downstream.name,
                target=r.downstream.target,
                grpc_method="Search",
                grpc_code="UNAVAILABLE",
            )
            for r in dead
        )
        >= 1
    )

    down = shard_of(added[0].id, SHARDS)
    up_listing = next(listing for listing in added if shard_of(listing.id, SHARDS) != down)
    stack.indexers[down][1].stop(0)
    reply = stack.stub.SimilarListings(
        gateway_pb2.SimilarListingsRequest(listing_id=up_listing.id, k=5, allow_partial_results=True),
        timeout=5,
    )
    assert list(reply.missing_shards) == [down]
    samples = scrape(port)
    assert value(samples, "gateway_partial_results_total", shard=str(down)) == 1
    assert value(samples, "gateway_partial_results_total", shard=str(1 - down)) == 0
    method = dict(grpc_service="marketplace.gateway.v1.Gateway", grpc_method="SimilarListings")
    assert value(samples, "grpc_server_handled_total", grpc_code="OK", **method) == 7
