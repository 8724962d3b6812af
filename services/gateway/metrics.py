"""The gateway's own Prometheus metrics, beside the gRPC server and client ones of
`common.metrics` (``grpc_client_*{downstream,target}``: every call to an embedder or shard).

Read when Prometheus scrapes:

* ``gateway_catalogue_listings`` and ``gateway_catalogue_images``: what the catalogue holds;
* ``gateway_downstream_ready{downstream,target}``: 1 while the downstream answered its last
  readiness probe with SERVING, else 0 (`services.gateway.readiness`; absent when the checks
  are off);
* ``gateway_ready``: 1 while the gateway's readiness entry is SERVING.
"""
from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.gateway.catalogue import Catalogue
from services.gateway.readiness import DownstreamWatch


class GatewayMetrics(Collector):
    """Registers the gateway's metrics on ``registry``; ``watch`` is set once readiness runs."""

    def __init__(self, registry: CollectorRegistry, catalogue: Catalogue) -> None:
        self.catalogue = catalogue
        self.watch: DownstreamWatch | None = None
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("gateway_catalogue_listings", "Listings in the catalogue.",
                                value=self.catalogue.count())
        yield GaugeMetricFamily("gateway_catalogue_images", "Listing photos in the catalogue.",
                                value=self.catalogue.count_images())
        watch = self.watch
        if watch is None:
            return
        ready = GaugeMetricFamily(
            "gateway_downstream_ready",
            "1 while the downstream answered the last readiness probe with SERVING.",
            labels=["downstream", "target"])
        for downstream, serving in list(watch.serving.items()):
            ready.add_metric([downstream.name, downstream.target], 1.0 if serving else 0.0)
        yield ready
        yield GaugeMetricFamily("gateway_ready",
                                "1 while the gateway is ready (every downstream serving).",
                                value=1.0 if watch.ready else 0.0)
