"""The gateway's readiness: its named health entry follows the health of its downstreams.

The gateway serves two entries of the standard health service (grpc.health.v1):

* ``""`` (the server) -- liveness: SERVING while the process runs. GetListing answers from the
  catalogue even while a downstream is down, so a dead embedder is no reason to restart the
  gateway (this is what docker-compose's healthcheck asks).
* ``marketplace.gateway.v1.Gateway`` -- readiness: SERVING only while the embedder and every
  indexer shard answer their own health check with SERVING; NOT_SERVING otherwise. A load
  balancer or ``grpcurl -d '{"service": "marketplace.gateway.v1.Gateway"}' ...
  grpc.health.v1.Health/Check`` sees a gateway whose searches would fail as not ready.

`DownstreamWatch` probes every ``GATEWAY_READINESS_INTERVAL_S`` (every second at most while
not ready) over the gateway's own channels
(so TLS and the reconnect backoff are the same as for real calls), each probe with a timeout of
``GATEWAY_READINESS_TIMEOUT_S``, and logs every change with what is wrong, e.g. ``gateway not
ready: indexer shard 1 at 127.0.0.1:50053: UNAVAILABLE``. One embedder replica answering is
enough: the channel balances over the replicas and gRPC skips the dead ones.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gateway.downstream import Downstream

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def probe(downstream: Downstream, timeout_s: float) -> str | None:
    """None when ``downstream`` says SERVING; otherwise what is wrong, naming it."""
    stub = health_pb2_grpc.HealthStub(downstream.channel)
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
    except grpc.RpcError as exc:
        return f"{downstream.label}: {exc.code().name}"
    if reply.status != SERVING:
        return f"{downstream.label}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


class DownstreamWatch:
    """Probes ``downstreams`` on a thread and calls ``publish(status)`` when readiness changes."""

    def __init__(self, downstreams: Sequence[Downstream], publish: Callable[[int], None], *,
                 interval_s: float = 5.0, timeout_s: float = 1.0) -> None:
        self.downstreams = list(downstreams)
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
        while not self._stop.wait(self.interval_s if self.ready else min(self.interval_s, 1.0)):
            try:
                self.check()
            except Exception:  # keep watching; a broken probe must not end readiness updates
                log.exception("readiness probe failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s * (len(self.downstreams) + 1) + 1)
