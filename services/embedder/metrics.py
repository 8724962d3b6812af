"""The embedder's own Prometheus metrics, beside the gRPC ones of `common.metrics`.

What Triton users watch on a dynamically batched model, under our names:

* ``embedder_batch_size`` (histogram): images per model call. The average batch size is
  ``rate(embedder_batch_size_sum[5m]) / rate(embedder_batch_size_count[5m])`` (Triton:
  ``nv_inference_count / nv_inference_exec_count``).
* ``embedder_queue_wait_seconds`` (histogram): per request, from its images entering the batching
  queue to the model call that first takes them (Triton's queue duration).
* ``embedder_model_seconds`` (histogram): one model call (Triton's compute duration per batch).
* ``embedder_images_embedded_total``, ``embedder_texts_embedded_total`` (counters).
* ``embedder_model_info{model_version,backbone,embedding_dim,text_model}`` = 1.
"""

from __future__ import annotations

from typing import Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, Info

from common.metrics import LATENCY_BUCKETS
from services.embedder.core import Embedder

#: Seconds a request may wait for a batch: from nothing (idle model) to the batching window
#: (EMBEDDER_MAX_WAIT_MS, 5 ms) and, under load, a few model calls' worth.
QUEUE_WAIT_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


def batch_size_buckets(batch_size: int) -> tuple[float, ...]:
    """1, 2, 4, ... below ``batch_size``, then ``batch_size`` itself: full batches get a bucket."""
    edges = []
    edge = 1
    while edge < batch_size:
        edges.append(float(edge))
        edge *= 2
    return (*edges, float(batch_size))


class EmbedderMetrics:
    """Registers the embedder's metrics on ``registry`` and watches ``core``'s batcher."""

    def __init__(self, registry: CollectorRegistry, core: Embedder, batch_size: int) -> None:
        self.batch_size = Histogram(
            "embedder_batch_size",
            "Images per model call (dynamic batching).",
            buckets=batch_size_buckets(batch_size),
            registry=registry,
        )
        self.queue_wait = Histogram(
            "embedder_queue_wait_seconds",
            "Per request: seconds its images waited in the batching queue for the model.",
            buckets=QUEUE_WAIT_BUCKETS,
            registry=registry,
        )
        self.model_seconds = Histogram(
            "embedder_model_seconds",
            "Seconds of one model call (one batch).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.images = Counter("embedder_images_embedded", "Images run through the model.", registry=registry)
        self.texts = Counter("embedder_texts_embedded", "Texts embedded by EmbedText.", registry=registry)
        model, text = core.model, core.text
        Info("embedder_model", "The model this embedder serves.", registry=registry).info(
            {
                "model_version": model.version,
                "backbone": model.backbone,
                "embedding_dim": str(model.embedding_dim),
                "text_model": text.name if text is not None else "",
            }
        )
        core.batcher.observer = self

    def batch_done(self, size: int, model_seconds: float, queue_waits: Sequence[float]) -> None:
        self.batch_size.observe(size)
        self.model_seconds.observe(model_seconds)
        self.images.inc(size)
        for wait in queue_waits:
            self.queue_wait.observe(wait)

    def texts_embedded(self, count: int) -> None:
        self.texts.inc(count)
