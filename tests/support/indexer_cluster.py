"""Indexer shards with replicas as real processes on loopback, for the scale-out tests and
``benchmarks.scaleout``: spawn, SIGKILL, restart, add a replica, read a replica's contents.

Each replica is ``python -m services.indexer`` with its own data directory, ``INDEXER_SHARD``,
``INDEXER_PEERS`` (the other replicas of its shard) and one FAISS thread.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from marketplace.indexer.v1 import indexer_pb2, indexer_pb2_grpc
from scripts.stack import ServiceProcess, free_port, spawn


@dataclass
class ReplicaProcess:
    shard: int
    number: int
    port: int
    data_dir: Path
    process: ServiceProcess | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class IndexerCluster:
    def __init__(
        self,
        root: Path,
        shards: int,
        replicas: int,
        collections: str,
        *,
        partitions: int = 256,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        self.collections = collections
        self.partitions = partitions
        self.extra_env = extra_env or {}
        self.replicas: list[list[ReplicaProcess]] = [
            [ReplicaProcess(s, r, free_port(), root / f"shard{s}-replica{r}") for r in range(replicas)]
            for s in range(shards)
        ]
        for shard in self.replicas:
            for replica in shard:
                self.start(replica)

    # -- topology -----------------------------------------------------------------------------------
    def shard_spec(self) -> str:
        """INDEXER_SHARDS for the gateway."""
        return ";".join(f"{s}=" + "|".join(r.address for r in shard) for s, shard in enumerate(self.replicas))

    def topology(self) -> tuple[tuple[str, ...], ...]:
        return tuple(tuple(r.address for r in shard) for shard in self.replicas)

    def gateway_config(self, root: Path, embedder_port: int, **settings):
        """A gateway over this cluster (catalogue in ``root``) that notices a replica going and
        coming back within a second; ``settings`` are further `GatewayConfig.local` settings."""
        from services.gateway.config import GatewayConfig, RetryPolicy, shard_replicas_setting

        return GatewayConfig.local(
            host="127.0.0.1",
            port=0,
            db_path=root / "catalogue.sqlite3",
            embedder_addr=f"127.0.0.1:{embedder_port}",
            indexer_shards=shard_replicas_setting(self.shard_spec(), "127.0.0.1:50052"),
            downstream_timeout_s=10.0,
            retry=RetryPolicy(3, 0.05, 0.2),
            reconnect_backoff_max_s=0.5,
            readiness_interval_s=0.5,
            **settings,
        )

    # -- processes ----------------------------------------------------------------------------------
    def start(self, replica: ReplicaProcess) -> None:
        peers = ",".join(r.address for r in self.replicas[replica.shard] if r is not replica)
        env = {
            "INDEXER_DATA_DIR": str(replica.data_dir),
            "INDEXER_COLLECTIONS": self.collections,
            "INDEXER_SHARD": str(replica.shard),
            "INDEXER_PARTITIONS": str(self.partitions),
            "INDEXER_PEERS": peers,
            "INDEXER_FAISS_THREADS": "1",
            "LOG_LEVEL": "info",
            "INDEXER_SNAPSHOT_WAL_RECORDS": "200",
            **self.extra_env,
        }
        replica.process = spawn(
            "indexer",
            replica.port,
            self.root / "logs" / f"shard{replica.shard}-replica{replica.number}.log",
            env,
        )

    def kill(self, shard: int, number: int) -> None:
        """SIGKILL: no final snapshot, no goodbye."""
        process = self.replicas[shard][number].process
        assert process is not None
        process.kill()

    def add_shard(self, replicas: int) -> int:
        shard = len(self.replicas)
        self.replicas.append(
            [
                ReplicaProcess(shard, r, free_port(), self.root / f"shard{shard}-replica{r}")
                for r in range(replicas)
            ]
        )
        for replica in self.replicas[shard]:
            self.start(replica)
        return shard

    def add_replica(self, shard: int) -> ReplicaProcess:
        """A brand-new, empty replica of ``shard`` (not started: start it with `start`)."""
        number = len(self.replicas[shard])
        replica = ReplicaProcess(shard, number, free_port(), self.root / f"shard{shard}-replica{number}")
        self.replicas[shard].append(replica)
        return replica

    def wait_serving(self, replica: ReplicaProcess, timeout: float = 120.0) -> float:
        """Seconds until ``replica`` reports SERVING (its catch-up done)."""
        started = time.monotonic()
        with grpc.insecure_channel(replica.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() - started < timeout:
                assert replica.process is not None
                if replica.process.process.poll() is not None:
                    raise RuntimeError(
                        f"{replica.address} exited:\n{replica.process.log_path.read_text()[-3000:]}"
                    )
                try:
                    if (
                        health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                        == health_pb2.HealthCheckResponse.SERVING
                    ):
                        return time.monotonic() - started
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"{replica.address} not SERVING after {timeout:.0f}s")

    def wait_all_serving(self, timeout: float = 120.0) -> None:
        for shard in self.replicas:
            for replica in shard:
                self.wait_serving(replica, timeout)

    def stop(self) -> None:
        for shard in self.replicas:
            for replica in shard:
                if replica.process is not None:
                    replica.process.stop(15)

    # -- contents -----------------------------------------------------------------------------------
    def contents(
        self, replica: ReplicaProcess, ids: list[str], collection: str = "image"
    ) -> dict[str, tuple[tuple[float, ...], str, str, float, str]]:
        """id -> (vector, listing id, category, price, location) of the ``ids`` it holds."""
        found = {}
        with grpc.insecure_channel(replica.address) as channel:
            stub = indexer_pb2_grpc.IndexerStub(channel)
            for start in range(0, len(ids), 512):
                reply = stub.Fetch(
                    indexer_pb2.FetchRequest(collection=collection, ids=ids[start : start + 512]), timeout=30
                )
                for item in reply.items:
                    a = item.attributes
                    found[item.id] = (
                        tuple(item.vector),
                        a.listing_id,
                        a.category,
                        a.price if a.HasField("price") else None,
                        a.location,
                    )
        return found

    def count(self, replica: ReplicaProcess) -> int:
        with grpc.insecure_channel(replica.address) as channel:
            stats = indexer_pb2_grpc.IndexerStub(channel).GetStats(indexer_pb2.GetStatsRequest(), timeout=30)
        return sum(c.count for c in stats.collections)


# ------------------------------------------------------------------ mixed load with SIGKILLs


@dataclass
class KillOutcome:
    """What a mixed load with one replica of each shard SIGKILLed and restarted saw."""

    searches: int
    failed_searches: list[str]
    adds: int
    removes: int
    failed_writes: list[str]
    lost_writes: list[str]
    converge_s: float
    failover_p99_ms: float
    steady_p99_ms: float
    mismatches: list[str]
    #: (seconds since the load began, search latency ms), and when the kill and restart happened
    timeline: list[tuple[float, float]]
    killed_at_s: float
    restarted_at_s: float


def run_kill_scenario(
    cluster: IndexerCluster,
    gateway_address: str,
    photos: list[bytes],
    seed_ids: list[str],
    *,
    duration_s: float,
    kill_at_s: float,
    restart_at_s: float,
    searchers: int = 2,
    say=print,
) -> KillOutcome:
    """Searches (SearchByImage, SimilarListings) and AddListing/RemoveListing through the
    gateway at ``gateway_address`` for ``duration_s``; at ``kill_at_s`` one replica of every
    shard is SIGKILLed (alternating which), at ``restart_at_s`` restarted on its data directory.
    Then checks every acknowledged write on every replica and that replicas of a shard hold the
    same items (same ids, vectors, attributes)."""
    from benchmarks._timing import percentile
    from marketplace.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    channel = grpc.insecure_channel(gateway_address)
    stub = gateway_pb2_grpc.GatewayStub(channel)
    stop = threading.Event()
    lock = threading.Lock()
    latencies: list[tuple[float, float]] = []  # (start offset, ms)
    failed_searches: list[str] = []
    failed_writes: list[str] = []
    added: dict[str, list[str]] = {}
    removed: set[str] = set()
    begin = time.monotonic()

    def search(worker: int) -> None:
        n = worker
        while not stop.is_set():
            n += 1
            started = time.monotonic()
            try:
                if n % 2:
                    reply = stub.SearchByImage(
                        gateway_pb2.SearchByImageRequest(image=photos[n % len(photos)], k=5), timeout=10
                    )
                else:
                    reply = stub.SimilarListings(
                        gateway_pb2.SimilarListingsRequest(listing_id=seed_ids[n % len(seed_ids)], k=5),
                        timeout=10,
                    )
                if not reply.results:
                    raise AssertionError("no results")
            except (grpc.RpcError, AssertionError) as exc:
                with lock:
                    failed_searches.append(f"{time.monotonic() - begin:.2f}s: {exc}")
                continue
            with lock:
                latencies.append((started - begin, (time.monotonic() - started) * 1000))

    def write() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            listing_id = f"load-{n}"
            try:
                reply = stub.AddListing(
                    gateway_pb2.AddListingRequest(
                        listing=gateway_pb2.Listing(
                            id=listing_id,
                            title=f"load listing {n}",
                            main_category="Appliances",
                            price=float(n),
                        ),
                        images=[photos[n % len(photos)]],
                    ),
                    timeout=10,
                )
                with lock:
                    added[listing_id] = list(reply.listing.image_ids)
                if n % 3 == 0:
                    stub.RemoveListing(gateway_pb2.RemoveListingRequest(listing_id=listing_id), timeout=10)
                    with lock:
                        removed.add(listing_id)
            except grpc.RpcError as exc:
                with lock:
                    failed_writes.append(f"{listing_id}: {exc.code().name}: {exc.details()}")
            stop.wait(0.05)

    threads = [threading.Thread(target=search, args=(i,)) for i in range(searchers)]
    threads.append(threading.Thread(target=write))
    for thread in threads:
        thread.start()
    killed = [cluster.replicas[s][s % len(cluster.replicas[s])] for s in range(len(cluster.replicas))]
    try:
        time.sleep(kill_at_s)
        kill_time = time.monotonic() - begin
        for replica in killed:
            cluster.kill(replica.shard, replica.number)
        say(
            f"  {kill_time:.1f}s: SIGKILLed {', '.join(f'shard {r.shard} replica {r.number}' for r in killed)}"
        )
        time.sleep(max(0.0, restart_at_s - (time.monotonic() - begin)))
        restart_time = time.monotonic()
        for replica in killed:
            cluster.start(replica)
        say(f"  {restart_time - begin:.1f}s: restarted them on their data directories")
        for replica in killed:
            cluster.wait_serving(replica)
        converge_s = time.monotonic() - restart_time
        say(f"  converged and serving {converge_s:.1f}s after the restart")
        time.sleep(max(0.0, duration_s - (time.monotonic() - begin)))
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        channel.close()
    # let the gateway's catch-up requests to replicas that missed writes finish
    time.sleep(1.0)
    cluster.wait_all_serving()
    lost: list[str] = []
    mismatches: list[str] = []
    for shard in cluster.replicas:
        ids = sorted({i for listing, image_ids in added.items() for i in image_ids})
        views = [cluster.contents(replica, ids) for replica in shard]
        counts = [cluster.count(replica) for replica in shard]
        for replica, view in zip(shard, views):
            for listing, image_ids in added.items():
                if listing in removed:
                    lost += [
                        f"{listing} (removed) still on {replica.address}" for i in image_ids if i in view
                    ]
        owned = set().union(*views)
        for listing, image_ids in added.items():
            if listing not in removed and any(i in owned for i in image_ids):
                for replica, view in zip(shard, views):
                    lost += [
                        f"{listing} image {i} missing on {replica.address}"
                        for i in image_ids
                        if i not in view
                    ]
        if any(view != views[0] for view in views) or len(set(counts)) > 1:
            mismatches.append(
                f"shard {shard[0].shard}: counts {counts}, "
                f"{sum(view != views[0] for view in views)} replica(s) differ"
            )
    for listing, image_ids in added.items():  # each kept listing is on some shard
        if listing not in removed and not any(
            cluster.contents(shard[0], image_ids) for shard in cluster.replicas
        ):
            lost.append(f"{listing} on no shard")
    after_kill = [ms for at, ms in latencies if kill_time <= at < kill_time + 1.0]
    steady = [ms for at, ms in latencies if at < kill_time]
    return KillOutcome(
        len(latencies) + len(failed_searches),
        failed_searches,
        len(added),
        len(removed),
        failed_writes,
        lost,
        converge_s,
        percentile(after_kill, 99),
        percentile(steady, 99),
        mismatches,
        sorted(latencies),
        kill_time,
        restart_time - begin,
    )
