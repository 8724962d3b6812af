"""SearchByImage through the gateway vs the same work done in-process.

    python -m benchmarks.gateway            # 3 s warm-up + 15 s per cell
    python -m benchmarks.gateway --quick    # about a minute

Two paths, each at concurrency 1 and 8 (closed loop: c threads, one request after another, a
real 512x512 marketplace photo per request, k = 10, no filter):

(a) in-process  the embedder's core (`services.embedder.core.Embedder`: decode, preprocess,
                dynamic batching, model) and an in-memory `services.indexer.core.IndexStore`
                holding every vector, called directly: embed + search, nothing else.
(b) gateway     the stack as processes on loopback: ``python -m services.embedder``, N indexer
                shards (default 2) and ``python -m services.gateway``; the client calls
                SearchByImage, the gateway embeds through the embedder, fans the search out to
                every shard, merges by listing and adds the catalogue entries.

Both use the same model, torch thread count and batching settings, and the same vectors; the
in-process search runs with the indexer's default FAISS thread count.
The catalogue is the prepared data (``build/data``) when present, else every listing of the raw
photo set. Index vectors: the artefact's precomputed ``embeddings/`` when it has them; otherwise
the query photos are embedded for real and every other photo gets a nearby synthetic vector
(a real one plus noise), so the index has the catalogue's size without embedding every photo.
Both embedders use the artefact's best checked inference runtime (``EMBEDDER_RUNTIME=auto``; an
artefact without runtime files is given them in a copy, see ``benchmarks.embedder``).
The cells of every path alternate so all see the same background load; a new path is one more
entry in ``paths`` (its column and ratios to (a) follow). Each cell also reports the CPU one
request cost, summed over every process of its path (read from /proc): on a busy machine that
says where the stack spends beyond in-process work when requests/s cannot. The last line is
``RESULT p99_vs_inprocess=<p99 (b) / p99 (a) at concurrency 8>
rps_vs_inprocess_c8=<requests/s (b) / (a) at 8> rps_c8=<(b) requests/s at 8>
metrics_overhead_p50=<p50 with metrics / p50 without, lowest concurrency>``: unless
``--no-metrics-overhead``, two more stacks, identical but for the services' Prometheus metrics
(off / on), run SearchByImage in alternating cells (off, on, on, off).

    python -m benchmarks.gateway --db postgres [--quick]

compares the catalogue back ends instead (`run_catalogue_comparison`): the same embedder and
shards behind (1) one gateway on a SQLite catalogue, (2) one gateway on PostgreSQL (a local
server from the machine's packages, durable settings, as SQLite's synchronous=FULL is) and
(3) two gateways on that PostgreSQL, the client spreading calls over both (gRPC round_robin).
Like for like: the same gateway code, threads (GATEWAY_MAX_WORKERS) and downstreams, every commit
durable on both (SQLite WAL with synchronous=FULL, PostgreSQL fsync=on and synchronous_commit=on:
an acknowledged write survives a power cut on either). SearchByImage and AddListing (one real
photo, a new listing each) at concurrency 8, in rounds: each round runs one cell per set-up, in
alternating order (1 2 3, then 3 2 1, ...), so background drift hits every set-up alike; a
set-up's figures pool its cells (full mode: 4 rounds of 15 s, a few hundred calls or more per
set-up and RPC, so p99 is not just the slowest call; ``--quick``: 2 rounds of 2.5 s, a smoke
test whose p99 is noise). Then the adds made through SQLite are removed again and ``reconcile``
checks the PostgreSQL catalogue against the shards. Last line ``RESULT pg_vs_sqlite_p99=<worse of the two
RPCs' p99, (2) / (1)> two_gateways_vs_one_rps=<SearchByImage requests/s, (3) / (2)>
orphans=<vectors without a listing found by reconcile>``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from benchmarks._timing import WindowCell, closed_loop, cpu_name, load_line
from common.artifact import CARD_FILE
from common.config import REPO_ROOT
from common.prepared_data import IMAGES_FILE, LISTINGS_FILE
from scripts.stack import free_port, spawn, wait_ready

PREPARED_DIR = REPO_ROOT / "build" / "data"
ARTIFACTS_DIR = REPO_ROOT / "artifacts"
TEST_ARTIFACT_DIRS = (
    REPO_ROOT / "build" / "bench" / "embedder-test-artifact",
    REPO_ROOT / "build" / "bench" / "gateway-test-artifact",
)
K = 10


# ------------------------------------------------------------------ inputs


def find_artifact() -> tuple[Path, str]:
    """The newest trained artefact under artifacts/, else the test artefact (exported once)."""
    cards = sorted(ARTIFACTS_DIR.glob(f"**/{CARD_FILE}"), key=lambda p: p.stat().st_mtime)
    if cards:
        return cards[-1].parent, "trained"
    from tests.support.artifacts import make_test_artifact

    for directory in TEST_ARTIFACT_DIRS:
        if (directory / CARD_FILE).is_file():
            return make_test_artifact(directory), "test artefact: pretrained backbone, random head"
    return (make_test_artifact(TEST_ARTIFACT_DIRS[-1]), "test artefact: pretrained backbone, random head")


def prepared_dir(tmp: Path) -> tuple[Path, str]:
    if (PREPARED_DIR / LISTINGS_FILE).is_file() and (PREPARED_DIR / IMAGES_FILE).is_file():
        return PREPARED_DIR, str(PREPARED_DIR)
    from tests.gateway.gateway_data import make_mini_prepared

    return make_mini_prepared(tmp / "prepared", per_category=1000), "raw photo set (no build/data)"


def catalogue_photos(prepared: Path) -> list[tuple[str, Path]]:
    from common.prepared_data import IMAGES_FILE, read_rows

    return [
        (row["image_id"], prepared / row["path"])
        for row in read_rows(prepared, IMAGES_FILE, required=("image_id", "path"))
        if (prepared / row["path"]).is_file()
    ]


def query_photos(photos: list[tuple[str, Path]], count: int) -> tuple[list[tuple[str, Path]], list[bytes]]:
    """``count`` query photos spread evenly over the catalogue, and their bytes."""
    step = max(1, len(photos) // count)
    queries = photos[::step][:count]
    return queries, [path.read_bytes() for _, path in queries]


def index_vectors(
    artifact_dir: Path, photo_ids: list[str], query_ids: list[str], query_vectors: np.ndarray, seed: int = 0
) -> tuple[list[str], np.ndarray, str]:
    """Vectors for every catalogue photo: precomputed ones, else real queries + synthetic others."""
    from common.artifact import read_image_embeddings

    try:
        ids, vectors = read_image_embeddings(artifact_dir)
        return ids, vectors, f"{len(ids):,} precomputed embeddings of the artefact"
    except (FileNotFoundError, ValueError):
        pass
    rng = np.random.default_rng(seed)
    real = dict(zip(query_ids, query_vectors))
    vectors = np.empty((len(photo_ids), query_vectors.shape[1]), dtype=np.float32)
    for i, image_id in enumerate(photo_ids):
        if image_id in real:
            vectors[i] = real[image_id]
        else:
            base = query_vectors[i % len(query_vectors)]
            noise = rng.standard_normal(base.shape).astype(np.float32)
            vector = base + 0.8 * np.linalg.norm(base) * noise / np.linalg.norm(noise)
            vectors[i] = vector / np.linalg.norm(vector)
    return (
        list(photo_ids),
        vectors,
        (
            f"{len(query_ids)} real embeddings of the query photos + "
            f"{len(photo_ids) - len(query_ids):,} synthetic neighbours"
        ),
    )


# ------------------------------------------------------------------ processes


def start_service(name: str, env: dict[str, str], log_dir: Path, label: str):
    """``python -m services.<name>`` on a free port (not waited for: see ``wait_ready``)."""
    return spawn(name, free_port(), log_dir / f"{label}.log", {"LOG_LEVEL": "warning", **env})


def embedder_settings(args, artifact_dir: Path) -> dict[str, str]:
    """The benchmarked embedder's environment: the artefact and the command line's settings."""
    return {
        "EMBEDDER_ARTIFACT_DIR": str(artifact_dir),
        "EMBEDDER_TORCH_THREADS": str(args.torch_threads),
        "EMBEDDER_MODEL_WORKERS": str(args.model_workers),
        "EMBEDDER_BATCH_SIZE": str(args.batch_size),
        "EMBEDDER_MAX_WAIT_MS": str(args.max_wait_ms),
    }


def inprocess_embedder(args, artifact_dir: Path):
    """The embedder's core in this process, with the benchmarked embedder's settings (no text)."""
    from services.embedder.config import EmbedderConfig
    from services.embedder.core import Embedder

    return Embedder.from_config(
        EmbedderConfig(
            artifact_dir=artifact_dir,
            host="127.0.0.1",
            port=0,
            torch_threads=args.torch_threads,
            model_workers=args.model_workers,
            batch_size=args.batch_size,
            max_wait_ms=args.max_wait_ms,
            text_model="off",
        )
    )


def start_shards(count: int, dim: int, log_dir: Path) -> Iterator:
    """``count`` indexer processes with one flat image collection of ``dim`` each (no fsync),
    started one at a time: a caller that extends its list of services with them stops every one
    that started even when a later one fails to start."""
    for i in range(count):
        yield start_service(
            "indexer",
            {
                "INDEXER_DATA_DIR": str(log_dir / f"indexer-{i}"),
                "INDEXER_COLLECTIONS": f"image:{dim}:flat:ip",
                "INDEXER_FSYNC": "false",
            },
            log_dir,
            f"indexer-{i}",
        )


# ------------------------------------------------------------------ CPU per request
# On a busy machine requests/s say more about the neighbours than about the stack; the CPU each
# request costs, summed over every process of the path, does not depend on them as much.


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a live process so far (None where /proc is unavailable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_per_call(run, call, spenders: dict[str, int]) -> tuple[WindowCell, dict[str, float]]:
    """``run(counted_call)`` (a closed loop) and the CPU milliseconds per call each spender
    process used meanwhile (warm-up calls included on both sides of the division)."""
    calls = itertools.count()

    def counted(worker: int, i: int) -> None:
        call(worker, i)
        next(calls)  # atomic in CPython: a thread-safe call counter

    before = {label: process_cpu_s(pid) for label, pid in spenders.items()}
    cell = run(counted)
    done = max(1, next(calls))
    spent = {}
    for label, pid in spenders.items():
        after = process_cpu_s(pid)
        if after is not None and before[label] is not None:
            spent[label] = (after - before[label]) * 1000 / done
    return cell, spent


def print_cpu_per_call(cpu: dict[tuple[str, int], dict[str, float]], levels: list[int]) -> None:
    """CPU milliseconds per SearchByImage of each path, by process."""
    if not all(cpu.values()):
        return
    print("CPU per request (ms, every process of the path; less sensitive to other load):")
    for level in levels:
        a, b = sum(cpu["a", level].values()), sum(cpu["b", level].values())
        parts = ", ".join(f"{label} {ms:.1f}" for label, ms in cpu["b", level].items())
        print(f"{level:>4} | (a) {a:.1f} | (b) {b:.1f} = {parts} | (a)/(b) {a / b:.2f}")


# ------------------------------------------------------------------ metrics on vs off
# (issue 20) Kept apart from the comparison above: two more stacks, identical but for the
# services' Prometheus metrics (every gRPC call counted and timed on the server and, in the
# gateway, on the client side; batching, search and catalogue metrics), measured in alternating
# cells (off, on, on, off at each concurrency) so that background drift cancels out.


def start_metrics_stack(
    label: str,
    tmp: Path,
    embedder_env: dict[str, str],
    dim: int,
    shard_count: int,
    db_path: Path,
    max_workers: int,
    metrics: bool,
) -> tuple[list, object, dict[str, int]]:
    """Embedder, shards and gateway as processes; with ``metrics``, each serves /metrics on a
    free port. Returns (all processes, the gateway, {service label: metrics port})."""
    ports: dict[str, int] = {}

    def start(name: str, env: dict[str, str], name_label: str):
        ports[name_label] = free_port() if metrics else 0
        return spawn(
            name,
            free_port(),
            tmp / f"{label}-{name_label}.log",
            {"LOG_LEVEL": "warning", **env},
            metrics_port=ports[name_label],
        )

    procs = [start("embedder", embedder_env, "embedder")]
    for i in range(shard_count):
        procs.append(
            start(
                "indexer",
                {
                    "INDEXER_DATA_DIR": str(tmp / f"{label}-indexer-{i}"),
                    "INDEXER_COLLECTIONS": f"image:{dim}:flat:ip",
                    "INDEXER_FSYNC": "false",
                },
                f"indexer-{i}",
            )
        )
    gateway = start(
        "gateway",
        {
            "GATEWAY_DB": str(db_path),
            "EMBEDDER_ADDR": procs[0].address,
            "INDEXER_ADDRS": ",".join(p.address for p in procs[1:]),
            "GATEWAY_MAX_WORKERS": str(max_workers),
        },
        "gateway",
    )
    return [*procs, gateway], gateway, ports


def scraped_requests(port: int, method: str) -> float:
    """``grpc_server_handled_total`` of gateway ``method`` (all codes) from the live /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "grpc_server_handled_total" and sample.labels.get("grpc_method") == method
    )


def measure_metrics_overhead(
    tmp: Path,
    embedder_env: dict[str, str],
    dim: int,
    shard_count: int,
    db_path: Path,
    ids: list[str],
    vectors: np.ndarray,
    query_bytes: list[bytes],
    levels: list[int],
    warmup_s: float,
    measure_s: float,
    max_workers: int,
    rounds: int = 1,
) -> dict[tuple[str, int], "WindowCell"]:
    """SearchByImage through a stack with metrics off and one with metrics on, alternating
    (off, on, on, off) ``rounds`` times per concurrency, each cell ``measure_s / 2`` long."""
    import grpc

    from marketplace.gateway.v1 import gateway_pb2, gateway_pb2_grpc
    from services.gateway.catalogue import Catalogue
    from services.gateway.config import RetryPolicy
    from services.gateway.downstream import IndexerShards
    from services.gateway.index_catalogue import index_embeddings

    stacks: dict[str, tuple] = {}
    channels: list = []
    try:
        for mode in ("off", "on"):
            stacks[mode] = start_metrics_stack(
                f"metrics-{mode}", tmp, embedder_env, dim, shard_count, db_path, max_workers, mode == "on"
            )
        stubs = {}
        for mode, (procs, gateway, _ports) in stacks.items():
            for proc in procs:
                wait_ready(proc, 300)
            shards = IndexerShards(
                [p.address for p in procs[1:-1]],
                RetryPolicy(),
                write_token=os.environ.get("WRITE_TOKEN") or None,
            )
            with Catalogue.open(db_path) as catalogue:
                index_embeddings(catalogue, shards, ids, vectors, progress=False)
            shards.close()
            channel = grpc.insecure_channel(
                gateway.address, options=[("grpc.max_send_message_length", 64 << 20)]
            )
            channels.append(channel)
            stubs[mode] = gateway_pb2_grpc.GatewayStub(channel)
        requests = [gateway_pb2.SearchByImageRequest(image=data, k=K) for data in query_bytes]
        calls = {mode: itertools.count() for mode in stubs}  # next() is atomic: a call counter

        def through(mode: str):
            stub = stubs[mode]

            def call(_worker: int, i: int) -> None:
                next(calls[mode])
                stub.SearchByImage(requests[i % len(requests)], timeout=60)

            return call

        for mode in stubs:
            through(mode)(0, 0)

        cells: dict[tuple[str, int], WindowCell] = {}
        for level in levels:
            for mode in ("off", "on", "on", "off") * rounds:
                cell = closed_loop(through(mode), level, warmup_s, measure_s / 2)
                before = cells.get((mode, level))
                cells[mode, level] = (
                    cell
                    if before is None
                    else WindowCell(before.per_s + cell.per_s, before.latencies_ms + cell.latencies_ms)
                )
            for mode in stubs:  # per_s summed over the 2 * rounds cells: the mean
                cells[mode, level].per_s /= 2 * rounds
        sent = next(calls["on"])
        counted = scraped_requests(stacks["on"][2]["gateway"], "SearchByImage")
        print(
            f"metrics on: the gateway's /metrics counted {counted:,.0f} SearchByImage calls of "
            f"the {sent:,} sent to it; metrics off: no /metrics endpoint",
            flush=True,
        )
        if counted != sent:
            raise RuntimeError(f"the metrics-on gateway counted {counted} of {sent} calls")
        return cells
    finally:
        for channel in channels:
            channel.close()
        for procs, _gateway, _ports in stacks.values():
            for proc in reversed(procs):
                proc.stop(30)


def metrics_cost_us(calls: int = 20_000) -> float:
    """Microseconds one RPC's metrics cost: a unary handler through the server metrics
    interceptor minus the bare handler, in-process (load-independent, unlike the cells)."""
    import grpc
    from prometheus_client import CollectorRegistry

    from common.metrics import GrpcServerMetrics

    class Details:
        method = "/marketplace.gateway.v1.Gateway/SearchByImage"
        invocation_metadata = ()

    class Context:
        def code(self):
            return None

    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    observed = (
        GrpcServerMetrics(CollectorRegistry())
        .interceptor()
        .intercept_service(lambda _details: handler, Details())
    )
    context = Context()
    best = []
    for behaviour in (handler.unary_unary, observed.unary_unary):
        times = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(calls):
                behaviour(None, context)
            times.append((time.perf_counter() - started) / calls)
        best.append(min(times))
    return (best[1] - best[0]) * 1e6


#: Metric recordings per SearchByImage with metrics on: the gateway's server series, its client
#: series for Embed and one Search per shard (2), the embedder's server series and its batch
#: (batch size, model seconds, images, queue wait), each shard's server series and search time.
RECORDINGS_PER_SEARCH = 1 + 3 + 1 + 2 + 2 * 2


def print_metrics_overhead(cells: dict[tuple[str, int], "WindowCell"], levels: list[int]) -> float:
    """The metrics on/off table; returns p50(on) / p50(off) at the lowest concurrency."""
    print("\nSearchByImage through the gateway, Prometheus metrics off vs on (alternating cells)")
    header = (
        f"{'conc':>4} | {'off req/s':>9} {'p50':>7} {'p99':>7} | {'on req/s':>9} {'p50':>7} "
        f"{'p99':>7} | {'p50 on/off':>10} {'p99 on/off':>10}"
    )
    print(header)
    print("-" * len(header))
    for level in levels:
        off, on = cells["off", level], cells["on", level]
        print(
            f"{level:>4} | {off.per_s:>9.1f} {off.percentile(50):>7.1f} {off.percentile(99):>7.1f} | "
            f"{on.per_s:>9.1f} {on.percentile(50):>7.1f} {on.percentile(99):>7.1f} | "
            f"{on.percentile(50) / off.percentile(50):>10.3f} "
            f"{on.percentile(99) / off.percentile(99):>10.3f}"
        )
    low = min(levels)
    ratio = cells["on", low].percentile(50) / cells["off", low].percentile(50)
    print(
        f"target: p50 with metrics within 1.03x of without at concurrency {low}: "
        f"{'met' if ratio <= 1.03 else 'NOT met'} ({ratio:.3f}x)"
    )
    cost = metrics_cost_us()
    estimate = RECORDINGS_PER_SEARCH * cost / 1000 / cells["off", low].percentile(50)
    print(
        f"cost of one RPC's metrics, in-process: {cost:.1f} us; about {RECORDINGS_PER_SEARCH} "
        f"recordings per SearchByImage across the stack = {estimate:.3%} of its p50 at "
        f"concurrency {low} (what the cells measure beyond this is noise)"
    )
    return ratio


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gateway",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="short cells, about a minute")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--shards", type=int, default=2, help="indexer shards behind the gateway")
    parser.add_argument("--queries", type=int, default=None, help="distinct query photos")
    parser.add_argument("--seconds", type=float, default=None, help="measuring time per cell")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="--db postgres: rounds of cells per set-up (default 4, --quick 2)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="embedder torch threads per model worker, in-process and served "
        "alike (0: the embedder's default, the cores shared out among its "
        "model workers)",
    )
    parser.add_argument(
        "--model-workers",
        type=int,
        default=0,
        help="embedder model workers, in-process and served alike (0: its default, min(2, cores))",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="embedder model batch")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="embedder batching wait")
    parser.add_argument(
        "--no-metrics-overhead",
        dest="metrics_overhead",
        action="store_false",
        help="skip the metrics on vs off comparison (two more stacks)",
    )
    parser.add_argument(
        "--db",
        choices=["postgres"],
        default=None,
        help="postgres: compare the catalogue back ends (SQLite vs PostgreSQL, "
        "one gateway vs two) instead of gateway vs in-process",
    )
    args = parser.parse_args(argv)
    if args.db == "postgres":
        return run_catalogue_comparison(args)
    levels = [int(x) for x in args.concurrency.split(",")]
    warmup_s = 1.0 if args.quick else 3.0
    measure_s = args.seconds or (3.0 if args.quick else 15.0)
    n_queries = args.queries or (16 if args.quick else 64)
    started = time.perf_counter()

    import grpc

    from marketplace.gateway.v1 import gateway_pb2, gateway_pb2_grpc
    from services.gateway.catalogue import Catalogue
    from services.gateway.config import RetryPolicy
    from services.gateway.downstream import IndexerShards
    from services.gateway.index_catalogue import index_embeddings
    from services.indexer.attributes import Attributes
    from services.indexer.core import IndexStore
    from services.indexer.spec import CollectionSpec

    from benchmarks.embedder import with_runtime_files

    artifact_dir, kind = find_artifact()
    artifact_dir = with_runtime_files(artifact_dir)
    card = json.loads((artifact_dir / CARD_FILE).read_text())
    dim = int(card["embedding_dim"])
    print(
        f"gateway benchmark: {card['model_version']} ({kind}), {cpu_name()}, "
        f"embedder torch threads {args.torch_threads or 'default'}, {args.shards} indexer shard(s)"
    )
    print(f"before: {load_line()}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp_name:
        tmp = Path(tmp_name)
        prepared, prepared_label = prepared_dir(tmp)
        db_path = tmp / "catalogue.sqlite3"
        with Catalogue.open(db_path) as catalogue:
            catalogue.load_prepared(prepared)
            listing_count, image_count = catalogue.count(), catalogue.count_images()
        photos = catalogue_photos(prepared)
        queries, query_bytes = query_photos(photos, n_queries)

        # Start the stack's processes while the in-process embedder loads here.
        embedder_env = embedder_settings(args, artifact_dir)
        services: list = []
        inprocess = None
        try:
            services.append(start_service("embedder", embedder_env, tmp, "embedder"))
            services.extend(start_shards(args.shards, dim, tmp))  # appended one by one: all stopped
            shard_addresses = [s.address for s in services[1:]]
            gateway = start_service(
                "gateway",
                {
                    "GATEWAY_DB": str(db_path),
                    "EMBEDDER_ADDR": services[0].address,
                    "INDEXER_ADDRS": ",".join(shard_addresses),
                    "GATEWAY_MAX_WORKERS": str(max(16, 2 * max(levels))),
                },
                tmp,
                "gateway",
            )
            services.append(gateway)
            inprocess = inprocess_embedder(args, artifact_dir)
            inprocess_runtime = inprocess.model.describe_runtime()["check"]
            query_vectors = np.concatenate(
                [inprocess.embed(query_bytes[i : i + 8]) for i in range(0, len(query_bytes), 8)]
            )
            ids, vectors, vectors_label = index_vectors(
                artifact_dir,
                [image_id for image_id, _ in photos],
                [image_id for image_id, _ in queries],
                query_vectors,
            )

            with Catalogue.open(db_path) as catalogue:
                rows = {row.image_id: row for row in catalogue.image_rows()}
            keep = [i for i, image_id in enumerate(ids) if image_id in rows]
            ids, vectors = [ids[i] for i in keep], vectors[keep]
            store = IndexStore.in_memory([CollectionSpec("image", dim)])
            store.upsert(
                "image",
                ids,
                vectors,
                [
                    Attributes(rows[i].listing_id, rows[i].main_category, rows[i].price, rows[i].location)
                    for i in ids
                ],
            )

            for service in services:
                wait_ready(service, 300)
            shards = IndexerShards(
                shard_addresses, RetryPolicy(), write_token=os.environ.get("WRITE_TOKEN") or None
            )
            with Catalogue.open(db_path) as catalogue:
                report = index_embeddings(catalogue, shards, ids, vectors, progress=False)
            shards.close()
            print(
                f"catalogue: {listing_count:,} listings, {image_count:,} photos, from {prepared_label}; "
                f"index: {report.upserted:,} vectors ({vectors_label}), per shard "
                f"{dict(sorted(report.per_shard.items()))}; {len(queries)} query photos; "
                f"set-up {time.perf_counter() - started:.0f} s",
                flush=True,
            )

            import dataclasses

            import faiss

            from services.indexer.config import IndexerConfig

            default_threads = next(
                f.default for f in dataclasses.fields(IndexerConfig) if f.name == "faiss_threads"
            )
            search_threads = int(os.environ.get("INDEXER_FAISS_THREADS", default_threads))

            def in_process(_worker: int, i: int) -> None:
                if search_threads:  # per calling thread, as the indexer does for each request
                    faiss.omp_set_num_threads(search_threads)
                vector = inprocess.embed([query_bytes[i % len(query_bytes)]])
                store.search("image", vector, K, group_by_listing=True)

            channel = grpc.insecure_channel(
                gateway.address, options=[("grpc.max_send_message_length", 64 << 20)]
            )
            stub = gateway_pb2_grpc.GatewayStub(channel)
            requests = [gateway_pb2.SearchByImageRequest(image=data, k=K) for data in query_bytes]
            reply = stub.SearchByImage(requests[0], timeout=60)
            assert len(reply.results) == K, f"gateway returned {len(reply.results)} results"

            def through_gateway(_worker: int, i: int) -> None:
                stub.SearchByImage(requests[i % len(requests)], timeout=60)

            paths = {"a": ("in-process", in_process), "b": ("gateway", through_gateway)}
            # the processes whose CPU each path spends: this one (callers, or embed + search
            # in-process), and for (b) every service of the stack too
            spenders = {
                "a": {"in-process": os.getpid()},
                "b": {
                    "client": os.getpid(),
                    **{
                        label: service.process.pid
                        for label, service in zip(
                            ["embedder", *(f"indexer-{i}" for i in range(args.shards)), "gateway"], services
                        )
                    },
                },
            }
            cells: dict[tuple[str, int], WindowCell] = {}
            cpu: dict[tuple[str, int], dict[str, float]] = {}
            for level in levels:
                for key, (_, call) in paths.items():
                    cells[key, level], cpu[key, level] = cpu_per_call(
                        lambda counted: closed_loop(counted, level, warmup_s, measure_s), call, spenders[key]
                    )
            channel.close()
        finally:
            for service in reversed(services):
                service.stop(30)
            if inprocess is not None:
                inprocess.close()
        metrics_cells = None
        if args.metrics_overhead:
            metrics_cells = measure_metrics_overhead(
                tmp,
                embedder_env,
                dim,
                args.shards,
                db_path,
                ids,
                vectors,
                query_bytes,
                levels,
                warmup_s,
                measure_s,
                max(16, 2 * max(levels)),
                rounds=2 if args.quick else 4,
            )

    print(
        f"\nSearchByImage, k={K}: requests/s and latency (ms), {warmup_s:g} s warm-up + "
        f"{measure_s:g} s per cell"
    )
    print(
        "(a) in-process = embedder core + in-memory index, embed + search; "
        f"(b) gateway = gRPC client -> gateway -> embedder + {args.shards} indexer shards"
    )
    print(f"embedder: {inprocess_runtime}")
    header = (
        f"{'conc':>4} | "
        + " | ".join(f"{f'({key}) req/s':>9} {'p50':>7} {'p99':>7}" for key in paths)
        + " | "
        + " | ".join(
            f"{f'p50 {key}/a':>7} {f'p99 {key}/a':>7} {f'rps {key}/a':>7}" for key in paths if key != "a"
        )
    )
    print(header)
    print("-" * len(header))
    for level in levels:
        a = cells["a", level]
        row = [
            f"{cells[key, level].per_s:>9.1f} {cells[key, level].percentile(50):>7.1f} "
            f"{cells[key, level].percentile(99):>7.1f}"
            for key in paths
        ]
        ratios = [
            f"{cells[key, level].percentile(50) / a.percentile(50):>7.2f} "
            f"{cells[key, level].percentile(99) / a.percentile(99):>7.2f} "
            f"{cells[key, level].per_s / a.per_s:>7.2f}"
            for key in paths
            if key != "a"
        ]
        print(f"{level:>4} | " + " | ".join(row) + " | " + " | ".join(ratios))
    print_cpu_per_call(cpu, levels)
    top = 8 if 8 in levels else max(levels)
    ratio = cells["b", top].percentile(99) / cells["a", top].percentile(99)
    rps_ratio = cells["b", top].per_s / cells["a", top].per_s
    print(
        f"targets at concurrency {top}: p99 of (b) within 1.5x of (a): "
        f"{'met' if ratio <= 1.5 else 'NOT met'} ({ratio:.2f}x); requests/s of (b) at least "
        f"0.8x (a): {'met' if rps_ratio >= 0.8 else 'NOT met'} ({rps_ratio:.2f}x)"
    )
    overhead = ""
    if metrics_cells is not None:
        overhead = f" metrics_overhead_p50={print_metrics_overhead(metrics_cells, levels):.3f}"
    print(f"after: {load_line()}; total {time.perf_counter() - started:.0f} s")
    print(
        f"RESULT p99_vs_inprocess={ratio:.2f} rps_vs_inprocess_c{top}={rps_ratio:.2f} "
        f"rps_c{top}={cells['b', top].per_s:.1f}{overhead}"
    )
    return 0


# ------------------------------------------------------------------ --db postgres


CATALOGUE_SETUPS = (
    ("sqlite", "SQLite, 1 gateway"),
    ("pg1", "PostgreSQL, 1 gateway"),
    ("pg2", "PostgreSQL, 2 gateways"),
)
#: PostgreSQL settings that decide whether an acknowledged commit survives a crash.
DURABILITY_SETTINGS = ("fsync", "synchronous_commit", "full_page_writes", "wal_sync_method")


def catalogue_costs(urls: dict[str, str], prepared: Path, calls: int) -> dict[str, dict[str, WindowCell]]:
    """What the catalogue itself costs per RPC on each back end, called in-process one after
    another (no gRPC, no embedder): SearchByImage's read of its 10 listings, and AddListing's
    catalogue steps (duplicate check, the pending write with its outbox entry, marking it done,
    the pending check). Each back end on a database of its own, loaded from ``prepared``."""
    from services.gateway.catalogue import Catalogue, StoredVector
    from services.gateway.domain import Listing

    vector = np.random.default_rng(0).standard_normal(1280).astype(np.float32)
    costs: dict[str, dict[str, WindowCell]] = {}
    for name, url in urls.items():
        with Catalogue.open(url, max_connections=4, min_connections=4) as catalogue:
            catalogue.load_prepared(prepared)
            ids = catalogue.listing_ids()
            search, add = [], []
            for n in range(calls):
                wanted = ids[(n * 10) % max(1, len(ids) - 10) :][:10]
                began = time.perf_counter()
                catalogue.get_many(wanted, include_pending=True)
                search.append((time.perf_counter() - began) * 1000)
                listing_id = f"cost-{n}"
                listing = Listing(
                    listing_id, "Cost", "", "", "Home & Garden", 1.0, "GBP", "", (f"{listing_id}-0",)
                )
                began = time.perf_counter()
                catalogue.get(listing_id, include_pending=True)
                entry = catalogue.add_pending(
                    listing,
                    [StoredVector("image", f"{listing_id}-0", vector)],
                    0,
                    lease_holder="bench",
                    lease_s=30,
                )
                catalogue.complete(entry)
                catalogue.pending_outbox(listing_id)
                add.append((time.perf_counter() - began) * 1000)
            costs[name] = {"SearchByImage": WindowCell(0.0, search), "AddListing": WindowCell(0.0, add)}
    return costs


def draw_catalogue_latencies(cells: dict[tuple[str, str], "WindowCell"]) -> Path:
    """Latency distribution (the share of calls answered within x ms) of each set-up, one panel
    per RPC, with p99 marked: ``build/benchmarks/gateway_catalogue.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = REPO_ROOT / "build" / "benchmarks" / "gateway_catalogue.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    rpcs = ("SearchByImage", "AddListing")
    fig, axes = plt.subplots(1, len(rpcs), figsize=(11, 4), sharey=True)
    for ax, rpc in zip(axes, rpcs):
        for key, label in CATALOGUE_SETUPS:
            latencies = np.sort(np.asarray(cells[rpc, key].latencies_ms))
            if not len(latencies):
                continue
            share = np.arange(1, len(latencies) + 1) / len(latencies)
            (line,) = ax.plot(latencies, share, label=f"{label} (n={len(latencies)})")
            ax.axvline(cells[rpc, key].percentile(99), color=line.get_color(), linestyle=":", linewidth=1)
        ax.set_title(f"{rpc} (dotted: p99)")
        ax.set_xlabel("latency (ms)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_ylabel("share of calls answered")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def durability_settings(url: str) -> str:
    """The server's durability settings as ``name=value ...`` (what the comparison ran with)."""
    import psycopg

    with psycopg.connect(url) as connection:
        return " ".join(
            f"{name}={connection.execute(f'SHOW {name}').fetchone()[0]}" for name in DURABILITY_SETTINGS
        )


def run_catalogue_comparison(args) -> int:
    """SQLite vs PostgreSQL catalogue, one gateway vs two (see the module docstring)."""
    import grpc

    from marketplace.gateway.v1 import gateway_pb2, gateway_pb2_grpc
    from scripts.postgres import LocalPostgres
    from services.gateway.catalogue import Catalogue
    from services.gateway.config import RetryPolicy
    from services.gateway.downstream import SERVICE_CONFIG, IndexerShards
    from services.gateway.index_catalogue import index_embeddings
    from services.gateway.reconcile import reconcile

    levels = [int(x) for x in args.concurrency.split(",")]
    level = 8 if 8 in levels else max(levels)
    warmup_s = 0.5 if args.quick else 2.0
    measure_s = args.seconds or (2.5 if args.quick else 15.0)
    rounds = args.rounds or (2 if args.quick else 4)
    n_queries = args.queries or (16 if args.quick else 64)
    started = time.perf_counter()
    artifact_dir, kind = find_artifact()
    card = json.loads((artifact_dir / CARD_FILE).read_text())
    dim = int(card["embedding_dim"])
    category = (
        card.get("categories", ["Home & Garden"])[0] if isinstance(card.get("categories"), list) else ""
    )
    print(
        f"gateway catalogue benchmark: {card['model_version']} ({kind}), {cpu_name()}, "
        f"{args.shards} indexer shard(s), concurrency {level}"
    )
    print(f"before: {load_line()}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-catalogue-") as tmp_name:
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o755)  # PostgreSQL runs as its own user under root
        prepared, prepared_label = prepared_dir(tmp)
        postgres = LocalPostgres(tmp / "postgres", free_port()).start()
        urls = {"sqlite": str(tmp / "catalogue.sqlite3"), "pg": postgres.create_database("catalogue")}
        for url in urls.values():
            with Catalogue.open(url) as catalogue:
                catalogue.load_prepared(prepared)
                listing_count, image_count = catalogue.count(), catalogue.count_images()
        photos = catalogue_photos(prepared)
        queries, query_bytes = query_photos(photos, n_queries)
        services: list = []
        gateways: dict[str, list] = {}
        try:
            services.append(
                start_service(
                    "embedder",
                    {**embedder_settings(args, artifact_dir), "EMBEDDER_TEXT_MODEL": "off"},
                    tmp,
                    "embedder",
                )
            )
            services.extend(start_shards(args.shards, dim, tmp))  # appended one by one: all stopped
            shard_addresses = [s.address for s in services[1:]]
            common = {
                "EMBEDDER_ADDR": services[0].address,
                "INDEXER_ADDRS": ",".join(shard_addresses),
                "GATEWAY_MAX_WORKERS": str(max(16, 2 * level)),
            }
            gateways["sqlite"] = [
                start_service("gateway", {**common, "GATEWAY_DB": urls["sqlite"]}, tmp, "gateway-sqlite")
            ]
            gateways["pg2"] = [
                start_service("gateway", {**common, "GATEWAY_DB": urls["pg"]}, tmp, f"gateway-pg-{n}")
                for n in range(2)
            ]
            gateways["pg1"] = gateways["pg2"][:1]
            services += gateways["sqlite"] + gateways["pg2"]

            embedder = inprocess_embedder(args, artifact_dir)
            try:
                query_vectors = np.concatenate(
                    [embedder.embed(query_bytes[i : i + 8]) for i in range(0, len(query_bytes), 8)]
                )
            finally:
                embedder.close()
            ids, vectors, vectors_label = index_vectors(
                artifact_dir,
                [image_id for image_id, _ in photos],
                [image_id for image_id, _ in queries],
                query_vectors,
            )
            for service in services:
                wait_ready(service, 300)
            shards = IndexerShards(shard_addresses, RetryPolicy())
            with Catalogue.open(urls["sqlite"]) as catalogue:
                known = {row.image_id for row in catalogue.image_rows()}
                keep = [i for i, image_id in enumerate(ids) if image_id in known]
                report = index_embeddings(
                    catalogue, shards, [ids[i] for i in keep], vectors[keep], progress=False
                )
            print(
                f"catalogue: {listing_count:,} listings, {image_count:,} photos, from {prepared_label} "
                f"(the same in SQLite and PostgreSQL); index: {report.upserted:,} vectors "
                f"({vectors_label}); set-up {time.perf_counter() - started:.0f} s",
                flush=True,
            )

            options = [("grpc.service_config", SERVICE_CONFIG), ("grpc.max_send_message_length", 64 << 20)]
            channels = {
                key: grpc.insecure_channel("ipv4:" + ",".join(g.address for g in procs), options=options)
                for key, procs in gateways.items()
            }
            stubs = {key: gateway_pb2_grpc.GatewayStub(channel) for key, channel in channels.items()}
            searches = [gateway_pb2.SearchByImageRequest(image=data, k=K) for data in query_bytes]
            added: dict[str, list[str]] = {key: [] for key in stubs}
            counter = iter(range(10**9))

            def search(key: str):
                return lambda _worker, i: (
                    stubs[key].SearchByImage(searches[i % len(searches)], timeout=60) and None
                )

            def add(key: str):
                def call(_worker: int, i: int) -> None:
                    listing_id = f"bench-{key}-{next(counter)}"
                    reply = stubs[key].AddListing(
                        gateway_pb2.AddListingRequest(
                            listing=gateway_pb2.Listing(
                                id=listing_id, title=f"Benchmark listing {listing_id}", main_category=category
                            ),
                            images=[query_bytes[i % len(query_bytes)]],
                        ),
                        timeout=60,
                    )
                    if reply.pending:
                        raise RuntimeError(f"AddListing {listing_id} left pending")
                    added[key].append(listing_id)

                return call

            for key in stubs:  # warm every path once (the first AddListing asks for the model's info)
                for gateway in range(len(gateways[key])):
                    stubs[key].SearchByImage(searches[0], timeout=60)
                    add(key)(0, gateway)
            cells: dict[tuple[str, str], WindowCell] = {}
            order = [key for key, _ in CATALOGUE_SETUPS]
            for rpc, make in (("SearchByImage", search), ("AddListing", add)):
                for round_number in range(rounds):
                    for key in order if round_number % 2 == 0 else order[::-1]:
                        cell = closed_loop(make(key), level, warmup_s, measure_s)
                        print(
                            f"  {rpc:13s} round {round_number + 1}/{rounds} {key:6s} {cell.per_s:7.1f} req/s",
                            flush=True,
                        )
                        before = cells.get((rpc, key))
                        cells[rpc, key] = (
                            cell
                            if before is None
                            else WindowCell(
                                before.per_s + cell.per_s, before.latencies_ms + cell.latencies_ms
                            )
                        )
                for key in order:  # per_s was summed over the rounds: their mean
                    cells[rpc, key].per_s /= rounds

            for listing_id in added["sqlite"]:  # the shards are shared: take SQLite's adds out again
                stubs["sqlite"].RemoveListing(
                    gateway_pb2.RemoveListingRequest(listing_id=listing_id), timeout=60
                )
            for channel in channels.values():
                channel.close()
            with Catalogue.open(urls["pg"]) as catalogue:
                check = reconcile(catalogue, shards)
                pg_count = catalogue.count(include_pending=True)
            postgres_settings = durability_settings(urls["pg"])
            costs = catalogue_costs(
                {"SQLite": str(tmp / "costs.sqlite3"), "PostgreSQL": postgres.create_database("costs")},
                prepared,
                100 if args.quick else 500,
            )
            shards.close()
        finally:
            for service in reversed(services):
                service.stop(30)
            postgres.destroy()

    print(
        f"\nSearchByImage and AddListing at concurrency {level}: requests/s and latency (ms), "
        f"{rounds} rounds of one {warmup_s:g} s warm-up + {measure_s:g} s cell per set-up "
        "(order alternating), pooled; calls = latencies behind the percentiles"
    )
    print(
        f"durability: SQLite journal_mode=WAL synchronous=FULL; PostgreSQL {postgres_settings}; "
        f"GATEWAY_MAX_WORKERS={common['GATEWAY_MAX_WORKERS']} on every gateway"
    )
    header = f"{'setup':24s} | {'rpc':13s} | {'req/s':>7} {'p50':>7} {'p99':>7} {'calls':>6}"
    print(header)
    print("-" * len(header))
    for rpc in ("SearchByImage", "AddListing"):
        for key, label in CATALOGUE_SETUPS:
            cell = cells[rpc, key]
            print(
                f"{label:24s} | {rpc:13s} | {cell.per_s:>7.1f} {cell.percentile(50):>7.1f} "
                f"{cell.percentile(99):>7.1f} {len(cell.latencies_ms):>6d}"
            )
    print(
        "\nthe catalogue's own cost per RPC (ms; in-process, calls one after another, "
        f"{len(costs['SQLite']['AddListing'].latencies_ms)} each):"
    )
    for rpc, what in (
        ("SearchByImage", "read its 10 listings"),
        ("AddListing", "duplicate check, pending write + outbox, mark done, pending check"),
    ):
        print(
            f"  {rpc:13s} ({what}): "
            + "; ".join(
                f"{name} p50 {cost[rpc].percentile(50):.2f} p99 {cost[rpc].percentile(99):.2f}"
                for name, cost in costs.items()
            )
        )
    p99_ratios = {
        rpc: cells[rpc, "pg1"].percentile(99) / cells[rpc, "sqlite"].percentile(99)
        for rpc in ("SearchByImage", "AddListing")
    }
    pg_vs_sqlite = max(p99_ratios.values())
    two_vs_one = cells["SearchByImage", "pg2"].per_s / cells["SearchByImage", "pg1"].per_s
    add_two_vs_one = cells["AddListing", "pg2"].per_s / cells["AddListing", "pg1"].per_s
    orphans = check.orphans
    print(
        "PostgreSQL / SQLite p99: "
        + ", ".join(f"{rpc} {r:.2f}" for rpc, r in p99_ratios.items())
        + f"; target <= 1.2: {'met' if pg_vs_sqlite <= 1.2 else 'NOT met'}"
    )
    print(
        f"two gateways / one, requests/s: SearchByImage {two_vs_one:.2f}, AddListing {add_two_vs_one:.2f} "
        f"(the embedder and shards are shared, on {os.cpu_count()} cores)"
    )
    print(
        f"reconcile after the run: PostgreSQL catalogue {pg_count:,} listings; orphans {check.orphans}, "
        f"missing {check.missing}, pending {check.pending}"
    )
    print(f"picture: {draw_catalogue_latencies(cells).relative_to(REPO_ROOT)}")
    print(f"after: {load_line()}; total {time.perf_counter() - started:.0f} s")
    print(
        f"RESULT pg_vs_sqlite_p99={pg_vs_sqlite:.2f} two_gateways_vs_one_rps={two_vs_one:.2f} "
        f"orphans={orphans}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
