from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Attributes(_message.Message):
    __slots__ = ("listing_id", "category", "price", "location")
    LISTING_ID_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    listing_id: str
    category: str
    price: float
    location: str
    def __init__(self, listing_id: _Optional[str] = ..., category: _Optional[str] = ..., price: _Optional[float] = ..., location: _Optional[str] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("id", "vector", "attributes")
    ID_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    id: str
    vector: _containers.RepeatedScalarFieldContainer[float]
    attributes: Attributes
    def __init__(self, id: _Optional[str] = ..., vector: _Optional[_Iterable[float]] = ..., attributes: _Optional[_Union[Attributes, _Mapping]] = ...) -> None: ...

class UpsertRequest(_message.Message):
    __slots__ = ("collection", "items")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    items: _containers.RepeatedCompositeFieldContainer[Item]
    def __init__(self, collection: _Optional[str] = ..., items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ...) -> None: ...

class UpsertResponse(_message.Message):
    __slots__ = ("inserted", "replaced", "replica_catching_up")
    INSERTED_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    REPLICA_CATCHING_UP_FIELD_NUMBER: _ClassVar[int]
    inserted: int
    replaced: int
    replica_catching_up: bool
    def __init__(self, inserted: _Optional[int] = ..., replaced: _Optional[int] = ..., replica_catching_up: _Optional[bool] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("collection", "ids", "strict")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    STRICT_FIELD_NUMBER: _ClassVar[int]
    collection: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    strict: bool
    def __init__(self, collection: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ..., strict: _Optional[bool] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted", "not_found", "replica_catching_up")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    REPLICA_CATCHING_UP_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    not_found: _containers.RepeatedScalarFieldContainer[str]
    replica_catching_up: bool
    def __init__(self, deleted: _Optional[int] = ..., not_found: _Optional[_Iterable[str]] = ..., replica_catching_up: _Optional[bool] = ...) -> None: ...

class Range(_message.Message):
    __slots__ = ("gte", "lte")
    GTE_FIELD_NUMBER: _ClassVar[int]
    LTE_FIELD_NUMBER: _ClassVar[int]
    gte: float
    lte: float
    def __init__(self, gte: _Optional[float] = ..., lte: _Optional[float] = ...) -> None: ...

class StringList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class Condition(_message.Message):
    __slots__ = ("field", "equals", "any_of", "none_of", "range")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    EQUALS_FIELD_NUMBER: _ClassVar[int]
    ANY_OF_FIELD_NUMBER: _ClassVar[int]
    NONE_OF_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    field: str
    equals: str
    any_of: StringList
    none_of: StringList
    range: Range
    def __init__(self, field: _Optional[str] = ..., equals: _Optional[str] = ..., any_of: _Optional[_Union[StringList, _Mapping]] = ..., none_of: _Optional[_Union[StringList, _Mapping]] = ..., range: _Optional[_Union[Range, _Mapping]] = ...) -> None: ...

class Filter(_message.Message):
    __slots__ = ("must",)
    MUST_FIELD_NUMBER: _ClassVar[int]
    must: _containers.RepeatedCompositeFieldContainer[Condition]
    def __init__(self, must: _Optional[_Iterable[_Union[Condition, _Mapping]]] = ...) -> None: ...

class SearchParams(_message.Message):
    __slots__ = ("nprobe", "ef_search")
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    EF_SEARCH_FIELD_NUMBER: _ClassVar[int]
    nprobe: int
    ef_search: int
    def __init__(self, nprobe: _Optional[int] = ..., ef_search: _Optional[int] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("collection", "queries", "k", "filter", "group_by_listing", "params")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_LISTING_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    queries: _containers.RepeatedCompositeFieldContainer[Vector]
    k: int
    filter: Filter
    group_by_listing: bool
    params: SearchParams
    def __init__(self, collection: _Optional[str] = ..., queries: _Optional[_Iterable[_Union[Vector, _Mapping]]] = ..., k: _Optional[int] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ..., group_by_listing: _Optional[bool] = ..., params: _Optional[_Union[SearchParams, _Mapping]] = ...) -> None: ...

class Vector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class Neighbor(_message.Message):
    __slots__ = ("id", "score", "attributes")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    attributes: Attributes
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., attributes: _Optional[_Union[Attributes, _Mapping]] = ...) -> None: ...

class NeighborList(_message.Message):
    __slots__ = ("neighbors",)
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    neighbors: _containers.RepeatedCompositeFieldContainer[Neighbor]
    def __init__(self, neighbors: _Optional[_Iterable[_Union[Neighbor, _Mapping]]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[NeighborList]
    def __init__(self, results: _Optional[_Iterable[_Union[NeighborList, _Mapping]]] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("collection", "ids")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, collection: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ...) -> None: ...

class FetchResponse(_message.Message):
    __slots__ = ("items", "not_found")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    not_found: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., not_found: _Optional[_Iterable[str]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ("collection",)
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    collection: str
    def __init__(self, collection: _Optional[str] = ...) -> None: ...

class CollectionStats(_message.Message):
    __slots__ = ("name", "count", "dimension", "index_type", "metric")
    NAME_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    name: str
    count: int
    dimension: int
    index_type: str
    metric: str
    def __init__(self, name: _Optional[str] = ..., count: _Optional[int] = ..., dimension: _Optional[int] = ..., index_type: _Optional[str] = ..., metric: _Optional[str] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("collections",)
    COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    collections: _containers.RepeatedCompositeFieldContainer[CollectionStats]
    def __init__(self, collections: _Optional[_Iterable[_Union[CollectionStats, _Mapping]]] = ...) -> None: ...

class ListIdsRequest(_message.Message):
    __slots__ = ("collection", "page_size", "page_token")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    collection: str
    page_size: int
    page_token: str
    def __init__(self, collection: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListedId(_message.Message):
    __slots__ = ("id", "listing_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    LISTING_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    listing_id: str
    def __init__(self, id: _Optional[str] = ..., listing_id: _Optional[str] = ...) -> None: ...

class ListIdsResponse(_message.Message):
    __slots__ = ("ids", "next_page_token")
    IDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedCompositeFieldContainer[ListedId]
    next_page_token: str
    def __init__(self, ids: _Optional[_Iterable[_Union[ListedId, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetReplicaStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("shard", "partitions", "state", "last_write_unix_ms", "items", "detail")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_WRITE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    shard: int
    partitions: int
    state: str
    last_write_unix_ms: int
    items: int
    detail: str
    def __init__(self, shard: _Optional[int] = ..., partitions: _Optional[int] = ..., state: _Optional[str] = ..., last_write_unix_ms: _Optional[int] = ..., items: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...

class StreamStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StateChunk(_message.Message):
    __slots__ = ("snapshot_file", "wal_record", "source")
    SNAPSHOT_FILE_FIELD_NUMBER: _ClassVar[int]
    WAL_RECORD_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    snapshot_file: SnapshotFileChunk
    wal_record: bytes
    source: ReplicaStatus
    def __init__(self, snapshot_file: _Optional[_Union[SnapshotFileChunk, _Mapping]] = ..., wal_record: _Optional[bytes] = ..., source: _Optional[_Union[ReplicaStatus, _Mapping]] = ...) -> None: ...

class SnapshotFileChunk(_message.Message):
    __slots__ = ("snapshot", "file", "data")
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    snapshot: str
    file: str
    data: bytes
    def __init__(self, snapshot: _Optional[str] = ..., file: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class CatchUpRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CatchUpResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: str
    def __init__(self, state: _Optional[str] = ...) -> None: ...

class ImportPartitionsRequest(_message.Message):
    __slots__ = ("sources", "partitions", "partition_count")
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    PARTITION_COUNT_FIELD_NUMBER: _ClassVar[int]
    sources: _containers.RepeatedScalarFieldContainer[str]
    partitions: _containers.RepeatedScalarFieldContainer[int]
    partition_count: int
    def __init__(self, sources: _Optional[_Iterable[str]] = ..., partitions: _Optional[_Iterable[int]] = ..., partition_count: _Optional[int] = ...) -> None: ...

class ImportPartitionsResponse(_message.Message):
    __slots__ = ("imported", "source")
    IMPORTED_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    imported: int
    source: str
    def __init__(self, imported: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...

class DropPartitionsRequest(_message.Message):
    __slots__ = ("partitions", "partition_count")
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    PARTITION_COUNT_FIELD_NUMBER: _ClassVar[int]
    partitions: _containers.RepeatedScalarFieldContainer[int]
    partition_count: int
    def __init__(self, partitions: _Optional[_Iterable[int]] = ..., partition_count: _Optional[int] = ...) -> None: ...

class DropPartitionsResponse(_message.Message):
    __slots__ = ("dropped",)
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dropped: int
    def __init__(self, dropped: _Optional[int] = ...) -> None: ...
