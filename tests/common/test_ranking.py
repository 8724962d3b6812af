"""The gateway's ranking math: fusion of image and text result lists, and Rocchio recommendations."""

from __future__ import annotations

import numpy as np
import pytest

from common.ranking import (
    reciprocal_rank_fusion,
    recommend_query,
    weighted_cosine_fusion,
)


# ------------------------------------------------------------------ weighted cosine fusion


def test_weighted_cosine_fusion_combines_scores_by_weight():
    image = {"a": 0.9, "b": 0.5}
    text = {"a": 0.1, "b": 0.7}
    fused = dict(weighted_cosine_fusion(image, text, text_weight=0.25))
    assert fused["a"] == pytest.approx(0.75 * 0.9 + 0.25 * 0.1)
    assert fused["b"] == pytest.approx(0.75 * 0.5 + 0.25 * 0.7)


def test_text_weight_moves_the_ranking_from_image_to_text():
    image = {"photo_match": 0.95, "text_match": 0.40}
    text = {"photo_match": 0.10, "text_match": 0.80}
    assert [i for i, _ in weighted_cosine_fusion(image, text, 0.0)][0] == "photo_match"
    assert [i for i, _ in weighted_cosine_fusion(image, text, 1.0)][0] == "text_match"
    assert [i for i, _ in weighted_cosine_fusion(image, text, 0.8)][0] == "text_match"


def test_missing_scores_default_to_the_lowest_returned_and_can_be_set():
    image = {"a": 0.9, "b": 0.6}
    text = {"c": 0.8, "a": 0.5}
    fused = dict(weighted_cosine_fusion(image, text, 0.5))
    assert fused["b"] == pytest.approx(0.5 * 0.6 + 0.5 * 0.5)  # text missing -> min text 0.5
    assert fused["c"] == pytest.approx(0.5 * 0.6 + 0.5 * 0.8)  # image missing -> min image 0.6
    fused_zero = dict(weighted_cosine_fusion(image, text, 0.5, missing=0.0))
    assert fused_zero["c"] == pytest.approx(0.4)


def test_weighted_fusion_sorts_descending_breaks_ties_by_first_appearance_and_cuts_top_k():
    ranked = weighted_cosine_fusion({"x": 0.5, "y": 0.5, "z": 0.9}, {}, 0.0)
    assert [i for i, _ in ranked] == ["z", "x", "y"]
    assert len(weighted_cosine_fusion({"x": 0.5, "y": 0.5, "z": 0.9}, {}, 0.0, top_k=2)) == 2
    assert weighted_cosine_fusion({}, {}, 0.5) == []


@pytest.mark.parametrize("weight", [-0.1, 1.5, float("nan")])
def test_weighted_fusion_rejects_weights_outside_0_1(weight):
    with pytest.raises(ValueError):
        weighted_cosine_fusion({"a": 1.0}, {"a": 1.0}, weight)


def test_weighted_fusion_rejects_non_finite_scores():
    with pytest.raises(ValueError):
        weighted_cosine_fusion({"a": float("nan")}, {}, 0.5)


# ------------------------------------------------------------------ reciprocal-rank fusion


def test_rrf_matches_the_formula():
    fused = dict(reciprocal_rank_fusion([["a", "b", "c"], ["b", "d"]], k=60))
    assert fused["a"] == pytest.approx(1 / 61)
    assert fused["b"] == pytest.approx(1 / 62 + 1 / 61)
    assert fused["c"] == pytest.approx(1 / 63)
    assert fused["d"] == pytest.approx(1 / 62)


def test_rrf_rewards_agreement_and_weights_favour_one_list():
    # b is second in both lists, x and y first in one list only: agreement wins
    assert [i for i, _ in reciprocal_rank_fusion([["x", "b"], ["y", "b"]])][0] == "b"
    image, text = ["a", "b", "c"], ["c", "b", "a"]
    # 1/61 + 1/63 > 2/62: a and c tie above b, a first (seen first)
    assert [i for i, _ in reciprocal_rank_fusion([image, text])] == ["a", "c", "b"]
    assert [i for i, _ in reciprocal_rank_fusion([image, text], weights=[0.2, 0.8])][0] == "c"
    assert [i for i, _ in reciprocal_rank_fusion([image, text], weights=[0.8, 0.2])][0] == "a"
    assert [i for i, _ in reciprocal_rank_fusion([image, text], weights=[1.0, 0.0])] == ["a", "b", "c"]


def test_rrf_counts_a_repeated_id_once_at_its_best_rank():
    fused = dict(reciprocal_rank_fusion([["a", "b", "a"]], k=1))
    assert fused["a"] == pytest.approx(1 / 2)
    assert fused["b"] == pytest.approx(1 / 3)


def test_rrf_top_k_ties_and_validation():
    ranked = reciprocal_rank_fusion([["a", "b"], ["b", "a"]], top_k=1)
    assert ranked == [("a", pytest.approx(1 / 61 + 1 / 62))]  # tie -> first seen
    with pytest.raises(ValueError):
        reciprocal_rank_fusion([["a"]], weights=[1.0, 1.0])
    with pytest.raises(ValueError):
        reciprocal_rank_fusion([["a"]], weights=[-1.0])
    with pytest.raises(ValueError):
        reciprocal_rank_fusion([["a"]], k=0)
    assert reciprocal_rank_fusion([]) == []


# ------------------------------------------------------------------ recommendations


def _unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_recommend_query_is_the_normalised_rocchio_vector():
    liked = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    skipped = np.array([[0.0, 0.0, 1.0]])
    q = recommend_query(liked, skipped, alpha=1.0, beta=0.5)
    assert q.dtype == np.float32 and q.shape == (3,)
    np.testing.assert_allclose(q, _unit([0.5, 0.5, -0.5]), atol=1e-6)
    assert np.linalg.norm(q) == pytest.approx(1.0, abs=1e-6)


def test_recommend_query_normalises_each_embedding_first():
    q = recommend_query(np.array([[10.0, 0.0], [0.0, 1.0]]), None)
    np.testing.assert_allclose(q, _unit([1.0, 1.0]), atol=1e-6)


def test_recommendations_rank_like_liked_and_unlike_skipped():
    rng = np.random.default_rng(0)
    sofa, phone = _unit(rng.normal(size=16)), _unit(rng.normal(size=16))
    catalogue = {f"sofa{i}": _unit(sofa + 0.3 * rng.normal(size=16)) for i in range(5)}
    catalogue |= {f"phone{i}": _unit(phone + 0.3 * rng.normal(size=16)) for i in range(5)}
    liked = [catalogue["sofa0"]]
    skipped = [catalogue["phone0"]]
    q = recommend_query(np.stack(liked), np.stack(skipped))
    scores = {k: float(v @ q) for k, v in catalogue.items()}
    ranked = [r for r in sorted(scores, key=scores.get, reverse=True) if r not in {"sofa0", "phone0"}]
    assert len(ranked) == 8 and all(r.startswith("sofa") for r in ranked[:4])
    assert all(r.startswith("phone") for r in ranked[4:])
    # the skip pushes the query away from phones
    assert float(q @ phone) < float(recommend_query(np.stack(liked), None) @ phone)


def test_recommend_query_beta_zero_ignores_skips_and_accepts_1d_inputs():
    liked = np.array([3.0, 4.0])
    np.testing.assert_allclose(recommend_query(liked, np.array([1.0, 0.0]), beta=0.0), [0.6, 0.8], atol=1e-6)
    np.testing.assert_allclose(recommend_query(liked, np.zeros((0, 2))), [0.6, 0.8], atol=1e-6)


def test_recommend_query_falls_back_to_liked_when_skips_cancel_it():
    v = np.array([[0.0, 1.0]])
    np.testing.assert_allclose(recommend_query(v, v, alpha=1.0, beta=1.0), [0.0, 1.0], atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(liked=np.zeros((0, 4))),
        dict(liked=None),
        dict(liked=np.ones((1, 4)), skipped=np.ones((1, 3))),
        dict(liked=np.zeros((1, 4))),
        dict(liked=np.ones((1, 4)), alpha=0.0),
        dict(liked=np.ones((1, 4)), beta=-1.0),
    ],
)
def test_recommend_query_rejects_bad_input(kwargs):
    with pytest.raises(ValueError):
        recommend_query(**kwargs)
