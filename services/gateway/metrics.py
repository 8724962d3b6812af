"""The gateway's own Prometheus metrics, beside the gRPC server and client ones of
`common.metrics` (``grpc_client_*{downstream,target}``: every call to an embedder or to an
indexer replica).

Read when Prometheus scrapes:

* ``gateway_catalogue_listings`` and ``gateway_catalogue_images``: what the catalogue holds;
* ``gateway_downstream_ready{downstream,target}``: 1 while the embedder answered its last
  readiness probe with SERVING, and while an indexer replica's state is SERVING, else 0
  (`services.gateway.readiness`; the embedder's is absent when the checks are off);
* ``gateway_indexer_replica_state{downstream,target,state}``: 1 for each replica's current
  state (UNKNOWN, SERVING, NOT_SERVING, UNREACHABLE, MISSED_WRITES), 0 for the others;
* ``gateway_ready``: 1 while the gateway's readiness entry is SERVING.

Counted as they happen (`MeteredReplicaEvents`, the downstream module's one hook for them):

* ``gateway_indexer_failovers_total{shard,code}``: reads moved from a failing replica to another
  replica of the same shard, by the failing replica's status code;
* ``gateway_partial_results_total{shard}``: searches answered without a shard
  (``allow_partial_results``).
"""

from __future__ import annotations

from typing import Iterator

import grpc
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common.metrics import GrpcClientMetrics, ServiceMetrics
from services.gateway.catalogue import Catalogue
from services.gateway.downstream import (
    MISSED_WRITES,
    NOT_SERVING,
    SERVING,
    UNKNOWN,
    UNREACHABLE,
    IndexerShards,
    Replica,
    ReplicaEvents,
)
from services.gateway.readiness import DownstreamWatch

REPLICA_STATES = (UNKNOWN, SERVING, NOT_SERVING, UNREACHABLE, MISSED_WRITES)


class GatewayMetrics(Collector):
    """Registers the gateway's metrics on the service's registry. The parts it reads are attached
    as the gateway is built: ``catalogue``, ``indexer`` and, once readiness runs, ``watch``."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        registry = metrics.registry
        #: the gRPC client metrics of every downstream channel
        self.client: GrpcClientMetrics = metrics.client()
        self.catalogue: Catalogue | None = None
        self.indexer: IndexerShards | None = None
        self.watch: DownstreamWatch | None = None
        self.failovers = Counter(
            "gateway_indexer_failovers",
            "Reads moved from a failing indexer replica to another replica of the same shard.",
            ["shard", "code"],
            registry=registry,
        )
        self.partial_results = Counter(
            "gateway_partial_results",
            "Searches answered without a shard whose replicas were all down (allow_partial_results).",
            ["shard"],
            registry=registry,
        )
        registry.register(self)

    def replica_events(self) -> ReplicaEvents:
        """The indexer's replica events, logged as before and counted here."""
        return MeteredReplicaEvents(self)

    def collect(self) -> Iterator[Metric]:
        if self.catalogue is not None:
            yield GaugeMetricFamily(
                "gateway_catalogue_listings", "Listings in the catalogue.", value=self.catalogue.count()
            )
            yield GaugeMetricFamily(
                "gateway_catalogue_images",
                "Listing photos in the catalogue.",
                value=self.catalogue.count_images(),
            )
        ready = GaugeMetricFamily(
            "gateway_downstream_ready",
            "1 while the embedder passed its last readiness probe / an indexer replica is SERVING.",
            labels=["downstream", "target"],
        )
        watch = self.watch
        if watch is not None:
            for downstream, serving in list(watch.serving.items()):
                ready.add_metric([downstream.name, downstream.target], 1.0 if serving else 0.0)
        if self.indexer is not None:
            states = GaugeMetricFamily(
                "gateway_indexer_replica_state",
                "1 for the state each indexer replica is in, 0 for the others.",
                labels=["downstream", "target", "state"],
            )
            for replica in self.indexer.replicas:
                where = [replica.downstream.name, replica.downstream.target]
                current = replica.state
                ready.add_metric(where, 1.0 if current == SERVING else 0.0)
                for state in REPLICA_STATES:
                    states.add_metric([*where, state], 1.0 if state == current else 0.0)
            yield states
        yield ready
        if watch is not None:
            yield GaugeMetricFamily(
                "gateway_ready",
                "1 while the gateway is ready (every downstream serving).",
                value=1.0 if watch.ready else 0.0,
            )


class MeteredReplicaEvents(ReplicaEvents):
    """`ReplicaEvents` that also count failovers and partial results."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def failover(self, shard: int, failed: Replica, code: grpc.StatusCode, to: Replica) -> None:
        super().failover(shard, failed, code, to)
        self.metrics.failovers.labels(str(shard), code.name).inc()

    def partial_result(self, shard: int, reason: str) -> None:
        super().partial_result(shard, reason)
        self.metrics.partial_results.labels(str(shard)).inc()
