"""Calls from the gateway to the embedder replicas and the indexer shards.

What every downstream call gets here, so the orchestration in `core` never repeats it:

* the request's deadline (`Deadline`), propagated as the call's timeout;
* the request id as ``x-request-id`` metadata (`common.logs.outgoing_metadata`);
* retries with exponential backoff and jitter on UNAVAILABLE only, for idempotent calls, never
  past the deadline (`RetryPolicy`);
* errors mapped to `domain` errors that name the downstream and its address, e.g.
  ``UNAVAILABLE: embedder at ipv4:127.0.0.1:5001 unavailable: failed to connect ...``. The
  embedder's INVALID_ARGUMENT (a bad photo) is passed through with its message.

Channels come from `common.security.open_channel` (TLS when TLS_CA is set) and use gRPC's
``round_robin`` policy (one connection per resolved address; a
``ipv4:a,b`` or ``dns:///`` target of embedder replicas is balanced by gRPC itself) and a capped
reconnect backoff so a downstream that comes back is used again quickly.

Shard fan-out issues every shard's call as a gRPC future (no thread per shard) and waits for all;
any shard failing fails the request (no silently partial results).
"""
from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from common.logs import outgoing_metadata
from common.metrics import GrpcClientMetrics
from common.security import bearer_metadata, open_channel
from marketplace.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from marketplace.indexer.v1 import indexer_pb2, indexer_pb2_grpc
from services.gateway.config import RetryPolicy
from services.gateway.domain import (
    CategoryScore,
    DeadlineExceeded,
    DownstreamError,
    FailedPrecondition,
    GatewayError,
    InvalidArgument,
    ModelInfo,
    ResourceExhausted,
    SearchFilter,
    Unavailable,
)
from services.gateway.ranking import Hit
from services.gateway.shards import shard_of

log = logging.getLogger(__name__)

MiB = 1024 * 1024
IMAGE_COLLECTION = "image"
#: The indexer collection of listing texts: item id = listing id, vector = the EmbedText vector
#: of `common.text.listing_text(title, description)`.
TEXT_COLLECTION = "text"
#: Most ids in one Fetch (the indexer's INDEXER_MAX_BATCH defaults to 1024).
FETCH_CHUNK = 512
SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


class Deadline:
    """An absolute point in (monotonic) time by which a request must be answered."""

    __slots__ = ("expires_at",)

    def __init__(self, seconds: float) -> None:
        self.expires_at = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.expires_at - time.monotonic()

    def __repr__(self) -> str:
        return f"Deadline({self.remaining():.3f}s left)"


def channel_options(reconnect_backoff_max_s: float = 2.0, max_message_bytes: int = 16 * MiB) -> list:
    backoff_ms = max(100, int(reconnect_backoff_max_s * 1000))
    return [
        ("grpc.service_config", SERVICE_CONFIG),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", min(100, backoff_ms)),
        ("grpc.min_reconnect_backoff_ms", min(100, backoff_ms)),
        ("grpc.max_reconnect_backoff_ms", backoff_ms),
    ]


class Downstream:
    """One named downstream target: its channel and a label for error messages."""

    def __init__(self, name: str, target: str, *, reconnect_backoff_max_s: float = 2.0,
                 client_metrics: GrpcClientMetrics | None = None) -> None:
        self.name = name
        self.target = target
        self.label = f"{name} at {target}"
        self._channel = open_channel(target, channel_options(reconnect_backoff_max_s))
        #: every call through it is counted and timed when metrics are on (`common.metrics`)
        self.channel = (client_metrics.instrument(self._channel, name, target)
                        if client_metrics is not None else self._channel)

    def close(self) -> None:
        self._channel.close()


@dataclass(frozen=True)
class Call:
    """One downstream unary call to make: where (label), what method, which request."""

    label: str
    method: grpc.UnaryUnaryMultiCallable
    request: object
    idempotent: bool = True
    metadata: tuple[tuple[str, str], ...] = ()
    #: INVALID_ARGUMENT is the caller's fault (e.g. a bad photo for the embedder) and passed on
    #: as such; when False (indexer calls, built from validated input) it is a gateway-side error.
    caller_input: bool = True


def map_rpc_error(label: str, error: grpc.RpcError, caller_input: bool = True) -> GatewayError:
    """A downstream's status -> the gateway error the caller should see (naming the downstream)."""
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"{label} unavailable: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"deadline exceeded waiting for {label}")
    if code == grpc.StatusCode.INVALID_ARGUMENT and caller_input:
        return InvalidArgument(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(f"{label}: {details}")
    if code == grpc.StatusCode.CANCELLED:
        return Unavailable(f"{label} cancelled the call: {details}")
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.UNIMPLEMENTED):
        return FailedPrecondition(f"{label}: {code.name}: {details}")
    name = code.name if code is not None else type(error).__name__
    return DownstreamError(f"{label} failed: {name}: {details}")


def call_all(calls: Sequence[Call], deadline: Deadline, policy: RetryPolicy) -> list:
    """Make all ``calls`` concurrently (gRPC futures) and return their responses in order.

    UNAVAILABLE is retried per call with backoff for idempotent calls while the deadline allows;
    the first failure that is not retried cancels the others and is raised as a GatewayError.
    """
    metadata = outgoing_metadata()

    def start(call: Call):
        timeout = deadline.remaining()
        if timeout <= 0:
            raise DeadlineExceeded(f"deadline exceeded before calling {call.label}")
        return call.method.future(call.request, timeout=timeout, metadata=metadata + call.metadata)

    futures: list = []
    try:
        for call in calls:
            futures.append(start(call))
        responses = []
        for index, call in enumerate(calls):
            retry = 0
            while True:
                try:
                    responses.append(futures[index].result())
                    break
                except grpc.RpcError as error:
                    if (error.code() == grpc.StatusCode.UNAVAILABLE and call.idempotent
                            and retry + 1 < policy.attempts):
                        delay = policy.backoff(retry) * random.uniform(0.5, 1.0)
                        if delay < deadline.remaining():
                            log.info("retrying %s after UNAVAILABLE (%s) in %.0f ms",
                                     call.label, error.details(), delay * 1000)
                            time.sleep(delay)
                            retry += 1
                            futures[index] = start(call)
                            continue
                    raise map_rpc_error(call.label, error, call.caller_input) from None
                except grpc.FutureCancelledError:
                    raise Unavailable(f"call to {call.label} was cancelled") from None
        return responses
    except BaseException:
        for future in futures:
            future.cancel()
        raise


def call_one(call: Call, deadline: Deadline, policy: RetryPolicy):
    return call_all([call], deadline, policy)[0]


def _vector(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


# ============================================================================ embedder


class EmbedderClient:
    """The embedder replicas behind one round_robin channel."""

    def __init__(self, target: str, policy: RetryPolicy, *, reconnect_backoff_max_s: float = 2.0,
                 model_info_ttl_s: float = 60.0,
                 client_metrics: GrpcClientMetrics | None = None) -> None:
        self.downstream = Downstream("embedder", target, reconnect_backoff_max_s=reconnect_backoff_max_s,
                                     client_metrics=client_metrics)
        self.stub = embedder_pb2_grpc.EmbedderStub(self.downstream.channel)
        self.policy = policy
        self.model_info_ttl_s = model_info_ttl_s
        self._info: ModelInfo | None = None
        self._info_at = 0.0
        self._info_lock = threading.Lock()

    @property
    def label(self) -> str:
        return self.downstream.label

    def close(self) -> None:
        self.downstream.close()

    def _call(self, method, request) -> Call:
        return Call(self.label, method, request)

    def model_info(self, deadline: Deadline, *, refresh: bool = False) -> ModelInfo:
        """The loaded model's categories, dimension and limits (cached for the TTL)."""
        with self._info_lock:
            if (not refresh and self._info is not None
                    and time.monotonic() - self._info_at < self.model_info_ttl_s):
                return self._info
        reply = call_one(self._call(self.stub.GetModelInfo, embedder_pb2.GetModelInfoRequest()),
                         deadline, self.policy)
        info = ModelInfo(
            categories=tuple(reply.categories), embedding_dim=int(reply.embedding_dim),
            model_version=reply.model_version, max_batch=int(reply.max_batch) or 32,
            max_image_bytes=int(reply.max_image_bytes), modalities=tuple(reply.modalities),
            text_embedding_dim=int(reply.text_embedding_dim))
        with self._info_lock:
            self._info, self._info_at = info, time.monotonic()
        return info

    def _batches(self, images: Sequence[bytes], deadline: Deadline) -> list[Sequence[bytes]]:
        if len(images) <= 1:
            return [images]
        size = max(1, self.model_info(deadline).max_batch)
        return [images[i:i + size] for i in range(0, len(images), size)]

    def embed(self, images: Sequence[bytes], deadline: Deadline) -> np.ndarray:
        """(len(images), dim) float32 unit vectors, in input order; batches sent in parallel."""
        batches = self._batches(images, deadline)
        replies = call_all([self._call(self.stub.Embed, embedder_pb2.EmbedRequest(images=list(batch)))
                            for batch in batches], deadline, self.policy)
        vectors = [_vector(v.values) for reply in replies for v in reply.embeddings]
        if len(vectors) != len(images):
            raise DownstreamError(f"{self.label} returned {len(vectors)} embeddings for "
                                  f"{len(images)} images")
        return np.stack(vectors)

    def embed_text(self, texts: Sequence[str], deadline: Deadline) -> np.ndarray:
        """(len(texts), text dim) float32 unit vectors from EmbedText, in input order; batches of
        at most the embedder's max_batch sent in parallel. An embedder without the text model
        answers FAILED_PRECONDITION (UNIMPLEMENTED if older), both passed on as
        FailedPrecondition naming the embedder."""
        texts = list(texts)
        size = len(texts) if len(texts) <= 1 else max(1, self.model_info(deadline).max_batch)
        batches = [texts[i:i + size] for i in range(0, len(texts), max(1, size))]
        replies = call_all([self._call(self.stub.EmbedText, embedder_pb2.EmbedTextRequest(texts=batch))
                            for batch in batches], deadline, self.policy)
        vectors = [_vector(v.values) for reply in replies for v in reply.embeddings]
        if len(vectors) != len(texts):
            raise DownstreamError(f"{self.label} returned {len(vectors)} text embeddings for "
                                  f"{len(texts)} texts")
        return np.stack(vectors) if vectors else np.zeros((0, 0), np.float32)

    def classify(self, images: Sequence[bytes], top_k: int, deadline: Deadline, *,
                 include_embeddings: bool = False
                 ) -> tuple[list[list[CategoryScore]], np.ndarray | None, str]:
        """Per image its top categories (best first), the embeddings if asked, the model version."""
        batches = self._batches(images, deadline)
        replies = call_all([self._call(self.stub.Classify, embedder_pb2.ClassifyRequest(
            images=list(batch), top_k=top_k, include_embeddings=include_embeddings))
            for batch in batches], deadline, self.policy)
        results = [result for reply in replies for result in reply.results]
        if len(results) != len(images):
            raise DownstreamError(f"{self.label} returned {len(results)} classifications for "
                                  f"{len(images)} images")
        categories = [[CategoryScore(c.category, float(c.probability)) for c in result.categories]
                      for result in results]
        vectors = None
        if include_embeddings:
            if any(not result.embedding.values for result in results):
                raise DownstreamError(f"{self.label} did not return embeddings with Classify")
            vectors = np.stack([_vector(result.embedding.values) for result in results])
        return categories, vectors, replies[0].model_version if replies else ""


# ============================================================================ indexer


@dataclass(frozen=True)
class IndexItem:
    """A vector to store with the attributes the index filters on."""

    id: str
    vector: np.ndarray
    listing_id: str
    category: str = ""
    price: float | None = None
    location: str = ""

    def to_proto(self) -> indexer_pb2.Item:
        attributes = indexer_pb2.Attributes(listing_id=self.listing_id, category=self.category,
                                            location=self.location)
        if self.price is not None:
            attributes.price = float(self.price)
        return indexer_pb2.Item(id=self.id, vector=np.asarray(self.vector, dtype=np.float32).tolist(),
                                attributes=attributes)


@dataclass(frozen=True)
class StoredItem:
    id: str
    vector: np.ndarray
    listing_id: str


def to_index_filter(search_filter: SearchFilter) -> indexer_pb2.Filter:
    """A gateway `SearchFilter` -> the indexer's Filter (applied inside the FAISS search)."""
    must = []
    if search_filter.main_category:
        must.append(indexer_pb2.Condition(field="category", equals=search_filter.main_category))
    if search_filter.min_price is not None or search_filter.max_price is not None:
        price_range = indexer_pb2.Range()
        if search_filter.min_price is not None:
            price_range.gte = float(search_filter.min_price)
        if search_filter.max_price is not None:
            price_range.lte = float(search_filter.max_price)
        must.append(indexer_pb2.Condition(field="price", range=price_range))
    if search_filter.location:
        must.append(indexer_pb2.Condition(field="location", equals=search_filter.location))
    if search_filter.exclude_listing_ids:
        must.append(indexer_pb2.Condition(
            field="listing_id",
            none_of=indexer_pb2.StringList(values=list(search_filter.exclude_listing_ids))))
    return indexer_pb2.Filter(must=must)


class IndexerShards:
    """The indexer shards, in INDEXER_ADDRS order; a listing's vectors live on `shard_for(id)`."""

    def __init__(self, targets: Sequence[str], policy: RetryPolicy, *,
                 reconnect_backoff_max_s: float = 2.0, write_token: str | None = None,
                 client_metrics: GrpcClientMetrics | None = None) -> None:
        if not targets:
            raise ValueError("at least one indexer shard is needed")
        self.shards = [Downstream(f"indexer shard {i}", target,
                                  reconnect_backoff_max_s=reconnect_backoff_max_s,
                                  client_metrics=client_metrics)
                       for i, target in enumerate(targets)]
        self.stubs = [indexer_pb2_grpc.IndexerStub(shard.channel) for shard in self.shards]
        self.policy = policy
        self.write_metadata = bearer_metadata(write_token)  # the indexer's Upsert/Delete need it

    def __len__(self) -> int:
        return len(self.shards)

    def close(self) -> None:
        for shard in self.shards:
            shard.close()

    def shard_for(self, listing_id: str) -> int:
        return shard_of(listing_id, len(self.shards))

    def search(self, queries: np.ndarray, k: int, search_filter: SearchFilter, deadline: Deadline, *,
               collection: str = IMAGE_COLLECTION, group_by_listing: bool = True) -> list[list[Hit]]:
        """Per query, the hits of every shard (each shard's top k), fanned out in parallel."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        request = indexer_pb2.SearchRequest(
            collection=collection, k=k, filter=to_index_filter(search_filter),
            group_by_listing=group_by_listing,
            queries=[indexer_pb2.Vector(values=row.tolist()) for row in queries])
        replies = call_all([Call(shard.label, stub.Search, request, caller_input=False)
                            for shard, stub in zip(self.shards, self.stubs)], deadline, self.policy)
        per_query: list[list[Hit]] = [[] for _ in range(len(queries))]
        for shard, reply in zip(self.shards, replies):
            if len(reply.results) != len(queries):
                raise DownstreamError(f"{shard.label} returned {len(reply.results)} result lists "
                                      f"for {len(queries)} queries")
            for hits, result in zip(per_query, reply.results):
                hits.extend(Hit(n.attributes.listing_id or n.id, float(n.score), n.id)
                            for n in result.neighbors)
        return per_query

    def fetch(self, shard: int, ids: Sequence[str], deadline: Deadline, *,
              collection: str = IMAGE_COLLECTION) -> list[StoredItem]:
        """The stored vectors of ``ids`` found on ``shard`` (request order; unknown ids skipped)."""
        reply = call_one(Call(self.shards[shard].label, self.stubs[shard].Fetch,
                              indexer_pb2.FetchRequest(collection=collection, ids=list(ids)),
                              caller_input=False),
                         deadline, self.policy)
        return [StoredItem(item.id, _vector(item.vector), item.attributes.listing_id)
                for item in reply.items]

    def fetch_many(self, ids_by_shard: dict[int, Sequence[str]], deadline: Deadline, *,
                   collection: str = IMAGE_COLLECTION) -> list[StoredItem]:
        """The stored vectors of the ids on each shard (``{shard: ids}``), all shards fetched in
        parallel in chunks of `FETCH_CHUNK` ids; unknown ids are skipped."""
        calls = []
        for shard, ids in sorted(ids_by_shard.items()):
            ids = list(ids)
            for start in range(0, len(ids), FETCH_CHUNK):
                calls.append(Call(self.shards[shard].label, self.stubs[shard].Fetch,
                                  indexer_pb2.FetchRequest(collection=collection,
                                                           ids=ids[start:start + FETCH_CHUNK]),
                                  caller_input=False))
        replies = call_all(calls, deadline, self.policy) if calls else []
        return [StoredItem(item.id, _vector(item.vector), item.attributes.listing_id)
                for reply in replies for item in reply.items]

    def upsert(self, shard: int, items: Sequence[IndexItem], deadline: Deadline, *,
               collection: str = IMAGE_COLLECTION) -> indexer_pb2.UpsertResponse:
        """Store ``items`` on ``shard`` atomically (replace by id, so a retry is harmless)."""
        return call_one(Call(self.shards[shard].label, self.stubs[shard].Upsert,
                             indexer_pb2.UpsertRequest(collection=collection,
                                                       items=[item.to_proto() for item in items]),
                             metadata=self.write_metadata, caller_input=False),
                        deadline, self.policy)

    def delete(self, shard: int, ids: Sequence[str], deadline: Deadline, *,
               collection: str = IMAGE_COLLECTION) -> int:
        """Remove ``ids`` from ``shard`` (unknown ids ignored); returns how many were removed."""
        reply = call_one(Call(self.shards[shard].label, self.stubs[shard].Delete,
                              indexer_pb2.DeleteRequest(collection=collection, ids=list(ids),
                                                        strict=False),
                              metadata=self.write_metadata, caller_input=False),
                         deadline, self.policy)
        return int(reply.deleted)

    def stats(self, deadline: Deadline, collection: str = "") -> list[indexer_pb2.GetStatsResponse]:
        request = indexer_pb2.GetStatsRequest(collection=collection)
        return call_all([Call(shard.label, stub.GetStats, request, caller_input=False)
                         for shard, stub in zip(self.shards, self.stubs)], deadline, self.policy)
