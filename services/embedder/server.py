"""gRPC front of the embedder: validates requests, calls the core, maps errors to status codes."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

from common.logs import setup_logging
from common.metrics import ServiceMetrics
from common.model import ArtifactError
from common.artifact import FUSION_WEIGHTS_FILE
from common.vectors import float_vector
from common.serving import Server, create_server, serve_until_signal, service_errors
from marketplace.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from services.embedder.config import EmbedderConfig
from services.embedder.core import Embedder
from services.embedder.metrics import EmbedderMetrics

log = logging.getLogger(__name__)
SERVICE_NAME = embedder_pb2.DESCRIPTOR.services_by_name["Embedder"].full_name


def _vector(values) -> embedder_pb2.Vector:
    return float_vector(embedder_pb2.Vector, values)


class EmbedderServicer(embedder_pb2_grpc.EmbedderServicer):
    """Thin shell over ``Embedder``: bad input -> INVALID_ARGUMENT naming the bad image or text,
    shutting down -> UNAVAILABLE, EmbedText without a text model -> FAILED_PRECONDITION saying
    how to enable it."""

    def __init__(
        self, core: Embedder, config: EmbedderConfig, metrics: EmbedderMetrics | None = None
    ) -> None:
        self.core = core
        self.config = config
        self.metrics = metrics

    def Embed(self, request, context):
        with service_errors(context):
            embeddings = self.core.embed(request.images)
        return embedder_pb2.EmbedResponse(
            embeddings=[_vector(row) for row in embeddings], model_version=self.core.model.version
        )

    def Classify(self, request, context):
        with service_errors(context):
            results = self.core.classify(
                request.images, request.top_k, include_embeddings=request.include_embeddings
            )
        response = embedder_pb2.ClassifyResponse(model_version=self.core.model.version)
        for result in results:
            item = response.results.add()
            for category, probability in result.categories:
                item.categories.add(category=category, probability=probability)
            if result.embedding is not None:
                item.embedding.CopyFrom(_vector(result.embedding))
        return response

    def EmbedText(self, request, context):
        with service_errors(context):
            embeddings = self.core.embed_text(list(request.texts))
        if self.metrics is not None:
            self.metrics.texts_embedded(len(embeddings))
        return embedder_pb2.EmbedTextResponse(
            embeddings=[_vector(row) for row in embeddings], text_model=self.core.text.name
        )

    def GetModelInfo(self, request, context):
        model, text, fusion = self.core.model, self.core.text, self.core.fusion_weights
        info = embedder_pb2.ModelInfo(
            backbone=model.backbone,
            embedding_dim=model.embedding_dim,
            categories=model.categories,
            model_version=model.version,
            input_size=model.input_size,
            modalities=self.core.modalities,
            text_embedding_dim=text.dim if text is not None else 0,
            text_model=text.name if text is not None else "",
            max_batch=self.config.max_batch,
            max_image_bytes=self.config.max_image_bytes,
            fusion_weights_problem=self.core.fusion_weights_problem,
        )
        if fusion is not None:
            info.fusion_weights.CopyFrom(
                embedder_pb2.FusionWeights(
                    search_text_weight=fusion.search_text_weight,
                    similar_text_weight=fusion.similar_text_weight,
                    chosen_on=fusion.chosen_on,
                    source=f"{FUSION_WEIGHTS_FILE} of {fusion.image_model_version}",
                )
            )
        return info


@dataclass
class EmbedderServer(Server):
    """The started server plus the core it serves; ``stop`` also stops the model worker."""

    core: Embedder | None = None

    def stop(self, grace: float | None = 5.0) -> None:
        super().stop(grace)
        if self.core is not None:
            self.core.close()


def start(config: EmbedderConfig, core: Embedder | None = None) -> EmbedderServer:
    """Load the model (raising ``ArtifactError`` before binding anything if the artefact is
    unusable), start the server on ``config.port`` (0: any free port) and report SERVING.
    TLS / mutual TLS when TLS_CERT + TLS_KEY (+ TLS_CLIENT_CA) are set (`common.security`)."""
    credentials = config.tls.server_credentials()  # a bad TLS_* path fails before the model loads
    core = core or Embedder.from_config(config)
    metrics = ServiceMetrics.for_port(config.host, config.metrics_port, "EMBEDDER_METRICS_PORT")
    observed = EmbedderMetrics(metrics.registry, core, config.batch_size) if metrics is not None else None
    servicer = EmbedderServicer(core, config, observed)

    def register(server):
        embedder_pb2_grpc.add_EmbedderServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    try:
        server = create_server(
            register,
            f"{config.host}:{config.port}",
            limits=config.server_limits(),
            credentials=credentials,
            metrics=metrics,
        )
    except Exception:
        core.close()
        raise
    embedder_server = EmbedderServer(
        server.grpc_server, server.port, server.health, server.service_names, core, metrics=server.metrics
    )
    embedder_server.set_serving(True)
    return embedder_server


def main(argv: list[str] | None = None) -> None:
    config = EmbedderConfig.from_env(argv)
    setup_logging("embedder", config.log_level)
    try:
        server = start(config)
    except ArtifactError as exc:
        log.error("cannot load the model from %s: %s", config.artifact_dir, exc)
        sys.exit(f"embedder: cannot start: {exc}")
    log.info("embedder serving %s on %s:%d", " and ".join(server.core.modalities), config.host, server.port)
    serve_until_signal(server)
