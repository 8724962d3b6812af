"""The gateway's own vocabulary: listings, filters, ranked results and errors.

Plain dataclasses with no gRPC in them, so the catalogue, ranking and orchestration code (and the
Python client's callers) can use them without knowing about protobuf or servicers. `convert`
maps them to and from the public protos; `common.serving.service_errors` maps the errors (each
carries its status code, `common.errors`) to status codes for the servicer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from common.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "AlreadyExists",
    "DeadlineExceeded",
    "DownstreamError",
    "FailedPrecondition",
    "GatewayError",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "ServiceError",
    "Unauthenticated",
    "Unavailable",
]


# ----------------------------------------------------------------------------- errors


class GatewayError(ServiceError):
    """The gateway's own errors: not the caller's fault (INTERNAL); ``str()`` is the details.
    The shared ones (`common.errors`: InvalidArgument, NotFound, Unavailable, ...) carry their
    own status code."""

    status = "INTERNAL"


class DownstreamError(GatewayError):
    """A downstream answered with an error that is not the caller's fault (INTERNAL, UNKNOWN...)."""


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Listing:
    """A catalogue entry. ``price`` is None when unknown; ``image_ids`` in display order."""

    id: str
    title: str
    description: str = ""
    category: str = ""
    main_category: str = ""
    price: float | None = None
    currency: str = ""
    location: str = ""
    image_ids: tuple[str, ...] = ()

    def with_(self, **changes) -> "Listing":
        return replace(self, **changes)


@dataclass(frozen=True)
class SearchFilter:
    """Which listings a search may return; empty / None fields do not filter."""

    main_category: str = ""
    min_price: float | None = None
    max_price: float | None = None
    location: str = ""
    exclude_listing_ids: tuple[str, ...] = ()

    def validate(self, known_categories: "set[str] | frozenset[str] | None" = None) -> None:
        """Raise InvalidArgument for a bad price range or an unknown main category."""
        for name, value in (("min_price", self.min_price), ("max_price", self.max_price)):
            if value is not None and not math.isfinite(value):
                raise InvalidArgument(f"filter.{name} must be a finite number, got {value}")
        if self.min_price is not None and self.max_price is not None and self.min_price > self.max_price:
            raise InvalidArgument(
                f"filter.min_price {self.min_price:g} is greater than filter.max_price {self.max_price:g}"
            )
        if self.main_category and known_categories is not None and self.main_category not in known_categories:
            raise InvalidArgument(
                f"filter.main_category {self.main_category!r} is not a known category; "
                f"known: {', '.join(sorted(known_categories))}"
            )

    def excluding(self, *listing_ids: str) -> "SearchFilter":
        extra = tuple(i for i in listing_ids if i not in self.exclude_listing_ids)
        return replace(self, exclude_listing_ids=self.exclude_listing_ids + extra)

    @property
    def is_empty(self) -> bool:
        return self == SearchFilter()


@dataclass(frozen=True)
class RankedListing:
    """One search result: 1-based rank, score (higher is better), best-matching photo, listing."""

    rank: int
    score: float
    matched_image_id: str
    listing: Listing


class RankedResults(list):
    """The answer of a search: its `RankedListing` results, best first (it is that list), and
    ``missing_shards``: the indexer shards whose listings could not be searched because every
    replica was down. Only a request with ``allow_partial_results`` gets an answer with missing
    shards; without it such a search fails with UNAVAILABLE naming the shard."""

    def __init__(self, results: Iterable[RankedListing] = (), missing_shards: Iterable[int] = ()) -> None:
        super().__init__(results)
        self.missing_shards: tuple[int, ...] = tuple(sorted(int(s) for s in missing_shards))

    @property
    def complete(self) -> bool:
        return not self.missing_shards

    @property
    def notice(self) -> str:
        """The missing shards in words for a person ("" when the results are complete)."""
        return missing_shards_notice(self.missing_shards)


def missing_shards_notice(missing_shards: Sequence[int]) -> str:
    """ "" for complete results, else a sentence saying which shards are missing and what that
    means for the results."""
    if not missing_shards:
        return ""
    if len(missing_shards) == 1:
        which = f"index shard {missing_shards[0]} is"
    else:
        which = "index shards " + ", ".join(map(str, missing_shards[:-1])) + f" and {missing_shards[-1]} are"
    return (
        f"These results are incomplete: {which} unavailable, so listings stored there are "
        "missing. Try again shortly for complete results."
    )


@dataclass(frozen=True)
class CategoryScore:
    category: str
    probability: float


@dataclass(frozen=True)
class Classification:
    categories: tuple[CategoryScore, ...]
    model_version: str


@dataclass(frozen=True)
class RemovedListing:
    """``pending``: the removal is committed (the listing is gone from reads) but its vectors are
    still being deleted from the shard by the outbox."""

    listing_id: str
    images_removed: int
    pending: bool = False


@dataclass(frozen=True)
class AddedListing:
    """A stored listing. ``pending``: committed, but its vectors are not acknowledged by the shard
    yet, so reads do not return it until the outbox has pushed them (it will: the write is
    durable)."""

    listing: Listing
    pending: bool = False


@dataclass(frozen=True)
class ServedFusionWeights:
    """The fusion weights the embedder's artefact holds for its image model (chosen on valid)."""

    search_text_weight: float
    similar_text_weight: float
    chosen_on: str = "valid"
    source: str = ""


@dataclass
class ModelInfo:
    """What the embedder serves, as far as the gateway needs it."""

    categories: tuple[str, ...]
    embedding_dim: int
    model_version: str
    max_batch: int = 32
    max_image_bytes: int = 0
    modalities: tuple[str, ...] = ("image",)
    text_embedding_dim: int = 0
    extra: dict = field(default_factory=dict)
    #: None when the artefact has no (current) fusion weights; ``fusion_weights_problem`` says why.
    fusion_weights: ServedFusionWeights | None = None
    fusion_weights_problem: str = ""
