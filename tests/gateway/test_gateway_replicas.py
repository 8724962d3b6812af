"""Indexer shards with replicas behind the gateway, over real gRPC: real indexer servers
(durable data directories, replication on) as two shards of two replicas each, the fake
embedder (photos -> deterministic vectors; the embedder is not what is tested here).

Reads fail over to the other replica of a shard, writes reach every replica, a restarted
replica catches up before it serves, readiness needs one serving replica per shard, and a shard
with every replica down is UNAVAILABLE naming it, or left out and named with
allow_partial_results."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from marketplace.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from marketplace.indexer.v1 import indexer_pb2
from scripts.stack import free_port
from common.config import ConfigError
from services.gateway import cli
from services.gateway.client import GatewayClient
from services.gateway.config import GatewayConfig, RetryPolicy, shard_replicas_setting
from services.gateway.downstream import Deadline, IndexerShards
from services.gateway.server import SERVICE_NAME
from services.gateway.server import start as start_gateway
from services.gateway.shards import shard_of
from services.indexer.config import IndexerConfig
from services.indexer.server import start as start_indexer
from services.indexer.spec import parse_collections
from tests.gateway.gateway_fakes import DIM, FakeEmbedder, serve_embedder

SHARDS, REPLICAS = 2, 2


class ReplicatedStack:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ports = [[free_port() for _ in range(REPLICAS)] for _ in range(SHARDS)]
        self.indexers = [[self.start_replica(s, r) for r in range(REPLICAS)] for s in range(SHARDS)]
        self.embedder = serve_embedder(FakeEmbedder())
        shards = ";".join(
            f"{s}=" + "|".join(f"127.0.0.1:{p}" for p in ports) for s, ports in enumerate(self.ports)
        )
        self.config = GatewayConfig.local(
            host="127.0.0.1",
            port=0,
            db_path=root / "catalogue.sqlite3",
            embedder_addr=f"127.0.0.1:{self.embedder.port}",
            indexer_shards=shard_replicas_setting(shards, "127.0.0.1:50052"),
            downstream_timeout_s=5.0,
            retry=RetryPolicy(2, 0.01, 0.05),
            reconnect_backoff_max_s=0.2,
            readiness_interval_s=0.2,
            readiness_timeout_s=0.5,
        )
        self.gateway = start_gateway(self.config)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.gateway.port}")
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        for replicas in self.indexers:
            for replica in replicas:
                wait_until(lambda r=replica: r.store is not None and r.replicator.serving, 20)
        # and the gateway has seen every replica serve (so reads are spread over all of them)
        wait_until(lambda: all(r.state == "SERVING" for r in self.gateway.core.indexer.replicas), 10)

    def probe_rarely(self) -> None:
        """From now on readiness probes once a minute (and when a replica missed a write): reads,
        not a probe that a loaded machine happens to run first, are what find a stopped replica."""
        self.gateway.watch.interval_s = 60.0

    def start_replica(self, shard: int, replica: int):
        peers = tuple(f"127.0.0.1:{p}" for i, p in enumerate(self.ports[shard]) if i != replica)
        return start_indexer(
            IndexerConfig.local(
                host="127.0.0.1",
                port=self.ports[shard][replica],
                data_dir=self.root / f"shard{shard}-replica{replica}",
                log_level="info",
                collections=tuple(parse_collections(f"image:{DIM}:flat:ip")),
                collections_explicit=True,
                snapshot_seconds=0,
                fsync=False,
                shard=shard,
                partitions=256,
                peers=peers,
            )
        )

    def ready(self) -> str:
        reply = self.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=2)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def add(self, listing_id: str, photos: int = 2) -> gateway_pb2.Listing:
        request = gateway_pb2.AddListingRequest(
            listing=gateway_pb2.Listing(
                id=listing_id, title=f"title {listing_id}", main_category="Appliances", price=10.0
            ),
            images=[f"photo {listing_id} {i}".encode() for i in range(photos)],
        )
        return self.stub.AddListing(request, timeout=5).listing

    def contents(self, shard: int, replica: int, ids: list[str]) -> dict:
        store = self.indexers[shard][replica].store
        items, _ = store.fetch("image", ids)
        return {i.id: (i.vector.tobytes(), i.attributes) for i in items}

    def close(self) -> None:
        self.channel.close()
        self.gateway.stop(0)
        self.embedder.stop(0)
        for replicas in self.indexers:
            for replica in replicas:
                replica.stop(0)


def wait_until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture
def stack(tmp_path):
    s = ReplicatedStack(tmp_path)
    yield s
    s.close()


def listing_on(shard: int, prefix: str) -> str:
    return next(f"{prefix}-{i}" for i in range(1000) if shard_of(f"{prefix}-{i}", SHARDS) == shard)


def test_writes_reach_every_replica_and_reads_spread_over_them(stack):
    added = [stack.add(f"L-{i}") for i in range(6)]
    for listing in added:
        shard = shard_of(listing.id, SHARDS)
        ids = list(listing.image_ids)
        assert stack.contents(shard, 0, ids) == stack.contents(shard, 1, ids)
        assert len(stack.contents(shard, 0, ids)) == 2
    before = [[r.store.stats()[0]["count"] for r in replicas] for replicas in stack.indexers]
    assert sum(map(sum, before)) == 2 * 12  # every photo on both replicas of its shard
    served = {}
    for _ in range(8):
        reply = stack.stub.SimilarListings(
            gateway_pb2.SimilarListingsRequest(listing_id=added[0].id, k=5), timeout=5
        )
        assert len(reply.results) == 5 and not reply.missing_shards
    for replicas in stack.gateway.core.indexer.replica_sets:
        served[replicas.shard] = [r.state for r in replicas.replicas]
    assert all(state == ["SERVING", "SERVING"] for state in served.values())


def test_a_dead_replica_is_failed_over_and_catches_up_when_back(stack, caplog):
    caplog.set_level(logging.INFO, logger="services.gateway.downstream")
    stack.probe_rarely()
    added = [stack.add(f"A-{i}") for i in range(4)]
    for shard in range(SHARDS):
        stack.indexers[shard][0].stop(0)
    # every read still answers (the first try of half of them hits a dead replica)
    for _ in range(6):
        reply = stack.stub.SimilarListings(
            gateway_pb2.SimilarListingsRequest(listing_id=added[0].id, k=3), timeout=5
        )
        assert len(reply.results) == 3 and not reply.missing_shards
    # writes are acknowledged by the surviving replica; the dead one misses them
    fresh = [stack.add(f"B-{i}") for i in range(4)]
    removed = stack.stub.RemoveListing(gateway_pb2.RemoveListingRequest(listing_id=added[1].id), timeout=5)
    assert removed.images_removed == 2
    assert stack.ready() == "SERVING"  # one serving replica per shard is enough
    for shard in range(SHARDS):
        stack.indexers[shard][0] = stack.start_replica(shard, 0)
    for shard in range(SHARDS):
        wait_until(lambda s=shard: stack.indexers[s][0].replicator.serving, 30)
    ids = [i for listing in added + fresh for i in listing.image_ids]
    for shard in range(SHARDS):
        assert stack.contents(shard, 0, ids) == stack.contents(shard, 1, ids)
        assert (
            stack.indexers[shard][0].store.stats()[0]["count"]
            == stack.indexers[shard][1].store.stats()[0]["count"]
        )
    messages = [r.getMessage() for r in caplog.records]
    assert any("-> UNREACHABLE" in m for m in messages)
    assert any("answered UNAVAILABLE; asking" in m for m in messages)


def test_a_shard_with_every_replica_down(stack):
    added = [stack.add(f"C-{i}") for i in range(8)]
    down = shard_of(added[0].id, SHARDS)
    up_listing = next(listing for listing in added if shard_of(listing.id, SHARDS) != down)
    for replica in stack.indexers[down]:
        replica.stop(0)
    request = gateway_pb2.SimilarListingsRequest(listing_id=up_listing.id, k=5)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        stack.stub.SimilarListings(request, timeout=3)
    assert time.monotonic() - started < 3
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"indexer shard {down} unavailable" in error.value.details()
    request.allow_partial_results = True
    reply = stack.stub.SimilarListings(request, timeout=3)
    assert list(reply.missing_shards) == [down]
    assert reply.results and all(shard_of(r.listing.id, SHARDS) != down for r in reply.results)
    # the same through the Python client and the command line
    client = GatewayClient("unused", channel=stack.channel, timeout=3)
    answer = client.similar(up_listing.id, 5, allow_partial_results=True)
    assert answer.missing_shards == (down,) and not answer.complete
    assert [r.listing.id for r in answer] == [r.listing.id for r in reply.results]
    assert f"index shard {down} is unavailable" in answer.notice
    by_photo = client.search_by_image(f"photo {up_listing.id} 0".encode(), 3, allow_partial_results=True)
    assert by_photo.missing_shards == (down,) and by_photo[0].listing.id == up_listing.id
    with pytest.raises(grpc.RpcError) as error:
        client.search_by_image(f"photo {up_listing.id} 0".encode(), 3)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    printed = cli.run(
        cli.build_parser().parse_args(["similar", up_listing.id, "-k", "5", "--allow-partial-results"]),
        client,
    )
    assert printed.splitlines()[-1] == answer.notice and up_listing.id not in printed
    assert all(r.listing.id in printed for r in answer)
    wait_until(lambda: stack.ready() == "NOT_SERVING", 5)
    # a write to the dead shard is refused (no replica took it), never acknowledged
    with pytest.raises(grpc.RpcError) as error:
        stack.add(listing_on(down, "D"))
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"indexer shard {down}" in error.value.details()


def test_indexer_shards_parse_errors():
    assert shard_replicas_setting("0=a:1|b:1;1=c:1", "127.0.0.1:50052") == (("a:1", "b:1"), ("c:1",))
    for bad, message in [
        ("0=a:1;2=b:1", "no shard 1"),
        ("0=a:1|a:1", "twice in shard 0"),
        ("0=a:1;1=a:1", "in shards 0 and 1"),
        ("0=", "no replica"),
        ("x=a:1", "is not shard=target"),
    ]:
        with pytest.raises(ConfigError, match=message):
            shard_replicas_setting(bad, "127.0.0.1:50052")
    with pytest.raises(ConfigError, match="not both"):
        shard_replicas_setting("0=a:1", "b:1,c:1")


def test_stats_reach_one_replica_per_shard(stack):
    stats = stack.gateway.core.indexer.stats(Deadline(5))
    assert len(stats) == SHARDS and all(isinstance(s, indexer_pb2.GetStatsResponse) for s in stats)


def test_a_hung_replica_slows_neither_reads_nor_writes_for_long(tmp_path):
    """A replica that accepts connections and never answers (a cut-off host): reads move to the
    other replica after their share of the deadline, writes are acknowledged by the live
    replica after a short grace and the hung one is marked as having missed them."""
    import socket

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)  # never accepted, never answered
    live = start_indexer(
        IndexerConfig.local(
            host="127.0.0.1",
            port=0,
            data_dir=tmp_path / "live",
            log_level="info",
            collections=tuple(parse_collections(f"image:{DIM}:flat:ip")),
            collections_explicit=True,
            snapshot_seconds=0,
            fsync=False,
        )
    )
    embedder = serve_embedder(FakeEmbedder())
    spec = f"0=127.0.0.1:{hole.getsockname()[1]}|127.0.0.1:{live.port}"
    gateway = start_gateway(
        GatewayConfig.local(
            host="127.0.0.1",
            port=0,
            db_path=tmp_path / "catalogue.sqlite3",
            embedder_addr=f"127.0.0.1:{embedder.port}",
            indexer_shards=shard_replicas_setting(spec, "127.0.0.1:50052"),
            downstream_timeout_s=5.0,
            retry=RetryPolicy(1, 0.01, 0.05),
            readiness_interval_s=0,
        )
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            for _ in range(2):  # reads rotate over the replicas: one of these asks the hung one
                started = time.monotonic()
                stub.SearchByImage(gateway_pb2.SearchByImageRequest(image=b"photo", k=1), timeout=4)
                assert time.monotonic() - started < 3.9
            assert gateway.core.indexer.replica_sets[0].replicas[0].state == "UNREACHABLE"
            started = time.monotonic()
            listing = stub.AddListing(
                gateway_pb2.AddListingRequest(
                    listing=gateway_pb2.Listing(id="H-1", title="hung", main_category="Appliances"),
                    images=[b"photo H-1"],
                ),
                timeout=6,
            ).listing
            assert time.monotonic() - started < 3.5
            hung = gateway.core.indexer.replica_sets[0].replicas[0]
            assert hung.state == "MISSED_WRITES"
            for _ in range(3):  # never read from the replica that missed writes
                started = time.monotonic()
                reply = stub.SimilarListings(
                    gateway_pb2.SimilarListingsRequest(listing_id=listing.id, k=1), timeout=6
                )
                assert time.monotonic() - started < 1.5 and not reply.missing_shards
    finally:
        gateway.stop(0)
        embedder.stop(0)
        live.stop(0)
        hole.close()


def test_reads_rotate_over_usable_replicas_and_never_reach_one_that_missed_writes():
    shards = IndexerShards([("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3")], RetryPolicy())
    try:
        replicas = shards.replica_sets[0]
        firsts = [replicas.read_order()[0].number for _ in range(6)]
        assert firsts == [0, 1, 2, 0, 1, 2]
        a, b, c = replicas.replicas
        b.set_state("UNREACHABLE", "test")
        c.set_state("MISSED_WRITES", "test")
        orders = [[r.number for r in replicas.read_order()] for _ in range(3)]
        assert all(order == [0, 1] for order in orders)  # usable first, stale never
    finally:
        shards.close()
