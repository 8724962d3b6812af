"""Scale-out with real processes on loopback: two indexer shards of two replicas each
(``python -m services.indexer`` processes, one FAISS thread each), the real embedder serving the
small pretrained test model, the gateway routing by INDEXER_SHARDS, real photos.

During a bounded mixed load (searches + AddListing/RemoveListing) one replica of each shard is
SIGKILLed and restarted: no search fails, no acknowledged write is lost, and the restarted
replicas converge to exactly their peers' contents. A brand-new empty replica added to a shard
converges and then serves."""

from __future__ import annotations

import time

import grpc
import pytest

from marketplace.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.embedder.config import EmbedderConfig
from services.embedder.server import start as start_embedder
from services.gateway.server import start as start_gateway
from tests.support.indexer_cluster import IndexerCluster, run_kill_scenario
from tests.support.photos import real_photos

pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, test_artifact):
    tmp_path = tmp_path_factory.mktemp("scaleout")
    embedder = start_embedder(
        EmbedderConfig.local(
            artifact_dir=test_artifact, host="127.0.0.1", port=0, text_model="off", model_workers=1
        )
    )
    cluster = IndexerCluster(tmp_path, shards=2, replicas=2, collections="image:1280:flat:ip")
    gateway = None
    try:
        cluster.wait_all_serving()
        gateway = start_gateway(cluster.gateway_config(tmp_path, embedder.port, readiness_timeout_s=1.0))
        gateways = [gateway]
        yield tmp_path, embedder, cluster, gateways
    finally:
        for running in gateways:
            running.stop(0)
        cluster.stop()
        embedder.stop(0)


def bootstrap_listings(stub, photos: list[bytes], count: int) -> list[str]:
    ids = []
    for n in range(count):
        reply = stub.AddListing(
            gateway_pb2.AddListingRequest(
                listing=gateway_pb2.Listing(id=f"seed-{n}", title=f"seed {n}", main_category="Appliances"),
                images=[photos[n % len(photos)]],
            ),
            timeout=30,
        )
        ids.append(reply.listing.id)
    return ids


def test_sigkill_one_replica_of_each_shard_under_mixed_load(stack):
    root, embedder, cluster, gateways = stack
    gateway = gateways[-1]
    photos = real_photos(6)
    with grpc.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        bootstrap_ids = bootstrap_listings(gateway_pb2_grpc.GatewayStub(channel), photos, 6)
    outcome = run_kill_scenario(
        cluster,
        f"127.0.0.1:{gateway.port}",
        photos,
        bootstrap_ids,
        duration_s=16,
        kill_at_s=4,
        restart_at_s=8,
    )
    print(outcome)
    assert outcome.searches > 20 and outcome.adds > 5 and outcome.removes > 1
    assert outcome.failed_searches == []
    assert outcome.failed_writes == []
    assert outcome.lost_writes == []
    assert outcome.mismatches == []


def test_a_brand_new_empty_replica_converges_then_serves(stack):
    root, embedder, cluster, gateways = stack
    photos = real_photos(4)
    # the gateways learn of the new replica first (it is down: writes skip it), then it starts
    fresh = cluster.add_replica(0)
    gateways[-1].stop(0)
    gateway = start_gateway(cluster.gateway_config(root, embedder.port, readiness_timeout_s=1.0))
    gateways.append(gateway)
    with grpc.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        more = [
            stub.AddListing(
                gateway_pb2.AddListingRequest(
                    listing=gateway_pb2.Listing(id=f"late-{n}", title="late", main_category="Appliances"),
                    images=[photos[n % len(photos)]],
                ),
                timeout=30,
            ).listing
            for n in range(4)
        ]
        cluster.start(fresh)
        converge_s = cluster.wait_serving(fresh)
        print(f"new replica serving after {converge_s:.1f}s")
        peer = cluster.replicas[0][0]
        time.sleep(1.0)
        assert cluster.count(fresh) == cluster.count(peer) > 0
        every = [i for listing in more for i in listing.image_ids]
        assert cluster.contents(fresh, every) == cluster.contents(peer, every)
        # and it serves reads: the gateway sees it SERVING
        deadline = time.monotonic() + 10
        replica = gateway.core.indexer.replica_sets[0].replicas[-1]
        while replica.state != "SERVING" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert replica.state == "SERVING"
