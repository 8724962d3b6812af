"""Text search, hybrid (image + text) search and recommendations through the real services: the
embedder serving the small real image model (`test_artifact`) and all-MiniLM-L6-v2, two indexer
shards with an "image" (1280-d) and a "text" (384-d) collection, and the gateway, all real gRPC
servers in-process on ephemeral ports. The catalogue is 60 real listings (10 in each of 6 main
categories) with their ~100 real photos; photos are embedded through Embed and listing texts through
EmbedText, written as an artefact's ``embeddings/`` files and indexed with
``python -m services.gateway.index_catalogue --artifact``'s ``main``.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pandas as pd
import pytest

from common.fusion_weights import FusionWeights
from common.text import listing_text
from marketplace.indexer.v1 import indexer_pb2, indexer_pb2_grpc
from services.gateway import index_catalogue
from services.gateway.client import GatewayClient
from services.gateway.core import candidate_count
from services.gateway.downstream import TEXT_COLLECTION, Deadline
from services.gateway.fusion_defaults import FusionDefaults
from services.gateway.server import start as start_gateway
from tests.gateway.gateway_data import make_mini_prepared, outside_photos
from tests.support.services import text_stack

pytestmark = pytest.mark.timeout(300)

CATEGORIES = [
    "Appliances",
    "Baby & Kids Stuff",
    "Clothes, Footwear & Accessories",
    "Computers & Software",
    "Home & Garden",
    "Sports, Leisure & Travel",
]
PER_CATEGORY = 10
#: The weights the embedder's artefact holds (fusion_weights.json), neither a built-in default.
ARTEFACT_SEARCH_WEIGHT, ARTEFACT_SIMILAR_WEIGHT = 0.3, 0.4


@pytest.fixture(scope="module")
def real(tmp_path_factory, test_artifact):
    root = tmp_path_factory.mktemp("gateway_text")
    prepared = make_mini_prepared(root / "prepared", per_category=PER_CATEGORY, categories=CATEGORIES)
    # The embedder's artefact holds fusion weights chosen for its image model: the gateway's defaults.
    model = root / "model"
    shutil.copytree(test_artifact, model)
    version = json.loads((model / "model_card.json").read_text())["model_version"]
    FusionWeights(
        search_text_weight=ARTEFACT_SEARCH_WEIGHT,
        similar_text_weight=ARTEFACT_SIMILAR_WEIGHT,
        image_model_version=version,
    ).save(model)
    with text_stack(root, model, prepared, downstream_timeout_s=30.0) as services:
        gateway, shards, config = services.gateway, services.shards, services.config
        core = gateway.core
        # An artefact's embeddings/ folder, as training exports it (plus a text vector of a
        # listing the catalogue does not have, which indexing must skip).
        artefact = root / "artefact"
        (artefact / "embeddings").mkdir(parents=True)
        image_ids, image_vectors = index_catalogue.embed_prepared(
            prepared, core.catalogue, core.embedder, progress=False
        )
        np.save(artefact / "embeddings" / "image_embeddings.npy", image_vectors)
        (artefact / "embeddings" / "image_ids.json").write_text(json.dumps(image_ids))
        text_ids, text_vectors = index_catalogue.embed_catalogue_texts(
            core.catalogue, core.embedder, batch_size=16, progress=False
        )
        np.save(
            artefact / "embeddings" / "text_embeddings.npy", np.concatenate([text_vectors, text_vectors[:1]])
        )
        (artefact / "embeddings" / "text_ids.json").write_text(json.dumps(text_ids + ["gone"]))
        code = index_catalogue.main(
            [
                "--db",
                str(config.db_path),
                "--indexers",
                ",".join(config.indexer_addrs),
                "--artifact",
                str(artefact),
                "--embedder",
                config.embedder_addr,
            ]
        )
        assert code == 0
        client = GatewayClient(f"127.0.0.1:{gateway.port}", timeout=60)
        try:
            yield SimpleNamespace(
                root=root,
                prepared=prepared,
                shards=shards,
                gateway=gateway,
                client=client,
                config=config,
                text_ids=text_ids,
                text_vectors=text_vectors,
                image_ids=image_ids,
                image_vectors=image_vectors,
                listings=pd.read_csv(prepared / "listings.csv", dtype={"price": float}),
                images=pd.read_csv(prepared / "images.csv", dtype=str),
            )
        finally:
            client.close()


def photo_of(real, listing_id: str) -> bytes:
    rows = real.images[real.images["product_id"] == listing_id].sort_values("image_id")
    return Path(rows.iloc[0]["path"]).read_bytes()


def ids(results) -> list[str]:
    return [r.listing.id for r in results]


def text_count(real, shard: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{real.shards[shard].port}") as channel:
        stats = indexer_pb2_grpc.IndexerStub(channel).GetStats(
            indexer_pb2.GetStatsRequest(collection=TEXT_COLLECTION), timeout=10
        )
    return sum(c.count for c in stats.collections)


def test_every_catalogue_listing_has_one_text_vector_on_its_shard(real):
    assert real.gateway.core.catalogue.count() == len(CATEGORIES) * PER_CATEGORY
    assert sorted(real.text_ids) == sorted(real.listings["product_id"])
    counts = [text_count(real, shard) for shard in range(2)]
    assert sum(counts) == len(real.listings) and min(counts) > 0  # "gone" was skipped
    info = real.gateway.core.embedder.model_info(Deadline(10))
    assert "text" in info.modalities and info.text_embedding_dim == 384
    # EmbedText through the gateway's client gives the vectors that were indexed
    again = real.gateway.core.embedder.embed_text(
        [listing_text(real.listings.iloc[0]["title"], real.listings.iloc[0]["description"])], Deadline(30)
    )
    row = real.text_ids.index(real.listings.iloc[0]["product_id"])
    np.testing.assert_allclose(again[0], real.text_vectors[row], atol=1e-5)


def test_search_by_text_finds_a_listing_by_its_own_title(real):
    """A title is only part of what is embedded (title + description), and some titles say
    little ("🔥🔥🔥log burners🔥🔥🔥"), so a few listings may miss: most must come first."""
    first = top3 = 0
    misses = []
    for listing in real.listings.itertuples(index=False):
        results = real.client.search_by_text(listing.title, k=3)
        assert len(results) == 3 and [r.rank for r in results] == [1, 2, 3]
        assert all(r.matched_image_id == "" for r in results)  # text matches name no photo
        assert all(a.score >= b.score for a, b in zip(results, results[1:]))
        assert -1.0 <= results[-1].score <= results[0].score <= 1.0 + 1e-5
        first += results[0].listing.id == listing.product_id
        top3 += listing.product_id in ids(results)
        if listing.product_id not in ids(results):
            misses.append(listing.title)
    print(f"own title: first for {first}, top 3 for {top3} of {len(real.listings)}; missed {misses}")
    assert top3 >= 0.95 * len(real.listings) and first >= 0.9 * len(real.listings), misses


def test_search_by_text_applies_the_filters(real):
    everything = real.client.search_by_text("something for the kitchen", k=100)
    assert len(everything) == len(real.listings)
    kids = real.client.search_by_text("something for the kitchen", k=100, main_category="Baby & Kids Stuff")
    assert len(kids) == PER_CATEGORY and {r.listing.main_category for r in kids} == {"Baby & Kids Stuff"}
    cheap = real.client.search_by_text("something for the kitchen", k=100, max_price=20)
    expected = real.listings[real.listings["price"] <= 20]["product_id"]
    assert set(ids(cheap)) == set(expected)
    rest = real.client.search_by_text("something for the kitchen", k=100, exclude=ids(everything)[:4])
    assert ids(rest) == ids(everything)[4:]


def test_hybrid_search_fuses_both_rankings(real):
    listings = real.listings.set_index("product_id")
    image_listing, text_listing = listings.index[2], listings.index[17]
    photo, query = photo_of(real, image_listing), listings.loc[text_listing, "title"]
    k, candidates = 5, candidate_count(5)  # each modality contributes its top max(3k, 50)
    by_image = {r.listing.id: r.score for r in real.client.search_by_image(photo, k=candidates)}
    by_text = {r.listing.id: r.score for r in real.client.search_by_text(query, k=candidates)}
    image_floor, text_floor = min(by_image.values()), min(by_text.values())

    fused = real.client.search(photo, query, k=k, text_weight=0.5)  # weighted cosine
    assert len(fused) == k and {image_listing, text_listing} <= set(ids(fused))
    for result in fused:  # a listing missing from one list gets that list's lowest score
        expected = 0.5 * by_image.get(result.listing.id, image_floor) + 0.5 * by_text.get(
            result.listing.id, text_floor
        )
        assert result.score == pytest.approx(expected, abs=1e-4)
    # text_weight unset: the weight the embedder's artefact holds (fusion_weights.json)
    w = ARTEFACT_SEARCH_WEIGHT
    default = real.client.search(photo, query, k=k)
    assert len(default) == k
    for result in default:
        expected = (1 - w) * by_image.get(result.listing.id, image_floor) + w * by_text.get(
            result.listing.id, text_floor
        )
        assert result.score == pytest.approx(expected, abs=1e-4)
    assert fused[0].listing.id in (image_listing, text_listing)
    assert next(r for r in fused if r.listing.id == image_listing).matched_image_id

    rrf = real.client.search(photo, query, k=k, fusion="reciprocal_rank")
    assert len(rrf) == k and {image_listing, text_listing} & set(ids(rrf))
    image_rank = {listing_id: rank for rank, listing_id in enumerate(by_image, 1)}
    text_rank = {listing_id: rank for rank, listing_id in enumerate(by_text, 1)}
    for result in rrf:  # 0.5 / (60 + image rank) + 0.5 / (60 + text rank); absent: nothing
        expected = sum(
            0.5 / (60 + ranks[result.listing.id])
            for ranks in (image_rank, text_rank)
            if result.listing.id in ranks
        )
        assert result.score == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("fusion", ["weighted_cosine", "reciprocal_rank"])
def test_text_weight_extremes_are_the_single_modality_rankings(real, fusion):
    listings = real.listings.set_index("product_id")
    photo = photo_of(real, listings.index[8])
    query = "warm winter coat"
    text_only = real.client.search_by_text(query, k=10)
    image_only = real.client.search_by_image(photo, k=10)
    assert ids(text_only) != ids(image_only)
    assert ids(real.client.search(photo, query, k=10, text_weight=1.0, fusion=fusion)) == ids(text_only)
    assert ids(real.client.search(photo, query, k=10, text_weight=0.0, fusion=fusion)) == ids(image_only)
    if fusion == "weighted_cosine":
        scores = [r.score for r in real.client.search(photo, query, k=10, text_weight=1.0)]
        assert scores == pytest.approx([r.score for r in text_only], abs=1e-5)


def test_recommend_follows_the_liked_category_and_never_returns_feedback(real):
    """For each category: like 3 of its listings, skip one listing of two other categories, have
    seen a 4th of the liked category. 6 of the 54 candidates (11%) are in the liked category; in
    the top 5 it must be at least half of all results, and present every time."""
    listings = real.listings.sort_values("product_id")
    by_category = {c: list(g["product_id"]) for c, g in listings.groupby("main_category")}
    in_liked_category, shown = 0, 0
    for liked_category in CATEGORIES:
        same = by_category[liked_category]
        liked, seen = same[:3], same[3:4]
        skipped = [by_category[c][0] for c in CATEGORIES if c != liked_category][:2]
        feedback = set(liked + skipped + seen)
        results = real.client.recommend(liked, skipped, seen, k=5)
        assert len(results) == 5 and not set(ids(results)) & feedback
        assert all(a.score >= b.score for a, b in zip(results, results[1:]))
        categories = Counter(r.listing.main_category for r in results)
        assert categories[liked_category] >= 1, (liked_category, categories)
        in_liked_category += categories[liked_category]
        shown += len(results)
        everything = real.client.recommend(liked, skipped, seen, k=100)
        assert len(everything) == len(listings) - len(feedback)
        assert not set(ids(everything)) & feedback
    assert in_liked_category / shown >= 0.5, f"{in_liked_category} of {shown}"


def test_recommend_refuses_unknown_or_missing_likes(real):
    with pytest.raises(grpc.RpcError) as raised:
        real.client.recommend(["no-such-listing"])
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND and "no-such-listing" in raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:
        real.client.recommend([], skipped=[real.listings["product_id"].iloc[0]])
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def similar_by_hand(real, listing_id: str, k: int, text_weight: float | None) -> list[tuple[str, float]]:
    """SimilarListings computed here from the indexed vectors, independently of the gateway: a
    listing's photo score is its best inner product with any of the query listing's photos; with
    a text weight, each modality's top max(3k, 50) are fused as (1 - w) * photo + w * text, a
    listing missing from one list taking that list's lowest score."""
    image_row = {image_id: row for row, image_id in enumerate(real.image_ids)}
    photos = real.images.groupby("product_id")["image_id"].apply(list).to_dict()
    own = real.image_vectors[[image_row[i] for i in photos[listing_id]]]
    image = {
        other: float((own @ real.image_vectors[[image_row[i] for i in ids_]].T).max())
        for other, ids_ in photos.items()
        if other != listing_id
    }
    text_row = {other: row for row, other in enumerate(real.text_ids)}
    query = real.text_vectors[text_row[listing_id]]
    text = {
        other: float(real.text_vectors[row] @ query) for other, row in text_row.items() if other != listing_id
    }

    def top(scores: dict[str, float], n: int) -> dict[str, float]:
        return dict(sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:n])

    if text_weight is None:
        return list(top(image, k).items())
    n = candidate_count(k)
    image, text = top(image, n), top(text, n)
    floor_image, floor_text = min(image.values()), min(text.values())
    fused = {
        other: (1 - text_weight) * image.get(other, floor_image) + text_weight * text.get(other, floor_text)
        for other in set(image) | set(text)
    }
    return list(top(fused, k).items())


def test_similar_listings_photos_only_is_todays_ranking_and_fused_is_what_the_weight_says(real):
    core = real.gateway.core
    listings = real.listings.sort_values("product_id")["product_id"].tolist()
    assert core.fusion.overrides["similar"] is None  # GATEWAY_SIMILAR_TEXT_WEIGHT unset
    differs = 0
    try:
        for weight in (ARTEFACT_SIMILAR_WEIGHT, 0.8):  # the artefact's, then a setting's
            core.fusion.overrides["similar"] = None if weight == ARTEFACT_SIMILAR_WEIGHT else weight
            for listing_id in listings[::12]:
                photos_only = real.client.similar(listing_id, k=8, photos_only=True)
                expected = similar_by_hand(real, listing_id, 8, None)
                assert ids(photos_only) == [i for i, _ in expected]
                assert [r.score for r in photos_only] == pytest.approx([s for _, s in expected], abs=1e-4)
                fused = real.client.similar(listing_id, k=8)
                expected = similar_by_hand(real, listing_id, 8, weight)
                assert ids(fused) == [i for i, _ in expected], (listing_id, weight)
                assert [r.score for r in fused] == pytest.approx([s for _, s in expected], abs=1e-4)
                assert listing_id not in ids(fused)
                differs += ids(fused) != ids(photos_only)
    finally:
        core.fusion.overrides["similar"] = None
    assert differs > 0  # the text really changes the ranking
    # A filter applies to both modalities.
    category = real.listings.set_index("product_id").loc[listings[0], "main_category"]
    filtered = real.client.similar(listings[0], k=5, main_category=category)
    assert filtered and all(r.listing.main_category == category for r in filtered)


def test_added_listing_is_found_by_text_and_removed_from_the_text_index(real):
    photos = [p.read_bytes() for p in outside_photos(real.prepared, 1)]
    added = real.client.add(
        photos,
        title="Vintage brass telescope on a wooden tripod",
        description="Nautical style, extends to 60cm. Collection only.",
        price=35.0,
        main_category="Other Goods",
    )
    shard = real.gateway.core.indexer.shard_for(added.id)
    try:
        top = real.client.search_by_text("brass telescope", k=3)[0]
        assert top.listing.id == added.id and top.listing.price == 35.0
        hybrid = real.client.search(photos[0], "brass telescope", k=3)
        assert hybrid[0].listing.id == added.id and hybrid[0].matched_image_id == added.image_ids[0]
    finally:
        real.client.remove(added.id)
    assert added.id not in ids(real.client.search_by_text("brass telescope", k=10))
    with grpc.insecure_channel(f"127.0.0.1:{real.shards[shard].port}") as channel:
        fetched = indexer_pb2_grpc.IndexerStub(channel).Fetch(
            indexer_pb2.FetchRequest(collection=TEXT_COLLECTION, ids=[added.id]), timeout=10
        )
    assert list(fetched.not_found) == [added.id]


def test_the_settings_override_the_artefacts_fusion_weights_and_the_log_says_where_each_came_from(
    real, caplog
):
    """A second gateway on the same embedder and shards, with GATEWAY_SEARCH_TEXT_WEIGHT and
    GATEWAY_SIMILAR_TEXT_WEIGHT set, fuses with those; the first (settings unset) with the
    artefact's. Each logs the weight it uses and its source."""
    from dataclasses import replace

    listings = real.listings.set_index("product_id")
    photo, query = photo_of(real, listings.index[3]), listings.loc[listings.index[40], "title"]
    listing_id = sorted(listings.index)[5]
    config = replace(
        real.config, db_path=real.root / "second.sqlite3", search_text_weight=0.9, similar_text_weight=0.2
    )
    with caplog.at_level(logging.INFO, logger="services.gateway"):
        second = start_gateway(config)
        try:
            with GatewayClient(f"127.0.0.1:{second.port}", timeout=60) as client:
                searched = client.search(photo, query, k=8)
                similar = client.similar(listing_id, k=8)
        finally:
            second.stop(0)
        explicit = real.client.search(photo, query, k=8, text_weight=0.9)
        assert ids(searched) == ids(explicit)
        assert [r.score for r in searched] == pytest.approx([r.score for r in explicit], abs=1e-5)
        expected = similar_by_hand(real, listing_id, 8, 0.2)
        assert ids(similar) == [i for i, _ in expected]
        assert [r.score for r in similar] == pytest.approx([s for _, s in expected], abs=1e-4)
        # settings unset: the weights the embedder serves from its artefact, logged with their source
        unset = FusionDefaults(real.gateway.core.embedder.model_info)
        assert unset.search_text_weight(Deadline(30)) == ARTEFACT_SEARCH_WEIGHT
        assert unset.similar_text_weight(Deadline(30)) == ARTEFACT_SIMILAR_WEIGHT
    messages = [r.getMessage() for r in caplog.records]
    assert any("GATEWAY_SEARCH_TEXT_WEIGHT" in m and "0.9 from" in m for m in messages), messages
    assert "hybrid Search text weight 0.90, from the setting GATEWAY_SEARCH_TEXT_WEIGHT=0.9" in messages
    assert "SimilarListings text weight 0.20, from the setting GATEWAY_SIMILAR_TEXT_WEIGHT=0.2" in messages
    artefact = [m for m in messages if "from the embedder's artefact (fusion_weights.json of" in m]
    assert any(m.startswith(f"hybrid Search text weight {ARTEFACT_SEARCH_WEIGHT:.2f}") for m in artefact), (
        messages
    )
    assert any(
        m.startswith(f"SimilarListings text weight {ARTEFACT_SIMILAR_WEIGHT:.2f}") for m in artefact
    ), messages
