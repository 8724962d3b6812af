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

Shard fan-out issues every shard's call as a gRPC future (no thread per shard) and waits for all.
Each shard may have several replicas (`IndexerShards`): a read fails over to another replica
of the same shard, a write goes to all of them. A shard with every replica down fails the
request (UNAVAILABLE naming it) unless the caller allowed partial results (`partial_results`),
which are then never silent: the response names the missing shards.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.logs import outgoing_metadata
from common.metrics import GrpcClientMetrics
from common.security import TlsFiles, bearer_metadata, open_channel
from common.vectors import float_vector
from marketplace.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from marketplace.indexer.v1 import indexer_pb2, indexer_pb2_grpc
from services.gateway.config import RetryPolicy
from services.gateway.domain import (
    CategoryScore,
    DeadlineExceeded,
    DownstreamError,
    FailedPrecondition,
    InvalidArgument,
    ModelInfo,
    ResourceExhausted,
    SearchFilter,
    ServedFusionWeights,
    ServiceError,
    Unavailable,
)
from services.gateway.ranking import Hit
from services.gateway.shards import ShardRouting

log = logging.getLogger(__name__)

MiB = 1024 * 1024
IMAGE_COLLECTION = "image"
#: The indexer collection of listing texts: item id = listing id, vector = the EmbedText vector
#: of `common.text.listing_text(title, description)`.
TEXT_COLLECTION = "text"
#: Most ids in one Fetch (the indexer's INDEXER_MAX_BATCH defaults to 1024).
FETCH_CHUNK = 512
SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
#: Least time between two DNS resolutions of a downstream name (gRPC's default: 30 s).
DNS_MIN_RESOLUTION_INTERVAL_MS = 1000


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
        # re-resolve a name soon after its address stops answering: a replaced Swarm task or
        # Kubernetes pod behind a DNS-listed service comes back at a new IP (gRPC waits 30 s)
        ("grpc.dns_min_time_between_resolutions_ms", DNS_MIN_RESOLUTION_INTERVAL_MS),
    ]


class Downstream:
    """One named downstream target: its channel and a label for error messages."""

    def __init__(
        self,
        name: str,
        target: str,
        *,
        reconnect_backoff_max_s: float = 2.0,
        client_metrics: GrpcClientMetrics | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self.name = name
        self.target = target
        self.label = f"{name} at {target}"
        self._channel = open_channel(target, channel_options(reconnect_backoff_max_s), tls)
        #: every call through it is counted and timed when metrics are on (`common.metrics`)
        self.channel = (
            client_metrics.instrument(self._channel, name, target)
            if client_metrics is not None
            else self._channel
        )

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


def map_rpc_error(label: str, error: grpc.RpcError, caller_input: bool = True) -> ServiceError:
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
    if code in (
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNIMPLEMENTED,
    ):
        return FailedPrecondition(f"{label}: {code.name}: {details}")
    name = code.name if code is not None else type(error).__name__
    return DownstreamError(f"{label} failed: {name}: {details}")


def call_all(calls: Sequence[Call], deadline: Deadline, policy: RetryPolicy) -> list:
    """Make all ``calls`` concurrently (gRPC futures) and return their responses in order.

    UNAVAILABLE is retried per call with backoff for idempotent calls while the deadline allows;
    the first failure that is not retried cancels the others and is raised as a ServiceError.
    """
    metadata = outgoing_metadata()

    def start(call: Call, inline: bool):
        timeout = deadline.remaining()
        if timeout <= 0:
            raise DeadlineExceeded(f"deadline exceeded before calling {call.label}")
        return _send(call.method, call.request, inline, timeout=timeout, metadata=metadata + call.metadata)

    futures: list = []
    try:
        for index, call in enumerate(calls):
            futures.append(start(call, inline=index == len(calls) - 1))
        responses = []
        for index, call in enumerate(calls):
            retry = 0
            while True:
                try:
                    responses.append(futures[index].result())
                    break
                except grpc.RpcError as error:
                    if (
                        error.code() == grpc.StatusCode.UNAVAILABLE
                        and call.idempotent
                        and retry + 1 < policy.attempts
                    ):
                        delay = policy.backoff(retry) * random.uniform(0.5, 1.0)
                        if delay < deadline.remaining():
                            log.info(
                                "retrying %s after UNAVAILABLE (%s) in %.0f ms",
                                call.label,
                                error.details(),
                                delay * 1000,
                            )
                            time.sleep(delay)
                            retry += 1
                            futures[index] = start(call, inline=True)
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


# A call's reply is awaited either way, so the calling thread makes one call of each fan-out
# itself, blocking (a single call: its only one), and the others go out as gRPC futures. A
# blocking call waits on a queue of its own; a future's outcome comes from the channel's spin
# thread, which gRPC starts whenever a channel has futures in flight again after none (so about
# once per request here) and which then wakes the waiting thread: a thread start and two
# hand-offs per call that the profile of SearchByImage showed as the gateway's largest cost.


def _send(method: grpc.UnaryUnaryMultiCallable, request, inline: bool, **kwargs):
    """The call, made on this thread and answered (``inline``) or sent as a gRPC future; either
    is read with ``result()``."""
    return _Answered(method, request, **kwargs) if inline else method.future(request, **kwargs)


class _Answered:
    """A unary call made on the calling thread, read like the gRPC future it stands for:
    ``result()`` gives its reply or raises its `grpc.RpcError`; there is nothing to cancel."""

    def __init__(self, method: grpc.UnaryUnaryMultiCallable, request, **kwargs) -> None:
        self._reply = None
        self._error: grpc.RpcError | None = None
        try:
            self._reply = method(request, **kwargs)
        except grpc.RpcError as error:
            self._error = error

    def result(self):
        if self._error is not None:
            raise self._error
        return self._reply

    def cancel(self) -> bool:
        return False


def _vector(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


# ============================================================================ embedder


def served_fusion_weights(reply: embedder_pb2.ModelInfo) -> ServedFusionWeights | None:
    """ModelInfo.fusion_weights, or None when the embedder serves none."""
    if not reply.HasField("fusion_weights"):
        return None
    weights = reply.fusion_weights
    return ServedFusionWeights(
        float(weights.search_text_weight),
        float(weights.similar_text_weight),
        weights.chosen_on,
        weights.source,
    )


class EmbedderClient:
    """The embedder replicas behind one round_robin channel."""

    def __init__(
        self,
        target: str,
        policy: RetryPolicy,
        *,
        reconnect_backoff_max_s: float = 2.0,
        model_info_ttl_s: float = 60.0,
        client_metrics: GrpcClientMetrics | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self.downstream = Downstream(
            "embedder",
            target,
            reconnect_backoff_max_s=reconnect_backoff_max_s,
            client_metrics=client_metrics,
            tls=tls,
        )
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
            if (
                not refresh
                and self._info is not None
                and time.monotonic() - self._info_at < self.model_info_ttl_s
            ):
                return self._info
        reply = call_one(
            self._call(self.stub.GetModelInfo, embedder_pb2.GetModelInfoRequest()), deadline, self.policy
        )
        info = ModelInfo(
            categories=tuple(reply.categories),
            embedding_dim=int(reply.embedding_dim),
            model_version=reply.model_version,
            max_batch=int(reply.max_batch) or 32,
            max_image_bytes=int(reply.max_image_bytes),
            modalities=tuple(reply.modalities),
            text_embedding_dim=int(reply.text_embedding_dim),
            fusion_weights=served_fusion_weights(reply),
            fusion_weights_problem=reply.fusion_weights_problem,
        )
        with self._info_lock:
            self._info, self._info_at = info, time.monotonic()
        return info

    def _batches(self, images: Sequence[bytes], deadline: Deadline) -> list[Sequence[bytes]]:
        if len(images) <= 1:
            return [images]
        size = max(1, self.model_info(deadline).max_batch)
        return [images[i : i + size] for i in range(0, len(images), size)]

    def embed(self, images: Sequence[bytes], deadline: Deadline) -> np.ndarray:
        """(len(images), dim) float32 unit vectors, in input order; batches sent in parallel."""
        batches = self._batches(images, deadline)
        replies = call_all(
            [self._call(self.stub.Embed, embedder_pb2.EmbedRequest(images=list(batch))) for batch in batches],
            deadline,
            self.policy,
        )
        vectors = [_vector(v.values) for reply in replies for v in reply.embeddings]
        if len(vectors) != len(images):
            raise DownstreamError(f"{self.label} returned {len(vectors)} embeddings for {len(images)} images")
        return np.stack(vectors)

    def embed_text(self, texts: Sequence[str], deadline: Deadline) -> np.ndarray:
        """(len(texts), text dim) float32 unit vectors from EmbedText, in input order; batches of
        at most the embedder's max_batch sent in parallel. An embedder without the text model
        answers FAILED_PRECONDITION (UNIMPLEMENTED if older), both passed on as
        FailedPrecondition naming the embedder."""
        texts = list(texts)
        size = len(texts) if len(texts) <= 1 else max(1, self.model_info(deadline).max_batch)
        batches = [texts[i : i + size] for i in range(0, len(texts), max(1, size))]
        replies = call_all(
            [
                self._call(self.stub.EmbedText, embedder_pb2.EmbedTextRequest(texts=batch))
                for batch in batches
            ],
            deadline,
            self.policy,
        )
        vectors = [_vector(v.values) for reply in replies for v in reply.embeddings]
        if len(vectors) != len(texts):
            raise DownstreamError(
                f"{self.label} returned {len(vectors)} text embeddings for {len(texts)} texts"
            )
        return np.stack(vectors) if vectors else np.zeros((0, 0), np.float32)

    def classify(
        self, images: Sequence[bytes], top_k: int, deadline: Deadline, *, include_embeddings: bool = False
    ) -> tuple[list[list[CategoryScore]], np.ndarray | None, str]:
        """Per image its top categories (best first), the embeddings if asked, the model version."""
        batches = self._batches(images, deadline)
        replies = call_all(
            [
                self._call(
                    self.stub.Classify,
                    embedder_pb2.ClassifyRequest(
                        images=list(batch), top_k=top_k, include_embeddings=include_embeddings
                    ),
                )
                for batch in batches
            ],
            deadline,
            self.policy,
        )
        results = [result for reply in replies for result in reply.results]
        if len(results) != len(images):
            raise DownstreamError(
                f"{self.label} returned {len(results)} classifications for {len(images)} images"
            )
        categories = [
            [CategoryScore(c.category, float(c.probability)) for c in result.categories] for result in results
        ]
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
        attributes = indexer_pb2.Attributes(
            listing_id=self.listing_id, category=self.category, location=self.location
        )
        if self.price is not None:
            attributes.price = float(self.price)
        return indexer_pb2.Item(
            id=self.id, vector=np.asarray(self.vector, dtype=np.float32).tolist(), attributes=attributes
        )


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
        must.append(
            indexer_pb2.Condition(
                field="listing_id",
                none_of=indexer_pb2.StringList(values=list(search_filter.exclude_listing_ids)),
            )
        )
    return indexer_pb2.Filter(must=must)


# ----------------------------------------------------------------------------- replicas

#: Replica states as the gateway sees them (logged on every change, once).
UNKNOWN = "UNKNOWN"  # not probed or called yet: used, after the known-good ones
SERVING = "SERVING"  # its health check says SERVING and its last call worked
NOT_SERVING = "NOT_SERVING"  # it answers but is catching up (or refuses to serve)
UNREACHABLE = "UNREACHABLE"  # a call or probe got UNAVAILABLE / ran out of time
MISSED_WRITES = "MISSED_WRITES"  # a write failed there while others took it: must catch up
#: Codes after which a read moves on to another replica of the same shard.
FAILOVER_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class PartialResults:
    """Shards left out of one request's searches because every replica was down."""

    def __init__(self) -> None:
        self.missing_shards: set[int] = set()


_partial_results: ContextVar[PartialResults | None] = ContextVar("partial_results", default=None)


@contextmanager
def partial_results(allowed: bool) -> Iterator[PartialResults]:
    """Within this block, `IndexerShards.search` answers from the shards that are up when every
    replica of some shard is down (``allowed``), recording the missing ones in the yielded
    object; otherwise it fails with UNAVAILABLE naming the shard. Fetches (the vectors of a
    listing one asks about) are never partial."""
    outcome = PartialResults()
    token = _partial_results.set(outcome if allowed else None)
    try:
        yield outcome
    finally:
        _partial_results.reset(token)


class ReplicaEvents:
    """The one place where replica state changes, failovers and partial results happen: each
    is logged here (metrics hook in by wrapping or subclassing these three methods)."""

    def state_changed(self, replica: "Replica", old: str, new: str, why: str) -> None:
        level = logging.INFO if new == SERVING else logging.WARNING
        log.log(level, "%s: %s -> %s%s", replica.label, old, new, f" ({why})" if why else "")

    def failover(self, shard: int, failed: "Replica", code: grpc.StatusCode, to: "Replica") -> None:
        log.info("indexer shard %d: %s answered %s; asking %s", shard, failed.label, code.name, to.label)

    def partial_result(self, shard: int, reason: str) -> None:
        log.warning("answering without indexer shard %d (allow_partial_results): %s", shard, reason)


class Replica:
    """One indexer process serving one shard: its channel, stubs and state."""

    def __init__(
        self,
        shard: int,
        number: int,
        target: str,
        label: str,
        events: ReplicaEvents,
        reconnect_backoff_max_s: float,
        client_metrics: GrpcClientMetrics | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self.shard = shard
        self.number = number
        self.downstream = Downstream(
            f"indexer shard {shard}",
            target,
            reconnect_backoff_max_s=reconnect_backoff_max_s,
            client_metrics=client_metrics,
            tls=tls,
        )
        self.downstream.label = label
        self.stub = indexer_pb2_grpc.IndexerStub(self.downstream.channel)
        self.replication = indexer_pb2_grpc.ReplicationStub(self.downstream.channel)
        self.events = events
        self.state = UNKNOWN
        self.refused_catch_up = False
        self._lock = threading.Lock()

    @property
    def label(self) -> str:
        return self.downstream.label

    def set_state(self, new: str, why: str = "") -> None:
        with self._lock:
            old, self.state = self.state, new
        if old != new:
            self.events.state_changed(self, old, new, why)

    def usable(self) -> bool:
        return self.state in (SERVING, UNKNOWN)


class ShardReplicas:
    """The replicas of one shard; reads start at a rotating replica among the usable ones."""

    def __init__(self, shard: int, replicas: list[Replica]) -> None:
        self.shard = shard
        self.replicas = replicas
        self._turn = itertools.count()

    @property
    def label(self) -> str:
        return self.replicas[0].label if len(self.replicas) == 1 else f"indexer shard {self.shard}"

    def read_order(self) -> list[Replica]:
        """Usable replicas first, starting at the next one in turn (spreads reads), then the
        unreachable or not serving ones (tried last: a probe may not have seen one come back;
        one catching up refuses reads itself). Never one that missed writes: it is stale."""
        turn = next(self._turn) % len(self.replicas)
        rotated = self.replicas[turn:] + self.replicas[:turn]
        return [r for r in rotated if r.usable()] + [
            r for r in rotated if not r.usable() and r.state != MISSED_WRITES
        ]

    def serving(self) -> list[Replica]:
        return [r for r in self.replicas if r.state == SERVING]


class IndexerShards:
    """The indexer shards and their replicas; a listing's vectors live on `shard_for(id)`.

    ``topology`` is one entry per shard in shard order: a target (one replica, as in
    INDEXER_ADDRS) or a sequence of replica targets (INDEXER_SHARDS).

    Reads (Search, Fetch, GetStats) go to one replica per shard, spread over the usable replicas;
    a replica answering UNAVAILABLE or running out of time is left for another replica of the
    same shard within the same call (each try gets the remaining time divided by the replicas
    left to try). When every replica failed, UNAVAILABLE is retried per `RetryPolicy` like any
    idempotent call; then the shard is down: UNAVAILABLE naming it, or, inside
    ``partial_results(True)``, the search answers without it.

    Writes (Upsert, Delete; idempotent by id) go to every replica of the listing's shard at once.
    One is acknowledged when a serving replica stored it and every other replica either stored
    it or is down; a replica that failed it is marked MISSED_WRITES, not read from, and asked to
    catch up (`request_catch_ups`, run by the readiness watch) -- a restarted replica catches up
    by itself before it serves.
    """

    def __init__(
        self,
        topology: Sequence[str | Sequence[str]],
        policy: RetryPolicy,
        *,
        reconnect_backoff_max_s: float = 2.0,
        write_token: str | None = None,
        events: ReplicaEvents | None = None,
        routing: ShardRouting | None = None,
        client_metrics: GrpcClientMetrics | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        if not topology:
            raise ValueError("at least one indexer shard is needed")
        self.events = events or ReplicaEvents()
        self.replica_sets: list[ShardReplicas] = []
        for shard, targets in enumerate(topology):
            targets = (targets,) if isinstance(targets, str) else tuple(targets)
            if not targets:
                raise ValueError(f"indexer shard {shard} has no replica")
            replicas = [
                Replica(
                    shard,
                    number,
                    target,
                    f"indexer shard {shard} at {target}"
                    if len(targets) == 1
                    else f"indexer shard {shard} replica {number} at {target}",
                    self.events,
                    reconnect_backoff_max_s,
                    client_metrics,
                    tls,
                )
                for number, target in enumerate(targets)
            ]
            self.replica_sets.append(ShardReplicas(shard, replicas))
        self.policy = policy
        self.write_metadata = bearer_metadata(write_token)  # the indexer's Upsert/Delete need it
        self.catch_up_wanted = threading.Event()
        self.routing = routing or ShardRouting(len(self.replica_sets))

    def __len__(self) -> int:
        return len(self.replica_sets)

    @property
    def replicas(self) -> list[Replica]:
        return [replica for replica_set in self.replica_sets for replica in replica_set.replicas]

    def close(self) -> None:
        for replica in self.replicas:
            replica.downstream.close()

    def shard_for(self, listing_id: str) -> int:
        """The shard to read ``listing_id``'s vectors from; as a `ShardRoute` it also names the
        shard its writes must reach too while a rebalance moves it."""
        return self.routing.shard_for(listing_id)

    # ------------------------------------------------------------------ reads

    def _read(
        self,
        method: str,
        requests: Sequence[tuple[int, object]],
        deadline: Deadline,
        *,
        partial: PartialResults | None = None,
    ) -> list:
        """One reply per ``(shard, request)``, each from one replica of that shard, all shards
        in flight at once; None for a shard that is down when ``partial`` collects those."""
        metadata = outgoing_metadata()
        reserve = min(0.2, 0.1 * max(deadline.remaining(), 0.0)) if partial is not None else 0.0
        attempts = [_ReadAttempt(self.replica_sets[shard], request) for shard, request in requests]

        def start(attempt: "_ReadAttempt", inline: bool = True) -> None:
            """Call the attempt's replica: blocking on this thread (``inline``: the last shard of
            the fan-out and any failover, which this thread would wait for anyway), else as a
            gRPC future (see `_Answered`)."""
            replica = attempt.replica
            left = len(attempt.order) - attempt.position
            timeout = (deadline.remaining() - reserve) / max(1, left)
            if timeout <= 0:
                raise DeadlineExceeded(f"deadline exceeded before calling {replica.label}")
            attempt.future = _send(
                getattr(replica.stub, method), attempt.request, inline, timeout=timeout, metadata=metadata
            )

        try:
            for number, attempt in enumerate(attempts):
                start(attempt, inline=number == len(attempts) - 1)
            return [self._finish_read(attempt, start, deadline, partial) for attempt in attempts]
        except BaseException:
            for attempt in attempts:
                if attempt.future is not None:
                    attempt.future.cancel()
            raise

    def _finish_read(
        self, attempt: "_ReadAttempt", start, deadline: Deadline, partial: PartialResults | None
    ):
        shard = attempt.replicas.shard
        rounds = 0
        while True:
            replica = attempt.replica
            try:
                reply = attempt.future.result()
            except grpc.FutureCancelledError:
                raise Unavailable(f"call to {replica.label} was cancelled") from None
            except grpc.RpcError as error:
                code = error.code()
                if code not in FAILOVER_CODES:
                    raise map_rpc_error(replica.label, error, caller_input=False) from None
                replica.set_state(UNREACHABLE, f"{code.name}: {error.details()}")
                attempt.failures.append((replica, error))
                if attempt.position + 1 < len(attempt.order) and deadline.remaining() > 0:
                    attempt.position += 1
                    self.events.failover(shard, replica, code, attempt.replica)
                    try:
                        start(attempt)
                        continue
                    except DeadlineExceeded:
                        if partial is None:
                            raise
                        partial.missing_shards.add(shard)
                        self.events.partial_result(shard, "no time left for another replica")
                        return None
                rounds += 1
                delay = self.policy.backoff(rounds - 1) * random.uniform(0.5, 1.0)
                if (
                    code == grpc.StatusCode.UNAVAILABLE
                    and rounds < self.policy.attempts
                    and delay < deadline.remaining()
                ):
                    log.info(
                        "retrying %s after UNAVAILABLE (%s) in %.0f ms",
                        attempt.replicas.label,
                        error.details(),
                        delay * 1000,
                    )
                    time.sleep(delay)
                    attempt.restart()
                    start(attempt)
                    continue
                failure = attempt.shard_down()
                if partial is None:
                    raise failure from None
                partial.missing_shards.add(shard)
                self.events.partial_result(shard, failure.message)
                return None
            if replica.state in (UNKNOWN, UNREACHABLE, NOT_SERVING):
                replica.set_state(SERVING, "answered a read")
            return reply

    def search(
        self,
        queries: np.ndarray,
        k: int,
        search_filter: SearchFilter,
        deadline: Deadline,
        *,
        collection: str = IMAGE_COLLECTION,
        group_by_listing: bool = True,
    ) -> list[list[Hit]]:
        """Per query, the hits of every shard (each shard's top k), fanned out in parallel.
        Inside ``partial_results(True)`` a shard whose replicas are all down is left out."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        request = indexer_pb2.SearchRequest(
            collection=collection,
            k=k,
            filter=to_index_filter(search_filter),
            group_by_listing=group_by_listing,
            queries=[float_vector(indexer_pb2.Vector, row) for row in queries],
        )
        shards = self.routing.search_shards()
        replies = self._read(
            "Search", [(shard, request) for shard in shards], deadline, partial=_partial_results.get()
        )
        per_query: list[list[Hit]] = [[] for _ in range(len(queries))]
        for replica_set, reply in zip((self.replica_sets[s] for s in shards), replies):
            if reply is None:
                continue
            if len(reply.results) != len(queries):
                raise DownstreamError(
                    f"{replica_set.label} returned {len(reply.results)} result "
                    f"lists for {len(queries)} queries"
                )
            for hits, result in zip(per_query, reply.results):
                hits.extend(
                    Hit(n.attributes.listing_id or n.id, float(n.score), n.id) for n in result.neighbors
                )
        return per_query

    def fetch(
        self, shard: int, ids: Sequence[str], deadline: Deadline, *, collection: str = IMAGE_COLLECTION
    ) -> list[StoredItem]:
        """The stored vectors of ``ids`` found on ``shard`` (request order; unknown ids skipped)."""
        reply = self._read(
            "Fetch", [(int(shard), indexer_pb2.FetchRequest(collection=collection, ids=list(ids)))], deadline
        )[0]
        return [StoredItem(item.id, _vector(item.vector), item.attributes.listing_id) for item in reply.items]

    def fetch_many(
        self,
        ids_by_shard: dict[int, Sequence[str]],
        deadline: Deadline,
        *,
        collection: str = IMAGE_COLLECTION,
    ) -> list[StoredItem]:
        """The stored vectors of the ids on each shard (``{shard: ids}``), all shards fetched in
        parallel in chunks of `FETCH_CHUNK` ids; unknown ids are skipped."""
        requests = []
        for shard, ids in sorted(ids_by_shard.items()):
            ids = list(ids)
            for start in range(0, len(ids), FETCH_CHUNK):
                requests.append(
                    (
                        int(shard),
                        indexer_pb2.FetchRequest(collection=collection, ids=ids[start : start + FETCH_CHUNK]),
                    )
                )
        replies = self._read("Fetch", requests, deadline) if requests else []
        return [
            StoredItem(item.id, _vector(item.vector), item.attributes.listing_id)
            for reply in replies
            for item in reply.items
        ]

    def stats(self, deadline: Deadline, collection: str = "") -> list[indexer_pb2.GetStatsResponse]:
        request = indexer_pb2.GetStatsRequest(collection=collection)
        return self._read("GetStats", [(shard, request) for shard in range(len(self))], deadline)

    def list_ids(
        self, shard: int, deadline: Deadline, *, collection: str = IMAGE_COLLECTION, page_size: int = 1000
    ) -> list[tuple[str, str]]:
        """Every (item id, listing id) stored on ``shard`` in ``collection``, paged (ListIds;
        each page from one replica of the shard, like any read)."""
        listed: list[tuple[str, str]] = []
        token = ""
        while True:
            reply = self._read(
                "ListIds",
                [
                    (
                        int(shard),
                        indexer_pb2.ListIdsRequest(
                            collection=collection, page_size=page_size, page_token=token
                        ),
                    )
                ],
                deadline,
            )[0]
            listed.extend((entry.id, entry.listing_id) for entry in reply.ids)
            token = reply.next_page_token
            if not token:
                return listed

    # ------------------------------------------------------------------ writes

    def _write(self, shard: int, method: str, request, deadline: Deadline):
        """Send a write to every replica of ``shard`` at once (see the class docstring), and to
        the shards in ``shard.also`` (a `ShardRoute` of a partition being moved) after it."""
        reply = self._write_shard(int(shard), method, request, deadline)
        for other in getattr(shard, "also", ()):
            self._write_shard(other, method, request, deadline)
        return reply

    def _write_shard(self, shard: int, method: str, request, deadline: Deadline):
        replica_set = self.replica_sets[shard]
        metadata = outgoing_metadata() + self.write_metadata
        rounds = 0
        while True:
            timeout = deadline.remaining() - min(0.2, 0.05 * max(deadline.remaining(), 0.0))
            if timeout <= 0:
                raise DeadlineExceeded(f"deadline exceeded before writing to {replica_set.label}")
            others_usable = sum(r.usable() for r in replica_set.replicas) > 0
            futures = [
                (
                    replica,
                    getattr(replica.stub, method).future(
                        request,
                        metadata=metadata,
                        timeout=timeout
                        if replica.usable() or not others_usable
                        else min(timeout, SUSPECT_WRITE_S),
                    ),
                )
                for replica in replica_set.replicas
            ]
            _await_writes([future for _, future in futures])
            stored, catching_up, down, refused = [], [], [], []
            for replica, future in futures:
                if not future.done():  # a serving replica stored it long ago: do not wait
                    future.cancel()
                    down.append((replica, None))
                    continue
                try:
                    reply = future.result()
                except grpc.RpcError as error:
                    (down if error.code() in FAILOVER_CODES else refused).append((replica, error))
                    continue
                except grpc.FutureCancelledError:
                    down.append((replica, None))
                    continue
                (catching_up if reply.replica_catching_up else stored).append((replica, reply))
            if stored:
                for replica, error in down + refused:
                    why = (
                        f"{error.code().name}: {error.details()}"
                        if error is not None
                        else "no answer while the others had long stored it"
                    )
                    replica.set_state(MISSED_WRITES, f"a {method} failed there: {why}")
                if down or refused:
                    self.catch_up_wanted.set()
                return stored[0][1]
            if refused and not stored:
                replica, error = refused[0]
                raise map_rpc_error(replica.label, error, caller_input=False)
            rounds += 1
            delay = self.policy.backoff(rounds - 1) * random.uniform(0.5, 1.0)
            if not catching_up and rounds < self.policy.attempts and delay < deadline.remaining():
                log.info(
                    "retrying %s on %s after every replica failed, in %.0f ms",
                    method,
                    replica_set.label,
                    delay * 1000,
                )
                time.sleep(delay)
                continue
            if len(replica_set.replicas) == 1 and down and down[0][1] is not None:
                raise map_rpc_error(down[0][0].label, down[0][1], caller_input=False)
            reasons = [f"{r.label}: {e.code().name if e is not None else 'CANCELLED'}" for r, e in down] + [
                f"{r.label}: catching up" for r, _ in catching_up
            ]
            raise Unavailable(
                f"{replica_set.label} unavailable: no serving replica took the "
                f"{method} ({'; '.join(reasons)})"
            )

    def upsert(
        self,
        shard: int,
        items: Sequence[IndexItem],
        deadline: Deadline,
        *,
        collection: str = IMAGE_COLLECTION,
    ) -> indexer_pb2.UpsertResponse:
        """Store ``items`` on every replica of ``shard`` (replace by id, so a retry is harmless),
        and on the other shard of any item whose partition a rebalance is moving (each item's
        own route, so a batch of many listings is placed right)."""
        targets: dict[int, list[IndexItem]] = {int(shard): list(items)}
        for item in items:
            for other in self.routing.shard_for(item.listing_id).writes:
                if other != int(shard):
                    targets.setdefault(other, []).append(item)
        replies = [
            self._write(
                target,
                "Upsert",
                indexer_pb2.UpsertRequest(collection=collection, items=[item.to_proto() for item in chunk]),
                deadline,
            )
            for target, chunk in targets.items()
        ]
        return replies[0]

    def delete(
        self, shard: int, ids: Sequence[str], deadline: Deadline, *, collection: str = IMAGE_COLLECTION
    ) -> int:
        """Remove ``ids`` from ``shard`` (unknown ids ignored); returns how many were removed."""
        reply = self._write(
            shard,
            "Delete",
            indexer_pb2.DeleteRequest(collection=collection, ids=list(ids), strict=False),
            deadline,
        )
        return int(reply.deleted)

    # ------------------------------------------------------------------ health

    def check_replicas(self, timeout_s: float) -> list[str]:
        """Probe every replica's health (and ask the ones that missed writes to catch up); the
        problems that make the gateway not ready: shards without a serving replica."""
        self.catch_up_wanted.clear()
        seen: dict[int, str] = {}
        for replica in self.replicas:
            if replica.state == MISSED_WRITES:
                self._request_catch_up(replica, timeout_s)
                continue
            problem = probe(replica.downstream, timeout_s)
            if problem is None:
                replica.set_state(SERVING, "health check")
            elif problem.endswith(": NOT_SERVING"):
                replica.set_state(NOT_SERVING, "health check says NOT_SERVING (catching up?)")
            else:
                replica.set_state(UNREACHABLE, problem.rsplit(": ", 1)[-1])
            if problem is not None:
                seen[id(replica)] = problem
        problems = []
        for replica_set in self.replica_sets:
            if replica_set.serving():
                continue
            states = "; ".join(seen.get(id(r), f"{r.label}: {r.state}") for r in replica_set.replicas)
            problems.append(
                f"indexer shard {replica_set.shard} has no serving replica ({states})"
                if len(replica_set.replicas) > 1
                else states
            )
        return problems

    def _request_catch_up(self, replica: Replica, timeout_s: float) -> None:
        """Tell a replica that missed a write to catch up from its peers (it goes NOT_SERVING)."""
        try:
            reply = replica.replication.CatchUp(
                indexer_pb2.CatchUpRequest(), timeout=timeout_s, metadata=self.write_metadata
            )
        except grpc.RpcError as error:
            log.info(
                "%s missed writes and cannot be asked to catch up yet: %s", replica.label, error.code().name
            )
            return
        if reply.state == "refusing":  # it has no INDEXER_PEERS: it can never catch up
            if replica.refused_catch_up:
                return
            replica.refused_catch_up = True
            log.error(
                "%s missed writes but cannot catch up (no INDEXER_PEERS?); it is not read "
                "from until it is restarted with its peers",
                replica.label,
            )
            return
        replica.refused_catch_up = False
        replica.set_state(NOT_SERVING, f"asked to catch up: {reply.state}")


#: A write to a replica already seen failing gets at most this long (it is likely down).
SUSPECT_WRITE_S = 1.0
#: Once a serving replica stored a write, the others get this long (or 4x the time the first
#: took, if longer) before they count as having missed it: a hung replica cannot stall writes.
WRITE_GRACE_S = 1.0


def _await_writes(futures: Sequence) -> None:
    """Wait until every write future is done, or one succeeded on a serving replica and the
    grace period after it has passed."""
    condition = threading.Condition()
    started = time.monotonic()

    def wake(_future) -> None:
        with condition:
            condition.notify_all()

    for future in futures:
        future.add_done_callback(wake)
    first_stored_at = None
    with condition:
        while True:
            if all(future.done() for future in futures):
                return
            if first_stored_at is None:
                for future in futures:
                    if (
                        future.done()
                        and not future.cancelled()
                        and future.exception() is None
                        and not future.result().replica_catching_up
                    ):
                        first_stored_at = time.monotonic()
                        break
            if first_stored_at is not None:
                grace = max(WRITE_GRACE_S, 4 * (first_stored_at - started))
                left = first_stored_at + grace - time.monotonic()
                if left <= 0:
                    return
                condition.wait(min(left, 0.1))
            else:
                condition.wait(0.1)


class _ReadAttempt:
    """One shard's read within `IndexerShards._read`: the replicas to try and what failed."""

    def __init__(self, replicas: ShardReplicas, request) -> None:
        self.replicas = replicas
        self.request = request
        self.future = None
        self.failures: list[tuple[Replica, grpc.RpcError]] = []
        self.restart()

    def restart(self) -> None:
        self.order = self.replicas.read_order()
        self.position = 0

    @property
    def replica(self) -> Replica:
        return self.order[self.position]

    def shard_down(self) -> ServiceError:
        """The error naming the shard after every replica failed."""
        if len(self.replicas.replicas) == 1:
            replica, error = self.failures[-1]
            return map_rpc_error(replica.label, error, caller_input=False)
        tried = "; ".join(f"{r.label}: {e.code().name}" for r, e in self.failures[-len(self.order) :])
        if all(e.code() == grpc.StatusCode.DEADLINE_EXCEEDED for _, e in self.failures):
            return DeadlineExceeded(f"deadline exceeded waiting for {self.replicas.label} ({tried})")
        return Unavailable(f"{self.replicas.label} unavailable: every replica failed ({tried})")


def probe(downstream: Downstream, timeout_s: float) -> str | None:
    """None when ``downstream`` says SERVING on the health service; otherwise what is wrong,
    naming it, e.g. ``indexer shard 1 at 127.0.0.1:5: UNAVAILABLE``."""
    stub = health_pb2_grpc.HealthStub(downstream.channel)
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
    except grpc.RpcError as exc:
        return f"{downstream.label}: {exc.code().name}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{downstream.label}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None
