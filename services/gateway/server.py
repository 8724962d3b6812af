"""gRPC front of the gateway: validates requests, calls the core, maps errors to status codes.

Each RPC: compute the request's deadline (the caller's, or GATEWAY_DOWNSTREAM_TIMEOUT_S when it
set none), convert the request to `domain` objects, call `core.GatewayCore`, convert back. A
`domain.GatewayError` becomes its status code with its message (INVALID_ARGUMENT, NOT_FOUND,
ALREADY_EXISTS, FAILED_PRECONDITION, UNAVAILABLE naming the dead downstream, DEADLINE_EXCEEDED,
and, from `common.security.WriteTokenInterceptor`, UNAUTHENTICATED / PERMISSION_DENIED for
AddListing/RemoveListing without the write token). SearchByText, Search (hybrid: fusion formulas
in `core`'s docstring) and Recommend answer FAILED_PRECONDITION when the embedder serves no text
model or the shards have no "text" collection where text is needed.

Health: ``""`` is SERVING while the process runs (liveness); ``marketplace.gateway.v1.Gateway``
is SERVING only while the embedder and every indexer shard are (readiness, `readiness`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, TypeVar

import grpc

from common.logs import setup_logging
from common.security import WriteTokenInterceptor, server_credentials
from common.serving import Server, ServerLimits, clip_details, create_server, serve_until_signal
from marketplace.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway import convert
from services.gateway.catalogue import Catalogue
from services.gateway.config import GatewayConfig
from services.gateway.core import GatewayCore
from services.gateway.domain import DeadlineExceeded, GatewayError
from services.gateway.downstream import Deadline, EmbedderClient, IndexerShards
from services.gateway.readiness import SERVING, DownstreamWatch

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

    def __init__(self, core: GatewayCore, config: GatewayConfig) -> None:
        self.core = core
        self.config = config

    # ------------------------------------------------------------------ plumbing

    def _deadline(self, context: grpc.ServicerContext) -> Deadline:
        remaining = context.time_remaining()
        if remaining is None or remaining > _NO_DEADLINE:
            return Deadline(self.config.downstream_timeout_s)
        return Deadline(max(0.0, remaining - min(DEADLINE_MARGIN_S, remaining * 0.1)))

    def _run(self, context: grpc.ServicerContext, work: Callable[[Deadline], T]) -> T:
        deadline = self._deadline(context)
        try:
            if deadline.remaining() <= 0:
                raise DeadlineExceeded("the caller's deadline had expired before the gateway started")
            return work(deadline)
        except GatewayError as exc:
            log.info("request failed: %s: %s", exc.code, clip_details(exc.message))
            # clipped: a message may echo a caller's input (e.g. a 100 KB listing id)
            context.abort(getattr(grpc.StatusCode, exc.code), clip_details(exc.message))

    # ------------------------------------------------------------------ RPCs

    def ClassifyImage(self, request, context):
        return self._run(context, lambda deadline: convert.classification_to_proto(
            self.core.classify(request.image, request.top_k, deadline)))

    def SearchByImage(self, request, context):
        return self._run(context, lambda deadline: convert.ranked_to_proto(
            self.core.search_by_image(request.image, request.k,
                                      convert.filter_from_proto(request.filter), deadline)))

    def SearchByText(self, request, context):
        return self._run(context, lambda deadline: convert.ranked_to_proto(
            self.core.search_by_text(request.query, request.k,
                                     convert.filter_from_proto(request.filter), deadline)))

    def Search(self, request, context):
        return self._run(context, lambda deadline: convert.ranked_to_proto(
            self.core.search(request.image, request.text, request.k,
                             convert.filter_from_proto(request.filter),
                             request.text_weight if request.HasField("text_weight") else None,
                             convert.fusion_from_proto(request.fusion), deadline)))

    def Recommend(self, request, context):
        return self._run(context, lambda deadline: convert.ranked_to_proto(
            self.core.recommend(list(request.liked_listing_ids), list(request.skipped_listing_ids),
                                list(request.seen_listing_ids), request.k,
                                convert.filter_from_proto(request.filter), deadline)))

    def SimilarListings(self, request, context):
        return self._run(context, lambda deadline: convert.ranked_to_proto(
            self.core.similar_listings(request.listing_id, request.k,
                                       convert.filter_from_proto(request.filter), deadline,
                                       photos_only=request.photos_only)))

    def GetListing(self, request, context):
        return self._run(context, lambda deadline: convert.listing_to_proto(
            self.core.get_listing(request.listing_id)))

    def AddListing(self, request, context):
        def work(deadline):
            listing = self.core.add_listing(convert.listing_from_proto(request.listing),
                                            list(request.images), deadline)
            return gateway_pb2.AddListingResponse(listing=convert.listing_to_proto(listing))
        return self._run(context, work)

    def RemoveListing(self, request, context):
        def work(deadline):
            removed = self.core.remove_listing(request.listing_id, deadline)
            return gateway_pb2.RemoveListingResponse(listing_id=removed.listing_id,
                                                     images_removed=removed.images_removed)
        return self._run(context, work)


@dataclass
class GatewayServer(Server):
    """The started server plus the core it serves (tests reach the catalogue through it) and
    the watch that keeps its readiness entry in step with the downstreams."""

    core: GatewayCore | None = None
    watch: DownstreamWatch | None = None

    def stop(self, grace: float | None = 5.0) -> None:
        if self.watch is not None:
            self.watch.stop()
        super().stop(grace)
        if self.core is not None:
            self.core.close()


def build_core(config: GatewayConfig) -> GatewayCore:
    catalogue = Catalogue.open(config.db_path)
    if config.seed_dir is not None and catalogue.count() == 0:
        report = catalogue.load_prepared(config.seed_dir)
        log.info("catalogue seeded from %s: %d listings, %d images", config.seed_dir,
                 report.listings, report.images)
    embedder = EmbedderClient(config.embedder_target, config.retry,
                              reconnect_backoff_max_s=config.reconnect_backoff_max_s,
                              model_info_ttl_s=config.model_info_ttl_s)
    indexer = IndexerShards(config.indexer_targets, config.retry,
                            reconnect_backoff_max_s=config.reconnect_backoff_max_s,
                            write_token=config.write_token)
    return GatewayCore(catalogue, embedder, indexer, max_k=config.max_k,
                       max_images=config.max_images,
                       compensation_timeout_s=config.compensation_timeout_s,
                       similar_text_weight=config.similar_text_weight)


def start(config: GatewayConfig) -> GatewayServer:
    core = build_core(config)
    servicer = GatewayServicer(core, config)

    def register(server):
        gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    try:
        server = create_server(register, f"{config.host}:{config.port}",
                               limits=ServerLimits(max_receive_bytes=config.max_message_bytes,
                                                   max_send_bytes=config.max_message_bytes,
                                                   max_workers=config.max_workers,
                                                   max_concurrent_rpcs=max(64, 4 * config.max_workers)),
                               interceptors=[WriteTokenInterceptor(WRITE_METHODS, config.write_token)],
                               credentials=server_credentials())
    except BaseException:
        core.close()
        raise
    if not config.write_token:
        log.warning("WRITE_TOKEN is not set: AddListing and RemoveListing are open to any caller")
    log.info("catalogue %s: %d listings; embedder %s; %d indexer shard(s): %s", config.db_path,
             core.catalogue.count(), config.embedder_target, len(config.indexer_targets),
             ", ".join(config.indexer_targets))
    gateway = GatewayServer(server.grpc_server, server.port, server.health, server.service_names,
                            core=core)
    if config.readiness_interval_s > 0:
        gateway.watch = DownstreamWatch(
            [core.embedder.downstream, *core.indexer.shards],
            lambda status: server.health.set(SERVICE_NAME, status),
            interval_s=config.readiness_interval_s, timeout_s=config.readiness_timeout_s)
        # the first check publishes the readiness entry: it never says SERVING before that
        gateway.watch.start()
        server.health.set("", SERVING)
    else:
        gateway.set_serving(True)
    return gateway


def main(argv: list[str] | None = None) -> None:
    config = GatewayConfig.from_env(argv)
    setup_logging("gateway", config.log_level)
    server = start(config)
    log.info("gateway serving on %s:%d", config.host, server.port)
    serve_until_signal(server)
