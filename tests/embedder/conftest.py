"""Embedder fixtures: one real server on an ephemeral port for the whole folder, real photos."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from marketplace.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from services.embedder.config import EmbedderConfig
from services.embedder.server import start
from tests.embedder.helpers import MAX_BATCH, MAX_IMAGE_BYTES, MAX_PIXELS, vectors
from tests.support.photos import NoPhotos, real_photos


@pytest.fixture(scope="session")
def photos() -> list[bytes]:
    """Three real photos (marketplace listings, or scikit-image samples) as JPEG bytes."""
    try:
        return real_photos(3)
    except NoPhotos as exc:
        pytest.skip(f"no real photos: {exc}")


@pytest.fixture(scope="session")
def embedder_config(test_artifact) -> EmbedderConfig:
    # One torch thread: results don't depend on it and it copes best with a busy machine.
    # Images only (the text model has its own server in test_text_rpc.py).
    return EmbedderConfig.local(
        artifact_dir=test_artifact,
        host="127.0.0.1",
        port=0,
        max_batch=MAX_BATCH,
        batch_size=8,
        max_wait_ms=20,
        torch_threads=1,
        decode_threads=2,
        max_image_bytes=MAX_IMAGE_BYTES,
        max_pixels=MAX_PIXELS,
        text_model="off",
    )


@pytest.fixture(scope="session")
def embedder_server(embedder_config):
    server = start(embedder_config)
    yield server
    server.stop(grace=1)


@pytest.fixture(scope="session")
def channel(embedder_server):
    with grpc.insecure_channel(f"127.0.0.1:{embedder_server.port}") as chan:
        yield chan


@pytest.fixture(scope="session")
def stub(channel) -> embedder_pb2_grpc.EmbedderStub:
    return embedder_pb2_grpc.EmbedderStub(channel)


@pytest.fixture(scope="session")
def embed(stub):
    """embed(images) -> (N, D) float32 array, through the real server."""

    def call(images: list[bytes]) -> np.ndarray:
        return vectors(stub.Embed(embedder_pb2.EmbedRequest(images=images), timeout=60))

    return call
