"""Indexer benchmark: serving overhead of gRPC over raw FAISS, and ANN recall/speed trade-offs.

Part 1 (serving overhead): an exact flat index of 100k x 512 unit vectors; Search with k=10 at
batch 1 and batch 32, through gRPC (the real servicer and server in-process, HTTP/2 over
loopback, protobuf both ways) and through raw FAISS ``index.search`` on the *same* FAISS object.
The two paths alternate request by request (or group by group at concurrency > 1), so noise
from other processes on a shared machine hits both alike.

Part 2 (ANN): IVF-Flat and HNSW built with the indexer's own build path on clustered data
(overlapping clusters on a low-dimensional latent space, see ``ClusteredData``), 1M x 512
(``--quick``: 100k for IVF and 20k for HNSW, whose graph build is the slow part). For each search setting: recall@10 against exact
search, QPS at batch 32 and the speed-up over exact flat search on the same vectors, plus the
build time and the resident memory the index added.

    python -m benchmarks.indexer --quick          # about a minute
    python -m benchmarks.indexer                  # full size: ~8 GB RAM; ~17 min on 2 busy
                                                  # cores, 10 of them building the HNSW graph

Prints one table, then ``RESULT grpc_vs_raw_b32=... ann_recall10=... ann_speedup=...`` where the
ANN figures are those of the fastest setting reaching recall@10 >= 0.95 (else the best recall).
Targets: gRPC at batch 32 >= 80% of raw FAISS QPS; ANN recall@10 >= 0.95 at >= 5x flat QPS.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import grpc
import numpy as np

from benchmarks._timing import LoadResult, print_table, rss_mb, run_interleaved, run_load
from marketplace.indexer.v1 import indexer_pb2 as pb
from marketplace.indexer.v1 import indexer_pb2_grpc
from services.indexer.config import IndexerConfig
from services.indexer.core import IndexStore
from services.indexer.server import start
from services.indexer.spec import CollectionSpec
from services.indexer.vector_index import DEFAULT_BLAS_THRESHOLD, VectorIndex, tune_faiss, use_blas_for

K = 10
RECALL_TARGET = 0.95
COLUMNS = [
    "part",
    "index",
    "n",
    "batch",
    "qps",
    "p50_ms",
    "p99_ms",
    "recall@10",
    "build_s",
    "mem_mb",
    "ratio",
]


@dataclass(frozen=True)
class Settings:
    quick: bool
    n: int
    dim: int
    ann_n: int
    hnsw_n: int
    ann_types: tuple[str, ...]
    queries: int
    b1_requests: int
    b32_requests: int
    concurrency: int
    threads: int
    hnsw_m: int
    ef_construction: int
    nlist: int
    spread: float
    seed: int


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.indexer", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k for IVF, 20k for HNSW, fewer requests")
    parser.add_argument("--n", type=int, default=100_000, help="vectors for the gRPC-vs-raw part")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ann-n", type=int, help="vectors for IVF (default 1M, quick 100k)")
    parser.add_argument("--hnsw-n", type=int, help="vectors for HNSW (default --ann-n, quick 20k)")
    parser.add_argument("--ann-types", default="ivf_flat,hnsw")
    parser.add_argument("--queries", type=int, help="queries for recall and ANN QPS (default 256, quick 128)")
    parser.add_argument(
        "--requests",
        type=int,
        help="Search calls per path at batch 1 (default 300, quick 30); batch 32 gets a third",
    )
    parser.add_argument("--concurrency", type=int, default=1, help="client threads for part 1")
    parser.add_argument(
        "--threads",
        type=int,
        help="FAISS OpenMP threads for both paths (default: FAISS's own, one per core; "
        "quick: 1, which stays stable on a shared, busy machine)",
    )
    parser.add_argument("--hnsw-m", type=int, help="HNSW links per node (default 32, quick 16)")
    parser.add_argument("--ef-construction", type=int, help="HNSW build beam (default 80, quick 40)")
    parser.add_argument("--nlist", type=int, default=0, help="IVF lists (0: about sqrt(n))")
    parser.add_argument(
        "--blas-threshold",
        type=int,
        default=DEFAULT_BLAS_THRESHOLD,
        help="FAISS BLAS threshold for both paths (the indexer's default)",
    )
    parser.add_argument(
        "--spread",
        type=float,
        default=0.7,
        help="cluster separation of the synthetic data (0.7: nearest neighbour cosine ~0.82)",
    )
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    quick = args.quick
    tune_faiss(args.blas_threshold)
    threads = args.threads if args.threads is not None else (1 if quick else 0)
    if threads:
        faiss.omp_set_num_threads(threads)
    ann_n = args.ann_n or (100_000 if quick else 1_000_000)
    return Settings(
        quick=quick,
        n=args.n,
        dim=args.dim,
        ann_n=ann_n,
        hnsw_n=args.hnsw_n or (min(20_000, ann_n) if quick else ann_n),
        ann_types=tuple(t for t in args.ann_types.split(",") if t),
        queries=args.queries or (128 if quick else 256),
        b1_requests=args.requests or (30 if quick else 300),
        b32_requests=max(3, (args.requests or (30 if quick else 300)) // 3),
        threads=threads,
        concurrency=args.concurrency,
        hnsw_m=args.hnsw_m or (16 if quick else 32),
        ef_construction=args.ef_construction or (40 if quick else 80),
        nlist=args.nlist,
        spread=args.spread,
        seed=args.seed,
    )


# -- data ------------------------------------------------------------------------------------------
class ClusteredData:
    """Unit vectors shaped like real embeddings: a mixture of overlapping Gaussian clusters
    (one per ~200 points; centres ``spread`` apart relative to a cluster width of 0.5, so
    larger is more clustered and easier for ANN) in a 32-dimensional latent space, mapped into ``dim`` dimensions by a
    random orthonormal projection, plus a little isotropic noise. Neighbourhoods are continuous
    rather than one tight cluster each, so ANN recall is not trivially 1 (isotropic clusters in
    512-d are: every neighbour shares the query's cluster and IVF list)."""

    LATENT = 32
    WITHIN = 0.5
    NOISE = 0.1

    def __init__(self, total: int, dim: int, seed: int, spread: float = 0.7) -> None:
        self.rng = np.random.default_rng(seed)
        self.dim = dim
        latent = min(self.LATENT, dim)
        basis, _ = np.linalg.qr(self.rng.standard_normal((dim, latent)))
        self.projection = basis.T.astype(np.float32)  # latent x dim, orthonormal rows
        self.centres = self.rng.standard_normal(
            (max(64, total // 200), latent), dtype=np.float32
        ) * np.float32(spread)

    def sample(self, n: int, chunk: int = 50_000) -> np.ndarray:
        out = np.empty((n, self.dim), dtype=np.float32)
        latent = self.centres.shape[1]
        noise = np.float32(self.NOISE * np.sqrt(latent / self.dim))
        for offset in range(0, n, chunk):
            m = min(chunk, n - offset)
            z = self.centres[self.rng.integers(0, len(self.centres), m)]
            z += self.rng.standard_normal((m, latent), dtype=np.float32) * np.float32(self.WITHIN)
            block = z @ self.projection
            block += self.rng.standard_normal((m, self.dim), dtype=np.float32) * noise
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            out[offset : offset + m] = block
        return out


def ids_for(n: int) -> list[str]:
    return [f"img-{i:07d}" for i in range(n)]


def batches(queries: np.ndarray, size: int) -> list[np.ndarray]:
    return [np.ascontiguousarray(queries[i : i + size]) for i in range(0, len(queries) - size + 1, size)]


# -- part 1: gRPC vs raw FAISS -----------------------------------------------------------------------
def serving_overhead(settings: Settings, data: np.ndarray, queries: np.ndarray) -> tuple[list[dict], float]:
    """Rows for batch 1 and 32 through raw FAISS and gRPC; returns them and the b32 ratio."""
    n = settings.n
    gc.collect()
    before = rss_mb()
    started = time.perf_counter()
    index = VectorIndex.build(CollectionSpec("image", settings.dim), ids_for(n), data[:n])
    build_s = time.perf_counter() - started
    mem = rss_mb() - before
    store = IndexStore.in_memory()
    store.replace_collection(index)
    with tempfile.TemporaryDirectory() as tmp:
        config = IndexerConfig.local(
            host="127.0.0.1",
            port=0,
            data_dir=Path(tmp),
            log_level="warning",
            collections=(),
            max_batch=1024,
            max_k=1000,
            faiss_threads=settings.threads,
            blas_threshold=faiss.cvar.distance_compute_blas_threshold,
        )
        server = start(config, store=store)
        rows: list[dict] = []
        ratio_b32 = float("nan")
        try:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = indexer_pb2_grpc.IndexerStub(channel)
                raw = index.raw_index
                for batch, requests in ((1, settings.b1_requests), (32, settings.b32_requests)):
                    pool = batches(queries, batch)[:16]
                    wire = [
                        pb.SearchRequest(queries=[pb.Vector(values=q.tolist()) for q in b], k=K) for b in pool
                    ]
                    _check_same_results(stub, raw, pool[0], wire[0])
                    raw_pool, wire_pool = itertools.cycle(pool), itertools.cycle(wire)
                    results = run_interleaved(
                        {
                            "raw FAISS": lambda: (
                                faiss_threads(settings.threads) and raw_search(raw, next(raw_pool))
                            ),
                            "gRPC": lambda: stub.Search(next(wire_pool), timeout=600),
                        },
                        rounds=max(1, requests // settings.concurrency),
                        requests=settings.concurrency,
                        concurrency=settings.concurrency,
                    )
                    raw_qps = results["raw FAISS"].qps * batch
                    for name, result in results.items():
                        row = _row("1 serving", f"flat via {name}", n, batch, result)
                        row["ratio"] = result.qps * batch / raw_qps
                        if name == "raw FAISS":
                            row.update(build_s=build_s, mem_mb=mem)
                        rows.append(row)
                    if batch == 32:
                        ratio_b32 = results["gRPC"].qps / results["raw FAISS"].qps
        finally:
            server.stop(grace=None)
    return rows, ratio_b32


def _check_same_results(stub, raw, queries: np.ndarray, request: pb.SearchRequest) -> None:
    """The comparison is only fair if both paths answer the same: check it once."""
    _, labels = raw.search(queries, K)
    reply = stub.Search(request, timeout=600)
    over_grpc = [[n.id for n in r.neighbors] for r in reply.results]
    direct = [[f"img-{i:07d}" for i in row if i >= 0] for row in labels]
    if over_grpc != direct:
        raise SystemExit("gRPC and raw FAISS disagree on the same index; benchmark invalid")


def _row(part: str, name: str, n: int, batch: int, result: LoadResult) -> dict:
    return {
        "part": part,
        "index": name,
        "n": n,
        "batch": batch,
        "qps": result.qps * batch,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
    }


# -- part 2: ANN recall and speed ------------------------------------------------------------------------
def raw_search(raw, queries: np.ndarray):
    """Raw FAISS with the indexer's per-search choice of BLAS or FAISS's SIMD loop
    (`use_blas_for`): the process-wide switch is shared with the in-process gRPC server, so both
    paths must set it alike."""
    use_blas_for(len(queries))
    return raw.search(queries, K)


def faiss_threads(threads: int) -> bool:
    """Apply the FAISS thread count in the calling thread (OpenMP settings are per thread, and
    the timing helper calls from its own threads, as gRPC does); always True."""
    if threads:
        faiss.omp_set_num_threads(threads)
    return True


def timed_batches(
    search, query_batches: list[np.ndarray], threads: int, passes: int = 2
) -> tuple[LoadResult, list]:
    """Run ``search`` over every batch ``passes`` times; keep the fastest pass (least disturbed
    by other processes) and the labels it returned."""
    best: LoadResult | None = None
    labels: list = []
    for _ in range(passes):
        cycle = iter(query_batches)
        out: list = []
        result = run_load(
            lambda: faiss_threads(threads) and out.append(search(next(cycle))[1]), requests=len(query_batches)
        )
        if best is None or result.seconds < best.seconds:
            best, labels = result, out
    assert best is not None
    return best, labels


def recall_at_k(found: list[np.ndarray], truth: list[np.ndarray]) -> float:
    hits = total = 0
    for f, t in zip(found, truth):
        for row_f, row_t in zip(f, t):
            hits += len(set(row_f[:K].tolist()) & set(row_t[:K].tolist()))
            total += K
    return hits / total


def ann_section(settings: Settings, data: np.ndarray, queries: np.ndarray) -> list[dict]:
    rows: list[dict] = []
    query_batches = batches(queries, 32)
    flat_cache: dict[int, tuple[LoadResult, list]] = {}
    for index_type in settings.ann_types:
        n = settings.hnsw_n if index_type == "hnsw" else settings.ann_n
        base = data[:n]
        if n not in flat_cache:
            flat_cache[n] = timed_batches(
                lambda q: faiss.knn(q, base, K, metric=faiss.METRIC_INNER_PRODUCT),
                query_batches,
                settings.threads,
                passes=1 if settings.quick else 2,
            )
            flat, _ = flat_cache[n]
            rows.append({**_row("2 ann", "flat (exact)", n, 32, flat), "recall@10": 1.0, "ratio": 1.0})
            scores, _ = faiss.knn(query_batches[0], base, K, metric=faiss.METRIC_INNER_PRODUCT)
            print(
                f"# data at n={n}: mean cosine of the 1st / 10th nearest neighbour "
                f"{scores[:, 0].mean():.3f} / {scores[:, K - 1].mean():.3f}",
                flush=True,
            )
        flat, truth = flat_cache[n]
        spec = (
            CollectionSpec("image", settings.dim, "ivf_flat", nlist=settings.nlist)
            if index_type == "ivf_flat"
            else CollectionSpec(
                "image",
                settings.dim,
                "hnsw",
                hnsw_m=settings.hnsw_m,
                ef_construction=settings.ef_construction,
            )
        )
        gc.collect()
        before = rss_mb()
        started = time.perf_counter()
        index = VectorIndex.build(spec, ids_for(n), base)
        build_s = time.perf_counter() - started
        gc.collect()
        mem = rss_mb() - before
        raw = index.raw_index
        if index_type == "ivf_flat":
            sweep = [("nprobe", p) for p in (1, 2, 4, 8, 16, 32, 64, 128) if p <= index.nlist]
            label = f"ivf_flat nlist={index.nlist}"
        else:
            sweep = [("efSearch", e) for e in (16, 32, 64, 128, 256)]
            label = f"hnsw M={settings.hnsw_m} efC={settings.ef_construction}"
        for number, (knob, value) in enumerate(sweep):
            params = (
                faiss.SearchParametersIVF(nprobe=value)
                if knob == "nprobe"
                else faiss.SearchParametersHNSW(efSearch=value)
            )
            result, found = timed_batches(
                lambda q: raw.search(q, K, params=params), query_batches, settings.threads
            )
            row = {
                **_row("2 ann", f"{label} {knob}={value}", n, 32, result),
                "recall@10": recall_at_k(found, truth),
                "ratio": flat.seconds / result.seconds,
            }
            if number == 0:
                row.update(build_s=build_s, mem_mb=mem)
            rows.append(row)
            if settings.quick and row["recall@10"] >= 0.99:
                break  # quick: slower settings would only confirm it
        index = raw = None  # free the index before the next one is built
        gc.collect()
    return rows


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    logging.getLogger("common.security").setLevel(logging.ERROR)  # no write-token warning here
    started = time.perf_counter()
    print(
        f"# indexer benchmark ({'quick' if settings.quick else 'full'}): {os.cpu_count()} cores, "
        f"FAISS {faiss.__version__} with {faiss.omp_get_max_threads()} threads, BLAS from "
        f"{faiss.cvar.distance_compute_blas_threshold} queries, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    total = max(settings.n, settings.ann_n if settings.ann_types else 0)
    generator = ClusteredData(total, settings.dim, settings.seed, settings.spread)
    data = generator.sample(total)
    queries = generator.sample(max(settings.queries, 32 * 16))
    print(
        f"# data: {total} x {settings.dim} clustered unit vectors ({time.perf_counter() - started:.1f}s)",
        flush=True,
    )
    rows, ratio_b32 = serving_overhead(settings, data, queries)
    print(f"# part 1 done ({time.perf_counter() - started:.1f}s)", flush=True)
    ann_rows = ann_section(settings, data, queries[: settings.queries]) if settings.ann_types else []
    rows += ann_rows
    print(
        "# qps = queries/s; ratio: part 1 = QPS / raw FAISS QPS at the same batch, "
        "part 2 = QPS / exact flat QPS on the same vectors; mem_mb = resident memory the index added"
    )
    print_table(rows, COLUMNS)
    candidates = [r for r in ann_rows if r["index"] != "flat (exact)"]
    good = [r for r in candidates if r["recall@10"] >= RECALL_TARGET]
    chosen = (
        max(good, key=lambda r: r["ratio"])
        if good
        else max(candidates, key=lambda r: r["recall@10"])
        if candidates
        else None
    )
    if chosen:
        print(f"# ANN figures from: {chosen['index']} at n={chosen['n']}")
    print(f"# load average now {os.getloadavg()[0]:.1f}; total {time.perf_counter() - started:.0f}s")
    recall = chosen["recall@10"] if chosen else float("nan")
    speedup = chosen["ratio"] if chosen else float("nan")
    print(f"RESULT grpc_vs_raw_b32={ratio_b32:.3f} ann_recall10={recall:.3f} ann_speedup={speedup:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
