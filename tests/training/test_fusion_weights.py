"""training.fusion_weights through training.text: the gateway's default fusion weights chosen on
the valid split and written into the artefact, checked against an independent computation that
ranks with the gateway's own fusion (`services.gateway.ranking.fuse_image_and_text`) on the
vectors the artefact holds. The tiny prepared set of `test_text_classifier` (real MiniLM), with
synthetic photo embeddings that carry the category plus noise."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from common.fusion_weights import FusionWeights, FusionWeightsError
from common.artifact import (
    CARD_FILE,
    EMBEDDINGS_DIR,
    FUSION_WEIGHTS_FILE,
    FUSION_WEIGHTS_PLOT_FILE,
    IMAGE_EMBEDDINGS_FILE,
    IMAGE_IDS_FILE,
    TEXT_EMBEDDINGS_FILE,
    TEXT_IDS_FILE,
)
from common.text import listing_text
from services.gateway.core import candidate_count
from services.gateway.ranking import WEIGHTED_COSINE, Hit, fuse_image_and_text
from tests.support.text import shared_text_encoder
from tests.training.test_text_classifier import prepared  # noqa: F401  (the module fixture)
from training import fusion_weights as F
from training import text as T

K = 10
GRID = [round(0.1 * i, 1) for i in range(11)]


@pytest.fixture(scope="module")
def fitted(prepared, tmp_path_factory):  # noqa: F811
    data, artifact, cache = prepared
    out = tmp_path_factory.mktemp("fusion") / "artefact"
    shutil.copytree(artifact, out)
    images = pd.read_csv(data / "images.csv")
    rng = np.random.default_rng(2)
    vectors = np.eye(16)[images["label"].to_numpy()] + rng.normal(0, 0.3, (len(images), 16))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    (out / EMBEDDINGS_DIR).mkdir(exist_ok=True)
    np.save(out / EMBEDDINGS_DIR / IMAGE_EMBEDDINGS_FILE, vectors.astype(np.float32))
    (out / EMBEDDINGS_DIR / IMAGE_IDS_FILE).write_text(json.dumps(images["image_id"].tolist()))
    metrics = T.run(data, out, out, cache_dir=cache)
    return data, out, metrics


def precision_by_hand(data, artefact, query) -> dict[float, float]:
    """Same-category precision@10 over the valid listings for each grid weight, every score
    computed here from the artefact's files and fused by the gateway's own code."""
    listings = pd.read_csv(data / "listings.csv").set_index("product_id")
    images = pd.read_csv(data / "images.csv")
    photo_vectors = dict(
        zip(
            json.loads((artefact / EMBEDDINGS_DIR / IMAGE_IDS_FILE).read_text()),
            np.load(artefact / EMBEDDINGS_DIR / IMAGE_EMBEDDINGS_FILE),
        )
    )
    text_vectors = dict(
        zip(
            json.loads((artefact / EMBEDDINGS_DIR / TEXT_IDS_FILE).read_text()),
            np.load(artefact / EMBEDDINGS_DIR / TEXT_EMBEDDINGS_FILE),
        )
    )
    photos = images.groupby("product_id")["image_id"].apply(list).to_dict()
    valid = sorted(images.loc[images["split"] == "valid", "product_id"].unique())
    n = candidate_count(K)
    hits = {w: [] for w in GRID}
    for listing_id in valid:
        query_photos, query_text = query(listing_id, photos, text_vectors, listings)
        image = [
            Hit(
                other, float(max(photo_vectors[q] @ photo_vectors[p] for q in query_photos for p in ids_)), ""
            )
            for other, ids_ in photos.items()
            if other != listing_id
        ]
        text = [
            Hit(other, float(vector @ query_text), other)
            for other, vector in text_vectors.items()
            if other != listing_id
        ]
        image = sorted(image, key=lambda h: (-h.score, h.listing_id))[:n]
        text = sorted(text, key=lambda h: (-h.score, h.listing_id))[:n]
        own = listings.at[listing_id, "main_category"]
        for w in GRID:
            top = fuse_image_and_text(image, text, w, WEIGHTED_COSINE, K)
            hits[w].append(np.mean([listings.at[f.listing_id, "main_category"] == own for f in top]))
    return {w: float(np.mean(v)) for w, v in hits.items()}


def similar_query(listing_id, photos, text_vectors, listings):
    return photos[listing_id], text_vectors[listing_id]


def search_query(listing_id, photos, text_vectors, listings):
    title = listing_text(listings.at[listing_id, "title"])
    return photos[listing_id][:1], shared_text_encoder().encode([title])[0]


def chosen(curve: dict[float, float]) -> float:
    return max(GRID, key=lambda w: (round(curve[w], 6), -w))


def test_the_text_fit_writes_the_weights_an_independent_computation_picks_on_valid(fitted):
    data, artefact, metrics = fitted
    weights = FusionWeights.load(artefact)  # for this artefact's image model: not refused
    card = json.loads((artefact / CARD_FILE).read_text())
    assert weights.image_model_version == card["model_version"] and weights.chosen_on == "valid"
    assert weights.valid_queries == metrics["split_listings"]["valid"] == 12
    for key, query, value in (
        ("similar", similar_query, weights.similar_text_weight),
        ("search", search_query, weights.search_text_weight),
    ):
        expected = precision_by_hand(data, artefact, query)
        curve = {float(w): p for w, p in weights.valid_curves[key].items()}
        assert curve == pytest.approx(expected, abs=1e-6), key
        assert value == chosen(expected), key
    # this fixture's photos and texts each err elsewhere: the best weights are inside the grid
    assert 0 < weights.search_text_weight < 1 and 0 < weights.similar_text_weight < 1
    assert metrics["fusion_weights"]["similar_text_weight"] == weights.similar_text_weight
    assert (artefact / FUSION_WEIGHTS_PLOT_FILE).stat().st_size > 5000


def test_weights_chosen_for_another_image_model_are_refused_with_the_command(fitted, tmp_path):
    _, artefact, _ = fitted
    stale = tmp_path / "stale"
    stale.mkdir()
    shutil.copy(artefact / FUSION_WEIGHTS_FILE, stale)
    (stale / CARD_FILE).write_text(json.dumps({"model_version": "efficientnet_lite0-new"}))
    with pytest.raises(
        FusionWeightsError,
        match=f"now efficientnet_lite0-new; choose them again with "
        f"`python -m training.fusion_weights --data build/data "
        f"--artifact {stale}`",
    ):
        FusionWeights.load(stale)


def test_the_command_alone_chooses_the_same_weights(fitted, prepared, tmp_path, capsys):  # noqa: F811
    data, artefact, _ = fitted
    _, _, cache = prepared
    out = tmp_path / "again"
    out.mkdir()
    shutil.copytree(artefact / EMBEDDINGS_DIR, out / EMBEDDINGS_DIR)
    shutil.copy(artefact / CARD_FILE, out)
    assert (
        F.main(["--data", str(data), "--artifact", str(artefact), "--out", str(out), "--cache", str(cache)])
        == 0
    )
    assert FusionWeights.load(out) == FusionWeights.load(artefact)
    assert "search_text_weight=" in capsys.readouterr().out
