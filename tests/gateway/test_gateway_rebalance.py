"""Resharding without a re-index: 2 -> 3 shards with `services.gateway.rebalance` while searches
run, over real indexer servers (durable, one replica per shard) and a gateway routing by the
versioned shard map kept in the catalogue database (SQLite and a real PostgreSQL); an interrupted
rebalance is finished by running it again; the shard map store refuses inconsistent versions and
lets only one of two writers advance the map."""

from __future__ import annotations

import threading
from collections import Counter

import grpc
import pytest

from common.shard_map import (
    ShardMap,
    ShardMapConflict,
    ShardMapError,
    initial,
    partition_of,
    plan,
    rendezvous_owner,
)
from marketplace.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from scripts.stack import free_port
from services.gateway.catalogue import Catalogue
from services.gateway.config import GatewayConfig, RetryPolicy
from services.gateway.rebalance import Rebalancer
from services.gateway.server import start as start_gateway
from services.gateway.shards import ShardRouting, shard_of
from services.indexer.config import IndexerConfig
from services.indexer.server import start as start_indexer
from services.indexer.spec import parse_collections
from tests.gateway.gateway_fakes import DIM, FakeEmbedder, serve_embedder
from tests.support.services import start_shards


def test_initial_map_routes_like_the_hash_and_rendezvous_moves_a_third():
    two = initial(2)
    assert all(ShardRouting(2, two).shard_for(f"L{i}") == shard_of(f"L{i}", 2) for i in range(500))
    three = plan(two.owners, 3)
    moved = [p for p in range(256) if three[p] != two.owners[p]]
    assert all(three[p] == 2 for p in moved)  # only to the new shard
    assert 0.25 < len(moved) / 256 < 0.42
    assert plan(three, 3) == three
    assert all(rendezvous_owner(p, 3) == three[p] for p in moved)


def test_shard_map_store_refuses_inconsistent_maps(catalogue_url):
    with Catalogue.open(catalogue_url) as catalogue:
        store = catalogue.shard_map_store()
        assert store.latest() is None
        store.publish(initial(2, 8))
        with pytest.raises(ShardMapConflict, match="version 1 already exists"):
            store.publish(initial(2, 8))
        with pytest.raises(ShardMapConflict, match="version 3 cannot follow v1"):
            store.publish(initial(2, 8).next().next())
        with pytest.raises(ShardMapError, match="every partition needs a shard"):
            ShardMap(2, 8, (0, 1, 0))
        with pytest.raises(ShardMapError, match="partition with no shard"):
            ShardMap(2, 4, (0, 1, -1, 0))
        # a row whose body claims another version (written by hand, or by a broken tool)
        with catalogue._db.transaction() as tx:
            tx.execute(
                "INSERT INTO shard_maps (version, state, body, created_at) VALUES (?, ?, ?, ?)",
                (
                    2,
                    "stable",
                    '{"version": 1, "partitions": 8, "state": "stable", "owners": [0,1,0,1,0,1,0,1]}',
                    0.0,
                ),
            )
        with pytest.raises(ShardMapError, match="two maps claim one version"):
            store.latest()
        with catalogue._db.transaction() as tx:
            tx.execute(
                "INSERT INTO shard_maps (version, state, body, created_at) VALUES (?, ?, ?, ?)",
                (3, "stable", '{"version": 3, "partitions": 8, "state": "stable", "owners": [0,1,0]}', 0.0),
            )
        with pytest.raises(ShardMapError, match="v3 .* every partition needs a shard"):
            store.latest()
    routing = ShardRouting(2)
    with pytest.raises(ShardMapError, match="only shards 0..1 are configured"):
        routing.use(ShardMap(1, 4, (0, 1, 2, 0)))


def test_two_writers_of_one_version_one_wins(catalogue_url):
    """Compare-and-set: rebalances racing to publish the same next version (separate
    connections, as separate commands would have) -> exactly one succeeds, the rest conflict."""
    with Catalogue.open(catalogue_url) as catalogue:
        catalogue.shard_map_store().publish(initial(2, 8))
    opened = [Catalogue.open(catalogue_url) for _ in range(4)]
    outcomes: list[str] = []
    start = threading.Barrier(len(opened))

    def publish(catalogue: Catalogue, shard: int) -> None:
        store = catalogue.shard_map_store()
        current = store.latest()
        start.wait()
        try:
            store.publish(current.next(state="migrating", moves={0: shard}))
            outcomes.append("published")
        except ShardMapConflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=publish, args=(c, n % 2)) for n, c in enumerate(opened)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert sorted(outcomes) == ["conflict"] * 3 + ["published"]
        assert opened[0].shard_map_store().versions() == [1, 2]
    finally:
        for catalogue in opened:
            catalogue.close()


class Cluster:
    """Three real indexer shards (shard 2 empty and unused at first) behind a gateway whose
    shard map places every partition on shards 0 and 1."""

    def __init__(self, root, db_url: str, listings: int = 30) -> None:
        self.root = root
        self.db_url = db_url
        self._opened: list[Catalogue] = []
        with Catalogue.open(db_url) as catalogue:
            catalogue.shard_map_store().publish(initial(2))
        self.indexers = [
            start_indexer(
                IndexerConfig.local(
                    host="127.0.0.1",
                    port=free_port(),
                    data_dir=root / f"shard{s}",
                    log_level="info",
                    collections=tuple(parse_collections(f"image:{DIM}:flat:ip")),
                    collections_explicit=True,
                    snapshot_seconds=0,
                    fsync=False,
                    shard=s,
                    partitions=256,
                )
            )
            for s in range(3)
        ]
        self.embedder = serve_embedder(FakeEmbedder())
        self.replicas = tuple((f"127.0.0.1:{i.port}",) for i in self.indexers)
        self.gateway = start_gateway(
            GatewayConfig.local(
                host="127.0.0.1",
                port=0,
                db_path=db_url,
                embedder_addr=f"127.0.0.1:{self.embedder.port}",
                indexer_shards=self.replicas,
                downstream_timeout_s=5.0,
                retry=RetryPolicy(2, 0.01, 0.05),
                readiness_interval_s=0,
                shard_map=True,
                shard_map_poll_s=0.1,
            )
        )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.gateway.port}")
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        self.listings = [self.add(f"R-{i}") for i in range(listings)]

    def add(self, listing_id: str) -> gateway_pb2.Listing:
        return self.stub.AddListing(
            gateway_pb2.AddListingRequest(
                listing=gateway_pb2.Listing(id=listing_id, title=listing_id, main_category="Appliances"),
                images=[f"photo {listing_id} {j}".encode() for j in range(2)],
            ),
            timeout=5,
        ).listing

    def holders(self) -> Counter:
        """image id -> how many shards hold it."""
        held = Counter()
        for indexer in self.indexers:
            held.update(indexer.store.collection("image").ids())
        return held

    def store(self):
        """The shard map store on a connection of its own (as the rebalance command has)."""
        catalogue = Catalogue.open(self.db_url)
        self._opened.append(catalogue)
        return catalogue.shard_map_store()

    def rebalancer(self, say=print) -> Rebalancer:
        return Rebalancer(self.store(), self.replicas, write_token=None, settle_s=0.4, say=say)

    def close(self) -> None:
        for catalogue in self._opened:
            catalogue.close()
        self.channel.close()
        self.gateway.stop(0)
        self.embedder.stop(0)
        for indexer in self.indexers:
            indexer.stop(0)


@pytest.fixture
def cluster(tmp_path, catalogue_url):
    c = Cluster(tmp_path, catalogue_url)
    yield c
    c.close()


def test_rebalance_2_to_3_under_reads_and_writes(cluster):
    assert cluster.indexers[2].store.collection("image").count == 0
    failures, searches, added = [], [0], []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            for listing in cluster.listings[:6]:
                try:
                    reply = cluster.stub.SimilarListings(
                        gateway_pb2.SimilarListingsRequest(listing_id=listing.id, k=5), timeout=5
                    )
                    assert len(reply.results) == 5
                    searches[0] += 1
                except (grpc.RpcError, AssertionError) as exc:
                    failures.append(exc)

    def write() -> None:
        n = 0
        while not stop.is_set():
            added.append(cluster.add(f"W-{n}"))
            n += 1
            stop.wait(0.05)

    threads = [threading.Thread(target=read), threading.Thread(target=write)]
    for thread in threads:
        thread.start()
    try:
        report = cluster.rebalancer().run(3)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    print("searches", searches[0], "added during", len(added), report)
    assert not failures and searches[0] > 0 and added
    assert report.to_shards == 3 and 0.15 < report.moved_fraction < 0.55, report
    latest = cluster.store().latest()
    assert latest.state == "stable" and not latest.drop and latest.shards == 3
    held = cluster.holders()
    everything = cluster.listings + added
    for listing in everything:  # every listing on exactly its new owner, once
        owner = latest.owners[partition_of(listing.id, 256)]
        stored = cluster.indexers[owner].store.collection("image")
        assert all(stored.contains(i) and held[i] == 1 for i in listing.image_ids), listing.id
    assert sum(held.values()) == 2 * len(everything)
    assert cluster.indexers[2].store.collection("image").count > 0
    # searches now reach all three shards and find listings that moved
    moved = next(l for l in cluster.listings if latest.owners[partition_of(l.id, 256)] == 2)
    reply = cluster.stub.SearchByImage(
        gateway_pb2.SearchByImageRequest(image=f"photo {moved.id} 0".encode(), k=1), timeout=5
    )
    assert reply.results[0].listing.id == moved.id


def test_an_interrupted_rebalance_is_finished_by_running_it_again(cluster):
    first = cluster.rebalancer()
    published = []
    original = first._publish

    def publish_then_die(shard_map, report):
        result = original(shard_map, report)
        published.append(shard_map.state)
        if shard_map.state == "switched":
            raise KeyboardInterrupt("killed after switching")
        return result

    first._publish = publish_then_die
    with pytest.raises(KeyboardInterrupt):
        first.run(3)
    assert published == ["migrating", "switched"]
    assert max(cluster.holders().values()) == 2  # moved partitions are on two shards for now
    extra = cluster.add("after-interruption")
    report = cluster.rebalancer().run(3)
    assert report.vectors_dropped > 0
    held = cluster.holders()
    assert set(held.values()) == {1}
    assert sum(held.values()) == 2 * (len(cluster.listings) + 1)
    assert all(held[i] == 1 for i in extra.image_ids)
    again = cluster.rebalancer().run(3)  # a third run has nothing left to do
    assert again.moved_partitions == 0 and again.versions == []


def test_sigkill_of_the_rebalance_command_then_rerun(cluster):
    """The real command as a process, SIGKILLed once the map says `switched`; run again it
    finishes: every listing once, on its new owner."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": str(repo),
        "GATEWAY_DB": cluster.db_url,
        "INDEXER_SHARDS": ";".join(f"{s}={r[0]}" for s, r in enumerate(cluster.replicas)),
    }
    env.pop("INDEXER_ADDRS", None)
    command = [sys.executable, "-m", "services.gateway.rebalance", "--to", "3", "--settle-s", "1"]
    process = subprocess.Popen(
        command, env=env, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    store = cluster.store()

    def switched() -> bool:
        latest = store.latest()
        return latest.version >= 3 and latest.state == "switched"

    deadline = time.monotonic() + 120
    while not switched() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.kill()
    output = process.communicate()[0]
    assert switched(), output
    assert max(cluster.holders().values()) == 2  # copies on old and new owners for now
    rerun = subprocess.run(command, env=env, cwd=repo, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "rebalance done" in rerun.stdout
    held = cluster.holders()
    assert set(held.values()) == {1} and sum(held.values()) == 2 * len(cluster.listings)
    latest = store.latest()
    assert latest.state == "stable" and store.versions() == [1, 2, 3, 4, 5]
    for listing in cluster.listings:
        owner = latest.owners[partition_of(listing.id, 256)]
        assert all(cluster.indexers[owner].store.collection("image").contains(i) for i in listing.image_ids)


def test_a_replica_that_is_down_is_passed_over_and_any_other_error_stops_the_rebalance(tmp_path):
    (live,) = start_shards(tmp_path, f"image:{DIM}:flat:ip", count=1, shard=0, partitions=256)
    dead = f"127.0.0.1:{free_port()}"
    said: list[str] = []
    rebalancer = Rebalancer(
        None,
        [[dead, f"127.0.0.1:{live.port}"]],
        write_token=None,
        settle_s=0,
        rpc_timeout_s=10,
        say=said.append,
    )
    try:
        stable = ShardMap(2, 256, (0,) * 256, drop={0: (1, 2)})
        assert rebalancer._drop(stable) == 0  # nothing was indexed: nothing to drop, but it answered
        assert (
            f"  shard 0 replica {dead} is down: it catches up from a peer of its shard when it is back"
            in said
        )
        assert any(
            f"shard 0 replica 127.0.0.1:{live.port}: dropped 0 vector(s) of 2 partition(s)" in s for s in said
        )
        with pytest.raises(
            ShardMapError, match=rf"drop on shard 0 replica 127.0.0.1:{live.port} failed: INVALID_ARGUMENT"
        ):
            rebalancer._drop(ShardMap(2, 256, (0,) * 256, drop={0: (300,)}))
    finally:
        rebalancer.close()
        live.stop(0)
