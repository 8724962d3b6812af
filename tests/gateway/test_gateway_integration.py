"""The gateway against the real services: the embedder serving the small real model (pretrained
EfficientNet-Lite0, `test_artifact`), two indexer shards and the gateway, all real gRPC servers on
ephemeral ports, with a catalogue of 26 real listings (2 per main category, 45 real photos) loaded
with `Catalogue.load_prepared` and indexed through gRPC with `index_catalogue`'s functions.

The servers run in-process (`start(config)`), so the "embedder dies" test stops the embedder's
server and starts a new one on the same port (keeping the loaded model, so it takes no model
reload). `test_killed_embedder_process...` (slow) does the same with a real embedder process
killed with SIGKILL and started again.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import grpc
import pandas as pd
import pytest

from marketplace.gateway.v1 import gateway_pb2
from marketplace.indexer.v1 import indexer_pb2, indexer_pb2_grpc
from scripts.stack import free_port, spawn, wait_healthy
from services.embedder.config import EmbedderConfig
from services.embedder.server import start as start_embedder
from services.gateway.client import GatewayClient
from services.gateway.config import GatewayConfig, RetryPolicy
from services.gateway.downstream import Deadline
from services.gateway.index_catalogue import embed_prepared, index_embeddings
from services.gateway.server import start as start_gateway
from tests.gateway.gateway_data import make_mini_prepared, outside_photos, shared_data_dir
from tests.support.services import start_shards

IMAGE_COLLECTION_SPEC = "image:1280:flat:ip"

pytestmark = pytest.mark.timeout(300)


def spawn_embedder(port: int, root: Path, artifact: Path):
    return spawn(
        "embedder",
        port,
        root / "embedder.log",
        {"EMBEDDER_ARTIFACT_DIR": str(artifact), "LOG_LEVEL": "warning", "EMBEDDER_TEXT_MODEL": "off"},
    )


def gateway_config(
    root: Path, embedder_addr: str, shards, bootstrap_dir: Path | None = None
) -> GatewayConfig:
    return GatewayConfig.local(
        host="127.0.0.1",
        port=0,
        db_path=root / "catalogue.sqlite3",
        bootstrap_dir=bootstrap_dir,
        embedder_addr=embedder_addr,
        indexer_addrs=tuple(f"127.0.0.1:{s.port}" for s in shards),
        downstream_timeout_s=30.0,
        retry=RetryPolicy(3, 0.05, 0.2),
        reconnect_backoff_max_s=1.0,
    )


@pytest.fixture(scope="module")
def real(tmp_path_factory, test_artifact):
    root = tmp_path_factory.mktemp("gateway_real")
    prepared = make_mini_prepared(root / "prepared", per_category=2)
    # Images only: text search has its own servers in test_text_integration.py.
    embedder_config = EmbedderConfig.local(
        artifact_dir=test_artifact, host="127.0.0.1", port=0, text_model="off"
    )
    embedder = start_embedder(embedder_config)
    embedder_config = replace(embedder_config, port=embedder.port)
    shards = start_shards(root, IMAGE_COLLECTION_SPEC)
    gateway = state = None
    try:
        config = gateway_config(root, f"127.0.0.1:{embedder.port}", shards, prepared)
        gateway = start_gateway(config)
        core = gateway.core
        ids, vectors = embed_prepared(prepared, core.catalogue, core.embedder, progress=False)
        report = index_embeddings(core.catalogue, core.indexer, ids, vectors, progress=False)
        assert report.upserted == len(ids) == 45 and len(report.per_shard) == 2
        state = SimpleNamespace(
            root=root,
            prepared=prepared,
            embedder=embedder,
            embedder_config=embedder_config,
            shards=shards,
            gateway=gateway,
            config=config,
            client=GatewayClient(f"127.0.0.1:{gateway.port}", timeout=30),
            listings=pd.read_csv(prepared / "listings.csv", dtype={"price": float}),
            images=pd.read_csv(prepared / "images.csv", dtype=str),
        )
        yield state
        state.client.close()
    finally:
        if gateway is not None:
            gateway.stop(0)
        for shard in shards:
            shard.stop(0)
        (state.embedder if state is not None else embedder).stop(0)


def listing_photo(real, listing_id: str, index: int = 0) -> tuple[str, bytes]:
    rows = real.images[real.images["product_id"] == listing_id].sort_values("image_id")
    row = rows.iloc[index]
    return row["image_id"], Path(row["path"]).read_bytes()


def test_catalogue_was_bootstrapped_from_prepared_data(real):
    catalogue = real.gateway.core.catalogue
    assert catalogue.count() == 26 and catalogue.count_images() == 45
    some = real.listings.iloc[0]
    got = real.client.get(some["product_id"])
    assert (got.title, got.location, got.main_category, got.price) == (
        some["title"],
        some["location"],
        some["main_category"],
        some["price"],
    )


def test_search_by_a_catalogue_photo_returns_its_own_listing_first(real):
    for listing_id in real.listings["product_id"].iloc[::5]:
        image_id, photo = listing_photo(real, listing_id)
        results = real.client.search_by_image(photo, k=5)
        assert len(results) == 5 and [r.rank for r in results] == [1, 2, 3, 4, 5]
        top = results[0]
        assert (top.listing.id, top.matched_image_id) == (listing_id, image_id)
        assert top.score == pytest.approx(1.0, abs=1e-3)
        assert len({r.listing.id for r in results}) == 5  # one entry per listing
        assert all(a.score >= b.score for a, b in zip(results, results[1:]))
        assert top.listing.title and top.listing.main_category


def test_filters_hold(real):
    _, photo = listing_photo(real, real.listings["product_id"].iloc[3])
    by_category = real.client.search_by_image(photo, k=10, main_category="Appliances")
    assert len(by_category) == 2 and {r.listing.main_category for r in by_category} == {"Appliances"}

    priced = real.client.search_by_image(photo, k=50, min_price=20, max_price=70)
    expected = real.listings[(real.listings["price"] >= 20) & (real.listings["price"] <= 70)]
    assert {r.listing.id for r in priced} == set(expected["product_id"])
    assert all(20 <= r.listing.price <= 70 for r in priced)

    leicester = real.client.search_by_image(photo, k=10, location="Leicester, Leicestershire")
    assert {r.listing.location for r in leicester} == {"Leicester, Leicestershire"} and len(leicester) == 2

    everything = real.client.search_by_image(photo, k=50)
    assert len(everything) == 26
    excluded = [r.listing.id for r in everything[:3]]
    rest = real.client.search_by_image(photo, k=50, exclude=excluded)
    assert [r.listing.id for r in rest] == [r.listing.id for r in everything[3:]]

    cheap_home = real.client.search_by_image(photo, k=10, main_category="Home & Garden", max_price=10)
    assert [(r.listing.main_category, r.listing.price) for r in cheap_home] == [("Home & Garden", 0.0)]


def test_bad_requests(real):
    def code_and_details(**kwargs):
        with pytest.raises(grpc.RpcError) as raised:
            real.client.stub.SearchByImage(gateway_pb2.SearchByImageRequest(**kwargs), timeout=30)
        return raised.value.code(), raised.value.details()

    code, details = code_and_details(image=b"this is not a photo")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "image" in details.lower()
    assert code_and_details(image=b"")[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, details = code_and_details(image=b"x", filter=gateway_pb2.ListingFilter(main_category="Cars"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "Home & Garden" in details  # lists known ones


def test_classify_image(real):
    _, photo = listing_photo(real, real.listings["product_id"].iloc[0])
    result = real.client.classify(photo, top_k=3)
    probabilities = [c.probability for c in result.categories]
    assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
    assert 0 < sum(probabilities) <= 1.0 + 1e-5 and result.model_version.startswith("efficientnet_lite0")


def test_similar_listings(real):
    listing_id = real.listings["product_id"].iloc[7]
    results = real.client.similar(listing_id, k=5)
    assert len(results) == 5 and listing_id not in {r.listing.id for r in results}
    assert all(r.matched_image_id for r in results)
    assert all(a.score >= b.score for a, b in zip(results, results[1:]))


def test_add_then_search_finds_it_then_remove_and_it_is_gone(real):
    photos = [p.read_bytes() for p in outside_photos(real.prepared, 2)]
    before = real.gateway.core.catalogue.count()
    added = real.client.add(
        photos,
        title="Test listing",
        price=12.5,
        location="York, North Yorkshire",
        description="added by the integration test",
    )
    assert added.main_category in real.gateway.core.embedder.model_info(Deadline(5)).categories
    assert len(added.image_ids) == 2 and real.gateway.core.catalogue.count() == before + 1

    top = real.client.search_by_image(photos[1], k=3)[0]
    assert (top.listing.id, top.matched_image_id) == (added.id, added.image_ids[1])
    assert top.listing.price == 12.5 and top.score == pytest.approx(1.0, abs=1e-3)
    in_york = real.client.search_by_image(photos[0], k=5, location="York, North Yorkshire")
    assert [r.listing.id for r in in_york] == [added.id]

    removed = real.client.remove(added.id)
    assert removed.images_removed == 2
    assert added.id not in {r.listing.id for r in real.client.search_by_image(photos[1], k=26)}
    with pytest.raises(grpc.RpcError) as raised:
        real.client.get(added.id)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    shard = real.shards[real.gateway.core.indexer.shard_for(added.id)]
    with grpc.insecure_channel(f"127.0.0.1:{shard.port}") as channel:
        fetched = indexer_pb2_grpc.IndexerStub(channel).Fetch(
            indexer_pb2.FetchRequest(ids=list(added.image_ids)), timeout=10
        )
    assert list(fetched.not_found) == list(added.image_ids)
    assert real.gateway.core.catalogue.count() == before


def assert_unavailable_fast(client: GatewayClient, photo: bytes, embedder_address: str) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        client.search_by_image(photo, k=1, timeout=5)
    elapsed = time.monotonic() - started
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert raised.value.details().startswith(f"embedder at {embedder_address} unavailable")
    assert elapsed < 2.5  # well inside the 5 s deadline: no hang, a few quick retries


def wait_until_recovered(client: GatewayClient, photo: bytes, within_s: float = 10.0):
    since = time.monotonic()
    while True:
        try:
            return client.search_by_image(photo, k=1, timeout=10)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - since < within_s, "the gateway did not reconnect to the embedder"
            time.sleep(0.2)


def test_dead_embedder_is_unavailable_within_the_deadline_and_the_gateway_recovers(real):
    listing_id = real.listings["product_id"].iloc[1]
    _, photo = listing_photo(real, listing_id)
    assert real.client.search_by_image(photo, k=1)
    count = real.gateway.core.catalogue.count()
    real.embedder.grpc_server.stop(0).wait()  # the embedder goes away (its model stays loaded)

    assert_unavailable_fast(real.client, photo, f"127.0.0.1:{real.embedder.port}")
    with pytest.raises(grpc.RpcError) as raised:  # a write fails cleanly too, nothing half-added
        real.client.add([photo], title="while the embedder is down", timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert real.gateway.core.catalogue.count() == count
    assert real.client.get(listing_id).id == listing_id  # catalogue reads still work

    real.embedder = start_embedder(real.embedder_config, core=real.embedder.core)  # same port
    results = wait_until_recovered(real.client, photo, within_s=5.0)
    assert results[0].listing.id == listing_id


@pytest.mark.slow
def test_killed_embedder_process_is_unavailable_and_the_gateway_recovers(tmp_path, test_artifact):
    port = free_port()
    embedder = spawn_embedder(port, tmp_path, test_artifact)
    shards = start_shards(tmp_path, IMAGE_COLLECTION_SPEC)
    gateway = None
    try:
        wait_healthy(embedder.address, 180, embedder.process, embedder.log_path)
        gateway = start_gateway(gateway_config(tmp_path, embedder.address, shards))
        client = GatewayClient(f"127.0.0.1:{gateway.port}", timeout=30)
        photo = sorted((shared_data_dir() / "images").glob("*.jpg"))[0].read_bytes()
        assert client.search_by_image(photo, k=1) == []  # empty index, embedder answered
        embedder.kill()  # SIGKILL: no goodbye
        assert_unavailable_fast(client, photo, embedder.address)
        embedder = spawn_embedder(port, tmp_path, test_artifact)
        wait_healthy(embedder.address, 180, embedder.process, embedder.log_path)
        assert wait_until_recovered(client, photo) == []
        client.close()
    finally:
        if gateway is not None:
            gateway.stop(0)
        for shard in shards:
            shard.stop(0)
        embedder.stop()
