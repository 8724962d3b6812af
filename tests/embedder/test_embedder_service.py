"""The embedder over real gRPC with real photos: vectors, categories, batching, limits."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from marketplace.embedder.v1 import embedder_pb2
from tests.embedder.helpers import MAX_BATCH, MAX_IMAGE_BYTES, cosine, vectors
from tests.support.artifacts import MAIN_CATEGORIES
from tests.support.photos import decode, encode
from tests.support.rpc import rpc_error

pytestmark = pytest.mark.timeout(120)


def test_reports_serving_once_the_model_is_loaded(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "marketplace.embedder.v1.Embedder"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_model_info_describes_the_loaded_artefact(stub, test_artifact):
    info = stub.GetModelInfo(embedder_pb2.GetModelInfoRequest(), timeout=10)
    assert info.backbone == "efficientnet_lite0"
    assert info.embedding_dim == 1280
    assert list(info.categories) == list(MAIN_CATEGORIES)
    assert info.model_version.startswith("efficientnet_lite0-")
    assert info.input_size == 224
    assert list(info.modalities) == ["image"]
    assert (info.text_embedding_dim, info.text_model) == (0, "")
    assert (info.max_batch, info.max_image_bytes) == (MAX_BATCH, MAX_IMAGE_BYTES)


def test_embed_text_is_refused_while_the_text_model_is_off(stub):
    error = rpc_error(stub.EmbedText, embedder_pb2.EmbedTextRequest(texts=["red bike"]))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "EMBEDDER_TEXT_MODEL=off" in error.details() and "EMBEDDER_TEXT_MODEL=on" in error.details()


def test_vectors_are_unit_norm_deterministic_and_distinct(stub, photos):
    request = embedder_pb2.EmbedRequest(images=photos)
    first = stub.Embed(request, timeout=60)
    again = vectors(stub.Embed(request, timeout=60))
    got = vectors(first)
    assert got.shape == (len(photos), 1280)
    assert first.model_version.startswith("efficientnet_lite0-")
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(got, again)
    similarity = got @ got.T
    assert similarity[~np.eye(len(photos), dtype=bool)].max() < 0.95, "different photos collapsed"


def test_same_photo_reencoded_as_jpeg_and_png_stays_near(embed, photos):
    pictures = [decode(data) for data in photos[:2]]
    jpegs = [encode(picture, "JPEG", quality=95) for picture in pictures]
    pngs = [encode(picture, "PNG") for picture in pictures]
    got = embed(jpegs + pngs)
    for i in range(len(pictures)):
        assert cosine(got[i], got[len(pictures) + i]) > 0.95


def test_a_batch_gives_the_same_vectors_as_single_calls(embed, photos):
    batch = embed(photos)
    singles = np.stack([embed([data])[0] for data in photos])
    np.testing.assert_allclose(batch, singles, atol=1e-5)


def test_concurrent_requests_are_batched_and_each_gets_its_own_vector(stub, embed, photos, embedder_server):
    expected = embed(photos)
    before = embedder_server.core.batcher.stats.largest
    clients = 6
    barrier = threading.Barrier(clients)
    results: dict[int, np.ndarray] = {}

    def client(i: int) -> None:
        barrier.wait(10)
        results[i] = vectors(
            stub.Embed(embedder_pb2.EmbedRequest(images=[photos[i % len(photos)]]), timeout=60)
        )[0]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == list(range(clients))
    for i, vector in results.items():
        np.testing.assert_allclose(vector, expected[i % len(photos)], atol=1e-5)
    assert max(before, embedder_server.core.batcher.stats.largest) > 1


def test_classify_returns_top_k_softmax_probabilities_best_first(stub, photos):
    reply = stub.Classify(embedder_pb2.ClassifyRequest(images=photos[:2]), timeout=60)
    assert len(reply.results) == 2
    for result in reply.results:
        probabilities = [c.probability for c in result.categories]
        assert len(probabilities) == 3  # top_k 0 means 3
        assert probabilities == sorted(probabilities, reverse=True)
        assert all(0.0 < p <= 1.0 for p in probabilities)
        assert {c.category for c in result.categories} <= set(MAIN_CATEGORIES)
        assert not result.HasField("embedding")

    everything = stub.Classify(
        embedder_pb2.ClassifyRequest(images=photos[:1], top_k=100), timeout=60
    ).results[0]
    assert len(everything.categories) == len(MAIN_CATEGORIES)  # capped at the category count
    assert sum(c.probability for c in everything.categories) == pytest.approx(1.0, abs=1e-4)
    assert everything.categories[0].category == reply.results[0].categories[0].category


def test_classify_with_embeddings_matches_embed_from_the_same_pass(stub, embed, photos):
    reply = stub.Classify(
        embedder_pb2.ClassifyRequest(images=photos[:2], top_k=1, include_embeddings=True), timeout=60
    )
    from_classify = np.array([list(r.embedding.values) for r in reply.results], dtype=np.float32)
    np.testing.assert_allclose(from_classify, embed(photos[:2]), atol=1e-5)
    assert all(len(r.categories) == 1 for r in reply.results)


def test_empty_and_oversized_requests_are_invalid_argument(stub, photos):
    error = rpc_error(stub.Embed, embedder_pb2.EmbedRequest(images=[]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at least one" in error.details()

    error = rpc_error(stub.Classify, embedder_pb2.ClassifyRequest(images=[photos[0]] * (MAX_BATCH + 1)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"limit is {MAX_BATCH}" in error.details()


def test_a_message_over_the_receive_limit_is_resource_exhausted(stub, embed, photos):
    too_big = [b"\0" * MAX_IMAGE_BYTES] * MAX_BATCH + [b"\0" * MAX_IMAGE_BYTES]
    error = rpc_error(stub.Embed, embedder_pb2.EmbedRequest(images=too_big))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert embed(photos[:1]).shape == (1, 1280)
