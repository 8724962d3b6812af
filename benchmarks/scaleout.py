"""Indexer scale-out: replicas, failover, convergence and resharding, with real processes.

    python -m benchmarks.scaleout            # 60 s mixed load, 20 s per QPS cell
    python -m benchmarks.scaleout --quick    # about two minutes on a busy 2-core machine

Three parts, each on ``python -m services.indexer`` processes on loopback (one FAISS thread
each, ``INDEXER_FAISS_THREADS=1``, so a replica is one core's worth of search):

1. Failover. Two shards of two replicas, the real embedder (the small pretrained test model)
   and the gateway; searches (SearchByImage, SimilarListings; real photos) and
   AddListing/RemoveListing for ``--load-s`` seconds. One replica of each shard is SIGKILLed
   at a quarter of the time and restarted at the half. Reports failed searches, acknowledged
   writes missing afterwards (or removed ones still present), whether the replicas of each
   shard hold identical items, the p99 of searches that started in the second after the
   SIGKILL next to the p99 before it, and the convergence time (restart -> SERVING).
2. Replica read QPS. One shard of ``--vectors`` vectors; `IndexerShards.search` (the gateway's
   fan-out layer) in a closed loop at concurrency 4, with the shard served by one replica, then
   by two (the second one added empty: it converges from the first), cells alternated. Each
   replica process is pinned to a CPU of its own (`pin_to_own_cpus`), so a replica is one core.
   ``replica_qps_ratio`` = QPS with 2 / QPS with 1 (2 cores: at most about 2, less the client's
   share of the second core).
3. Rebalance 2 -> 3 shards under read load: ``services.gateway.rebalance`` moves the partitions
   rendezvous hashing gives the new shard while searches run through shard-map routing; then
   every listing is fetched from the shard the map names. Reports the moved fraction of vectors
   (about 1/3 expected) and the time.

A picture of part 1 (search latency over time, kill and restart marked) goes to
``build/benchmarks/scaleout_failover.png``. Last line:
``RESULT failed_searches=.. lost_writes=.. converge_s=.. moved_fraction=.. replica_qps_ratio=..``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks._timing import closed_loop, cpu_name, load_line
from common.config import REPO_ROOT

DIM = 256


def part_failover(root: Path, load_s: float) -> dict:
    import grpc

    from marketplace.gateway.v1 import gateway_pb2, gateway_pb2_grpc
    from services.embedder.config import EmbedderConfig
    from services.embedder.server import start as start_embedder
    from services.gateway.server import start as start_gateway
    from tests.support.artifacts import make_test_artifact
    from tests.support.indexer_cluster import IndexerCluster, run_kill_scenario
    from tests.support.photos import real_photos

    artifact = make_test_artifact(root / "artifact")
    embedder = start_embedder(
        EmbedderConfig.local(
            artifact_dir=artifact, host="127.0.0.1", port=0, text_model="off", model_workers=1
        )
    )
    cluster = IndexerCluster(root / "failover", shards=2, replicas=2, collections="image:1280:flat:ip")
    gateway = None
    try:
        cluster.wait_all_serving()
        gateway = start_gateway(cluster.gateway_config(root, embedder.port))
        photos = real_photos(8)
        with grpc.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            bootstrap_ids = [
                stub.AddListing(
                    gateway_pb2.AddListingRequest(
                        listing=gateway_pb2.Listing(id=f"seed-{n}", title="seed", main_category="Appliances"),
                        images=[photos[n % len(photos)]],
                    ),
                    timeout=60,
                ).listing.id
                for n in range(8)
            ]
        print(f"part 1: 2 shards x 2 replicas, {load_s:.0f} s mixed load (2 searchers, 1 writer)", flush=True)
        outcome = run_kill_scenario(
            cluster,
            f"127.0.0.1:{gateway.port}",
            photos,
            bootstrap_ids,
            duration_s=load_s,
            kill_at_s=load_s / 4,
            restart_at_s=load_s / 2,
            say=lambda m: print(m, flush=True),
        )
    finally:
        if gateway is not None:
            gateway.stop(0)
        cluster.stop()
        embedder.stop(0)
    print(
        f"  searches {outcome.searches}, failed {len(outcome.failed_searches)}; AddListing "
        f"{outcome.adds}, RemoveListing {outcome.removes}, failed writes "
        f"{len(outcome.failed_writes)}, lost writes {len(outcome.lost_writes)}; replicas "
        f"{'identical' if not outcome.mismatches else outcome.mismatches}"
    )
    print(
        f"  search p99 before the kill {outcome.steady_p99_ms:.0f} ms, in the second after it "
        f"{outcome.failover_p99_ms:.0f} ms; converged {outcome.converge_s:.1f} s after restart"
    )
    for problem in (outcome.failed_searches + outcome.failed_writes + outcome.lost_writes)[:5]:
        print(f"  ! {problem}")
    draw_timeline(outcome)
    return {
        "failed_searches": len(outcome.failed_searches),
        "lost_writes": len(outcome.lost_writes) + len(outcome.failed_writes),
        "converge_s": outcome.converge_s,
        "failover_p99_ms": outcome.failover_p99_ms,
        "identical": not outcome.mismatches,
    }


def draw_timeline(outcome) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = REPO_ROOT / "build" / "benchmarks" / "scaleout_failover.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 3.5))
    if outcome.timeline:
        at, ms = zip(*outcome.timeline)
        ax.scatter(at, ms, s=4)
    ax.axvline(outcome.killed_at_s, color="red", label="SIGKILL one replica per shard")
    ax.axvline(outcome.restarted_at_s, color="green", label="restart (catch-up)")
    ax.set_xlabel("seconds into the load")
    ax.set_ylabel("search latency (ms)")
    ax.set_yscale("log")
    ax.set_title(f"{outcome.searches} searches, {len(outcome.failed_searches)} failed")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"  picture: {out.relative_to(REPO_ROOT)}")


def synthetic_items(count: int, seed: int):
    from services.gateway.downstream import IndexItem

    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [
        IndexItem(
            f"img-{seed}-{i}", vectors[i], f"listing-{seed}-{i // 2}", "Appliances", float(i % 500), "Leeds"
        )
        for i in range(count)
    ], vectors


def upsert_all(shards, items, deadline_s: float = 120.0) -> None:
    from services.gateway.downstream import Deadline

    by_shard: dict = {}
    for item in items:
        by_shard.setdefault(shards.shard_for(item.listing_id), []).append(item)
    for shard, chunk in by_shard.items():
        for start in range(0, len(chunk), 500):
            shards.upsert(shard, chunk[start : start + 500], Deadline(deadline_s))


def pin_to_own_cpus(replicas) -> str:
    """Pin each replica process to a CPU of its own (the client stays unpinned), so a replica
    is one core's worth of search. One FAISS thread per request is not enough for that: the
    indexer serves up to its worker count of searches at once and FAISS releases the GIL, so
    at concurrency 4 a single replica used every core and a second one had none left to add
    (replica_qps_ratio about 1.0 on an idle 2-core machine)."""
    import os

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_setaffinity") else []
    if len(cpus) < len(replicas):
        return f"replicas not pinned ({len(cpus)} CPU(s) for {len(replicas)} replicas)"
    for replica, cpu in zip(replicas, cpus):
        # every thread: affinity is per thread, and threads started later inherit it
        for task in Path(f"/proc/{replica.process.process.pid}/task").iterdir():
            try:
                os.sched_setaffinity(int(task.name), {cpu})
            except ProcessLookupError:  # a thread that just ended
                pass
    return "replicas pinned to CPUs " + ", ".join(str(c) for c in cpus[: len(replicas)])


def part_replica_qps(root: Path, vectors: int, measure_s: float) -> dict:
    from services.gateway.config import RetryPolicy
    from services.gateway.domain import SearchFilter
    from services.gateway.downstream import Deadline, IndexerShards
    from tests.support.indexer_cluster import IndexerCluster

    cluster = IndexerCluster(
        root / "qps",
        shards=1,
        replicas=1,
        collections=f"image:{DIM}:flat:ip",
        extra_env={"INDEXER_SNAPSHOT_WAL_RECORDS": "100000"},
    )
    try:
        cluster.wait_all_serving()
        one = IndexerShards(cluster.topology(), RetryPolicy())
        items, queries = synthetic_items(vectors, 7)
        upsert_all(one, items)
        fresh = cluster.add_replica(0)
        cluster.start(fresh)
        converge_s = cluster.wait_serving(fresh)
        print(
            f"part 2: 1 shard of {vectors:,} x {DIM} vectors; a new empty replica converged in "
            f"{converge_s:.1f} s; {pin_to_own_cpus(cluster.replicas[0])}",
            flush=True,
        )
        two = IndexerShards(cluster.topology(), RetryPolicy())
        no_filter = SearchFilter()

        def searcher(shards):
            def call(_worker: int, i: int) -> None:
                shards.search(queries[i % 1000 : i % 1000 + 1], 10, no_filter, Deadline(30))

            return call

        cells = {1: [], 2: []}
        for _ in range(2):
            for replicas, shards in ((1, one), (2, two)):
                cells[replicas].append(closed_loop(searcher(shards), 4, 1.0, measure_s / 2))
        one.close()
        two.close()
    finally:
        cluster.stop()
    qps = {r: sum(c.per_s for c in cs) / len(cs) for r, cs in cells.items()}
    p99 = {r: float(np.mean([c.percentile(99) for c in cs])) for r, cs in cells.items()}
    print(
        f"  concurrency 4: 1 replica {qps[1]:.1f} searches/s (p99 {p99[1]:.1f} ms), 2 replicas "
        f"{qps[2]:.1f} searches/s (p99 {p99[2]:.1f} ms): ratio {qps[2] / qps[1]:.2f}"
    )
    return {"replica_qps_ratio": qps[2] / qps[1], "new_replica_converge_s": converge_s}


def part_rebalance(root: Path, vectors: int) -> dict:
    from common.shard_map import initial
    from services.gateway.catalogue import Catalogue
    from services.gateway.config import RetryPolicy
    from services.gateway.domain import SearchFilter
    from services.gateway.downstream import Deadline, IndexerShards
    from services.gateway.rebalance import Rebalancer
    from services.gateway.shards import ShardMapWatch, ShardRouting
    from tests.support.indexer_cluster import IndexerCluster

    catalogue = Catalogue.open(root / "catalogue.sqlite3")  # the shard map's home, as for gateways
    store = catalogue.shard_map_store()
    store.publish(initial(2))
    cluster = IndexerCluster(root / "rebalance", shards=2, replicas=1, collections=f"image:{DIM}:flat:ip")
    failures: list[str] = []
    searches = [0]
    stop = threading.Event()
    try:
        cluster.add_shard(1)
        cluster.wait_all_serving()
        routing = ShardRouting(3, store.latest())
        shards = IndexerShards(cluster.topology(), RetryPolicy(), routing=routing)
        watch = ShardMapWatch(store, routing, 0.2)
        watch.start()
        items, queries = synthetic_items(vectors, 11)
        upsert_all(shards, items)
        print(f"part 3: {vectors:,} vectors on 2 shards; rebalancing to 3 under read load", flush=True)

        def read() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    hits = shards.search(queries[n % len(queries)], 5, SearchFilter(), Deadline(10))
                    if not hits[0]:
                        raise AssertionError("no hits")
                    searches[0] += 1
                except Exception as exc:  # noqa: BLE001 - every failure is counted
                    failures.append(repr(exc))

        readers = [threading.Thread(target=read) for _ in range(2)]
        for reader in readers:
            reader.start()
        started = time.perf_counter()
        rebalancer = Rebalancer(
            store, cluster.topology(), write_token=None, settle_s=0.6, say=lambda m: print(m, flush=True)
        )
        try:
            report = rebalancer.run(3)
        finally:
            rebalancer.close()
            seconds = time.perf_counter() - started
            stop.set()
            for reader in readers:
                reader.join()
        watch.check()
        missing = 0
        by_shard: dict = {}
        for item in items:
            by_shard.setdefault(int(shards.shard_for(item.listing_id)), []).append(item.id)
        found = {stored.id for stored in shards.fetch_many(by_shard, Deadline(60))}
        missing = sum(item.id not in found for item in items)
        counts = [cluster.count(shard[0]) for shard in cluster.replicas]
        watch.stop()
        shards.close()
    finally:
        stop.set()
        cluster.stop()
        catalogue.close()
    print(
        f"  {searches[0]} searches during the rebalance, {len(failures)} failed; moved "
        f"{report.vectors_moved:,} of {report.vectors_before:,} vectors "
        f"(fraction {report.moved_fraction:.3f}) in {seconds:.1f} s; per shard now {counts} "
        f"(sum {sum(counts):,}); listings not found where the map says: {missing}"
    )
    for problem in failures[:5]:
        print(f"  ! {problem}")
    return {
        "failed_searches": len(failures),
        "missing": missing + (sum(counts) - vectors),
        "moved_fraction": report.moved_fraction,
        "rebalance_s": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaleout", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="about two minutes")
    parser.add_argument("--load-s", type=float, default=None, help="mixed-load seconds (60)")
    parser.add_argument("--vectors", type=int, default=None, help="vectors per QPS shard (100000)")
    args = parser.parse_args(argv)
    load_s = args.load_s or (20.0 if args.quick else 60.0)
    vectors = args.vectors or (20_000 if args.quick else 100_000)
    measure_s = 6.0 if args.quick else 20.0
    print(f"scale-out benchmark on {cpu_name()}")
    print(f"before: {load_line()}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as tmp:
        root = Path(tmp)
        failover = part_failover(root, load_s)
        qps = part_replica_qps(root, vectors, measure_s)
        rebalance = part_rebalance(root, vectors // 2)
    print(f"after: {load_line()}; total {time.perf_counter() - started:.0f} s")
    failed = failover["failed_searches"] + rebalance["failed_searches"]
    lost = failover["lost_writes"] + rebalance["missing"] + (0 if failover["identical"] else 1)
    print(
        f"RESULT failed_searches={failed} lost_writes={lost} "
        f"converge_s={failover['converge_s']:.1f} moved_fraction={rebalance['moved_fraction']:.3f} "
        f"replica_qps_ratio={qps['replica_qps_ratio']:.2f} "
        f"failover_p99_ms={failover['failover_p99_ms']:.0f} rebalance_s={rebalance['rebalance_s']:.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
