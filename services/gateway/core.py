"""What the gateway does, in listing terms: the orchestration behind each public RPC.

`GatewayCore` composes the catalogue (`catalogue.Catalogue`), the embedder replicas
(`downstream.EmbedderClient`) and the indexer shards (`downstream.IndexerShards`). It takes and
returns `domain` objects and raises `domain.GatewayError`s; the servicer in `server` only converts
protos and maps those errors to status codes.

Search by image: embed the photo -> every shard's filtered top-k (one per listing) in parallel ->
`ranking.merge_by_listing` -> catalogue entries. Similar listings: the listing's stored photo
vectors (fetched from its shard, no re-embedding) are the queries; the per-photo rankings are
merged by best score and the listing itself is excluded.

AddListing is all or nothing: embed (nothing stored yet) -> upsert the vectors on the listing's
shard -> insert into the catalogue in one SQLite transaction. If the upsert fails its outcome may
be unknown (a timeout after the write), so the image ids are deleted again (idempotent); if the
catalogue insert fails, the upserted vectors are deleted (compensation). RemoveListing deletes
vectors first, then the catalogue row, so a failure never leaves a catalogue entry pointing at
half-deleted photos unnoticed (retrying RemoveListing completes it).

A text collection ("text", listing id as item id) can be searched later through
`_search_collection` and combined with `ranking.weighted_cosine_fusion` /
`ranking.reciprocal_rank_fusion`.
"""
from __future__ import annotations

import logging
import math
import re
import uuid
from collections.abc import Sequence

import numpy as np

from services.gateway.catalogue import Catalogue, DuplicateListing
from services.gateway.domain import (
    AlreadyExists,
    Classification,
    CategoryScore,
    FailedPrecondition,
    GatewayError,
    InvalidArgument,
    Listing,
    NotFound,
    RankedListing,
    RemovedListing,
    SearchFilter,
    Unavailable,
)
from services.gateway.downstream import (
    IMAGE_COLLECTION,
    Deadline,
    EmbedderClient,
    IndexerShards,
    IndexItem,
)
from services.gateway.ranking import Hit, merge_by_listing

log = logging.getLogger(__name__)

DEFAULT_K = 10
DEFAULT_TOP_K = 3
DEFAULT_CURRENCY = "GBP"
_LISTING_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")


class GatewayCore:
    def __init__(self, catalogue: Catalogue, embedder: EmbedderClient, indexer: IndexerShards, *,
                 max_k: int = 100, max_images: int = 16, compensation_timeout_s: float = 5.0) -> None:
        self.catalogue = catalogue
        self.embedder = embedder
        self.indexer = indexer
        self.max_k = max_k
        self.max_images = max_images
        self.compensation_timeout_s = compensation_timeout_s

    def close(self) -> None:
        self.embedder.close()
        self.indexer.close()
        self.catalogue.close()

    # ------------------------------------------------------------------ validation helpers

    def resolve_k(self, k: int) -> int:
        if k == 0:
            return DEFAULT_K
        if not 1 <= k <= self.max_k:
            raise InvalidArgument(f"k must be between 1 and {self.max_k} (0 means {DEFAULT_K}), got {k}")
        return k

    def categories(self, deadline: Deadline, *, catalogue_fallback: bool = False) -> frozenset[str]:
        """The model's categories; the catalogue's if the embedder is down and that is allowed."""
        try:
            return frozenset(self.embedder.model_info(deadline).categories)
        except Unavailable:
            if not catalogue_fallback:
                raise
            return frozenset(self.catalogue.main_categories())

    @staticmethod
    def _require_image(image: bytes, what: str = "image") -> None:
        if not image:
            raise InvalidArgument(f"{what} is empty: send the encoded photo bytes")

    # ------------------------------------------------------------------ reads

    def get_listing(self, listing_id: str) -> Listing:
        if not listing_id:
            raise InvalidArgument("listing_id is empty")
        listing = self.catalogue.get(listing_id)
        if listing is None:
            raise NotFound(f"listing {listing_id} not found")
        return listing

    def classify(self, image: bytes, top_k: int, deadline: Deadline) -> Classification:
        self._require_image(image)
        top_k = top_k or DEFAULT_TOP_K
        categories, _, version = self.embedder.classify([image], top_k, deadline)
        return Classification(tuple(categories[0]), version)

    def search_by_image(self, image: bytes, k: int, search_filter: SearchFilter,
                        deadline: Deadline) -> list[RankedListing]:
        self._require_image(image)
        k = self.resolve_k(k)
        search_filter.validate()
        if search_filter.main_category:
            search_filter.validate(self.categories(deadline))
        query = self.embedder.embed([image], deadline)
        hits = self._search_collection(IMAGE_COLLECTION, query, k, search_filter, deadline)
        return self._attach(merge_by_listing(hits, k))

    def similar_listings(self, listing_id: str, k: int, search_filter: SearchFilter,
                         deadline: Deadline) -> list[RankedListing]:
        listing = self.get_listing(listing_id)
        k = self.resolve_k(k)
        search_filter.validate()
        if search_filter.main_category:
            search_filter.validate(self.categories(deadline, catalogue_fallback=True))
        if not listing.image_ids:
            raise FailedPrecondition(f"listing {listing_id} has no photos")
        stored = self.indexer.fetch(self.indexer.shard_for(listing_id), listing.image_ids, deadline)
        if not stored:
            raise FailedPrecondition(f"listing {listing_id} has no indexed photos; index the "
                                     "catalogue first (python -m services.gateway.index_catalogue)")
        queries = np.stack([item.vector for item in stored])
        hits = self._search_collection(IMAGE_COLLECTION, queries, k,
                                       search_filter.excluding(listing_id), deadline)
        return self._attach(merge_by_listing(hits, k, exclude=[listing_id]))

    def _search_collection(self, collection: str, queries: np.ndarray, k: int,
                           search_filter: SearchFilter, deadline: Deadline) -> list[list[Hit]]:
        """Per query, the hits of all shards (one per listing per shard)."""
        return self.indexer.search(queries, k, search_filter, deadline, collection=collection,
                                   group_by_listing=True)

    def _attach(self, hits: Sequence[Hit]) -> list[RankedListing]:
        """Hits -> ranked listings with their catalogue entries (hits without one are dropped)."""
        listings = self.catalogue.get_many(hit.listing_id for hit in hits)
        ranked: list[RankedListing] = []
        missing = []
        for hit in hits:
            listing = listings.get(hit.listing_id)
            if listing is None:
                missing.append(hit.listing_id)
                continue
            ranked.append(RankedListing(len(ranked) + 1, hit.score, hit.item_id, listing))
        if missing:
            log.warning("index has vectors of %d listings missing from the catalogue: %s",
                        len(missing), ", ".join(missing[:5]))
        return ranked

    # ------------------------------------------------------------------ writes

    def _validate_new_listing(self, listing: Listing, images: Sequence[bytes]) -> Listing:
        if not images:
            raise InvalidArgument("at least one image is required")
        if len(images) > self.max_images:
            raise InvalidArgument(f"at most {self.max_images} images per listing, got {len(images)}")
        for index, image in enumerate(images):
            self._require_image(image, f"images[{index}]")
        if listing.image_ids:
            raise InvalidArgument("listing.image_ids must be empty: the gateway assigns image ids")
        if not listing.title.strip():
            raise InvalidArgument("listing.title is required")
        if listing.id and not _LISTING_ID.match(listing.id):
            raise InvalidArgument("listing.id must be 1-128 characters of letters, digits and . _ : - "
                                  f"(or empty to assign one), got {listing.id!r}")
        if listing.price is not None and (not math.isfinite(listing.price) or listing.price < 0):
            raise InvalidArgument(f"listing.price must be a non-negative number, got {listing.price}")
        if listing.currency and not _CURRENCY.match(listing.currency):
            raise InvalidArgument(f"listing.currency must be an ISO 4217 code such as GBP, "
                                  f"got {listing.currency!r}")
        currency = listing.currency or (DEFAULT_CURRENCY if listing.price is not None else "")
        return listing.with_(id=listing.id or str(uuid.uuid4()), title=listing.title.strip(),
                             currency=currency)

    def add_listing(self, listing: Listing, images: Sequence[bytes], deadline: Deadline) -> Listing:
        """Embed, index and store a listing; all or nothing. Returns the stored listing."""
        listing = self._validate_new_listing(listing, images)
        if self.catalogue.get(listing.id) is not None:
            raise AlreadyExists(f"listing {listing.id} already exists")
        info = self.embedder.model_info(deadline)
        main_category = listing.main_category
        if not main_category and listing.category:
            derived = listing.category.split(" / ")[0].strip()
            main_category = derived if derived in info.categories else ""
        if main_category and main_category not in info.categories:
            raise InvalidArgument(f"listing.main_category {main_category!r} is not one of the "
                                  f"model's categories: {', '.join(info.categories)}")

        # 1. Embed: nothing is stored yet, so a failure here needs no undo.
        if main_category:
            vectors = self.embedder.embed(images, deadline)
        else:
            predictions, vectors, _ = self.embedder.classify(
                images, len(info.categories), deadline, include_embeddings=True)
            main_category = predict_category(predictions)
        listing = listing.with_(main_category=main_category,
                                image_ids=tuple(str(uuid.uuid4()) for _ in images))

        # 2. Index on the listing's shard.
        shard = self.indexer.shard_for(listing.id)
        items = [IndexItem(image_id, vector, listing.id, main_category, listing.price, listing.location)
                 for image_id, vector in zip(listing.image_ids, vectors)]
        try:
            self.indexer.upsert(shard, items, deadline)
        except GatewayError:
            # Usually nothing was stored, but after a timeout or a lost connection the write may
            # have landed: delete the new image ids (idempotent) so nothing is left half-added.
            self._undo_upsert(shard, listing)
            raise

        # 3. Catalogue, one transaction; undo the vectors if it fails.
        try:
            self.catalogue.add(listing)
        except DuplicateListing as exc:
            self._undo_upsert(shard, listing)
            raise AlreadyExists(str(exc)) from None
        except BaseException:
            self._undo_upsert(shard, listing)
            raise
        log.info("added listing %s with %d photos on shard %d", listing.id, len(images), shard)
        return listing

    def _undo_upsert(self, shard: int, listing: Listing) -> None:
        """Compensation: delete the listing's new vectors with a budget of its own."""
        try:
            self.indexer.delete(shard, listing.image_ids, Deadline(self.compensation_timeout_s))
        except GatewayError as exc:
            log.error("could not undo the upsert of listing %s on shard %d; orphan vectors %s: %s",
                      listing.id, shard, ", ".join(listing.image_ids), exc)

    def remove_listing(self, listing_id: str, deadline: Deadline) -> RemovedListing:
        listing = self.get_listing(listing_id)
        removed = 0
        if listing.image_ids:
            removed = self.indexer.delete(self.indexer.shard_for(listing_id), listing.image_ids,
                                          deadline)
        self.catalogue.remove(listing_id)
        log.info("removed listing %s (%d vectors)", listing_id, removed)
        return RemovedListing(listing_id, removed)


def predict_category(per_image: Sequence[Sequence[CategoryScore]]) -> str:
    """The category with the highest mean probability over a listing's photos."""
    totals: dict[str, float] = {}
    for scores in per_image:
        for score in scores:
            totals[score.category] = totals.get(score.category, 0.0) + score.probability
    if not totals:
        raise GatewayError("the embedder returned no categories")
    return min(totals, key=lambda name: (-totals[name], name))
