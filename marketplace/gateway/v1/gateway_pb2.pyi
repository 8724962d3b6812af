from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Fusion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FUSION_WEIGHTED_COSINE: _ClassVar[Fusion]
    FUSION_RECIPROCAL_RANK: _ClassVar[Fusion]
FUSION_WEIGHTED_COSINE: Fusion
FUSION_RECIPROCAL_RANK: Fusion

class Listing(_message.Message):
    __slots__ = ("id", "title", "description", "category", "main_category", "price", "currency", "location", "image_ids")
    ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    MAIN_CATEGORY_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    title: str
    description: str
    category: str
    main_category: str
    price: float
    currency: str
    location: str
    image_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., title: _Optional[str] = ..., description: _Optional[str] = ..., category: _Optional[str] = ..., main_category: _Optional[str] = ..., price: _Optional[float] = ..., currency: _Optional[str] = ..., location: _Optional[str] = ..., image_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ListingFilter(_message.Message):
    __slots__ = ("main_category", "min_price", "max_price", "location", "exclude_listing_ids")
    MAIN_CATEGORY_FIELD_NUMBER: _ClassVar[int]
    MIN_PRICE_FIELD_NUMBER: _ClassVar[int]
    MAX_PRICE_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_LISTING_IDS_FIELD_NUMBER: _ClassVar[int]
    main_category: str
    min_price: float
    max_price: float
    location: str
    exclude_listing_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, main_category: _Optional[str] = ..., min_price: _Optional[float] = ..., max_price: _Optional[float] = ..., location: _Optional[str] = ..., exclude_listing_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class CategoryPrediction(_message.Message):
    __slots__ = ("category", "probability")
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    category: str
    probability: float
    def __init__(self, category: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class ClassifyImageRequest(_message.Message):
    __slots__ = ("image", "top_k")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    top_k: int
    def __init__(self, image: _Optional[bytes] = ..., top_k: _Optional[int] = ...) -> None: ...

class ClassifyImageResponse(_message.Message):
    __slots__ = ("categories", "model_version")
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    categories: _containers.RepeatedCompositeFieldContainer[CategoryPrediction]
    model_version: str
    def __init__(self, categories: _Optional[_Iterable[_Union[CategoryPrediction, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class RankedListing(_message.Message):
    __slots__ = ("rank", "score", "matched_image_id", "listing")
    RANK_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    MATCHED_IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    LISTING_FIELD_NUMBER: _ClassVar[int]
    rank: int
    score: float
    matched_image_id: str
    listing: Listing
    def __init__(self, rank: _Optional[int] = ..., score: _Optional[float] = ..., matched_image_id: _Optional[str] = ..., listing: _Optional[_Union[Listing, _Mapping]] = ...) -> None: ...

class SearchListingsResponse(_message.Message):
    __slots__ = ("results", "missing_shards")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RankedListing]
    missing_shards: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, results: _Optional[_Iterable[_Union[RankedListing, _Mapping]]] = ..., missing_shards: _Optional[_Iterable[int]] = ...) -> None: ...

class SearchByImageRequest(_message.Message):
    __slots__ = ("image", "k", "filter", "allow_partial_results")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    ALLOW_PARTIAL_RESULTS_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    k: int
    filter: ListingFilter
    allow_partial_results: bool
    def __init__(self, image: _Optional[bytes] = ..., k: _Optional[int] = ..., filter: _Optional[_Union[ListingFilter, _Mapping]] = ..., allow_partial_results: _Optional[bool] = ...) -> None: ...

class SearchByTextRequest(_message.Message):
    __slots__ = ("query", "k", "filter", "allow_partial_results")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    ALLOW_PARTIAL_RESULTS_FIELD_NUMBER: _ClassVar[int]
    query: str
    k: int
    filter: ListingFilter
    allow_partial_results: bool
    def __init__(self, query: _Optional[str] = ..., k: _Optional[int] = ..., filter: _Optional[_Union[ListingFilter, _Mapping]] = ..., allow_partial_results: _Optional[bool] = ...) -> None: ...

class HybridSearchRequest(_message.Message):
    __slots__ = ("image", "text", "k", "filter", "text_weight", "fusion", "allow_partial_results")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    TEXT_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    FUSION_FIELD_NUMBER: _ClassVar[int]
    ALLOW_PARTIAL_RESULTS_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    text: str
    k: int
    filter: ListingFilter
    text_weight: float
    fusion: Fusion
    allow_partial_results: bool
    def __init__(self, image: _Optional[bytes] = ..., text: _Optional[str] = ..., k: _Optional[int] = ..., filter: _Optional[_Union[ListingFilter, _Mapping]] = ..., text_weight: _Optional[float] = ..., fusion: _Optional[_Union[Fusion, str]] = ..., allow_partial_results: _Optional[bool] = ...) -> None: ...

class SimilarListingsRequest(_message.Message):
    __slots__ = ("listing_id", "k", "filter", "photos_only", "allow_partial_results")
    LISTING_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    PHOTOS_ONLY_FIELD_NUMBER: _ClassVar[int]
    ALLOW_PARTIAL_RESULTS_FIELD_NUMBER: _ClassVar[int]
    listing_id: str
    k: int
    filter: ListingFilter
    photos_only: bool
    allow_partial_results: bool
    def __init__(self, listing_id: _Optional[str] = ..., k: _Optional[int] = ..., filter: _Optional[_Union[ListingFilter, _Mapping]] = ..., photos_only: _Optional[bool] = ..., allow_partial_results: _Optional[bool] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("liked_listing_ids", "skipped_listing_ids", "seen_listing_ids", "k", "filter", "allow_partial_results")
    LIKED_LISTING_IDS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_LISTING_IDS_FIELD_NUMBER: _ClassVar[int]
    SEEN_LISTING_IDS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    ALLOW_PARTIAL_RESULTS_FIELD_NUMBER: _ClassVar[int]
    liked_listing_ids: _containers.RepeatedScalarFieldContainer[str]
    skipped_listing_ids: _containers.RepeatedScalarFieldContainer[str]
    seen_listing_ids: _containers.RepeatedScalarFieldContainer[str]
    k: int
    filter: ListingFilter
    allow_partial_results: bool
    def __init__(self, liked_listing_ids: _Optional[_Iterable[str]] = ..., skipped_listing_ids: _Optional[_Iterable[str]] = ..., seen_listing_ids: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ..., filter: _Optional[_Union[ListingFilter, _Mapping]] = ..., allow_partial_results: _Optional[bool] = ...) -> None: ...

class GetListingRequest(_message.Message):
    __slots__ = ("listing_id", "include_pending")
    LISTING_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PENDING_FIELD_NUMBER: _ClassVar[int]
    listing_id: str
    include_pending: bool
    def __init__(self, listing_id: _Optional[str] = ..., include_pending: _Optional[bool] = ...) -> None: ...

class AddListingRequest(_message.Message):
    __slots__ = ("listing", "images")
    LISTING_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    listing: Listing
    images: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, listing: _Optional[_Union[Listing, _Mapping]] = ..., images: _Optional[_Iterable[bytes]] = ...) -> None: ...

class AddListingResponse(_message.Message):
    __slots__ = ("listing", "pending")
    LISTING_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    listing: Listing
    pending: bool
    def __init__(self, listing: _Optional[_Union[Listing, _Mapping]] = ..., pending: _Optional[bool] = ...) -> None: ...

class RemoveListingRequest(_message.Message):
    __slots__ = ("listing_id",)
    LISTING_ID_FIELD_NUMBER: _ClassVar[int]
    listing_id: str
    def __init__(self, listing_id: _Optional[str] = ...) -> None: ...

class RemoveListingResponse(_message.Message):
    __slots__ = ("listing_id", "images_removed", "pending")
    LISTING_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_REMOVED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    listing_id: str
    images_removed: int
    pending: bool
    def __init__(self, listing_id: _Optional[str] = ..., images_removed: _Optional[int] = ..., pending: _Optional[bool] = ...) -> None: ...
