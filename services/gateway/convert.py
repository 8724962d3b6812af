"""Public gateway protos <-> `domain` objects (used by the servicer and the Python client)."""

from __future__ import annotations

from marketplace.gateway.v1 import gateway_pb2
from services.gateway.domain import (
    CategoryScore,
    Classification,
    Listing,
    RankedListing,
    RankedResults,
    RemovedListing,
    SearchFilter,
)
from services.gateway.ranking import RECIPROCAL_RANK, WEIGHTED_COSINE

#: Public Fusion enum <-> `ranking.fuse_image_and_text` method names.
_FUSIONS = {
    gateway_pb2.FUSION_WEIGHTED_COSINE: WEIGHTED_COSINE,
    gateway_pb2.FUSION_RECIPROCAL_RANK: RECIPROCAL_RANK,
}


def listing_to_proto(listing: Listing) -> gateway_pb2.Listing:
    message = gateway_pb2.Listing(
        id=listing.id,
        title=listing.title,
        description=listing.description,
        category=listing.category,
        main_category=listing.main_category,
        currency=listing.currency,
        location=listing.location,
        image_ids=list(listing.image_ids),
    )
    if listing.price is not None:
        message.price = float(listing.price)
    return message


def listing_from_proto(message: gateway_pb2.Listing) -> Listing:
    return Listing(
        id=message.id,
        title=message.title,
        description=message.description,
        category=message.category,
        main_category=message.main_category,
        price=message.price if message.HasField("price") else None,
        currency=message.currency,
        location=message.location,
        image_ids=tuple(message.image_ids),
    )


def filter_from_proto(message: gateway_pb2.ListingFilter) -> SearchFilter:
    return SearchFilter(
        main_category=message.main_category,
        min_price=message.min_price if message.HasField("min_price") else None,
        max_price=message.max_price if message.HasField("max_price") else None,
        location=message.location,
        exclude_listing_ids=tuple(dict.fromkeys(i for i in message.exclude_listing_ids if i)),
    )


def filter_to_proto(search_filter: SearchFilter) -> gateway_pb2.ListingFilter:
    message = gateway_pb2.ListingFilter(
        main_category=search_filter.main_category,
        location=search_filter.location,
        exclude_listing_ids=list(search_filter.exclude_listing_ids),
    )
    if search_filter.min_price is not None:
        message.min_price = float(search_filter.min_price)
    if search_filter.max_price is not None:
        message.max_price = float(search_filter.max_price)
    return message


def fusion_from_proto(value: int) -> str:
    """A Fusion enum value -> its method name (an unknown value gives a name the core refuses)."""
    return _FUSIONS.get(value, f"Fusion value {value}")


def fusion_to_proto(method: str) -> int:
    """A method name ("weighted_cosine" / "reciprocal_rank") -> the Fusion enum value."""
    for value, name in _FUSIONS.items():
        if name == method:
            return value
    raise ValueError(f"unknown fusion {method!r}; use one of {', '.join(_FUSIONS.values())}")


def ranked_to_proto(results: list[RankedListing]) -> gateway_pb2.SearchListingsResponse:
    return gateway_pb2.SearchListingsResponse(
        results=[
            gateway_pb2.RankedListing(
                rank=r.rank,
                score=r.score,
                matched_image_id=r.matched_image_id,
                listing=listing_to_proto(r.listing),
            )
            for r in results
        ],
        missing_shards=getattr(results, "missing_shards", ()),
    )


def ranked_from_proto(message: gateway_pb2.SearchListingsResponse) -> RankedResults:
    return RankedResults(
        (
            RankedListing(r.rank, float(r.score), r.matched_image_id, listing_from_proto(r.listing))
            for r in message.results
        ),
        message.missing_shards,
    )


def classification_to_proto(result: Classification) -> gateway_pb2.ClassifyImageResponse:
    return gateway_pb2.ClassifyImageResponse(
        categories=[
            gateway_pb2.CategoryPrediction(category=c.category, probability=c.probability)
            for c in result.categories
        ],
        model_version=result.model_version,
    )


def classification_from_proto(message: gateway_pb2.ClassifyImageResponse) -> Classification:
    return Classification(
        tuple(CategoryScore(c.category, float(c.probability)) for c in message.categories),
        message.model_version,
    )


def removed_from_proto(message: gateway_pb2.RemoveListingResponse) -> RemovedListing:
    return RemovedListing(message.listing_id, int(message.images_removed), bool(message.pending))
