"""Congruence: the same images through gRPC and through the in-process core (a separate
``Embedder`` loaded from the same artefact) give identical vectors and categories."""

from __future__ import annotations

import numpy as np
import pytest

from marketplace.embedder.v1 import embedder_pb2
from services.embedder.core import BadImages, Embedder, RequestError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def core(embedder_config):
    embedder = Embedder.from_config(embedder_config)
    yield embedder
    embedder.close()


def test_embed_through_grpc_equals_the_in_process_core(embed, core, photos):
    np.testing.assert_array_equal(embed(photos), core.embed(photos))
    np.testing.assert_array_equal(embed(photos[:1]), core.embed(photos[:1]))


def test_classify_through_grpc_equals_the_in_process_core(stub, core, photos):
    reply = stub.Classify(
        embedder_pb2.ClassifyRequest(images=photos, top_k=5, include_embeddings=True), timeout=60
    )
    local = core.classify(photos, 5, include_embeddings=True)
    assert len(reply.results) == len(local)
    for remote, mine in zip(reply.results, local):
        assert [(c.category, c.probability) for c in remote.categories] == [
            (name, np.float32(p)) for name, p in mine.categories
        ]
        np.testing.assert_array_equal(np.array(remote.embedding.values, dtype=np.float32), mine.embedding)


def test_the_core_raises_the_errors_the_servicer_maps(core, photos):
    with pytest.raises(BadImages) as raised:
        core.embed([photos[0], b"", b"nope"])
    assert [index for index, _ in raised.value.problems] == [1, 2]
    with pytest.raises(RequestError, match="at least one"):
        core.embed([])
