"""The gateway's core pieces without any server: catalogue, merging, shard routing, config."""
from __future__ import annotations

import sqlite3
from collections import Counter

import pytest

from common.config import ConfigError
from services.gateway.catalogue import SCHEMA_VERSION, Catalogue, CatalogueError, DuplicateListing
from services.gateway.config import GatewayConfig, RetryPolicy, embedder_target, parse_indexer_addrs
from services.gateway.core import predict_category
from services.gateway.domain import CategoryScore, InvalidArgument, Listing, SearchFilter
from services.gateway.ranking import Hit, fuse_image_and_text, merge_by_listing
from services.gateway.shards import group_by_shard, shard_of


def listing(listing_id: str, images=("a", "b"), **fields) -> Listing:
    base = dict(title=f"title {listing_id}", description="desc", category="Home & Garden / Tables",
                main_category="Home & Garden", price=12.5, currency="GBP", location="Leeds, West Yorkshire")
    base.update(fields)
    return Listing(listing_id, image_ids=tuple(f"{listing_id}-{i}" for i in images), **base)


# ----------------------------------------------------------------------------- catalogue


def test_catalogue_created_migrated_and_reopened(tmp_path):
    path = tmp_path / "sub" / "catalogue.sqlite3"
    with Catalogue.open(path) as catalogue:
        assert catalogue.schema_version == SCHEMA_VERSION
        catalogue.add(listing("L1"))
    with Catalogue.open(path) as catalogue:  # second open: no migration re-run, data kept
        assert catalogue.schema_version == SCHEMA_VERSION
        assert catalogue.get("L1") == listing("L1")


def test_catalogue_refuses_a_newer_schema(tmp_path):
    path = tmp_path / "c.sqlite3"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(CatalogueError, match="schema version"):
        Catalogue.open(path)


def test_catalogue_add_get_remove_and_duplicates(tmp_path):
    with Catalogue.open(tmp_path / "c.sqlite3") as catalogue:
        catalogue.add(listing("L1", price=None, currency=""))
        catalogue.add(listing("L2", images=("x",)))
        assert catalogue.get("L1").price is None
        assert catalogue.get("L1").image_ids == ("L1-a", "L1-b")  # order kept
        with pytest.raises(DuplicateListing):
            catalogue.add(listing("L1"))
        with pytest.raises(DuplicateListing):  # an image id already used: nothing written
            catalogue.add(Listing("L3", "t", image_ids=("L2-x",)))
        assert catalogue.get("L3") is None and catalogue.count() == 2
        assert set(catalogue.get_many(["L1", "L2", "nope"])) == {"L1", "L2"}
        assert catalogue.main_categories() == ["Home & Garden"]
        assert [(r.image_id, r.listing_id) for r in catalogue.image_rows(["L2-x", "zz"])] == [("L2-x", "L2")]
        assert catalogue.remove("L1") == listing("L1", price=None, currency="")
        assert catalogue.remove("L1") is None
        assert catalogue.count_images() == 1


def test_catalogue_get_many_beyond_sql_variable_limit(tmp_path):
    with Catalogue.open(tmp_path / "c.sqlite3") as catalogue:
        for i in range(1200):
            catalogue.add(listing(f"L{i:04d}", images=("p",)))
        found = catalogue.get_many([f"L{i:04d}" for i in range(1200)])
        assert len(found) == 1200 and found["L0999"].image_ids == ("L0999-p",)


def write_prepared(directory):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "images").mkdir(exist_ok=True)
    (directory / "listings.csv").write_text(
        "product_id,title,location,description,category,main_category,price,currency,price_flag\n"
        'p1,Oak table,"Leeds, West Yorkshire","Solid oak,\nseats 4",Home & Garden / Tables,Home & Garden,40.0,GBP,\n'
        "p2,Kettle,Wokingham,Works,Appliances / Kettles,Appliances,10000000.0,GBP,absurd\n"
        "p3,Mystery,,,Other Goods,Other Goods,,,unparseable\n")
    (directory / "images.csv").write_text(
        "image_id,product_id,main_category,label,split,path,sha256\n"
        "i1,p1,Home & Garden,6,train,images/i1.jpg,x\n"
        "i2,p1,Home & Garden,6,train,images/i2.jpg,x\n"
        "i3,p2,Appliances,0,test,images/i3.jpg,x\n"
        "i4,p9,Appliances,0,test,images/i4.jpg,x\n")
    for name in ("i1", "i3", "i4"):  # i2's file is missing
        (directory / "images" / f"{name}.jpg").write_bytes(b"jpeg")
    return directory


def test_load_prepared(tmp_path):
    prepared = write_prepared(tmp_path / "prepared")
    with Catalogue.open(tmp_path / "c.sqlite3") as catalogue:
        report = catalogue.load_prepared(prepared)
        assert (report.listings, report.images) == (3, 2)
        assert report.images_skipped_missing_file == 1 and report.images_skipped_unknown_listing == 1
        table = catalogue.get("p1")
        assert table.description == "Solid oak,\nseats 4" and table.location == "Leeds, West Yorkshire"
        assert table.price == 40.0 and table.image_ids == ("i1",)
        assert catalogue.get("p2").price is None  # absurd price -> unknown
        assert catalogue.get("p3").price is None and catalogue.get("p3").image_ids == ()
        again = catalogue.load_prepared(prepared)  # idempotent: nothing new
        assert again.listings == 0 and catalogue.count() == 3
        only = catalogue.load_prepared(prepared, replace=True, only_with_images=True)
        assert only.listings == 2 and catalogue.count() == 2


# ----------------------------------------------------------------------------- ranking


def test_merge_by_listing_keeps_best_hit_per_listing_across_lists():
    shard0 = [Hit("A", 0.9, "a1"), Hit("B", 0.5, "b1")]
    shard1 = [Hit("C", 0.8, "c1"), Hit("A", 0.95, "a2"), Hit("D", 0.5, "d1")]
    merged = merge_by_listing([shard0, shard1], k=3)
    assert [(h.listing_id, h.item_id) for h in merged] == [("A", "a2"), ("C", "c1"), ("B", "b1")]
    assert [h.listing_id for h in merge_by_listing([shard1, shard0], exclude=["A"])] == ["C", "B", "D"]
    assert merge_by_listing([], k=5) == []


def test_merge_by_listing_equals_global_top_k():
    import random
    rng = random.Random(7)
    lists = [[Hit(f"L{rng.randrange(30)}", rng.random(), f"i{q}-{j}") for j in range(40)] for q in range(4)]
    best: dict[str, float] = {}
    for hits in lists:
        for h in hits:
            best[h.listing_id] = max(best.get(h.listing_id, -1), h.score)
    truncated = [merge_by_listing([hits], k=5) for hits in lists]  # what a shard returns
    merged = merge_by_listing(truncated, k=5)
    assert [h.listing_id for h in merged] == sorted(best, key=lambda i: -best[i])[:5]


def test_fusion_adapters():
    image = [Hit("A", 0.9, "a1"), Hit("B", 0.85, "b1")]
    text = [Hit("B", 0.7, "B"), Hit("C", 0.6, "C")]
    weighted = fuse_image_and_text(image, text, 0.5)
    assert weighted[0].listing_id == "B" and weighted[0].matched_image_id == "b1"
    assert {f.listing_id for f in weighted} == {"A", "B", "C"}
    rrf = fuse_image_and_text(image, text, 0.5, method="reciprocal_rank", k=2)
    assert rrf[0].listing_id == "B" and len(rrf) == 2
    assert [f.listing_id for f in fuse_image_and_text(image, text, 0.0, "reciprocal_rank")][:2] == ["A", "B"]


def test_predict_category_averages_over_photos():
    photos = [[CategoryScore("A", 0.6), CategoryScore("B", 0.4)],
              [CategoryScore("B", 0.9), CategoryScore("A", 0.1)]]
    assert predict_category(photos) == "B"


# ----------------------------------------------------------------------------- shards


def test_shard_routing_is_stable_and_spread():
    assert shard_of("anything", 1) == 0
    assert shard_of("0f9e2c1a-listing", 2) == shard_of("0f9e2c1a-listing", 2)  # no per-process salt
    counts = Counter(shard_of(f"listing-{i}", 4) for i in range(4000))
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) > 850
    groups = group_by_shard(["a", "b", "c", "d"], 2)
    assert sorted(i for ids in groups.values() for i in ids) == ["a", "b", "c", "d"]
    with pytest.raises(ValueError):
        shard_of("x", 0)


def test_shard_routing_matches_known_values():
    # Pinned so a change of hash (which would strand every indexed listing) fails loudly.
    assert [shard_of(f"listing-{i}", 2) for i in range(8)] == [0, 1, 1, 0, 0, 1, 1, 1]
    assert [shard_of(f"listing-{i}", 3) for i in range(8)] == [2, 0, 0, 2, 1, 0, 2, 0]
    import hashlib
    expected = int.from_bytes(hashlib.blake2b(b"listing-1", digest_size=8).digest(), "big") % 5
    assert shard_of("listing-1", 5) == expected


# ----------------------------------------------------------------------------- filters / config


def test_search_filter_validation():
    SearchFilter(min_price=1, max_price=1).validate({"A"})
    with pytest.raises(InvalidArgument, match="greater than"):
        SearchFilter(min_price=5, max_price=1).validate()
    with pytest.raises(InvalidArgument, match="finite"):
        SearchFilter(max_price=float("nan")).validate()
    with pytest.raises(InvalidArgument, match="not a known category"):
        SearchFilter(main_category="Cars").validate({"A", "B"})
    assert SearchFilter(exclude_listing_ids=("a",)).excluding("a", "b").exclude_listing_ids == ("a", "b")


def test_embedder_target_forms():
    assert embedder_target("127.0.0.1:50051") == "127.0.0.1:50051"
    assert embedder_target("embedder:50051") == "embedder:50051"
    assert embedder_target("127.0.0.1:1, 127.0.0.2:2") == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert embedder_target("localhost:1,localhost:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert embedder_target("[::1]:1,[::1]:2") == "ipv6:[::1]:1,[::1]:2"
    assert embedder_target("dns:///embedder:50051") == "dns:///embedder:50051"
    assert embedder_target("ipv4:10.0.0.1:1,10.0.0.2:1") == "ipv4:10.0.0.1:1,10.0.0.2:1"
    for bad in ("", "nohostport,other", "127.0.0.1:1,no-such-host.invalid:2"):
        with pytest.raises(ConfigError):
            embedder_target(bad)


def test_config_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBEDDER_ADDR", "127.0.0.1:7001,127.0.0.1:7002")
    monkeypatch.setenv("INDEXER_ADDRS", "127.0.0.1:8001, 127.0.0.1:8002")
    monkeypatch.setenv("GATEWAY_DB", str(tmp_path / "db.sqlite3"))
    monkeypatch.setenv("GATEWAY_DOWNSTREAM_TIMEOUT_S", "2.5")
    monkeypatch.setenv("GATEWAY_MAX_K", "50")
    monkeypatch.setenv("GATEWAY_RETRY_ATTEMPTS", "4")
    monkeypatch.setenv("WRITE_TOKEN", "s3cret")
    monkeypatch.setenv("GATEWAY_READINESS_INTERVAL_S", "0")
    monkeypatch.setenv("GATEWAY_READINESS_TIMEOUT_S", "0.25")
    config = GatewayConfig.from_env(["--port", "0"])
    assert config.embedder_target == "ipv4:127.0.0.1:7001,127.0.0.1:7002"
    assert config.indexer_targets == ("127.0.0.1:8001", "127.0.0.1:8002")
    assert config.db_path == tmp_path / "db.sqlite3" and config.port == 0
    assert (config.downstream_timeout_s, config.max_k, config.retry.attempts) == (2.5, 50, 4)
    assert config.write_token == "s3cret"
    assert (config.readiness_interval_s, config.readiness_timeout_s) == (0.0, 0.25)
    monkeypatch.setenv("GATEWAY_MAX_K", "lots")
    with pytest.raises(ConfigError, match="GATEWAY_MAX_K"):
        GatewayConfig.from_env([])
    with pytest.raises(ConfigError):
        parse_indexer_addrs("a:1,a:1")


def test_similar_text_weight_from_env(monkeypatch):
    monkeypatch.delenv("GATEWAY_SIMILAR_TEXT_WEIGHT", raising=False)
    assert GatewayConfig.from_env([]).similar_text_weight == 0.7
    monkeypatch.setenv("GATEWAY_SIMILAR_TEXT_WEIGHT", "0.25")
    assert GatewayConfig.from_env([]).similar_text_weight == 0.25
    for bad in ("1.5", "-0.1", "half"):
        monkeypatch.setenv("GATEWAY_SIMILAR_TEXT_WEIGHT", bad)
        with pytest.raises(ConfigError, match="GATEWAY_SIMILAR_TEXT_WEIGHT"):
            GatewayConfig.from_env([])


def test_retry_backoff_grows_and_is_capped():
    policy = RetryPolicy(attempts=5, initial_backoff_s=0.1, max_backoff_s=0.3)
    assert [policy.backoff(i) for i in range(4)] == [0.1, 0.2, 0.3, 0.3]
