"""Turning per-query, per-shard neighbour lists into one ranking of listings.

Everything here works on `Hit` (listing id, score, matched item id) and knows nothing about gRPC,
shards or the catalogue:

* `merge_by_listing` - several hit lists (one per shard and/or per query photo) -> one entry per
  listing, its best score and the item that gave it, best first. Used by SearchByImage (fan-out over
  shards) and SimilarListings (one query per photo of the listing).
* `fuse_image_and_text` - an image ranking and a ranking from the "text" collection
  (item id = listing id) combined with `common.ranking`'s weighted-cosine or reciprocal-rank
  fusion, the two `Fusion` modes of the public proto (`WEIGHTED_COSINE`, `RECIPROCAL_RANK`).

Ties are broken by listing id so results are deterministic whatever order shards answered in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from common import ranking as common_ranking
from common.ranking import RRF_K

#: The fusion methods, as `fuse_image_and_text` names them (FUSION_WEIGHTED_COSINE and
#: FUSION_RECIPROCAL_RANK in the public proto).
WEIGHTED_COSINE = "weighted_cosine"
RECIPROCAL_RANK = "reciprocal_rank"
FUSION_METHODS = (WEIGHTED_COSINE, RECIPROCAL_RANK)


@dataclass(frozen=True)
class Hit:
    """One neighbour: the listing it belongs to, its similarity and the stored item's id
    (an image id in the "image" collection, the listing id in a text collection)."""

    listing_id: str
    score: float
    item_id: str


def _order(hit: Hit) -> tuple[float, str, str]:
    return (-hit.score, hit.listing_id, hit.item_id)


def merge_by_listing(
    hit_lists: Iterable[Iterable[Hit]], k: int | None = None, exclude: Iterable[str] = ()
) -> list[Hit]:
    """One hit per listing (its best-scoring item over all lists), best first, at most ``k``.

    With each list being a top-k of one query over one shard, the result is exactly the global
    top-k by best score: a listing in the global top-k ranks within the top-k of the list that
    holds its best score.
    """
    excluded = set(exclude)
    best: dict[str, Hit] = {}
    for hits in hit_lists:
        for hit in hits:
            if hit.listing_id in excluded:
                continue
            current = best.get(hit.listing_id)
            if current is None or _order(hit) < _order(current):
                best[hit.listing_id] = hit
    ranked = sorted(best.values(), key=_order)
    return ranked if k is None else ranked[:k]


@dataclass(frozen=True)
class FusedHit:
    """A listing's fused score and the photo that matched it (empty for a text-only match)."""

    listing_id: str
    score: float
    matched_image_id: str


def fuse_image_and_text(
    image_hits: Sequence[Hit],
    text_hits: Sequence[Hit],
    text_weight: float,
    method: str = WEIGHTED_COSINE,
    k: int | None = None,
) -> list[FusedHit]:
    """Combine an image ranking and a text ranking of listings (each one hit per listing, best
    first, e.g. from `merge_by_listing`) with `common.ranking`'s fusion:

    * ``"weighted_cosine"`` - ``(1 - w) * image + w * text`` (FUSION_WEIGHTED_COSINE);
    * ``"reciprocal_rank"`` - ``sum weight / (60 + rank)`` with weights ``(1 - w, w)``
      (FUSION_RECIPROCAL_RANK).
    """
    image = merge_by_listing([image_hits])
    text = merge_by_listing([text_hits])
    if method == WEIGHTED_COSINE:
        fused = common_ranking.weighted_cosine_fusion(
            {h.listing_id: h.score for h in image},
            {h.listing_id: h.score for h in text},
            text_weight,
            top_k=k,
        )
    elif method == RECIPROCAL_RANK:
        fused = common_ranking.reciprocal_rank_fusion(
            [[h.listing_id for h in image], [h.listing_id for h in text]],
            [1.0 - text_weight, text_weight],
            RRF_K,
            top_k=k,
        )
    else:
        raise ValueError(f"unknown fusion method {method!r}")
    matched = {h.listing_id: h.item_id for h in image}
    return [FusedHit(listing_id, float(score), matched.get(listing_id, "")) for listing_id, score in fused]
