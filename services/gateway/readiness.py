"""The gateway's readiness: its named health entry follows the health of its downstreams.

The gateway serves two entries of the standard health service (grpc.health.v1):

* ``""`` (the server) -- liveness: SERVING while the process runs. GetListing answers from the
  catalogue even while a downstream is down, so a dead embedder is no reason to restart the
  gateway (this is what docker-compose's healthcheck asks).
* ``marketplace.gateway.v1.Gateway`` -- readiness: SERVING only while the embedder answers its
  health check with SERVING and every indexer shard has at least one replica that does;
  NOT_SERVING otherwise. A load
  balancer or ``grpcurl -d '{"service": "marketplace.gateway.v1.Gateway"}' ...
  grpc.health.v1.Health/Check`` sees a gateway whose searches would fail as not ready.

`DownstreamWatch` probes every ``GATEWAY_READINESS_INTERVAL_S`` (every second at most while
not ready) over the gateway's own channels
(so TLS and the reconnect backoff are the same as for real calls), each probe with a timeout of
``GATEWAY_READINESS_TIMEOUT_S``, and logs every change with what is wrong, e.g. ``gateway not
ready: indexer shard 1 at 127.0.0.1:50053: UNAVAILABLE``. One embedder replica answering is
enough: the channel balances over the replicas and gRPC skips the dead ones. The indexer
replicas are probed one by one (`IndexerShards.check_replicas`): each replica's state change is
logged once (``indexer shard 0 replica 1 at ...: SERVING -> UNREACHABLE``), reads avoid replicas
that are not serving, and replicas that missed a write are asked to catch up. A write that a
replica missed wakes the watch at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from grpc_health.v1 import health_pb2

from services.gateway.downstream import Downstream, IndexerShards, probe

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class DownstreamWatch:
    """Probes ``downstreams`` on a thread and calls ``publish(status)`` when readiness changes."""

    def __init__(
        self,
        downstreams: Sequence[Downstream],
        publish: Callable[[int], None],
        *,
        shards: IndexerShards | None = None,
        interval_s: float = 5.0,
        timeout_s: float = 1.0,
    ) -> None:
        self.downstreams = list(downstreams)
        self.shards = shards
        self.publish = publish
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.problems: list[str] | None = None  # None: not probed yet
        #: each downstream's outcome in the last check (SERVING or not), for the metrics
        self.serving: dict[Downstream, bool] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        return self.problems == []

    def check(self) -> list[str]:
        """Probe every downstream now; publish and log when the outcome changed."""
        outcomes = [(d, probe(d, self.timeout_s)) for d in self.downstreams]
        self.serving = {d: problem is None for d, problem in outcomes}
        problems = [problem for _, problem in outcomes if problem]
        if self.shards is not None:
            problems += self.shards.check_replicas(self.timeout_s)
        if problems != self.problems:
            first = self.problems is None
            self.problems = problems
            self.publish(NOT_SERVING if problems else SERVING)
            if problems:
                log.warning("gateway not ready: %s", "; ".join(problems))
            elif not first:
                log.info("gateway ready again: every downstream is serving")
        return problems

    def start(self) -> None:
        self.check()
        self._thread = threading.Thread(target=self._run, name="gateway-readiness", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # while not ready, look every second at most: a downstream that comes back is seen soon
        while not self._stop.is_set():
            self._wait(self.interval_s if self.ready else min(self.interval_s, 1.0))
            if self._stop.is_set():
                return
            try:
                self.check()
            except Exception:  # keep watching; a broken probe must not end readiness updates
                log.exception("readiness probe failed")

    def _wait(self, seconds: float) -> None:
        """Sleep ``seconds``, or less when a replica missed a write (it must catch up soon)."""
        wake = self.shards.catch_up_wanted if self.shards is not None else self._stop
        step = 0.05
        waited = 0.0
        while waited < seconds and not self._stop.is_set() and not wake.is_set():
            self._stop.wait(step)
            waited += step

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            replicas = len(self.shards.replicas) if self.shards is not None else 0
            self._thread.join(timeout=self.timeout_s * (len(self.downstreams) + replicas + 1) + 1)
