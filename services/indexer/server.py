"""gRPC front of the indexer: validates requests, calls the core index, maps errors to status codes.

Status codes
    INVALID_ARGUMENT    wrong dimension, non-finite value, bad id, k outside 1..max_k, no queries,
                        unknown filter field or operator, nprobe/ef_search out of bounds
    RESOURCE_EXHAUSTED  more items/queries/ids than INDEXER_MAX_BATCH (limit in the message);
                        gRPC itself answers it for messages over INDEXER_MAX_MESSAGE_MB
    NOT_FOUND           unknown collection; unknown id on a strict Delete
    UNAUTHENTICATED / PERMISSION_DENIED  Upsert/Delete without the WRITE_TOKEN (common.security)
    UNAVAILABLE         Search/Fetch while this replica catches up from a peer (a gateway then
                        asks another replica); health says NOT_SERVING meanwhile
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import faiss
import grpc
import numpy as np

from common.logs import setup_logging
from common.metrics import ServiceMetrics
from common.security import write_token_interceptor
from common.errors import ServiceError
from common.serving import Server, create_server, serve_until_signal, service_errors
from marketplace.indexer.v1 import indexer_pb2, indexer_pb2_grpc
from services.indexer.attributes import Attributes
from services.indexer.config import IndexerConfig
from services.indexer.core import IndexStore, StoreOptions
from services.indexer.errors import InvalidArgument, LimitExceeded, NotFound
from services.indexer.replication import ReplicaIdentity, Replicator, check_identity, stream_state
from services.indexer.filters import Condition
from services.indexer.metrics import IndexerMetrics
from services.indexer.vector_index import Hit, tune_faiss

log = logging.getLogger(__name__)
SERVICE_NAME = indexer_pb2.DESCRIPTOR.services_by_name["Indexer"].full_name
REPLICATION_SERVICE = indexer_pb2.DESCRIPTOR.services_by_name["Replication"].full_name
WRITE_METHODS = {
    f"/{SERVICE_NAME}/Upsert",
    f"/{SERVICE_NAME}/Delete",
    *(f"/{REPLICATION_SERVICE}/{m}" for m in ("CatchUp", "ImportPartitions", "DropPartitions")),
}


def _maps_errors(method: Callable) -> Callable:
    """`common.serving.service_errors` around a servicer method, with the configured FAISS thread
    count applied: OpenMP settings are per calling thread, so setting it once in the main thread
    would not reach gRPC's worker threads."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        if self.faiss_threads:
            faiss.omp_set_num_threads(self.faiss_threads)
        with service_errors(context):
            return method(self, request, context)

    return wrapper


# -- proto <-> core conversions ---------------------------------------------------------------------
def attributes_from_proto(message: indexer_pb2.Attributes) -> Attributes:
    return Attributes(
        message.listing_id,
        message.category,
        message.price if message.HasField("price") else None,
        message.location,
    )


def attributes_to_proto(attributes: Attributes) -> indexer_pb2.Attributes:
    return indexer_pb2.Attributes(
        listing_id=attributes.listing_id,
        category=attributes.category,
        price=attributes.price,
        location=attributes.location,
    )


def condition_from_proto(message: indexer_pb2.Condition) -> Condition:
    op = message.WhichOneof("op") or ""
    if op == "equals":
        return Condition(message.field, op, (message.equals,))
    if op in ("any_of", "none_of"):
        return Condition(message.field, op, tuple(getattr(message, op).values))
    if op == "range":
        r = message.range
        return Condition(
            message.field, op, (), r.gte if r.HasField("gte") else None, r.lte if r.HasField("lte") else None
        )
    return Condition(message.field, op)  # raises: unknown field or missing operator


def vectors_to_matrix(vectors: Sequence, dimension: int | None, what: str) -> np.ndarray:
    """(n, d) float32 from repeated float fields; a ragged or wrong-sized one is INVALID_ARGUMENT
    naming its position."""
    if not len(vectors):
        return np.zeros((0, dimension or 0), dtype=np.float32)
    expected = dimension if dimension is not None else len(vectors[0])
    for position, values in enumerate(vectors):
        if len(values) != expected:
            raise InvalidArgument(f"{what} {position} has dimension {len(values)}; expected {expected}")
    return np.array(vectors, dtype=np.float32).reshape(len(vectors), expected)


def hits_to_proto(hits: list[Hit]) -> indexer_pb2.NeighborList:
    return indexer_pb2.NeighborList(
        neighbors=[
            indexer_pb2.Neighbor(id=h.id, score=h.score, attributes=attributes_to_proto(h.attributes))
            for h in hits
        ]
    )


class IndexerServicer(indexer_pb2_grpc.IndexerServicer):
    """Thin gRPC layer over an IndexStore: request limits and conversions only."""

    def __init__(
        self,
        store: IndexStore,
        *,
        max_batch: int = 1024,
        max_k: int = 1000,
        faiss_threads: int = 0,
        replicator: Replicator | None = None,
        metrics: IndexerMetrics | None = None,
    ) -> None:
        self.store = store
        self.replicator = replicator
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_k = max_k
        self.faiss_threads = faiss_threads

    def _check_batch(self, count: int, what: str) -> None:
        if count > self.max_batch:
            raise LimitExceeded(
                f"{count} {what} in one request; the limit is {self.max_batch} "
                "(INDEXER_MAX_BATCH): split the request"
            )

    def _catching_up(self) -> bool:
        return self.replicator is not None and not self.replicator.serving

    def _refuse_reads_while_catching_up(self, context) -> None:
        if self._catching_up():
            context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"this replica is not serving yet: {self.replicator.state} "
                f"({self.replicator.detail}); ask another replica of the shard",
            )

    def _dimension_of(self, collection: str) -> int | None:
        try:
            return self.store.collection(collection).dimension
        except NotFound:
            return None  # Upsert may create it (auto-create); the store decides

    @_maps_errors
    def Upsert(self, request, context):
        items = request.items
        self._check_batch(len(items), "items")
        vectors = vectors_to_matrix(
            [item.vector for item in items], self._dimension_of(request.collection), "item"
        )
        result = self.store.upsert(
            request.collection,
            [item.id for item in items],
            vectors,
            [attributes_from_proto(item.attributes) for item in items],
        )
        return indexer_pb2.UpsertResponse(
            inserted=result.inserted, replaced=result.replaced, replica_catching_up=self._catching_up()
        )

    @_maps_errors
    def Delete(self, request, context):
        self._check_batch(len(request.ids), "ids")
        result = self.store.delete(request.collection, list(request.ids), strict=request.strict)
        return indexer_pb2.DeleteResponse(
            deleted=result.deleted, not_found=result.not_found, replica_catching_up=self._catching_up()
        )

    @_maps_errors
    def Search(self, request, context):
        self._refuse_reads_while_catching_up(context)
        if not request.queries:
            raise InvalidArgument("at least one query vector is required")
        self._check_batch(len(request.queries), "queries")
        if not 1 <= request.k <= self.max_k:
            raise InvalidArgument(f"k must be in 1..{self.max_k} (got {request.k})")
        index = self.store.collection(request.collection)
        queries = vectors_to_matrix([q.values for q in request.queries], index.dimension, "query")
        conditions = [condition_from_proto(c) for c in request.filter.must]
        started = time.perf_counter()
        results = index.search(
            queries,
            request.k,
            conditions,
            group_by_listing=request.group_by_listing,
            nprobe=request.params.nprobe,
            ef_search=request.params.ef_search,
        )
        if self.metrics is not None:
            self.metrics.searched(index.name, time.perf_counter() - started)
        return indexer_pb2.SearchResponse(results=[hits_to_proto(hits) for hits in results])

    @_maps_errors
    def Fetch(self, request, context):
        self._refuse_reads_while_catching_up(context)
        self._check_batch(len(request.ids), "ids")
        items, missing = self.store.fetch(request.collection, list(request.ids))
        return indexer_pb2.FetchResponse(
            items=[
                indexer_pb2.Item(
                    id=i.id, vector=i.vector.tolist(), attributes=attributes_to_proto(i.attributes)
                )
                for i in items
            ],
            not_found=missing,
        )

    @_maps_errors
    def ListIds(self, request, context):
        self._check_batch(request.page_size, "ids per page")
        size = request.page_size or self.max_batch
        listed = self.store.list_ids(request.collection, request.page_token, size + 1)
        more = len(listed) > size
        listed = listed[:size]
        return indexer_pb2.ListIdsResponse(
            ids=[indexer_pb2.ListedId(id=i, listing_id=listing) for i, listing in listed],
            next_page_token=listed[-1][0] if more else "",
        )

    @_maps_errors
    def GetStats(self, request, context):
        return indexer_pb2.GetStatsResponse(
            collections=[
                indexer_pb2.CollectionStats(**stats) for stats in self.store.stats(request.collection)
            ]
        )


class ReplicationServicer(indexer_pb2_grpc.ReplicationServicer):
    """Replication between the replicas of one shard (`services.indexer.replication`)."""

    def __init__(self, replicator: Replicator) -> None:
        self.replicator = replicator

    def GetReplicaStatus(self, request, context):
        return self.replicator.status()

    def StreamState(self, request, context):
        if not self.replicator.serving:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this replica is {self.replicator.state}: copy a serving replica",
            )
        if self.replicator.store.data_dir is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "an in-memory store cannot be copied")
        yield from stream_state(self.replicator.store, self.replicator.status())

    def CatchUp(self, request, context):
        return indexer_pb2.CatchUpResponse(state=self.replicator.request_catch_up())

    def _partitions(self, partitions, count: int, context) -> set[int]:
        if count < 1 or any(p >= count for p in partitions):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"partitions must lie in 0..partition_count-1 (partition_count {count})",
            )
        return set(partitions)

    def ImportPartitions(self, request, context):
        wanted = self._partitions(request.partitions, request.partition_count, context)
        if not self.replicator.serving:
            context.abort(
                grpc.StatusCode.UNAVAILABLE, f"this replica is {self.replicator.state}: import when it serves"
            )
        with service_errors(context):  # IndexerError: FAILED_PRECONDITION
            taken, source = self.replicator.import_partitions(
                list(request.sources), wanted, request.partition_count
            )
        return indexer_pb2.ImportPartitionsResponse(imported=taken, source=source)

    def DropPartitions(self, request, context):
        wanted = self._partitions(request.partitions, request.partition_count, context)
        with service_errors(context):
            dropped = self.replicator.drop_partitions(wanted, request.partition_count)
        return indexer_pb2.DropPartitionsResponse(dropped=dropped)


@dataclass
class IndexerServer(Server):
    """A started indexer: the gRPC server plus the store it serves. ``stop`` also closes the
    store it owns (final snapshot, data directory released)."""

    store: IndexStore | None = None
    owns_store: bool = False
    replicator: Replicator | None = None

    def stop(self, grace: float | None = 5.0) -> None:
        if self.replicator is not None:
            self.replicator.stop()
        super().stop(grace)
        if self.owns_store and self.store is not None:
            self.store.close()


def open_store(config: IndexerConfig) -> IndexStore:
    """Open the data directory (snapshot + WAL replay) and start background snapshots."""
    store = IndexStore.open(
        config.data_dir,
        config.collections,
        specs_are_explicit=config.collections_explicit,
        options=StoreOptions(
            fsync=config.fsync,
            snapshot_every_records=config.snapshot_wal_records,
            snapshot_every_bytes=config.snapshot_wal_bytes,
            compact_dead_fraction=config.compact_dead_fraction,
            auto_create=config.auto_create,
        ),
    )
    store.start_snapshots(config.snapshot_seconds)
    return store


def start(config: IndexerConfig, store: IndexStore | None = None) -> IndexerServer:
    """Start serving ``store`` (or the one in ``config.data_dir``) on ``config.host:port``.

    Raises CorruptData / IndexerError when the data directory cannot be loaded safely.
    """
    tune_faiss(config.blas_threshold)
    if config.faiss_threads:
        faiss.omp_set_num_threads(config.faiss_threads)
    owns_store = store is None
    identity = ReplicaIdentity(config.shard, config.partitions)
    if store is None:
        check_identity(config.data_dir, identity)
        store = open_store(config)
    replicator = Replicator(store, identity, config.peers, lambda serving: None, tls=config.tls)
    metrics = ServiceMetrics.for_port(config.host, config.metrics_port, "INDEXER_METRICS_PORT")
    servicer = IndexerServicer(
        store,
        max_batch=config.max_batch,
        max_k=config.max_k,
        faiss_threads=config.faiss_threads,
        replicator=replicator,
        metrics=IndexerMetrics(metrics.registry, store) if metrics else None,
    )

    def register(server):
        indexer_pb2_grpc.add_IndexerServicer_to_server(servicer, server)
        indexer_pb2_grpc.add_ReplicationServicer_to_server(ReplicationServicer(replicator), server)
        return [SERVICE_NAME, REPLICATION_SERVICE]

    try:
        base = create_server(
            register,
            f"{config.host}:{config.port}",
            limits=config.limits,
            interceptors=[write_token_interceptor(WRITE_METHODS, config.write_token)],
            credentials=config.tls.server_credentials(),
            metrics=metrics,
        )
    except BaseException:
        if owns_store:
            store.close(snapshot=False)
        raise
    server = IndexerServer(
        base.grpc_server,
        base.port,
        base.health,
        base.service_names,
        store=store,
        owns_store=owns_store,
        replicator=replicator,
        metrics=base.metrics,
    )
    replicator.on_serving = server.set_serving
    replicator.start()  # SERVING at once without peers; after catching up with them
    return server


def main(argv: list[str] | None = None) -> None:
    config = IndexerConfig.from_env(argv)
    setup_logging("indexer", config.log_level)
    try:
        server = start(config)
    except ServiceError as exc:  # CorruptData, another shard's data, a stored collection...
        log.error("refusing to start: %s", exc)
        raise SystemExit(f"indexer: refusing to start: {exc}") from None
    log.info(
        "indexer serving on %s:%d",
        config.host,
        server.port,
        extra={"fields": {"collections": server.store.stats() if server.store else []}},
    )

    def stopped() -> None:
        log.info("final snapshot written; data directory %s released", config.data_dir)

    serve_until_signal(server, on_stop=stopped)
