"""Ranking math for the gateway, free of gRPC: fusing an image and a text result list, and the
query vector for recommendations.

Fusion of an image query and a text query (``Search`` with both):

* `weighted_cosine_fusion` - ``score = (1 - w) * image_cosine + w * text_cosine`` over the union
  of both candidate lists. Uses the similarity values, so a near-duplicate photo (cosine 0.98)
  can outweigh a loose text match; but the two models' cosines live on different scales
  (EfficientNet features are non-negative, so their cosines are rarely below 0.3; MiniLM
  cosines of unrelated text sit near 0), which the weight ``w`` has to absorb.
* `reciprocal_rank_fusion` - ``score(d) = sum_i weight_i / (k + rank_i(d))`` (rank 1 = best),
  Cormack, Clarke & Buettcher (SIGIR 2009), k = 60 as in the paper. Uses only ranks, so it is
  scale-free and needs no calibration between models; the weights still let the caller favour
  one list. The usual default for the gateway.

Recommendations (``Recommend``): `recommend_query` turns liked and skipped listing embeddings
into one unit query vector (Rocchio relevance feedback); the gateway searches the index with it
and drops listings already liked, skipped or seen.

All functions are deterministic: ties are broken by the id's first appearance in the inputs.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

__all__ = [
    "RRF_K",
    "normalise_rows",
    "reciprocal_rank_fusion",
    "recommend_query",
    "weighted_cosine_fusion",
]

#: The RRF constant from Cormack et al. (2009): damps the weight of the very first ranks.
RRF_K = 60


def _check_finite(scores: Mapping, what: str) -> None:
    for key, value in scores.items():
        if not math.isfinite(float(value)):
            raise ValueError(f"{what} score for {key!r} is {value}, must be finite")


def _ranked(scores: dict, order: dict, top_k: int | None) -> list[tuple[Hashable, float]]:
    ranked = sorted(scores.items(), key=lambda item: (-item[1], order[item[0]]))
    return ranked if top_k is None else ranked[: max(0, int(top_k))]


def weighted_cosine_fusion(
    image_scores: Mapping[Hashable, float],
    text_scores: Mapping[Hashable, float],
    text_weight: float = 0.5,
    *,
    missing: float | None = None,
    top_k: int | None = None,
) -> list[tuple[Hashable, float]]:
    """Fuse two {id: cosine} result lists into one ranking, best first.

    ``score(id) = (1 - text_weight) * image_score + text_weight * text_score``, over the union
    of ids. ``text_weight`` in [0, 1]: 0 ranks by the image alone, 1 by the text alone (the other
    modality still contributes its candidates, scored by the weighted modality).

    An id found by only one query has no score in the other list. With ``missing=None`` (default)
    it gets the lowest score that list returned: a kNN search returned its top k, so anything it
    did not return scores at most that much (an optimistic but order-preserving estimate, and the
    same estimate for every absent id). Pass a number (e.g. 0.0) to use that instead; an empty
    list contributes ``missing`` or 0.0.

    Returns [(id, fused_score)] sorted by score descending, ties in order of first appearance
    (image list first); ``top_k`` keeps only the first k.
    """
    w = float(text_weight)
    if not 0.0 <= w <= 1.0 or math.isnan(w):
        raise ValueError(f"text_weight must be in [0, 1], got {text_weight}")
    _check_finite(image_scores, "image")
    _check_finite(text_scores, "text")

    def fill(scores: Mapping) -> float:
        if missing is not None:
            return float(missing)
        return float(min(scores.values())) if scores else 0.0

    image_fill, text_fill = fill(image_scores), fill(text_scores)
    order: dict = {}
    for key in list(image_scores) + list(text_scores):
        order.setdefault(key, len(order))
    fused = {
        key: (1.0 - w) * float(image_scores.get(key, image_fill)) + w * float(text_scores.get(key, text_fill))
        for key in order
    }
    return _ranked(fused, order, top_k)


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[Hashable]],
    weights: Sequence[float] | None = None,
    k: float = RRF_K,
    *,
    top_k: int | None = None,
) -> list[tuple[Hashable, float]]:
    """Reciprocal-rank fusion of several ranked id lists (each best first).

    ``score(id) = sum over lists i containing id of weights[i] / (k + rank_i(id))`` with rank 1
    for a list's first item; an id absent from a list gets nothing from it. ``weights`` default
    to 1 for every list (for an image and a text list, ``[1 - w, w]`` mirrors
    `weighted_cosine_fusion`'s ``text_weight``). A repeated id within one list counts once, at
    its best rank. Larger ``k`` flattens the advantage of the top ranks.

    Returns [(id, score)] sorted by score descending, ties in order of first appearance;
    ``top_k`` keeps only the first k.
    """
    if weights is None:
        weights = [1.0] * len(rankings)
    if len(weights) != len(rankings):
        raise ValueError(f"{len(rankings)} rankings but {len(weights)} weights")
    if any(not math.isfinite(float(wt)) or float(wt) < 0 for wt in weights):
        raise ValueError(f"weights must be finite and >= 0, got {list(weights)}")
    if not float(k) > 0 or not math.isfinite(float(k)):
        raise ValueError(f"k must be a positive number, got {k}")
    scores: dict = {}
    order: dict = {}
    for ranking, weight in zip(rankings, weights):
        seen: set = set()
        for rank, key in enumerate(ranking, start=1):
            if key in seen:
                continue
            seen.add(key)
            order.setdefault(key, len(order))
            scores[key] = scores.get(key, 0.0) + float(weight) / (float(k) + rank)
    return _ranked(scores, order, top_k)


def normalise_rows(vectors: np.ndarray) -> np.ndarray:
    """L2-normalise each row (float32); zero rows raise ValueError."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(vectors)):
        raise ValueError("embeddings must be finite and non-zero")
    return vectors / norms


def _as_matrix(vectors: np.ndarray | None, what: str, dim: int | None) -> np.ndarray | None:
    if vectors is None:
        return None
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim == 1:
        array = array[None, :] if array.size else array.reshape(0, dim or 0)
    if array.ndim != 2:
        raise ValueError(f"{what} embeddings must be (n, d), got shape {array.shape}")
    if len(array) == 0:
        return None
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{what} embeddings are {array.shape[1]}-d, liked ones {dim}-d")
    return array


def recommend_query(
    liked: np.ndarray, skipped: np.ndarray | None = None, alpha: float = 1.0, beta: float = 0.5
) -> np.ndarray:
    """Rocchio relevance feedback: one unit query vector from liked and skipped embeddings.

    ``q = alpha * mean(liked) - beta * mean(skipped)``, normalised to unit length, where each
    embedding is L2-normalised first (so one listing cannot dominate by its norm). Searching
    an index with ``q`` by cosine ranks listings like the liked ones and unlike the skipped
    ones; ``beta = 0`` ignores the skips. ``liked`` is (n, d) or (d,) with n >= 1; ``skipped``
    is (m, d), (d,), empty or None.

    If the skips cancel the likes exactly (q is zero, e.g. the same listing liked and skipped
    with alpha == beta), the liked mean alone is returned rather than an undefined direction.
    Raises ValueError when nothing is liked, shapes disagree, or alpha <= 0 / beta < 0.
    """
    if not (alpha > 0 and math.isfinite(alpha)) or not (beta >= 0 and math.isfinite(beta)):
        raise ValueError(f"need alpha > 0 and beta >= 0, got alpha={alpha} beta={beta}")
    liked_m = _as_matrix(liked, "liked", None)
    if liked_m is None:
        raise ValueError("recommend_query needs at least one liked embedding")
    skipped_m = _as_matrix(skipped, "skipped", liked_m.shape[1])
    liked_mean = normalise_rows(liked_m).astype(np.float64).mean(axis=0)
    query = alpha * liked_mean
    if skipped_m is not None and beta > 0:
        query = query - beta * normalise_rows(skipped_m).astype(np.float64).mean(axis=0)
    norm = np.linalg.norm(query)
    if norm < 1e-6 * alpha:
        query, norm = liked_mean, np.linalg.norm(liked_mean)
        if norm < 1e-12:  # liked embeddings cancel each other out: no direction is preferred
            raise ValueError("the liked embeddings cancel out; no query direction")
    return (query / norm).astype(np.float32)
