"""The embedder's batching metrics: the batcher tells its observer each batch's size, model time
and each submission's queue wait; `EmbedderMetrics` turns them into Prometheus series."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from services.embedder.batcher import DynamicBatcher
from services.embedder.metrics import batch_size_buckets

pytestmark = pytest.mark.timeout(60)


class Recorder:
    def __init__(self) -> None:
        self.batches: list[tuple[int, float, list[float]]] = []

    def batch_done(self, size, model_seconds, queue_waits) -> None:
        self.batches.append((size, model_seconds, list(queue_waits)))


def test_observer_sees_every_batch_with_its_queue_waits():
    gate = threading.Event()

    def model(batch: torch.Tensor):
        gate.wait(10)
        values = batch.numpy().reshape(batch.shape[0], -1)
        return (values,)

    batcher = DynamicBatcher(model, max_batch_size=4, max_wait_s=0.0)
    recorder = Recorder()
    batcher.observer = recorder
    try:
        first = batcher.submit(torch.zeros(1, 1))  # the model blocks on this one ...
        later = [batcher.submit(torch.zeros(3, 1)), batcher.submit(torch.zeros(3, 1))]
        gate.set()  # ... while 6 rows queue up
        for future in [first, *later]:
            future.result(10)
    finally:
        batcher.close()
    sizes = [size for size, _, _ in recorder.batches]
    assert sum(sizes) == 7 and max(sizes) <= 4
    waits = [wait for _, _, batch_waits in recorder.batches for wait in batch_waits]
    assert len(waits) == 3  # one per submission, at its first batch
    assert all(wait >= 0 for wait in waits)
    assert all(seconds >= 0 for _, seconds, _ in recorder.batches)


def test_a_failing_observer_does_not_stop_the_model_worker():
    batcher = DynamicBatcher(lambda batch: (batch.numpy(),), max_batch_size=2, max_wait_s=0.0)

    class Broken:
        def batch_done(self, *args) -> None:
            raise RuntimeError("metrics broke")

    batcher.observer = Broken()
    try:
        for _ in range(3):
            (out,) = batcher.submit(torch.ones(1, 2)).result(10)
            np.testing.assert_array_equal(out, [[1, 1]])
    finally:
        batcher.close()


def test_batch_size_buckets_end_at_the_configured_batch():
    assert batch_size_buckets(8) == (1.0, 2.0, 4.0, 8.0)
    assert batch_size_buckets(6) == (1.0, 2.0, 4.0, 6.0)
    assert batch_size_buckets(1) == (1.0,)


def test_embedder_metrics_on_a_real_embedder(test_artifact):
    from services.embedder.config import EmbedderConfig
    from services.embedder.core import Embedder
    from services.embedder.metrics import EmbedderMetrics
    from tests.support.photos import real_photos

    core = Embedder.from_config(
        EmbedderConfig(artifact_dir=test_artifact, text_model="off", batch_size=4, model_workers=1)
    )
    registry = CollectorRegistry()
    EmbedderMetrics(registry, core, batch_size=4)
    try:
        core.embed(real_photos(3))
        core.embed(real_photos(1))
    finally:
        core.close()
    value = registry.get_sample_value
    assert value("embedder_images_embedded_total") == 4
    assert value("embedder_batch_size_sum") == 4
    assert 1 <= value("embedder_batch_size_sum") / value("embedder_batch_size_count") <= 4
    assert value("embedder_queue_wait_seconds_count") == 2
    assert value("embedder_model_seconds_count") == value("embedder_batch_size_count")
    assert (
        value(
            "embedder_model_info",
            {
                "model_version": core.model.version,
                "backbone": core.model.backbone,
                "embedding_dim": str(core.model.embedding_dim),
                "text_model": "",
            },
        )
        == 1
    )


def test_embedder_server_exports_text_counts_and_rpc_codes(embedder_config):
    """A real embedder server with the text model and metrics on: EmbedText's texts are counted
    only when embedded, and each call lands under its code."""
    from dataclasses import replace

    import grpc

    from marketplace.embedder.v1 import embedder_pb2, embedder_pb2_grpc
    from scripts.stack import free_port
    from tests.support.metrics import scrape, value
    from tests.support.text import start_text_embedder

    server = start_text_embedder(replace(embedder_config, text_model="on", metrics_port=free_port()))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = embedder_pb2_grpc.EmbedderStub(channel)
            stub.EmbedText(embedder_pb2.EmbedTextRequest(texts=["oak table", "bike", "lamp"]), timeout=60)
            stub.EmbedText(embedder_pb2.EmbedTextRequest(texts=["sofa", "desk"]), timeout=60)
            with pytest.raises(grpc.RpcError) as raised:
                stub.EmbedText(embedder_pb2.EmbedTextRequest(texts=["chair", " "]), timeout=60)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        samples = scrape(server.metrics.bound_port)
    finally:
        server.stop(grace=1)
    assert value(samples, "embedder_texts_embedded_total") == 5
    method = dict(grpc_service="marketplace.embedder.v1.Embedder", grpc_method="EmbedText")
    assert value(samples, "grpc_server_handled_total", grpc_code="OK", **method) == 2
    assert value(samples, "grpc_server_handled_total", grpc_code="INVALID_ARGUMENT", **method) == 1
    assert value(samples, "grpc_server_handling_seconds_count", **method) == 3
    assert value(samples, "embedder_images_embedded_total") == 0
    assert value(samples, "embedder_model_info", text_model=server.core.text.name) == 1
