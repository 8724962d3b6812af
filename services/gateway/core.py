"""What the gateway does, in listing terms: the orchestration behind each public RPC.

`GatewayCore` composes the catalogue (`catalogue.Catalogue`), the embedder replicas
(`downstream.EmbedderClient`) and the indexer shards (`downstream.IndexerShards`). It takes and
returns `domain` objects and raises `common.errors.ServiceError`s (each with its status code);
the servicer in `server` only converts protos and maps those errors to status codes
(`common.serving.service_errors`).

Search by image: embed the photo -> every shard's filtered top-k (one per listing) in parallel ->
`ranking.merge_by_listing` -> catalogue entries. Similar listings: the listing's stored photo
vectors (fetched from its shard, no re-embedding) are the queries; the per-photo rankings are
merged by best score and the listing itself is excluded. Unless the caller asks for photos only,
its stored text vector also searches the "text" collection, and the two top ``k' = max(3k, 50)``
rankings are fused by weighted cosine (as hybrid Search, below) with SimilarListings' text weight
(`fusion_defaults`: GATEWAY_SIMILAR_TEXT_WEIGHT when set, else the weight chosen on the valid split
that the embedder's artefact holds); without a text vector (or a text collection) it is the
photos-only ranking, without indexed photos the text ranking.

AddListing is all or nothing with no window for orphan vectors (design and failure cases in
``docs/catalogue.md``): embed (nothing stored yet) -> one catalogue transaction holding the listing
(``pending``, invisible to reads), its vectors and an outbox entry -> the outbox pushes the vectors
to the listing's shard (at once, within the request's deadline; else later, by any gateway's
applier loop) and the listing turns live in the transaction that marks the entry done. If the
shard refuses the vectors or cannot be reached, the add is cancelled (the listing dropped and its
ids queued for deletion, in one transaction) and the error returned; if the outcome is unknown (a
timeout), the response says ``pending`` and the outbox keeps pushing. RemoveListing deletes the row
and queues the vector deletion in one transaction, then pushes it the same way. Nothing is ever
undone by a compensating call that a late write could overtake: writes only roll forward.

Text: the indexer's "text" collection holds one vector per listing (item id = listing id), the
embedder's EmbedText vector (all-MiniLM-L6-v2, unit norm) of
``common.text.listing_text(title, description)``. SearchByText embeds ``listing_text(query)``
the same way and searches that collection on every shard (filters as for images); results carry
no matched image id. AddListing also embeds and indexes the listing's text when the embedder
serves text (GetModelInfo.modalities), within the same all-or-nothing steps (text embedded
before anything is written, its vector stored and pushed with the photos'); RemoveListing
deletes the text vector too (a shard without a text collection is fine).

Hybrid Search (an image and a text query). With only one of them it is exactly SearchByImage or
SearchByText (``text_weight`` and ``fusion`` are then ignored). With both, each modality's top
``k' = max(3k, 50)`` listings (one entry per listing: its best photo for the image side) are
fetched with the same filter and fused with ``w = text_weight`` (unset: for weighted cosine hybrid
Search's default text weight from `fusion_defaults`, GATEWAY_SEARCH_TEXT_WEIGHT, else the one the
embedder's artefact holds, else 0.5; for reciprocal rank 0.5), by
`ranking.fuse_image_and_text` over `common.ranking`:

* FUSION_WEIGHTED_COSINE (default): ``score = (1 - w) * cos_image + w * cos_text``. A listing
  found by one query only gets, for the other, the lowest score that query's k' list holds (an
  upper bound on its true score). ``w = 0`` ranks exactly as the image search, ``w = 1`` as the
  text search. Cosines of the two models live on different scales (EfficientNet features are
  non-negative), so ``w`` also calibrates.
* FUSION_RECIPROCAL_RANK: ``score = (1 - w) / (60 + rank_image) + w / (60 + rank_text)``
  (Cormack et al. 2009, rank 1 = best; a list that lacks the listing adds nothing). Scale-free.

Recommend (liked, skipped, seen listing ids): per modality ("image": a listing's vector is the
normalised mean of its stored photo vectors; "text": its stored text vector), the Rocchio query
``q = normalise(mean(liked) - 0.5 * mean(skipped))`` (`common.ranking.recommend_query`) searches
that collection for the top k' listings, with liked, skipped and seen listings excluded inside
the index (and again after merging). When both modalities have a query, the two rankings are
fused by reciprocal rank with equal weights (``RECOMMEND_FUSION``: scale-free, no caller weight
to calibrate cosines with), else the one ranking is used with its cosine scores. An unknown
liked id is NOT_FOUND, no liked id INVALID_ARGUMENT; unknown skipped/seen ids are only excluded.
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from collections.abc import Sequence

import numpy as np

from common.listing_text import listing_text
from common.ranking import recommend_query
from services.gateway.catalogue import Catalogue, DuplicateListing, StoredVector
from services.gateway.domain import (
    AddedListing,
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
    TEXT_COLLECTION,
    Deadline,
    EmbedderClient,
    IndexerShards,
)
from services.gateway.fusion_defaults import FusionDefaults
from services.gateway.outbox import OutboxApplier
from services.gateway.ranking import (
    FUSION_METHODS,
    RECIPROCAL_RANK,
    WEIGHTED_COSINE,
    FusedHit,
    Hit,
    fuse_image_and_text,
    merge_by_listing,
)

log = logging.getLogger(__name__)

DEFAULT_K = 10
DEFAULT_TOP_K = 3
DEFAULT_CURRENCY = "GBP"
_LISTING_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")
#: Longest value of each free-text listing field AddListing accepts (characters).
FIELD_LIMITS = {"title": 500, "description": 20_000, "category": 500, "main_category": 200, "location": 500}
#: Text weight of a reciprocal-rank hybrid Search whose request leaves text_weight unset (equal
#: weights; a weighted-cosine one takes `fusion_defaults`' choice).
DEFAULT_TEXT_WEIGHT = 0.5
#: Longest text query accepted (listing_text keeps at most the first 200 characters of it).
MAX_QUERY_CHARS = 2000
#: Most liked + skipped listing ids one Recommend may carry (their vectors are fetched), and
#: most seen ids (only excluded).
MAX_FEEDBACK_IDS = 500
MAX_SEEN_IDS = 5000
#: How Recommend fuses its image and text rankings (see the module docstring).
RECOMMEND_FUSION = RECIPROCAL_RANK


def candidate_count(k: int) -> int:
    """How many listings each modality contributes to a fusion: ``k' = max(3k, 50)``."""
    return max(3 * k, 50)


class GatewayCore:
    def __init__(
        self,
        catalogue: Catalogue,
        embedder: EmbedderClient,
        indexer: IndexerShards,
        *,
        max_k: int = 100,
        max_images: int = 16,
        outbox: OutboxApplier | None = None,
        fusion: FusionDefaults | None = None,
    ) -> None:
        self.catalogue = catalogue
        self.embedder = embedder
        self.indexer = indexer
        self.max_k = max_k
        self.max_images = max_images
        self.outbox = outbox or OutboxApplier(catalogue, indexer)
        #: The default text weights of hybrid Search and SimilarListings (settings, else artefact).
        self.fusion = fusion or FusionDefaults(embedder.model_info)

    def close(self) -> None:
        self.outbox.stop()
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

    def get_listing(self, listing_id: str, *, include_pending: bool = False) -> Listing:
        """A live listing; with ``include_pending`` also one whose vectors are still being
        indexed (see `AddedListing`)."""
        if not listing_id:
            raise InvalidArgument("listing_id is empty")
        listing = self.catalogue.get(listing_id, include_pending=include_pending)
        if listing is None:
            raise NotFound(f"listing {listing_id} not found")
        return listing

    def classify(self, image: bytes, top_k: int, deadline: Deadline) -> Classification:
        self._require_image(image)
        top_k = top_k or DEFAULT_TOP_K
        categories, _, version = self.embedder.classify([image], top_k, deadline)
        return Classification(tuple(categories[0]), version)

    def search_by_image(
        self, image: bytes, k: int, search_filter: SearchFilter, deadline: Deadline
    ) -> list[RankedListing]:
        self._require_image(image)
        k = self.resolve_k(k)
        search_filter.validate()
        if search_filter.main_category:
            search_filter.validate(self.categories(deadline))
        query = self.embedder.embed([image], deadline)
        hits = self._search_collection(IMAGE_COLLECTION, query, k, search_filter, deadline)
        return self._attach(merge_by_listing(hits, k))

    def similar_listings(
        self,
        listing_id: str,
        k: int,
        search_filter: SearchFilter,
        deadline: Deadline,
        *,
        photos_only: bool = False,
    ) -> list[RankedListing]:
        """Listings like this one (never itself): by its photos and its text fused, or by its
        photos alone (``photos_only``, or when it has no text vector; see the module docstring)."""
        listing = self.get_listing(listing_id)
        k = self.resolve_k(k)
        search_filter.validate()
        if search_filter.main_category:
            search_filter.validate(self.categories(deadline, catalogue_fallback=True))
        exclusion = search_filter.excluding(listing_id)
        text_query = None if photos_only else self._listing_text_vectors([listing], deadline).get(listing_id)
        if text_query is None:
            return self._attach(self._similar_by_photos(listing, k, exclusion, deadline))
        candidates = candidate_count(k)
        text = merge_by_listing(
            self._search_collection(TEXT_COLLECTION, text_query[None, :], candidates, exclusion, deadline),
            candidates,
            exclude=[listing_id],
        )
        image = self._similar_by_photos(listing, candidates, exclusion, deadline, required=False)
        if not image:  # no indexed photo: the text ranking alone
            return self._attach([Hit(h.listing_id, h.score, "") for h in text[:k]])
        weight = self.fusion.similar_text_weight(deadline)
        return self._attach_fused(fuse_image_and_text(image, text, weight, WEIGHTED_COSINE, k))

    def _similar_by_photos(
        self, listing: Listing, k: int, exclusion: SearchFilter, deadline: Deadline, *, required: bool = True
    ) -> list[Hit]:
        """The listing's stored photo vectors as queries, merged by best score, itself left out.
        With ``required`` a listing without (indexed) photos is FAILED_PRECONDITION, else []."""
        if not listing.image_ids:
            if not required:
                return []
            raise FailedPrecondition(f"listing {listing.id} has no photos")
        stored = self.indexer.fetch(self.indexer.shard_for(listing.id), listing.image_ids, deadline)
        if not stored:
            if not required:
                return []
            raise FailedPrecondition(
                f"listing {listing.id} has no indexed photos; index the "
                "catalogue first (python -m services.gateway.index_catalogue)"
            )
        queries = np.stack([item.vector for item in stored])
        hits = self._search_collection(IMAGE_COLLECTION, queries, k, exclusion, deadline)
        return merge_by_listing(hits, k, exclude=[listing.id])

    def search_by_text(
        self, query: str, k: int, search_filter: SearchFilter, deadline: Deadline
    ) -> list[RankedListing]:
        """Listings whose text best matches ``query`` (cosine of MiniLM vectors), best first."""
        text = self._query_text(query)
        k = self.resolve_k(k)
        self._validate_filter(search_filter, deadline)
        hits = self._search_collection(
            TEXT_COLLECTION, self._embed_query(text, deadline), k, search_filter, deadline
        )
        return self._attach([Hit(h.listing_id, h.score, "") for h in merge_by_listing(hits, k)])

    def search(
        self,
        image: bytes,
        text: str,
        k: int,
        search_filter: SearchFilter,
        text_weight: float | None,
        fusion: str,
        deadline: Deadline,
    ) -> list[RankedListing]:
        """Hybrid search: an image query and/or a text query, fused (see the module docstring)."""
        has_text = bool(text and text.strip())
        if not image and not has_text:
            raise InvalidArgument("send an image, a text query, or both")
        if text_weight is not None and not (math.isfinite(text_weight) and 0.0 <= text_weight <= 1.0):
            raise InvalidArgument(f"text_weight must be between 0 and 1, got {text_weight}")
        if fusion not in FUSION_METHODS:
            raise InvalidArgument(f"fusion must be one of {', '.join(FUSION_METHODS)}; got {fusion}")
        if not has_text:
            return self.search_by_image(image, k, search_filter, deadline)
        if not image:
            return self.search_by_text(text, k, search_filter, deadline)
        query = self._query_text(text)
        k = self.resolve_k(k)
        self._validate_filter(search_filter, deadline)
        weight = self._search_text_weight(text_weight, fusion, deadline)
        candidates = candidate_count(k)
        image_query = self.embedder.embed([image], deadline)
        text_query = self._embed_query(query, deadline)
        image_hits = merge_by_listing(
            self._search_collection(IMAGE_COLLECTION, image_query, candidates, search_filter, deadline),
            candidates,
        )
        text_hits = merge_by_listing(
            self._search_collection(TEXT_COLLECTION, text_query, candidates, search_filter, deadline),
            candidates,
        )
        return self._attach_fused(fuse_image_and_text(image_hits, text_hits, weight, fusion, k))

    def _search_text_weight(self, text_weight: float | None, fusion: str, deadline: Deadline) -> float:
        """The caller's weight; unset: for weighted cosine the default chosen for the image model
        (`fusion_defaults`: it calibrates the two cosines' scales), for reciprocal rank (scale-free)
        equal weights."""
        if text_weight is not None:
            return float(text_weight)
        if fusion == WEIGHTED_COSINE:
            return self.fusion.search_text_weight(deadline)
        return DEFAULT_TEXT_WEIGHT

    def recommend(
        self,
        liked: Sequence[str],
        skipped: Sequence[str],
        seen: Sequence[str],
        k: int,
        search_filter: SearchFilter,
        deadline: Deadline,
    ) -> list[RankedListing]:
        """Listings like the liked ones and unlike the skipped ones, none of liked, skipped or
        seen returned (see the module docstring)."""
        liked = list(dict.fromkeys(i for i in liked if i))
        liked_set = set(liked)
        skipped = [i for i in dict.fromkeys(i for i in skipped if i) if i not in liked_set]
        seen = list(dict.fromkeys(i for i in seen if i))
        if not liked:
            raise InvalidArgument("liked_listing_ids is empty: like at least one listing")
        if len(liked) + len(skipped) > MAX_FEEDBACK_IDS:
            raise InvalidArgument(
                f"at most {MAX_FEEDBACK_IDS} liked and skipped listing ids in "
                f"all, got {len(liked) + len(skipped)}"
            )
        if len(seen) > MAX_SEEN_IDS:
            raise InvalidArgument(f"at most {MAX_SEEN_IDS} seen listing ids, got {len(seen)}")
        k = self.resolve_k(k)
        self._validate_filter(search_filter, deadline, catalogue_fallback=True)
        known = self.catalogue.get_many(liked + skipped)
        unknown = [i for i in liked if i not in known]
        if unknown:
            raise NotFound(
                f"liked listing{'s' if len(unknown) > 1 else ''} not found: {', '.join(unknown[:10])}"
            )
        skipped = [i for i in skipped if i in known]  # unknown skips can only be excluded
        feedback = [known[i] for i in liked + skipped]
        vectors = {
            IMAGE_COLLECTION: self._listing_image_vectors(feedback, deadline),
            TEXT_COLLECTION: self._listing_text_vectors(feedback, deadline),
        }
        excluded = liked + skipped + seen
        candidates = candidate_count(k)
        exclusion = search_filter.excluding(*excluded)
        rankings: dict[str, list[Hit]] = {}
        for collection, per_listing in vectors.items():
            liked_vectors = [per_listing[i] for i in liked if i in per_listing]
            if not liked_vectors:
                continue
            skipped_vectors = [per_listing[i] for i in skipped if i in per_listing]
            query = recommend_query(
                np.stack(liked_vectors), np.stack(skipped_vectors) if skipped_vectors else None
            )
            hits = self._search_collection(collection, query, candidates, exclusion, deadline)
            rankings[collection] = merge_by_listing(hits, candidates, exclude=excluded)
        if not rankings:
            raise FailedPrecondition(
                "none of the liked listings has indexed vectors; index the "
                "catalogue first (python -m services.gateway.index_catalogue)"
            )
        image, text = rankings.get(IMAGE_COLLECTION), rankings.get(TEXT_COLLECTION)
        if image is not None and text is not None:
            fused = fuse_image_and_text(image, text, 0.5, RECOMMEND_FUSION, k)
        elif image is not None:
            fused = [FusedHit(h.listing_id, h.score, h.item_id) for h in image[:k]]
        else:
            fused = [FusedHit(h.listing_id, h.score, "") for h in text[:k]]
        return self._attach_fused(fused)

    # ------------------------------------------------------------------ search helpers

    def _validate_filter(
        self, search_filter: SearchFilter, deadline: Deadline, *, catalogue_fallback: bool = False
    ) -> None:
        search_filter.validate()
        if search_filter.main_category:
            search_filter.validate(self.categories(deadline, catalogue_fallback=catalogue_fallback))

    @staticmethod
    def _query_text(query: str) -> str:
        """A text query -> the text to embed (`listing_text`), or InvalidArgument."""
        if len(query) > MAX_QUERY_CHARS:
            raise InvalidArgument(
                f"the text query is {len(query)} characters long, the limit is {MAX_QUERY_CHARS}"
            )
        text = listing_text(query)
        if not text:
            raise InvalidArgument("the text query is empty")
        return text

    def _embed_query(self, text: str, deadline: Deadline) -> np.ndarray:
        return self.embedder.embed_text([text], deadline)

    def _listing_image_vectors(
        self, listings: Sequence[Listing], deadline: Deadline
    ) -> dict[str, np.ndarray]:
        """{listing id: normalised mean of its stored photo vectors} (listings without any
        indexed photo are left out), fetched from the owning shards in parallel."""
        by_shard: dict[int, list[str]] = {}
        for listing in listings:
            if listing.image_ids:
                by_shard.setdefault(self.indexer.shard_for(listing.id), []).extend(listing.image_ids)
        owner = {image_id: listing.id for listing in listings for image_id in listing.image_ids}
        photos: dict[str, list[np.ndarray]] = {}
        for item in self.indexer.fetch_many(by_shard, deadline):
            listing_id = owner.get(item.id)
            norm = float(np.linalg.norm(item.vector))
            if listing_id is not None and norm > 0 and math.isfinite(norm):
                photos.setdefault(listing_id, []).append(item.vector / norm)
        means = {listing_id: np.mean(rows, axis=0) for listing_id, rows in photos.items()}
        return {
            listing_id: mean / np.linalg.norm(mean)
            for listing_id, mean in means.items()
            if np.linalg.norm(mean) > 1e-12
        }

    def _listing_text_vectors(self, listings: Sequence[Listing], deadline: Deadline) -> dict[str, np.ndarray]:
        """{listing id: stored text vector}; empty when the shards have no text collection."""
        by_shard: dict[int, list[str]] = {}
        for listing in listings:
            by_shard.setdefault(self.indexer.shard_for(listing.id), []).append(listing.id)
        try:
            stored = self.indexer.fetch_many(by_shard, deadline, collection=TEXT_COLLECTION)
        except FailedPrecondition as exc:  # e.g. NOT_FOUND: no "text" collection configured
            log.info("no text vectors for Recommend: %s", exc)
            return {}
        wanted = {listing.id for listing in listings}
        return {
            item.id: item.vector for item in stored if item.id in wanted and np.linalg.norm(item.vector) > 0
        }

    def _search_collection(
        self, collection: str, queries: np.ndarray, k: int, search_filter: SearchFilter, deadline: Deadline
    ) -> list[list[Hit]]:
        """Per query, the hits of all shards (one per listing per shard)."""
        return self.indexer.search(
            queries, k, search_filter, deadline, collection=collection, group_by_listing=True
        )

    def _attach_fused(self, fused: Sequence[FusedHit]) -> list[RankedListing]:
        return self._attach([Hit(f.listing_id, f.score, f.matched_image_id) for f in fused])

    def _attach(self, hits: Sequence[Hit]) -> list[RankedListing]:
        """Hits -> ranked listings with their catalogue entries (hits without one are dropped).
        A hit proves its vectors searchable, so a listing still marked pending is returned."""
        listings = self.catalogue.get_many((hit.listing_id for hit in hits), include_pending=True)
        ranked: list[RankedListing] = []
        missing = []
        for hit in hits:
            listing = listings.get(hit.listing_id)
            if listing is None:
                missing.append(hit.listing_id)
                continue
            ranked.append(RankedListing(len(ranked) + 1, hit.score, hit.item_id, listing))
        if missing:
            log.warning(
                "index has vectors of %d listings missing from the catalogue: %s",
                len(missing),
                ", ".join(missing[:5]),
            )
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
            raise InvalidArgument(
                "listing.id must be 1-128 characters of letters, digits and . _ : - "
                f"(or empty to assign one), got {listing.id!r}"
            )
        for name, limit in FIELD_LIMITS.items():
            value = getattr(listing, name)
            if len(value) > limit:
                raise InvalidArgument(f"listing.{name} is {len(value)} characters long; the limit is {limit}")
        if listing.price is not None and (not math.isfinite(listing.price) or listing.price < 0):
            raise InvalidArgument(f"listing.price must be a non-negative number, got {listing.price}")
        if listing.currency and not _CURRENCY.match(listing.currency):
            raise InvalidArgument(
                f"listing.currency must be an ISO 4217 code such as GBP, got {listing.currency!r}"
            )
        currency = listing.currency or (DEFAULT_CURRENCY if listing.price is not None else "")
        return listing.with_(
            id=listing.id or str(uuid.uuid4()), title=listing.title.strip(), currency=currency
        )

    def add_listing(self, listing: Listing, images: Sequence[bytes], deadline: Deadline) -> AddedListing:
        """Embed, store and index a listing; all or nothing (see the module docstring)."""
        listing = self._validate_new_listing(listing, images)
        if self.catalogue.get(listing.id, include_pending=True) is not None:
            raise AlreadyExists(f"listing {listing.id} already exists")
        info = self.embedder.model_info(deadline)
        main_category = listing.main_category
        if not main_category and listing.category:
            derived = listing.category.split(" / ")[0].strip()
            main_category = derived if derived in info.categories else ""
        if main_category and main_category not in info.categories:
            raise InvalidArgument(
                f"listing.main_category {main_category!r} is not one of the "
                f"model's categories: {', '.join(info.categories)}"
            )

        # 1. Embed: nothing is stored yet, so a failure here needs no undo.
        if main_category:
            vectors = self.embedder.embed(images, deadline)
        else:
            predictions, vectors, _ = self.embedder.classify(
                images, len(info.categories), deadline, include_embeddings=True
            )
            main_category = predict_category(predictions)
        text_vector = None
        if "text" in info.modalities:  # the embedder serves text: index the listing's text too
            text_vector = self.embedder.embed_text(
                [listing_text(listing.title, listing.description)], deadline
            )[0]
        listing = listing.with_(
            main_category=main_category, image_ids=tuple(str(uuid.uuid4()) for _ in images)
        )

        # 2. One transaction: the pending listing, its vectors, the outbox entry for its shard.
        shard = self.indexer.shard_for(listing.id)
        stored = [
            StoredVector(IMAGE_COLLECTION, image_id, vector)
            for image_id, vector in zip(listing.image_ids, vectors)
        ]
        if text_vector is not None:
            stored.append(StoredVector(TEXT_COLLECTION, listing.id, text_vector))
        try:  # the entry is written held by this gateway's applier: no claim before the push
            entry = self.catalogue.add_pending(
                listing, stored, shard, lease_holder=self.outbox.holder, lease_s=self.outbox.lease_s
            )
        except DuplicateListing as exc:
            raise AlreadyExists(str(exc)) from None

        # 3. Push the vectors now. Refused, or the shard unreachable: the add is cancelled and
        # the error returned. Unknown outcome (a timeout): the outbox loop keeps pushing and
        # the caller hears "pending".
        pushed = self.outbox.apply_listing(listing.id, deadline, cancel_refused_add=True, leased=entry)
        if pushed.cancelled:
            raise pushed.error
        pending = not pushed.done
        log.info(
            "added listing %s with %d photos on shard %d%s",
            listing.id,
            len(images),
            shard,
            " (vectors pending)" if pending else "",
        )
        return AddedListing(listing, pending)

    def remove_listing(self, listing_id: str, deadline: Deadline) -> RemovedListing:
        """Delete a live listing and queue the deletion of its vectors in one transaction, then
        push that deletion (at once if the shard answers in time, else by the outbox loop)."""
        if not listing_id:
            raise InvalidArgument("listing_id is empty")
        removed = self.catalogue.remove_queued(
            listing_id,
            self.indexer.shard_for(listing_id),
            text_collection=TEXT_COLLECTION,
            lease_holder=self.outbox.holder,
            lease_s=self.outbox.lease_s,
        )
        if removed is None:
            raise NotFound(f"listing {listing_id} not found")
        listing, entry = removed
        pending = not self.outbox.apply_listing(listing_id, deadline, leased=entry).done
        log.info(
            "removed listing %s (%d photos%s)",
            listing_id,
            len(listing.image_ids),
            ", vector deletion pending" if pending else "",
        )
        return RemovedListing(listing_id, len(listing.image_ids), pending)


def predict_category(per_image: Sequence[Sequence[CategoryScore]]) -> str:
    """The category with the highest mean probability over a listing's photos."""
    totals: dict[str, float] = {}
    for scores in per_image:
        for score in scores:
            totals[score.category] = totals.get(score.category, 0.0) + score.probability
    if not totals:
        raise GatewayError("the embedder returned no categories")
    return min(totals, key=lambda name: (-totals[name], name))
