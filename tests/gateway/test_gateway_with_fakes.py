"""The gateway's orchestration over gRPC against fake embedder/indexer servers (milliseconds each):
filters reach the index, shards are fanned out and merged, writes are all or nothing, retries,
deadlines, round_robin and error codes. The same behaviour against the real services is in
test_gateway_integration.py."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from common.logs import REQUEST_ID_KEY
from marketplace.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from scripts.stack import free_port
from services.gateway.catalogue import CatalogueUnavailable
from services.gateway.client import GatewayClient
from services.gateway.config import GatewayConfig, RetryPolicy
from services.gateway.core import FIELD_LIMITS
from services.gateway.domain import Listing
from services.gateway.downstream import IndexItem
from services.gateway.server import start
from services.gateway.shards import shard_of
from tests.gateway.gateway_fakes import (
    CATEGORIES,
    FakeEmbedder,
    FakeIndexer,
    fake_vector,
    near,
    serve_embedder,
    serve_indexer,
)
from tests.support.postgres import PostgresCluster

# (id, main category, price, location, photos)
LISTINGS = [
    ("L-table", "Home & Garden", 40.0, "Leeds, West Yorkshire", 2),
    ("L-chair", "Home & Garden", 15.0, "Leeds, West Yorkshire", 1),
    ("L-kettle", "Appliances", 12.0, "Wokingham, Berkshire", 2),
    ("L-fridge", "Appliances", 150.0, "Leeds, West Yorkshire", 1),
    ("L-box", "Other Goods", None, "Bath, Somerset", 1),
    ("L-lamp", "Home & Garden", 8.0, "Bath, Somerset", 1),
]


def photo(listing_id: str, index: int = 0) -> bytes:
    return f"photo of {listing_id} #{index}".encode()


class Stack:
    def __init__(self, tmp_path, embedders: int = 1, write_token: str | None = None, **overrides):
        self.embedders = [FakeEmbedder(f"e{i}") for i in range(embedders)]
        self.embedder_servers = [serve_embedder(e) for e in self.embedders]
        self.indexers = [FakeIndexer(), FakeIndexer()]
        self.indexer_servers = [serve_indexer(i) for i in self.indexers]
        settings = dict(
            host="127.0.0.1",
            port=0,
            db_path=tmp_path / "catalogue.sqlite3",
            embedder_addr=",".join(f"127.0.0.1:{s.port}" for s in self.embedder_servers),
            indexer_addrs=tuple(f"127.0.0.1:{s.port}" for s in self.indexer_servers),
            downstream_timeout_s=5.0,
            retry=RetryPolicy(3, 0.01, 0.05),
            write_token=write_token,
            max_workers=8,
        )
        settings.update(overrides)
        self.config = GatewayConfig.local(**settings)
        self.gateway = start(self.config)
        self.address = f"127.0.0.1:{self.gateway.port}"
        self.client = GatewayClient(self.address, timeout=5.0, write_token=write_token or "")
        self.bootstrap()

    def bootstrap(self) -> None:
        catalogue = self.gateway.core.catalogue
        for listing_id, main, price, location, photos in LISTINGS:
            image_ids = tuple(f"{listing_id}-img{j}" for j in range(photos))
            catalogue.add(
                Listing(
                    listing_id,
                    f"Title of {listing_id}",
                    "",
                    f"{main} / x",
                    main,
                    price,
                    "GBP" if price is not None else "",
                    location,
                    image_ids,
                )
            )
            shard = self.indexers[shard_of(listing_id, 2)]
            for j, image_id in enumerate(image_ids):
                item = IndexItem(
                    image_id, fake_vector(photo(listing_id, j)), listing_id, main, price, location
                ).to_proto()
                shard.items[image_id] = (fake_vector(photo(listing_id, j)), item.attributes)

    def close(self) -> None:
        self.client.close()
        self.gateway.stop(0)
        for server in self.embedder_servers + self.indexer_servers:
            server.stop(0)


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path)
    yield s
    s.close()


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call(*args, **kwargs)
    return raised.value


def test_listings_are_on_both_shards(stack):
    assert all(len(indexer.items) > 0 for indexer in stack.indexers)


def test_search_by_own_photo_returns_own_listing_first(stack):
    results = stack.client.search_by_image(photo("L-kettle", 1), k=3)
    assert [r.rank for r in results] == [1, 2, 3]
    top = results[0]
    assert top.listing.id == "L-kettle" and top.matched_image_id == "L-kettle-img1"
    assert top.score == pytest.approx(1.0, abs=1e-5)
    assert top.listing.title == "Title of L-kettle" and top.listing.price == 12.0
    assert len({r.listing.id for r in results}) == 3  # one entry per listing
    assert all(a.score >= b.score for a, b in zip(results, results[1:]))
    for indexer in stack.indexers:  # fanned out to every shard, once each
        assert indexer.faults.calls["Search"] == 1


def test_search_merges_shards_into_the_global_ranking(stack):
    everything = stack.client.search_by_image(photo("L-table"), k=100)
    assert sorted(r.listing.id for r in everything) == sorted(row[0] for row in LISTINGS)
    top2 = stack.client.search_by_image(photo("L-table"), k=2)
    assert [r.listing.id for r in top2] == [r.listing.id for r in everything[:2]]


def test_filters_hold(stack):
    query = photo("L-table")
    appliances = stack.client.search_by_image(query, k=10, main_category="Appliances")
    assert {r.listing.id for r in appliances} == {"L-kettle", "L-fridge"}
    cheap = stack.client.search_by_image(query, k=10, min_price=10, max_price=40)
    assert {r.listing.id for r in cheap} == {"L-table", "L-chair", "L-kettle"}
    leeds = stack.client.search_by_image(query, k=10, location="Leeds, West Yorkshire", exclude=["L-table"])
    assert {r.listing.id for r in leeds} == {"L-chair", "L-fridge"}
    combined = stack.client.search_by_image(query, k=10, main_category="Home & Garden", max_price=10)
    assert [r.listing.id for r in combined] == ["L-lamp"]


def test_client_refuses_an_unknown_search_option(stack):
    """The searches share their keyword arguments (`SearchOptions`): a misspelt one is an error,
    not a filter silently dropped."""
    with pytest.raises(TypeError, match="max_prise"):
        stack.client.search_by_image(photo("L-table"), k=5, max_prise=10)
    with pytest.raises(TypeError, match="text_wieght"):
        stack.client.search(text="oak", text_wieght=0.5)


@pytest.mark.parametrize(
    "request_kwargs, message",
    [
        (dict(image=b"", k=5), "image is empty"),
        (dict(image=b"x", k=101), "k must be between 1 and 100"),
        (dict(image=b"x", filter=gateway_pb2.ListingFilter(min_price=5, max_price=1)), "greater than"),
        (dict(image=b"x", filter=gateway_pb2.ListingFilter(main_category="Cars")), "not a known category"),
        (dict(image=b"bad bytes"), "images[0] is not a decodable image"),  # embedder's message passed through
    ],
)
def test_search_invalid_arguments(stack, request_kwargs, message):
    error = rpc_error(
        stack.client.stub.SearchByImage, gateway_pb2.SearchByImageRequest(**request_kwargs), timeout=5
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()


def test_similar_listings_excludes_the_listing_and_merges_its_photos(stack):
    indexer = stack.indexers[shard_of("L-table", 2)]
    # Make a close look-alike of each of L-table's photos in two other listings.
    for other, index in (("L-lamp", 0), ("L-box", 1)):
        vector = near(photo("L-table", index), 5 + index)
        image_id = f"{other}-img0"
        indexer_of_other = stack.indexers[shard_of(other, 2)]
        indexer_of_other.items[image_id] = (vector, indexer_of_other.items[image_id][1])
    results = stack.client.similar("L-table", k=3)
    ids = [r.listing.id for r in results]
    assert "L-table" not in ids
    assert set(ids[:2]) == {"L-lamp", "L-box"}  # one found through each of the two photos
    # One Fetch for its text vector (the fake has none, so the photos alone rank), one for its photos.
    assert indexer.faults.calls["Fetch"] == 2
    assert [r.listing.id for r in stack.client.similar("L-table", k=3, photos_only=True)] == ids
    assert indexer.faults.calls["Fetch"] == 3
    filtered = stack.client.similar("L-table", k=3, main_category="Other Goods")
    assert [r.listing.id for r in filtered] == ["L-box"]


def test_similar_and_get_unknown_listing_is_not_found(stack):
    for call in (lambda: stack.client.similar("nope"), lambda: stack.client.get("nope")):
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND and "nope" in error.details()


def test_similar_without_indexed_photos_is_failed_precondition(stack):
    stack.gateway.core.catalogue.add(Listing("L-new", "t", image_ids=("never-indexed",)))
    error = rpc_error(stack.client.similar, "L-new")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no indexed photos" in error.details()


def test_add_search_remove_round_trip(stack):
    images = [b"new photo A", b"new photo B"]
    added = stack.client.add(
        images,
        title="  Brass lamp ",
        price=25,
        location="York, North Yorkshire",
        main_category="Home & Garden",
    )
    assert added.title == "Brass lamp" and added.currency == "GBP" and len(added.image_ids) == 2
    assert stack.client.get(added.id) == added
    shard = stack.indexers[shard_of(added.id, 2)]
    assert set(added.image_ids) <= set(shard.items)  # routed to the listing's shard only
    assert shard.items[added.image_ids[0]][1].listing_id == added.id
    assert not set(added.image_ids) & set(stack.indexers[1 - shard_of(added.id, 2)].items)
    top = stack.client.search_by_image(b"new photo B", k=1)[0]
    assert (top.listing.id, top.matched_image_id) == (added.id, added.image_ids[1])

    removed = stack.client.remove(added.id)
    assert (removed.listing_id, removed.images_removed) == (added.id, 2)
    assert not set(added.image_ids) & set(shard.items)
    assert stack.client.search_by_image(b"new photo B", k=1)[0].listing.id != added.id
    assert rpc_error(stack.client.get, added.id).code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error(stack.client.remove, added.id).code() == grpc.StatusCode.NOT_FOUND


def test_add_predicts_main_category_when_empty(stack):
    added = stack.client.add([b"some photo"], title="Thing")
    assert added.main_category in CATEGORIES
    assert stack.embedders[0].faults.calls["Classify"] == 1 and stack.embedders[0].faults.calls["Embed"] == 0
    derived = stack.client.add([b"other photo"], title="Thing", category="Appliances / Kettles")
    assert derived.main_category == "Appliances"


@pytest.mark.parametrize(
    "kwargs, code, message",
    [
        (dict(title=""), grpc.StatusCode.INVALID_ARGUMENT, "title is required"),
        (dict(title="t", main_category="Cars"), grpc.StatusCode.INVALID_ARGUMENT, "not one of the model's"),
        (dict(title="t", price=-1), grpc.StatusCode.INVALID_ARGUMENT, "non-negative"),
        (dict(title="t", listing_id="L-table"), grpc.StatusCode.ALREADY_EXISTS, "already exists"),
        (dict(title="t", listing_id="bad id!"), grpc.StatusCode.INVALID_ARGUMENT, "listing.id"),
        (dict(title="t", listing_id="L" * 129), grpc.StatusCode.INVALID_ARGUMENT, "1-128 characters"),
    ],
)
def test_add_invalid(stack, kwargs, code, message):
    error = rpc_error(stack.client.add, [b"p"], **kwargs)
    assert error.code() == code and message in error.details()
    assert stack.gateway.core.catalogue.count() == len(LISTINGS)


def test_add_without_images_or_with_a_bad_one(stack):
    error = rpc_error(stack.client.add, [], title="t")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "at least one image" in error.details()
    error = rpc_error(stack.client.add, [b"fine", b"bad photo"], title="t", main_category="Other Goods")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "images[1]" in error.details()
    assert sum(i.faults.calls["Upsert"] for i in stack.indexers) == 0  # never reached the index


def _item_counts(stack):
    return [len(indexer.items) for indexer in stack.indexers]


def wait_for(condition, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_add_to_an_unreachable_shard_is_unavailable_and_leaves_nothing(stack):
    """The shard cannot be reached: the add is cancelled in one transaction (listing dropped, its
    ids queued for deletion in case an attempt landed after all) and the caller hears why."""
    before = _item_counts(stack)
    shard = stack.indexers[shard_of("L-x", 2)]
    shard.faults.plan("Upsert", grpc.StatusCode.UNAVAILABLE, times=3)
    error = rpc_error(stack.client.add, [b"p1"], title="t", main_category="Other Goods", listing_id="L-x")
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "indexer shard" in error.details() and "unavailable" in error.details()
    assert stack.gateway.core.catalogue.get("L-x", include_pending=True) is None
    assert shard.faults.calls["Upsert"] == 3  # retried, then given up
    assert wait_for(lambda: stack.gateway.core.catalogue.pending_outbox() == [])
    assert shard.faults.calls["Delete"] == 1  # the queued deletion, pushed by the outbox loop
    assert _item_counts(stack) == before
    added = stack.client.add_listing([b"p1"], title="t", main_category="Other Goods", listing_id="L-x")
    assert not added.pending and stack.client.get("L-x") == added.listing  # the id is free again


def test_add_whose_outcome_is_unknown_is_pending_until_it_lands(stack):
    """The shard is slow (the push times out; it may or may not have landed): no undo that the
    late write could overtake. The listing is committed, invisible to reads, and visible once the
    outbox has pushed its vectors again."""
    shard_number = shard_of("L-x", 2)
    shard = stack.indexers[shard_number]
    before = _item_counts(stack)
    shard.faults.plan("Upsert", delay=2.5, times=2)  # the request's try and its retry
    added = stack.client.add_listing(
        [b"p1"], title="t", main_category="Other Goods", listing_id="L-x", timeout=1.5
    )
    assert added.pending and added.listing.id == "L-x"
    assert shard.faults.calls["Delete"] == 0  # nothing undone
    assert rpc_error(stack.client.get, "L-x").code() == grpc.StatusCode.NOT_FOUND
    assert stack.client.get("L-x", include_pending=True).image_ids == added.listing.image_ids
    assert (
        rpc_error(stack.client.add, [b"p2"], title="t", main_category="Other Goods", listing_id="L-x").code()
        == grpc.StatusCode.ALREADY_EXISTS
    )
    assert wait_for(lambda: stack.gateway.core.catalogue.get("L-x") is not None)
    assert stack.client.get("L-x").image_ids == added.listing.image_ids
    assert set(added.listing.image_ids) <= set(shard.items)
    assert _item_counts(stack)[shard_number] == before[shard_number] + 1
    assert stack.gateway.core.catalogue.pending_outbox() == []
    assert stack.client.search_by_image(b"p1", k=1)[0].listing.id == "L-x"


def test_add_writes_nothing_when_the_catalogue_is_unusable(stack, monkeypatch):
    before = _item_counts(stack)

    def broken_add(*_, **__):
        raise CatalogueUnavailable("catalogue database sqlite:///x unavailable: disk I/O error")

    monkeypatch.setattr(stack.gateway.core.catalogue, "add_pending", broken_add)
    error = rpc_error(
        stack.client.add, [b"p1", b"p2"], title="t", main_category="Other Goods", listing_id="L-y"
    )
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "catalogue database" in error.details()
    assert sum(i.faults.calls["Upsert"] for i in stack.indexers) == 0  # the index never saw it
    assert _item_counts(stack) == before
    monkeypatch.undo()
    assert stack.gateway.core.catalogue.get("L-y", include_pending=True) is None


def test_remove_is_committed_then_the_deletion_is_pushed(stack):
    shard = stack.indexers[shard_of("L-chair", 2)]
    shard.faults.plan("Delete", grpc.StatusCode.INTERNAL)
    removed = stack.client.remove("L-chair")
    assert removed.pending and removed.images_removed == 1
    assert rpc_error(stack.client.get, "L-chair").code() == grpc.StatusCode.NOT_FOUND
    # its vector is still in the index for a moment, but searches drop hits without a listing
    assert all(r.listing.id != "L-chair" for r in stack.client.search_by_image(photo("L-chair"), k=6))
    assert wait_for(lambda: "L-chair-img0" not in shard.items)
    # the applier marks the entry done just after the shard's Delete returns: wait for that too
    assert wait_for(lambda: stack.gateway.core.catalogue.pending_outbox() == [])
    assert rpc_error(stack.client.remove, "L-chair").code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("field, limit", sorted(FIELD_LIMITS.items()))
def test_add_with_a_field_over_its_limit_is_invalid(stack, field, limit):
    values = dict(title="t", description="", category="", main_category="", location="")
    values[field] = "x" * (limit + 1)
    error = rpc_error(stack.client.add, [b"p"], **values)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"listing.{field}" in error.details() and str(limit) in error.details()


def test_unavailable_is_retried_with_backoff(stack):
    embedder = stack.embedders[0]
    embedder.faults.plan("Embed", grpc.StatusCode.UNAVAILABLE, times=2)
    assert stack.client.search_by_image(photo("L-box"), k=1)[0].listing.id == "L-box"
    assert embedder.faults.calls["Embed"] == 3
    embedder.faults.plan("Embed", grpc.StatusCode.UNAVAILABLE, times=3)
    error = rpc_error(stack.client.search_by_image, photo("L-box"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details().startswith(f"embedder at {stack.config.embedder_target} unavailable")


def test_other_errors_are_not_retried(stack):
    embedder = stack.embedders[0]
    embedder.faults.plan("Embed", grpc.StatusCode.INTERNAL, times=1)
    error = rpc_error(stack.client.search_by_image, photo("L-box"))
    assert error.code() == grpc.StatusCode.INTERNAL and "embedder at" in error.details()
    assert embedder.faults.calls["Embed"] == 1


def test_dead_embedder_is_unavailable_fast_and_named(tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    s = Stack(tmp_path, embedder_addr=dead)
    try:
        started = time.monotonic()
        error = rpc_error(s.client.search_by_image, photo("L-box"), timeout=5)
        assert time.monotonic() - started < 2.0
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert error.details().startswith(f"embedder at {dead} unavailable")
        assert s.client.get("L-box").id == "L-box"  # catalogue reads do not need the embedder
    finally:
        s.close()


def test_dead_shard_fails_search_naming_the_shard(stack):
    stack.indexer_servers[1].stop(0)
    error = rpc_error(stack.client.search_by_image, photo("L-box"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details().startswith(f"indexer shard 1 at {stack.config.indexer_addrs[1]} unavailable")


def test_callers_deadline_is_propagated(stack):
    embedder = stack.embedders[0]
    embedder.faults.plan("Embed", delay=2.0)  # a hung embedder
    started = time.monotonic()
    error = rpc_error(stack.client.search_by_image, photo("L-box"), timeout=0.6)
    elapsed = time.monotonic() - started
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 1.0  # at the caller's deadline, not after the slow embedder
    assert embedder.faults.time_remaining[-1] <= 0.6  # the embedder was given the caller's deadline
    # Normally the gateway answers just before the caller's deadline, naming who was slow (the
    # caller's own timer may win on a very busy machine).
    assert "embedder at" in error.details() or error.details() == "Deadline Exceeded"


def test_default_deadline_applies_when_the_caller_sets_none(tmp_path):
    s = Stack(tmp_path, downstream_timeout_s=0.4)
    try:
        s.embedders[0].faults.plan("Embed", delay=3.0)
        with grpc.insecure_channel(s.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            started = time.monotonic()
            error = rpc_error(stub.SearchByImage, gateway_pb2.SearchByImageRequest(image=b"x"))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert error.details() == f"deadline exceeded waiting for embedder at {s.config.embedder_target}"
        assert time.monotonic() - started < 2.5  # did not wait for the 3 s reply (room for load)
        assert 0 < s.embedders[0].faults.time_remaining[-1] <= 0.41  # gRPC rounds the deadline
    finally:
        s.close()


def test_request_id_and_write_token_reach_the_downstreams(tmp_path):
    s = Stack(tmp_path, write_token="s3cret")
    try:
        no_token = GatewayClient(s.address, write_token="")
        error = rpc_error(no_token.add, [b"p"], title="t")
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        wrong = GatewayClient(s.address, write_token="guess")
        assert rpc_error(wrong.remove, "L-box").code() == grpc.StatusCode.PERMISSION_DENIED
        assert no_token.get("L-box").id == "L-box"  # reads stay open
        no_token.close()
        wrong.close()

        with grpc.insecure_channel(s.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            stub.AddListing(
                gateway_pb2.AddListingRequest(
                    listing=gateway_pb2.Listing(title="t", main_category="Other Goods"), images=[b"p"]
                ),
                metadata=((REQUEST_ID_KEY, "trace-me-123"), ("authorization", "Bearer s3cret")),
                timeout=5,
            )
        seen = [m for e in s.embedders for m in e.faults.metadata] + [
            m for i in s.indexers for m in i.faults.metadata
        ]
        upserts = [m for m in seen if m["method"] == "Upsert"]
        assert upserts and all(m.get("authorization") == "Bearer s3cret" for m in upserts)
        assert all(m.get(REQUEST_ID_KEY) == "trace-me-123" for m in seen)
    finally:
        s.close()


def test_round_robin_over_embedder_replicas(tmp_path):
    s = Stack(tmp_path, embedders=2)
    try:
        assert s.config.embedder_target.startswith("ipv4:")
        s.client.search_by_image(photo("L-box"), k=1)  # connects to every replica
        time.sleep(0.3)
        for e in s.embedders:
            e.faults.calls.clear()
        for _ in range(10):
            s.client.search_by_image(photo("L-box"), k=1)
        counts = [e.faults.calls["Embed"] for e in s.embedders]
        assert sum(counts) == 10 and min(counts) >= 3, counts  # both replicas used
        s.embedder_servers[0].stop(0)  # one replica goes away: the other serves everything
        for _ in range(5):
            assert s.client.search_by_image(photo("L-box"), k=1)[0].listing.id == "L-box"
    finally:
        s.close()


def test_text_search_needs_an_embedder_that_serves_text(stack):
    """The fake embedder serves images only (no EmbedText): text queries are FAILED_PRECONDITION
    naming the embedder; a hybrid Search with only an image is SearchByImage."""
    error = rpc_error(stack.client.search_by_text, "oak")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "embedder at" in error.details()
    error = rpc_error(stack.client.search, photo("L-box"), "oak")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    by_image = stack.client.search_by_image(photo("L-kettle", 1), k=4)
    assert stack.client.search(photo("L-kettle", 1), k=4) == by_image
    assert stack.client.search(photo("L-kettle", 1), "  ", k=4, text_weight=1.0) == by_image


def test_hybrid_search_and_recommend_refuse_bad_requests(stack):
    def code(call, *args, **kwargs):
        return rpc_error(call, *args, **kwargs).code()

    assert code(stack.client.search) == grpc.StatusCode.INVALID_ARGUMENT  # neither image nor text
    assert (
        code(stack.client.search, photo("L-box"), "oak", text_weight=1.5) == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert code(stack.client.search_by_text, "   ") == grpc.StatusCode.INVALID_ARGUMENT
    assert code(stack.client.recommend, []) == grpc.StatusCode.INVALID_ARGUMENT
    error = rpc_error(stack.client.recommend, ["L-table", "L-nope"])
    assert error.code() == grpc.StatusCode.NOT_FOUND and "L-nope" in error.details()


def test_recommend_never_returns_liked_skipped_or_seen_listings(stack):
    """Image-only here (the fake index has no text vectors)."""
    everything = stack.client.recommend(["L-table"], k=10)
    assert {r.listing.id for r in everything} == {"L-chair", "L-kettle", "L-fridge", "L-box", "L-lamp"}
    assert all(r.matched_image_id.startswith(r.listing.id) for r in everything)
    assert all(a.score >= b.score for a, b in zip(everything, everything[1:]))
    results = stack.client.recommend(["L-table"], skipped=["L-kettle"], seen=["L-box", "L-unknown"], k=10)
    assert {r.listing.id for r in results} == {"L-chair", "L-fridge", "L-lamp"}
    fetches = sum(i.faults.calls["Fetch"] for i in stack.indexers)
    assert fetches >= 2  # the liked and skipped listings' photos, from their own shards


def test_cli_prints_tables(stack, tmp_path, capsys):
    from services.gateway import cli

    photo_file = tmp_path / "q.jpg"
    photo_file.write_bytes(photo("L-table"))
    assert (
        cli.main(
            ["--addr", stack.address, "search", str(photo_file), "-k", "3", "--category", "Home & Garden"]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["rank", "score", "title"] and set(lines[1]) <= {"-", " "}
    assert "Title of L-table" in lines[2] and "£40.00" in lines[2] and lines[2].endswith("L-table")
    assert len(lines) == 5
    assert cli.main(["--addr", stack.address, "get", "L-box"]) == 0
    assert "\nprice          -\n" in capsys.readouterr().out
    assert cli.main(["--addr", stack.address, "classify", str(photo_file)]) == 0
    assert "model fake-1" in capsys.readouterr().out
    assert cli.main(["--addr", stack.address, "add", "--title", "Lamp", "--price", "3", str(photo_file)]) == 0
    added_id = capsys.readouterr().out.splitlines()[1].split()[-1]
    assert cli.main(["--addr", stack.address, "similar", added_id, "-k", "1"]) == 0
    assert "L-table" in capsys.readouterr().out  # same photo bytes as L-table's
    assert cli.main(["--addr", stack.address, "remove", added_id]) == 0
    assert "1 image vectors" in capsys.readouterr().out
    assert cli.main(["--addr", stack.address, "get", added_id]) == 1
    assert capsys.readouterr().err.startswith("error: NOT_FOUND: listing")


def test_index_embeddings_routes_by_listing(stack, tmp_path):
    from common.artifact import read_image_embeddings, write_image_embeddings
    from services.gateway.index_catalogue import index_embeddings

    for indexer in stack.indexers:
        indexer.items.clear()
    rows = stack.gateway.core.catalogue.image_rows()
    ids = [r.image_id for r in rows] + ["not-in-catalogue"]
    vectors = np.stack([fake_vector(i.encode()) for i in ids])
    write_image_embeddings(tmp_path / "artifact", ids, vectors)
    loaded_ids, loaded = read_image_embeddings(tmp_path / "artifact")
    assert loaded_ids == ids and loaded.shape == vectors.shape
    report = index_embeddings(
        stack.gateway.core.catalogue,
        stack.gateway.core.indexer,
        loaded_ids,
        loaded,
        batch_size=3,
        progress=False,
    )
    assert report.upserted == len(rows) and report.skipped_not_in_catalogue == 1
    for row in rows:
        stored = stack.indexers[shard_of(row.listing_id, 2)].items[row.image_id][1]
        assert (stored.listing_id, stored.category, stored.location) == (
            row.listing_id,
            row.main_category,
            row.location,
        )
    assert sum(i.faults.calls["Upsert"] for i in stack.indexers) >= 3  # batched


def test_indexer_invalid_argument_is_not_blamed_on_the_caller(stack):
    for indexer in stack.indexers:
        indexer.faults.plan("Search", grpc.StatusCode.INVALID_ARGUMENT)
    error = rpc_error(stack.client.search_by_image, photo("L-box"))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "indexer shard" in error.details() and "INVALID_ARGUMENT" in error.details()


def test_index_catalogue_text_needs_text_vectors_from_somewhere(stack, tmp_path):
    """No text embeddings in the artefact and an image-only embedder: --text auto skips text with
    the reason, --text on fails, --text off does not ask."""
    from services.gateway.index_catalogue import text_vectors

    policy = RetryPolicy(2, 0.01, 0.05)
    address = stack.config.embedder_addr
    reason = text_vectors("auto", tmp_path, stack.gateway.core.catalogue, address, policy)
    assert isinstance(reason, str) and "serves no text model" in reason
    with pytest.raises(ValueError, match="serves no text model"):
        text_vectors("on", tmp_path, stack.gateway.core.catalogue, address, policy)
    calls = stack.embedders[0].faults.calls["GetModelInfo"]
    assert text_vectors("off", tmp_path, stack.gateway.core.catalogue, address, policy) == "--text off"
    assert stack.embedders[0].faults.calls["GetModelInfo"] == calls


def test_cli_recommend_and_text_commands(stack, tmp_path, capsys):
    from services.gateway import cli

    assert (
        cli.main(
            [
                "--addr",
                stack.address,
                "recommend",
                "--like",
                "L-table",
                "--skip",
                "L-kettle",
                "--seen",
                "L-box",
                "-k",
                "3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("rank") and len(out.splitlines()) == 5
    assert "L-table" not in out and "L-kettle" not in out and "L-box" not in out
    photo_file = tmp_path / "q.jpg"
    photo_file.write_bytes(photo("L-table"))
    assert cli.main(["--addr", stack.address, "text", "oak table"]) == 1  # image-only embedder
    assert "FAILED_PRECONDITION" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "--addr",
                stack.address,
                "hybrid",
                str(photo_file),
                "oak",
                "--fusion",
                "rrf",
                "--text-weight",
                "0.3",
            ]
        )
        == 1
    )
    assert "FAILED_PRECONDITION" in capsys.readouterr().err


def _answers(call) -> bool:
    try:
        call()
        return True
    except grpc.RpcError:
        return False


def test_catalogue_database_going_away_is_unavailable_then_recovers(tmp_path):
    """A real PostgreSQL catalogue stopped under a serving gateway: every call that needs it is
    UNAVAILABLE naming the database; started again, the same gateway serves (no restart)."""
    cluster = PostgresCluster().start()
    try:
        s = Stack(tmp_path, db_path=cluster.create_database("gw"), db_connect_timeout_s=1.0)
        try:
            assert s.client.get("L-box").id == "L-box"
            cluster.stop()
            for call in (
                lambda: s.client.get("L-box"),
                lambda: s.client.search_by_image(photo("L-box"), k=1),
                lambda: s.client.add([b"p"], title="t", main_category="Other Goods"),
                lambda: s.client.remove("L-box"),
            ):
                error = rpc_error(call)
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
                assert "catalogue database" in error.details()
                assert f"127.0.0.1:{cluster.port}/gw" in error.details()
            cluster.start()
            assert wait_for(lambda: _answers(lambda: s.client.get("L-box")), 30)
            added = s.client.add_listing([b"after"], title="t", main_category="Other Goods")
            assert not added.pending and s.client.get(added.listing.id) == added.listing
            assert s.client.search_by_image(photo("L-box"), k=1)[0].listing.id == "L-box"
        finally:
            s.close()
    finally:
        cluster.destroy()
