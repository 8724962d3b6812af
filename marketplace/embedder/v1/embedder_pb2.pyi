from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Vector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, images: _Optional[_Iterable[bytes]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "model_version")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Vector]
    model_version: str
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Vector, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("images", "top_k", "include_embeddings")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    top_k: int
    include_embeddings: bool
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., top_k: _Optional[int] = ..., include_embeddings: _Optional[bool] = ...) -> None: ...

class CategoryScore(_message.Message):
    __slots__ = ("category", "probability")
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    category: str
    probability: float
    def __init__(self, category: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class Classification(_message.Message):
    __slots__ = ("categories", "embedding")
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    categories: _containers.RepeatedCompositeFieldContainer[CategoryScore]
    embedding: Vector
    def __init__(self, categories: _Optional[_Iterable[_Union[CategoryScore, _Mapping]]] = ..., embedding: _Optional[_Union[Vector, _Mapping]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("results", "model_version")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Classification]
    model_version: str
    def __init__(self, results: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class EmbedTextRequest(_message.Message):
    __slots__ = ("texts",)
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, texts: _Optional[_Iterable[str]] = ...) -> None: ...

class EmbedTextResponse(_message.Message):
    __slots__ = ("embeddings", "text_model")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    TEXT_MODEL_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Vector]
    text_model: str
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Vector, _Mapping]]] = ..., text_model: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("backbone", "embedding_dim", "categories", "model_version", "input_size", "modalities", "text_embedding_dim", "text_model", "max_batch", "max_image_bytes", "fusion_weights", "fusion_weights_problem")
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    TEXT_EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    TEXT_MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FUSION_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    FUSION_WEIGHTS_PROBLEM_FIELD_NUMBER: _ClassVar[int]
    backbone: str
    embedding_dim: int
    categories: _containers.RepeatedScalarFieldContainer[str]
    model_version: str
    input_size: int
    modalities: _containers.RepeatedScalarFieldContainer[str]
    text_embedding_dim: int
    text_model: str
    max_batch: int
    max_image_bytes: int
    fusion_weights: FusionWeights
    fusion_weights_problem: str
    def __init__(self, backbone: _Optional[str] = ..., embedding_dim: _Optional[int] = ..., categories: _Optional[_Iterable[str]] = ..., model_version: _Optional[str] = ..., input_size: _Optional[int] = ..., modalities: _Optional[_Iterable[str]] = ..., text_embedding_dim: _Optional[int] = ..., text_model: _Optional[str] = ..., max_batch: _Optional[int] = ..., max_image_bytes: _Optional[int] = ..., fusion_weights: _Optional[_Union[FusionWeights, _Mapping]] = ..., fusion_weights_problem: _Optional[str] = ...) -> None: ...

class FusionWeights(_message.Message):
    __slots__ = ("search_text_weight", "similar_text_weight", "chosen_on", "source")
    SEARCH_TEXT_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SIMILAR_TEXT_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_ON_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    search_text_weight: float
    similar_text_weight: float
    chosen_on: str
    source: str
    def __init__(self, search_text_weight: _Optional[float] = ..., similar_text_weight: _Optional[float] = ..., chosen_on: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...
