"""The indexer's own Prometheus metrics, beside the gRPC ones of `common.metrics`.

Read from the store when Prometheus scrapes (nothing to keep in step):

* ``indexer_vectors{collection}``: live vectors per collection;
* ``indexer_wal_bytes``: bytes of write-ahead log on disk, i.e. writes not yet in a snapshot;
* ``indexer_seconds_since_last_snapshot``: age of the snapshot named by ``CURRENT`` (absent
  before the first snapshot).

Recorded as they happen:

* ``indexer_snapshot_duration_seconds`` (histogram): each snapshot written;
* ``indexer_search_seconds{collection}`` (histogram): each Search, inside the index (the
  gRPC handling time is ``grpc_server_handling_seconds``).
"""

from __future__ import annotations

import time
from typing import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common.metrics import LATENCY_BUCKETS
from services.indexer.core import IndexStore
from services.indexer.snapshot import CURRENT

#: Writing a snapshot takes from milliseconds (small collections) to minutes (millions of vectors).
SNAPSHOT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class IndexerMetrics(Collector):
    """Registers the indexer's metrics on ``registry``, reading and watching ``store``."""

    def __init__(self, registry: CollectorRegistry, store: IndexStore) -> None:
        self.store = store
        self.search_seconds = Histogram(
            "indexer_search_seconds",
            "Seconds of one Search inside a collection's index.",
            ["collection"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.snapshot_seconds = Histogram(
            "indexer_snapshot_duration_seconds",
            "Seconds to write one snapshot.",
            buckets=SNAPSHOT_BUCKETS,
            registry=registry,
        )
        store.snapshot_observer = self.snapshot_seconds.observe
        registry.register(self)

    def searched(self, collection: str, seconds: float) -> None:
        self.search_seconds.labels(collection).observe(seconds)

    def collect(self) -> Iterator[Metric]:
        vectors = GaugeMetricFamily(
            "indexer_vectors", "Live vectors stored per collection.", labels=["collection"]
        )
        for stats in self.store.stats():
            vectors.add_metric([stats["name"]], stats["count"])
        yield vectors
        data_dir = self.store.data_dir
        if data_dir is None:  # an in-memory store has no WAL and no snapshots
            return
        wal_bytes = 0
        for segment in (data_dir / "wal").glob("*.wal"):
            try:
                wal_bytes += segment.stat().st_size
            except FileNotFoundError:  # dropped by a snapshot meanwhile
                pass
        yield GaugeMetricFamily(
            "indexer_wal_bytes",
            "Bytes of write-ahead log on disk (writes not yet in a snapshot).",
            value=wal_bytes,
        )
        try:
            age = max(0.0, time.time() - (data_dir / CURRENT).stat().st_mtime)
        except FileNotFoundError:
            return
        yield GaugeMetricFamily(
            "indexer_seconds_since_last_snapshot",
            "Seconds since the current snapshot was written.",
            value=age,
        )
