"""Replicas of one shard over real gRPC (in-process servers on real ports, durable data
directories): a replica that missed writes catches up from a serving peer's snapshot + WAL
before it serves, and data of another shard is refused naming both."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from marketplace.indexer.v1 import indexer_pb2 as pb
from marketplace.indexer.v1 import indexer_pb2_grpc
from scripts.stack import free_port
from services.indexer.config import IndexerConfig
from services.indexer.replication import ReplicaMismatch
from services.indexer.server import start
from services.indexer.spec import parse_collections
from tests.indexer.indexer_testutil import unit_vectors

D = 8


def config(
    data_dir: Path, port: int, peers: tuple[str, ...], shard: int = 0, count: int = 256, **overrides
) -> IndexerConfig:
    return IndexerConfig.local(
        host="127.0.0.1",
        port=port,
        data_dir=data_dir,
        log_level="info",
        collections=tuple(parse_collections(f"image:{D}:flat:ip")),
        collections_explicit=True,
        snapshot_seconds=0,
        fsync=False,
        shard=shard,
        partitions=count,
        peers=peers,
        **overrides,
    )


class Replica:
    def __init__(self, data_dir: Path, port: int, peers: tuple[str, ...], **kwargs) -> None:
        self.data_dir, self.port, self.peers, self.kwargs = data_dir, port, peers, kwargs
        self.server = start(config(data_dir, port, peers, **kwargs))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.indexer = indexer_pb2_grpc.IndexerStub(self.channel)
        self.replication = indexer_pb2_grpc.ReplicationStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def serving(self) -> bool:
        reply = self.health.Check(health_pb2.HealthCheckRequest(), timeout=2)
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def wait_serving(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.serving():
            assert time.monotonic() < deadline, self.replication.GetReplicaStatus(
                pb.GetReplicaStatusRequest(), timeout=2
            )
            time.sleep(0.05)

    def stop(self) -> None:
        self.channel.close()
        self.server.stop(0)


def items(prefix: str, n: int, seed: int) -> list[pb.Item]:
    vectors = unit_vectors(n, D, seed)
    return [
        pb.Item(
            id=f"{prefix}-{i}",
            vector=vectors[i].tolist(),
            attributes=pb.Attributes(listing_id=f"{prefix}-L{i // 2}", category="Music", price=float(i)),
        )
        for i in range(n)
    ]


def fetch_all(replica: Replica, ids: list[str]) -> dict[str, tuple]:
    reply = replica.indexer.Fetch(pb.FetchRequest(ids=ids), timeout=5)
    return {
        item.id: (tuple(item.vector), item.attributes.listing_id, item.attributes.price)
        for item in reply.items
    }


@pytest.fixture
def pair(tmp_path):
    ports = [free_port(), free_port()]
    addresses = [f"127.0.0.1:{p}" for p in ports]
    a = Replica(tmp_path / "a", ports[0], (addresses[1],))
    b = Replica(tmp_path / "b", ports[1], (addresses[0],))
    replicas = [a, b]
    yield replicas
    for replica in replicas:
        replica.stop()


def test_new_empty_replicas_serve_and_a_stale_one_catches_up(pair, tmp_path):
    a, b = pair
    a.wait_serving()
    b.wait_serving()
    first = items("x", 6, 1)
    for replica in pair:
        replica.indexer.Upsert(pb.UpsertRequest(items=first), timeout=5)
    # b goes down; a takes writes b misses (an upsert, a replace, a delete)
    b.stop()
    a.indexer.Upsert(pb.UpsertRequest(items=items("y", 5, 2)), timeout=5)
    a.indexer.Upsert(pb.UpsertRequest(items=items("x", 2, 3)), timeout=5)
    a.indexer.Delete(pb.DeleteRequest(ids=["x-5"]), timeout=5)
    b_again = Replica(b.data_dir, b.port, b.peers)
    pair[1] = b_again
    b_again.wait_serving()
    ids = [f"x-{i}" for i in range(6)] + [f"y-{i}" for i in range(5)]
    expected = fetch_all(a, ids)
    assert len(expected) == 10 and "x-5" not in expected
    assert fetch_all(b_again, ids) == expected
    status = b_again.replication.GetReplicaStatus(pb.GetReplicaStatusRequest(), timeout=2)
    assert (status.shard, status.partitions, status.state, status.items) == (0, 256, "serving", 10)


def test_catch_up_on_request_refuses_reads_meanwhile_and_keeps_new_writes(pair):
    a, b = pair
    a.wait_serving()
    b.wait_serving()
    a.indexer.Upsert(pb.UpsertRequest(items=items("z", 4, 4)), timeout=5)  # b missed it
    assert fetch_all(b, ["z-0"]) == {}
    reply = b.replication.CatchUp(pb.CatchUpRequest(), timeout=5)
    assert reply.state in ("catching_up", "serving")
    # a write arriving while b catches up is kept (journalled and re-applied over the copy)
    both = items("w", 2, 5)
    for replica in (a, b):
        replica.indexer.Upsert(pb.UpsertRequest(items=both), timeout=5)
    b.wait_serving()
    ids = [f"z-{i}" for i in range(4)] + ["w-0", "w-1"]
    assert fetch_all(b, ids) == fetch_all(a, ids)
    assert len(fetch_all(b, ids)) == 6


def test_reads_refused_while_no_peer_can_be_copied(tmp_path):
    dead_peer = f"127.0.0.1:{free_port()}"
    replica = Replica(tmp_path / "lonely", free_port(), (dead_peer,))
    try:
        time.sleep(0.5)
        assert not replica.serving()
        with pytest.raises(grpc.RpcError) as error:
            replica.indexer.Search(pb.SearchRequest(queries=[pb.Vector(values=[1.0] * D)], k=1), timeout=5)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "not serving yet" in error.value.details()
        # writes are still taken, and say the replica is catching up
        reply = replica.indexer.Upsert(pb.UpsertRequest(items=items("q", 1, 6)), timeout=5)
        assert reply.replica_catching_up
    finally:
        replica.stop()


def test_data_of_another_shard_is_refused_naming_both(tmp_path):
    first = Replica(tmp_path / "d", free_port(), (), shard=1, count=256)
    first.stop()
    with pytest.raises(ReplicaMismatch) as error:
        start(config(tmp_path / "d", free_port(), (), shard=0, count=256))
    assert "holds shard 1 of a 256-partition cluster" in str(
        error.value
    ) and "configured as shard 0 of a 256-partition cluster" in str(error.value)
    with pytest.raises(ReplicaMismatch, match="configured as shard 1 of a 64-partition"):
        start(config(tmp_path / "d", free_port(), (), shard=1, count=64))
