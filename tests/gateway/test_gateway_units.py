"""The gateway's core pieces without any server: merging, shard routing, config."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from common.config import ConfigError
from services.gateway.config import GatewayConfig, RetryPolicy, embedder_target, parse_indexer_addrs
from services.gateway.core import predict_category
from services.gateway.domain import CategoryScore, InvalidArgument, Listing, SearchFilter
from services.gateway.ranking import Hit, fuse_image_and_text, merge_by_listing
from services.gateway.shards import group_by_shard, shard_of


def listing(listing_id: str, images=("a", "b"), **fields) -> Listing:
    base = dict(
        title=f"title {listing_id}",
        description="desc",
        category="Home & Garden / Tables",
        main_category="Home & Garden",
        price=12.5,
        currency="GBP",
        location="Leeds, West Yorkshire",
    )
    base.update(fields)
    return Listing(listing_id, image_ids=tuple(f"{listing_id}-{i}" for i in images), **base)


# ----------------------------------------------------------------------------- catalogue fixtures
# (the catalogue's own suite, over both back ends, is test_catalogue.py)


def write_prepared(directory):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "images").mkdir(exist_ok=True)
    (directory / "listings.csv").write_text(
        "product_id,title,location,description,category,main_category,price,currency,price_flag\n"
        'p1,Oak table,"Leeds, West Yorkshire","Solid oak,\nseats 4",Home & Garden / Tables,Home & Garden,40.0,GBP,\n'
        "p2,Kettle,Wokingham,Works,Appliances / Kettles,Appliances,10000000.0,GBP,absurd\n"
        "p3,Mystery,,,Other Goods,Other Goods,,,unparseable\n"
    )
    (directory / "images.csv").write_text(
        "image_id,product_id,main_category,label,split,path,sha256\n"
        "i1,p1,Home & Garden,6,train,images/i1.jpg,x\n"
        "i2,p1,Home & Garden,6,train,images/i2.jpg,x\n"
        "i3,p2,Appliances,0,test,images/i3.jpg,x\n"
        "i4,p9,Appliances,0,test,images/i4.jpg,x\n"
    )
    for name in ("i1", "i3", "i4"):  # i2's file is missing
        (directory / "images" / f"{name}.jpg").write_bytes(b"jpeg")
    return directory


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
    photos = [
        [CategoryScore("A", 0.6), CategoryScore("B", 0.4)],
        [CategoryScore("B", 0.9), CategoryScore("A", 0.1)],
    ]
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


@pytest.mark.parametrize(
    "name, field",
    [
        ("GATEWAY_SIMILAR_TEXT_WEIGHT", "similar_text_weight"),
        ("GATEWAY_SEARCH_TEXT_WEIGHT", "search_text_weight"),
    ],
)
def test_fusion_text_weights_from_env(monkeypatch, name, field):
    """Unset (or empty): None, the embedder's artefact decides; set: a number in [0, 1]."""
    monkeypatch.delenv(name, raising=False)
    assert getattr(GatewayConfig.from_env([]), field) is None
    monkeypatch.setenv(name, "")
    assert getattr(GatewayConfig.from_env([]), field) is None
    monkeypatch.setenv(name, "0.25")
    assert getattr(GatewayConfig.from_env([]), field) == 0.25
    monkeypatch.setenv(name, "0")
    assert getattr(GatewayConfig.from_env([]), field) == 0.0
    for bad in ("1.5", "-0.1", "half"):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ConfigError, match=name):
            GatewayConfig.from_env([])


def test_indexer_shards_and_shard_map_from_env(monkeypatch, tmp_path):
    monkeypatch.delenv("INDEXER_ADDRS", raising=False)
    monkeypatch.setenv("INDEXER_SHARDS", "0=127.0.0.1:1|127.0.0.1:2;1=127.0.0.1:3")
    monkeypatch.setenv("GATEWAY_SHARD_MAP", "on")
    monkeypatch.setenv("GATEWAY_SHARD_MAP_POLL_S", "0.5")
    config = GatewayConfig.from_env([])
    assert config.indexer_replicas == (("127.0.0.1:1", "127.0.0.1:2"), ("127.0.0.1:3",))
    assert config.indexer_targets == ("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3")
    assert (config.shard_map, config.shard_map_poll_s, config.partitions) == (True, 0.5, 256)
    for off in ("off", "0", "false", ""):
        monkeypatch.setenv("GATEWAY_SHARD_MAP", off)
        assert GatewayConfig.from_env([]).shard_map is False
    monkeypatch.setenv("GATEWAY_SHARD_MAP", str(tmp_path / "map"))  # where the map used to live
    with pytest.raises(ConfigError, match="kept in the catalogue database .*GATEWAY_SHARD_MAP=on"):
        GatewayConfig.from_env([])
    monkeypatch.setenv("GATEWAY_SHARD_MAP", "on")
    monkeypatch.setenv("INDEXER_ADDRS", "127.0.0.1:9")
    with pytest.raises(ConfigError, match="not both"):
        GatewayConfig.from_env([])


def _publish(db_path, shard_map) -> None:
    from services.gateway.catalogue import Catalogue

    with Catalogue.open(db_path) as catalogue:
        catalogue.shard_map_store().publish(shard_map)


def test_gateway_refuses_a_shard_map_naming_unconfigured_shards(tmp_path):
    from common.shard_map import initial
    from services.gateway.server import start

    _publish(tmp_path / "db.sqlite3", initial(4))
    config = GatewayConfig.local(
        host="127.0.0.1",
        port=0,
        db_path=tmp_path / "db.sqlite3",
        indexer_addrs=("127.0.0.1:1", "127.0.0.1:2"),
        shard_map=False,
        readiness_interval_s=0,
    )  # a stored map is followed
    with pytest.raises(ConfigError, match="places partitions on shard 3, but only shards 0..1"):
        start(config)


def test_gateway_refuses_an_inconsistent_shard_map_in_the_database(tmp_path):
    from services.gateway.catalogue import Catalogue
    from services.gateway.server import start

    db = tmp_path / "db.sqlite3"
    with Catalogue.open(db) as catalogue, catalogue._db.transaction() as tx:
        tx.execute(
            "INSERT INTO shard_maps (version, state, body, created_at) VALUES (?, ?, ?, ?)",
            (1, "stable", '{"version": 1, "partitions": 4, "state": "stable", "owners": [0, 1, -1, 0]}', 0.0),
        )
    config = GatewayConfig.local(
        host="127.0.0.1",
        port=0,
        db_path=db,
        indexer_addrs=("127.0.0.1:1", "127.0.0.1:2"),
        shard_map=True,
        readiness_interval_s=0,
    )
    with pytest.raises(ConfigError, match="shard map v1 .* partition with no shard"):
        start(config)


def test_gateways_create_one_map_and_a_hash_routed_gateway_follows_it(tmp_path):
    """GATEWAY_SHARD_MAP=on creates version 1 in the catalogue database; a gateway started
    before it (off: routing by hash) switches to the map by itself; a third gateway, started
    with on after it, finds it instead of creating another."""
    from services.gateway.server import start

    db = tmp_path / "db.sqlite3"

    def config(shard_map: bool) -> GatewayConfig:
        return GatewayConfig.local(
            host="127.0.0.1",
            port=0,
            db_path=db,
            indexer_addrs=("127.0.0.1:1", "127.0.0.1:2"),
            shard_map=shard_map,
            shard_map_poll_s=0.05,
            readiness_interval_s=0,
        )

    hashed = start(config(False))
    try:
        routing = hashed.core.indexer.routing
        assert routing.map is None
        mapped = start(config(True))
        again = start(config(True))
        try:
            first = mapped.core.indexer.routing.map
            assert first is not None and first.version == 1 and first.shards == 2
            assert again.core.indexer.routing.map == first
            assert mapped.core.catalogue.shard_map_store().versions() == [1]
            deadline = time.monotonic() + 10
            while routing.map is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert routing.map == first
            assert all(routing.shard_for(f"L{i}") == shard_of(f"L{i}", 2) for i in range(200))
        finally:
            again.stop(0)
            mapped.stop(0)
    finally:
        hashed.stop(0)


def test_retry_backoff_grows_and_is_capped():
    policy = RetryPolicy(attempts=5, initial_backoff_s=0.1, max_backoff_s=0.3)
    assert [policy.backoff(i) for i in range(4)] == [0.1, 0.2, 0.3, 0.3]


def test_ranked_results_carry_missing_shards_through_the_proto_and_in_words():
    from services.gateway import convert
    from services.gateway.domain import RankedListing, RankedResults, missing_shards_notice

    listing = Listing("L1", "Oak table", image_ids=("I1",))
    answer = RankedResults([RankedListing(1, 0.5, "I1", listing)], missing_shards=[3, 1])
    back = convert.ranked_from_proto(convert.ranked_to_proto(answer))
    assert back == answer and back.missing_shards == (1, 3) and not back.complete
    assert convert.ranked_from_proto(convert.ranked_to_proto([])).complete
    assert missing_shards_notice(()) == ""
    assert missing_shards_notice((2,)).startswith("These results are incomplete: index shard 2 is ")
    assert "index shards 0, 1 and 4 are unavailable" in missing_shards_notice((0, 1, 4))
