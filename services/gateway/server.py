"""gRPC front of the gateway: validates requests, calls the core, maps errors to status codes.

Each RPC: compute the request's deadline (the caller's, or GATEWAY_DOWNSTREAM_TIMEOUT_S when it
set none), convert the request to `domain` objects, call `core.GatewayCore`, convert back. A
`common.errors.ServiceError` becomes its status code with its message (INVALID_ARGUMENT, NOT_FOUND,
ALREADY_EXISTS, FAILED_PRECONDITION, UNAVAILABLE naming the dead downstream, DEADLINE_EXCEEDED,
and, from `common.security.WriteTokenInterceptor`, UNAUTHENTICATED / PERMISSION_DENIED for
AddListing/RemoveListing without the write token). SearchByText, Search (hybrid: fusion formulas
in `core`'s docstring) and Recommend answer FAILED_PRECONDITION when the embedder serves no text
model or the shards have no "text" collection where text is needed.

Health: ``""`` is SERVING while the process runs (liveness); ``marketplace.gateway.v1.Gateway``
is SERVING only while the embedder is and every indexer shard has a serving replica
(readiness, `readiness`). Search RPCs with ``allow_partial_results`` answer without shards
whose replicas are all down and name them in ``missing_shards``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, TypeVar

import grpc

from common.config import ConfigError
from common.errors import Internal
from common.image_store import open_image_store
from common.logs import setup_logging
from common.metrics import ServiceMetrics
from common.shard_map import ShardMapError
from common.security import WriteTokenInterceptor
from common.serving import Server, ServerLimits, create_server, serve_until_signal, service_errors
from marketplace.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway import convert
from services.gateway.catalogue import Catalogue, CatalogueError, CatalogueUnavailable
from services.gateway.catalogue_db import UniqueViolation
from services.gateway.config import GatewayConfig
from services.gateway.core import GatewayCore
from services.gateway.domain import DeadlineExceeded, ServiceError
from services.gateway.downstream import Deadline, EmbedderClient, IndexerShards, partial_results
from services.gateway.fusion_defaults import FusionDefaults
from services.gateway.metrics import GatewayMetrics
from services.gateway.outbox import OutboxApplier
from services.gateway.photos import ListingPhotos
from services.gateway.readiness import SERVING, DownstreamWatch
from services.gateway.shards import ShardMapWatch, ShardRouting, routing_for

log = logging.getLogger(__name__)
SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
#: RPCs that change stored data: they need the write token when WRITE_TOKEN is set.
WRITE_METHODS = {f"/{SERVICE_NAME}/AddListing", f"/{SERVICE_NAME}/RemoveListing"}
T = TypeVar("T")

#: Part of the caller's remaining time kept back so the gateway answers before the caller gives up.
DEADLINE_MARGIN_S = 0.05
_NO_DEADLINE = 1e8  # gRPC reports "no deadline" as None or as a huge number of seconds


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """Thin: validate -> core -> map errors."""

    def __init__(self, core: GatewayCore, config: GatewayConfig, photos: ListingPhotos | None = None) -> None:
        self.core = core
        self.config = config
        self.photos = photos or ListingPhotos(None)

    # ------------------------------------------------------------------ plumbing

    def _deadline(self, context: grpc.ServicerContext) -> Deadline:
        remaining = context.time_remaining()
        if remaining is None or remaining > _NO_DEADLINE:
            return Deadline(self.config.downstream_timeout_s)
        return Deadline(max(0.0, remaining - min(DEADLINE_MARGIN_S, remaining * 0.1)))

    def _run(self, context: grpc.ServicerContext, work: Callable[[Deadline], T]) -> T:
        deadline = self._deadline(context)
        with service_errors(context):
            if deadline.remaining() <= 0:
                raise DeadlineExceeded("the caller's deadline had expired before the gateway started")
            try:
                return work(deadline)
            except CatalogueError as exc:  # e.g. a constraint the validation did not foresee
                log.error("catalogue error: %s", exc)
                raise Internal(f"catalogue error: {exc}") from exc

    def _search(
        self, context: grpc.ServicerContext, request, work: Callable[[Deadline], list]
    ) -> gateway_pb2.SearchListingsResponse:
        """A search RPC: with ``request.allow_partial_results`` shards whose replicas are all
        down are left out and named in ``missing_shards``."""
        with partial_results(request.allow_partial_results) as outcome:
            response = convert.ranked_to_proto(self._run(context, work))
        response.missing_shards.extend(sorted(outcome.missing_shards))
        return response

    # ------------------------------------------------------------------ RPCs

    def ClassifyImage(self, request, context):
        return self._run(
            context,
            lambda deadline: convert.classification_to_proto(
                self.core.classify(request.image, request.top_k, deadline)
            ),
        )

    def SearchByImage(self, request, context):
        return self._search(
            context,
            request,
            lambda deadline: self.core.search_by_image(
                request.image, request.k, convert.filter_from_proto(request.filter), deadline
            ),
        )

    def SearchByText(self, request, context):
        return self._search(
            context,
            request,
            lambda deadline: self.core.search_by_text(
                request.query, request.k, convert.filter_from_proto(request.filter), deadline
            ),
        )

    def Search(self, request, context):
        return self._search(
            context,
            request,
            lambda deadline: self.core.search(
                request.image,
                request.text,
                request.k,
                convert.filter_from_proto(request.filter),
                request.text_weight if request.HasField("text_weight") else None,
                convert.fusion_from_proto(request.fusion),
                deadline,
            ),
        )

    def Recommend(self, request, context):
        return self._search(
            context,
            request,
            lambda deadline: self.core.recommend(
                list(request.liked_listing_ids),
                list(request.skipped_listing_ids),
                list(request.seen_listing_ids),
                request.k,
                convert.filter_from_proto(request.filter),
                deadline,
            ),
        )

    def SimilarListings(self, request, context):
        return self._search(
            context,
            request,
            lambda deadline: self.core.similar_listings(
                request.listing_id,
                request.k,
                convert.filter_from_proto(request.filter),
                deadline,
                photos_only=request.photos_only,
            ),
        )

    def GetListing(self, request, context):
        return self._run(
            context,
            lambda deadline: convert.listing_to_proto(
                self.core.get_listing(request.listing_id, include_pending=request.include_pending)
            ),
        )

    def AddListing(self, request, context):
        def work(deadline):
            added = self.core.add_listing(
                convert.listing_from_proto(request.listing), list(request.images), deadline
            )
            self._keep_photos(added.listing, request.images, deadline)
            return gateway_pb2.AddListingResponse(
                listing=convert.listing_to_proto(added.listing), pending=added.pending
            )

        return self._run(context, work)

    def RemoveListing(self, request, context):
        def work(deadline):
            image_ids = self.core.get_listing(request.listing_id).image_ids
            removed = self.core.remove_listing(request.listing_id, deadline)
            self.photos.forget(image_ids)
            return gateway_pb2.RemoveListingResponse(
                listing_id=removed.listing_id, images_removed=removed.images_removed, pending=removed.pending
            )

        return self._run(context, work)

    def _keep_photos(self, listing, images, deadline: Deadline) -> None:
        """The image-store hook of AddListing (`photos`): a store failure undoes the listing."""
        try:
            self.photos.keep(listing, images)
        except ServiceError:
            try:
                self.core.remove_listing(listing.id, deadline)
            except ServiceError as exc:
                log.error("listing %s stays without its photos: removing it failed: %s", listing.id, exc)
            raise


@dataclass
class GatewayServer(Server):
    """The started server plus the core it serves (tests reach the catalogue through it) and
    the watch that keeps its readiness entry in step with the downstreams."""

    core: GatewayCore | None = None
    watch: DownstreamWatch | None = None
    map_watch: ShardMapWatch | None = None

    def stop(self, grace: float | None = 5.0) -> None:
        if self.watch is not None:
            self.watch.stop()
        if self.map_watch is not None:
            self.map_watch.stop()
        super().stop(grace)
        if self.core is not None:
            self.core.close()


def build_core(config: GatewayConfig, metrics: GatewayMetrics | None = None) -> GatewayCore:
    """The core; with ``metrics``, its downstream calls, replica events, catalogue and replica
    states are measured (`services.gateway.metrics`)."""
    pool = config.max_workers + 4  # every request thread, the outbox loop and readiness at once
    catalogue = Catalogue.open(
        config.db_path,
        password=config.db_password,
        max_connections=pool,
        min_connections=pool,
        connect_timeout_s=config.db_connect_timeout_s,
    )
    try:  # an unusable shard map refuses before anything else is started
        routing = shard_routing(config, catalogue)
    except BaseException:
        catalogue.close()
        raise
    if config.bootstrap_dir is not None and catalogue.count(include_pending=True) == 0:
        try:
            report = catalogue.load_prepared(config.bootstrap_dir)
        except (CatalogueError, UniqueViolation) as exc:  # another replica bootstrapped it meanwhile
            log.info("catalogue not bootstrapped from %s: %s", config.bootstrap_dir, exc)
        else:
            log.info(
                "catalogue bootstrapped from %s: %d listings, %d images",
                config.bootstrap_dir,
                report.listings,
                report.images,
            )
    embedder = EmbedderClient(
        config.embedder_target,
        config.retry,
        reconnect_backoff_max_s=config.reconnect_backoff_max_s,
        model_info_ttl_s=config.model_info_ttl_s,
        client_metrics=metrics.client if metrics else None,
        tls=config.tls,
    )
    indexer = IndexerShards(
        config.indexer_replicas,
        config.retry,
        reconnect_backoff_max_s=config.reconnect_backoff_max_s,
        write_token=config.write_token,
        routing=routing,
        events=metrics.replica_events() if metrics else None,
        client_metrics=metrics.client if metrics else None,
        tls=config.tls,
    )
    if metrics is not None:
        metrics.catalogue, metrics.indexer = catalogue, indexer
    outbox = OutboxApplier(
        catalogue, indexer, lease_s=config.outbox_lease_s, interval_s=config.outbox_interval_s
    )
    fusion = FusionDefaults(
        embedder.model_info,
        search_override=config.search_text_weight,
        similar_override=config.similar_text_weight,
    )
    return GatewayCore(
        catalogue,
        embedder,
        indexer,
        max_k=config.max_k,
        max_images=config.max_images,
        outbox=outbox,
        fusion=fusion,
    )


def shard_routing(config: GatewayConfig, catalogue: Catalogue) -> ShardRouting:
    """Routing by the shard map in the catalogue database when it holds one (created at
    version 1 with GATEWAY_SHARD_MAP=on), refusing one that cannot be used with the configured
    shards; else by hash over the configured shards."""
    try:
        return routing_for(
            len(config.indexer_replicas),
            catalogue.shard_map_store(),
            config.partitions,
            create=config.shard_map,
        )
    except ShardMapError as exc:
        raise ConfigError(f"shard map (GATEWAY_SHARD_MAP, in GATEWAY_DB {catalogue.path}): {exc}") from None


def start(config: GatewayConfig) -> GatewayServer:
    metrics = ServiceMetrics.for_port(config.host, config.metrics_port, "GATEWAY_METRICS_PORT")
    observed = GatewayMetrics(metrics) if metrics is not None else None
    core = build_core(config, observed)
    photos = ListingPhotos(
        open_image_store(config.image_store_dir, config.max_message_bytes) if config.image_store_dir else None
    )
    servicer = GatewayServicer(core, config, photos)

    def register(server):
        gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    try:
        server = create_server(
            register,
            f"{config.host}:{config.port}",
            limits=ServerLimits(
                max_receive_bytes=config.max_message_bytes,
                max_send_bytes=config.max_message_bytes,
                max_workers=config.max_workers,
                max_concurrent_rpcs=max(64, 4 * config.max_workers),
            ),
            interceptors=[WriteTokenInterceptor(WRITE_METHODS, config.write_token)],
            credentials=config.tls.server_credentials(),
            metrics=metrics,
        )
    except BaseException:
        core.close()
        raise
    if not config.write_token:
        log.warning("WRITE_TOKEN is not set: AddListing and RemoveListing are open to any caller")
    core.outbox.start()  # pushes index writes left pending (a shard down, a gateway killed)
    log.info("fusion defaults: %s", core.fusion.describe_settings())
    log.info(
        "catalogue %s: %d listings; embedder %s; %d indexer shard(s): %s",
        core.catalogue.path,
        core.catalogue.count(),
        config.embedder_target,
        len(config.indexer_replicas),
        "; ".join(f"{n}={'|'.join(r)}" for n, r in enumerate(config.indexer_replicas)),
    )
    gateway = GatewayServer(
        server.grpc_server,
        server.port,
        server.health,
        server.service_names,
        core=core,
        metrics=server.metrics,
    )
    # every gateway follows the map's versions (also one routing by hash: when another gateway
    # creates the first map, this one must route by it too)
    gateway.map_watch = ShardMapWatch(
        core.catalogue.shard_map_store(), core.indexer.routing, config.shard_map_poll_s
    )
    gateway.map_watch.start()
    if config.readiness_interval_s > 0:
        gateway.watch = DownstreamWatch(
            [core.embedder.downstream],
            lambda status: server.health.set(SERVICE_NAME, status),
            shards=core.indexer,
            interval_s=config.readiness_interval_s,
            timeout_s=config.readiness_timeout_s,
        )
        if observed is not None:
            observed.watch = gateway.watch
        # the first check publishes the readiness entry: it never says SERVING before that
        gateway.watch.start()
        server.health.set("", SERVING)
    else:
        gateway.set_serving(True)
    return gateway


def main(argv: list[str] | None = None) -> None:
    config = GatewayConfig.from_env(argv)
    setup_logging("gateway", config.log_level)
    try:
        server = start(config)
    except (CatalogueError, CatalogueUnavailable) as exc:
        raise SystemExit(f"gateway: GATEWAY_DB: {exc}") from None
    log.info("gateway serving on %s:%d", config.host, server.port)
    serve_until_signal(server)
