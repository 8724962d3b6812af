"""The JSON shapes of the edge's API: the gateway's messages (`services.gateway.domain`) as
pydantic models, which also make the OpenAPI document."""

from __future__ import annotations

from pydantic import BaseModel, Field

from services.gateway.domain import Classification, Listing, RankedListing, missing_shards_notice

#: Where the page and API clients fetch a photo of the image store.
IMAGE_URL = "/api/images/{image_id}"


def image_url(image_id: str) -> str:
    return IMAGE_URL.format(image_id=image_id)


class ErrorBody(BaseModel):
    """Every answer other than 2xx (and FastAPI's own 422 for malformed parameters)."""

    detail: str = Field(
        description="what went wrong, in words meant for a person (the gateway's "
        "message when the gateway refused)"
    )
    code: str = Field(description="gRPC status name, e.g. INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE")


class CategoryScore(BaseModel):
    category: str
    probability: float = Field(description="softmax probability in [0, 1]")


class ClassificationOut(BaseModel):
    categories: list[CategoryScore]
    model_version: str

    @classmethod
    def of(cls, result: Classification) -> "ClassificationOut":
        return cls(
            categories=[
                CategoryScore(category=c.category, probability=c.probability) for c in result.categories
            ],
            model_version=result.model_version,
        )


class PredictImageOut(BaseModel):
    """The answer of the original FastAPI project's ``POST /predict/image``."""

    Category: str = Field(description="the most likely main category")
    Probability: float = Field(description="its probability in [0, 1]")


class ListingOut(BaseModel):
    id: str
    title: str
    description: str = ""
    category: str = Field("", description='full category path, e.g. "Home & Garden / Dining"')
    main_category: str = ""
    price: float | None = Field(None, description="unset when unknown")
    currency: str = ""
    location: str = ""
    image_ids: list[str] = []
    image_urls: list[str] = Field([], description="the photos, in order, from the image store")

    @classmethod
    def of(cls, listing: Listing) -> "ListingOut":
        return cls(
            id=listing.id,
            title=listing.title,
            description=listing.description,
            category=listing.category,
            main_category=listing.main_category,
            price=listing.price,
            currency=listing.currency,
            location=listing.location,
            image_ids=list(listing.image_ids),
            image_urls=[image_url(i) for i in listing.image_ids],
        )


class RankedListingOut(BaseModel):
    rank: int = Field(description="1-based position")
    score: float = Field(description="relevance, higher is better")
    matched_image_id: str = Field(description="the listing's photo that matched best; empty for text matches")
    image_url: str | None = Field(
        description="the photo to show: the matched one, else the listing's first; null when it has none"
    )
    listing: ListingOut

    @classmethod
    def of(cls, result: RankedListing) -> "RankedListingOut":
        shown = result.matched_image_id or next(iter(result.listing.image_ids), "")
        return cls(
            rank=result.rank,
            score=result.score,
            matched_image_id=result.matched_image_id,
            image_url=image_url(shown) if shown else None,
            listing=ListingOut.of(result.listing),
        )


class SearchResults(BaseModel):
    results: list[RankedListingOut]
    missing_shards: list[int] = Field(
        [],
        description=(
            "index shards (0-based) whose listings are NOT in these results because every replica "
            "was down; only ever non-empty when the request set allow_partial_results"
        ),
    )
    notice: str = Field(
        "", description="the missing shards in words for a person; empty when the results are complete"
    )

    @classmethod
    def of(cls, results: list[RankedListing]) -> "SearchResults":
        missing = tuple(getattr(results, "missing_shards", ()))
        return cls(
            results=[RankedListingOut.of(r) for r in results],
            missing_shards=list(missing),
            notice=missing_shards_notice(missing),
        )


class FilterIn(BaseModel):
    main_category: str = ""
    min_price: float | None = None
    max_price: float | None = None
    location: str = ""
    exclude: list[str] = Field([], description="listing ids never to return")


class RecommendIn(BaseModel):
    liked: list[str] = Field(description="listing ids the user liked (at least one)")
    skipped: list[str] = Field([], description="listing ids the user skipped")
    seen: list[str] = Field([], description="listing ids already shown: never returned")
    k: int = Field(10, ge=0, le=2**32 - 1, description="listings to return; 0 means 10")
    filter: FilterIn = FilterIn()
    allow_partial_results: bool = Field(
        False,
        description=(
            "when every replica of an index shard is down, answer from the other shards and name "
            "the missing ones (default false: 503 naming the shard)"
        ),
    )


class RemovedOut(BaseModel):
    listing_id: str
    images_removed: int


class CategoriesOut(BaseModel):
    categories: list[str] = Field(description="the model's main categories, sorted")


class HealthOut(BaseModel):
    edge: str = Field(description="always SERVING when this answers")
    gateway: str = Field(description="the gateway's readiness: SERVING, NOT_SERVING or UNREACHABLE")
    ready: bool = Field(description="whether searches can be answered now")
