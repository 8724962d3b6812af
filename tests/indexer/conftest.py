"""Indexer test configuration."""

from __future__ import annotations

import faiss
import pytest


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """Test data is tiny: one OpenMP thread avoids spin-waiting on a shared, busy machine
    (restored afterwards so other test folders are unaffected)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)
