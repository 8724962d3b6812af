"""Exact search picks BLAS or FAISS's SIMD loop by the number of queries, per search.

FAISS 1.15 compares its process-wide threshold with more than the query count: a threshold that
lets a batch use BLAS also sends a single query through sgemm, at about twice the CPU. The
choice must follow the query count and must never change the answer.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from services.indexer import vector_index
from services.indexer.attributes import Attributes
from services.indexer.spec import CollectionSpec
from services.indexer.vector_index import DEFAULT_BLAS_THRESHOLD, VectorIndex, tune_faiss


@pytest.fixture()
def index():
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((3000, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"img-{i}" for i in range(len(vectors))]
    attributes = [Attributes(listing_id=f"listing-{i // 3}") for i in range(len(vectors))]
    built = VectorIndex.build(CollectionSpec("image", 64), ids, vectors, attributes)
    tune_faiss(DEFAULT_BLAS_THRESHOLD)
    yield built, vectors
    tune_faiss(DEFAULT_BLAS_THRESHOLD)


def test_few_queries_run_on_the_simd_loop_and_batches_on_blas(index):
    built, vectors = index
    built.search(vectors[:1], 10)
    assert faiss.cvar.distance_compute_blas_threshold > 10**6  # no BLAS for one query
    built.search(vectors[:DEFAULT_BLAS_THRESHOLD], 10)
    assert faiss.cvar.distance_compute_blas_threshold == 1  # BLAS for the batch
    tune_faiss(4)
    built.search(vectors[:4], 10)
    assert faiss.cvar.distance_compute_blas_threshold == 1  # INDEXER_BLAS_THRESHOLD counts


@pytest.mark.parametrize("group_by_listing", [False, True])
def test_a_query_alone_gets_the_answer_it_gets_in_a_batch(index, group_by_listing):
    built, vectors = index
    queries = vectors[100 : 100 + 2 * DEFAULT_BLAS_THRESHOLD]
    batched = built.search(queries, 10, group_by_listing=group_by_listing)  # BLAS
    for row, query in enumerate(queries[:5]):
        alone = built.search(query[None, :], 10, group_by_listing=group_by_listing)[0]  # SIMD
        assert [hit.id for hit in alone] == [hit.id for hit in batched[row]]
        np.testing.assert_allclose(
            [hit.score for hit in alone], [hit.score for hit in batched[row]], atol=1e-5
        )
    assert vector_index._blas_from_queries == DEFAULT_BLAS_THRESHOLD
