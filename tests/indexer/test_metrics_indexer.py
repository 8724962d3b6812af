"""The indexer's metrics read from a real data directory: vectors per collection, WAL bytes,
snapshot age and duration, search time per collection through the gRPC servicer."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from services.indexer.core import IndexStore
from services.indexer.metrics import IndexerMetrics
from services.indexer.spec import CollectionSpec

pytestmark = pytest.mark.timeout(60)


def test_store_metrics_follow_writes_and_snapshots(tmp_path):
    store = IndexStore.open(tmp_path, [CollectionSpec("image", 4), CollectionSpec("text", 3)])
    registry = CollectorRegistry()
    metrics = IndexerMetrics(registry, store)
    value = registry.get_sample_value
    try:
        assert value("indexer_vectors", {"collection": "image"}) == 0
        assert value("indexer_seconds_since_last_snapshot") is None  # none written yet
        store.upsert("image", ["a", "b"], np.eye(4, dtype=np.float32)[:2])
        assert value("indexer_vectors", {"collection": "image"}) == 2
        assert value("indexer_vectors", {"collection": "text"}) == 0
        before = value("indexer_wal_bytes")
        assert before > 4 * 2 * 4  # at least the two vectors' float32s
        assert store.snapshot() is not None
        assert value("indexer_wal_bytes") < before
        assert 0 <= value("indexer_seconds_since_last_snapshot") < 60
        assert value("indexer_snapshot_duration_seconds_count") == 1
        metrics.searched("image", 0.002)
        assert value("indexer_search_seconds_count", {"collection": "image"}) == 1
    finally:
        store.close()


def test_in_memory_store_exports_vectors_only():
    store = IndexStore.in_memory([CollectionSpec("image", 2)])
    registry = CollectorRegistry()
    IndexerMetrics(registry, store)
    assert registry.get_sample_value("indexer_vectors", {"collection": "image"}) == 0
    assert registry.get_sample_value("indexer_wal_bytes") is None
