"""The HTTP edge vs calling the gateway over gRPC directly: what the page's JSON costs.

    python -m benchmarks.web            # 30 s per cell in 3 rounds, about 5 minutes
    python -m benchmarks.web --quick    # about a minute

The stack runs as processes on loopback: ``python -m services.embedder`` (the newest trained
artefact under artifacts/, else the small test artefact), one indexer shard,
``python -m services.gateway`` and ``python -m services.web``. The catalogue is a slice of the
real marketplace data (``make_mini_prepared``: N listings per main category with all their
photos), embedded through the running embedder and indexed. Queries are real 512x512 photos of
those listings, one after another in a closed loop at each concurrency:

(g) gRPC direct   the gateway's Python client stub: ClassifyImage (top_k 1) and SearchByImage
                  (k = 10), the photo bytes in the request;
(e) edge          the same photo as a multipart upload over HTTP/1.1 keep-alive (httpx, one
                  client per thread) to ``POST /predict/image`` and ``POST /api/search/image``
                  (k = 10), JSON back; the edge makes the same gRPC call.

Each cell's measuring time is split into rounds in which (g) and (e) alternate, so both see
the same background load. The last line is
``RESULT edge_vs_grpc_p99=<the larger of the two endpoints' p99 (e) / p99 (g) at the top
concurrency> predict_p99_ratio=... search_p99_ratio=... edge_search_rps=...``; target <= 1.3.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from benchmarks._timing import WindowCell, closed_loop, cpu_name, load_line
from benchmarks.gateway import find_artifact
from scripts.stack import free_port, spawn, wait_ready

K = 10
OPERATIONS = ("predict", "search")


def start(name: str, env: dict[str, str], log_dir: Path):
    return spawn(name, free_port(), log_dir / f"{name}.log", {"LOG_LEVEL": "warning", **env})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.web",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="short cells, about a minute")
    parser.add_argument("--concurrency", default=None, help="levels, e.g. 1,8 (quick: 1,4)")
    parser.add_argument(
        "--per-category",
        type=int,
        default=None,
        help="catalogue listings per main category (quick: 4, else 20)",
    )
    parser.add_argument("--seconds", type=float, default=None, help="measuring time per cell")
    args = parser.parse_args(argv)
    levels = [int(x) for x in (args.concurrency or ("1,4" if args.quick else "1,8")).split(",")]
    warmup_s = 1.0 if args.quick else 3.0
    measure_s = args.seconds or (6.0 if args.quick else 30.0)
    rounds = 2 if args.quick else 3  # (g) and (e) alternate within each cell this many times
    per_category = args.per_category or (4 if args.quick else 20)
    started = time.perf_counter()

    import httpx

    from common.prepared_data import IMAGES_FILE, read_rows
    from services.gateway import index_catalogue
    from services.gateway.client import GatewayClient
    from marketplace.gateway.v1 import gateway_pb2
    from tests.gateway.gateway_data import make_mini_prepared

    artifact_dir, kind = find_artifact()
    print(f"web edge benchmark: model {artifact_dir.name} ({kind}), {cpu_name()}")
    print(f"before: {load_line()}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-web-") as tmp_name:
        tmp = Path(tmp_name)
        prepared = make_mini_prepared(tmp / "prepared", per_category=per_category)
        db_path = tmp / "catalogue.sqlite3"
        services = []
        try:
            embedder = start(
                "embedder", {"EMBEDDER_ARTIFACT_DIR": str(artifact_dir), "EMBEDDER_TEXT_MODEL": "off"}, tmp
            )
            services.append(embedder)
            indexer = start(
                "indexer",
                {
                    "INDEXER_DATA_DIR": str(tmp / "indexer"),
                    "INDEXER_COLLECTIONS": "image:1280:flat:ip",
                    "INDEXER_FSYNC": "false",
                },
                tmp,
            )
            services.append(indexer)
            gateway = start(
                "gateway",
                {
                    "GATEWAY_DB": str(db_path),
                    "GATEWAY_BOOTSTRAP_DIR": str(prepared),
                    "EMBEDDER_ADDR": embedder.address,
                    "INDEXER_ADDRS": indexer.address,
                    "IMAGE_STORE_DIR": str(tmp / "images"),
                },
                tmp,
            )
            services.append(gateway)
            edge = start(
                "web", {"GATEWAY_ADDR": gateway.address, "IMAGE_STORE_DIR": str(tmp / "images")}, tmp
            )
            services.append(edge)
            for service in services:
                wait_ready(service, 300)
            code = index_catalogue.main(
                [
                    "--db",
                    str(db_path),
                    "--indexers",
                    indexer.address,
                    "--prepared",
                    str(prepared),
                    "--embedder",
                    embedder.address,
                ]
            )
            assert code == 0, "indexing the catalogue failed"
            images = read_rows(prepared, IMAGES_FILE, required=("product_id", "path"))
            photos = [Path(row["path"]).read_bytes() for row in images[::3]][:32]
            print(
                f"catalogue: {len({row['product_id'] for row in images})} listings, {len(images)} photos "
                f"(real embeddings); {len(photos)} query photos; set-up "
                f"{time.perf_counter() - started:.0f} s",
                flush=True,
            )

            gateway_client = GatewayClient(gateway.address, timeout=60)
            stub = gateway_client.stub
            classify = [gateway_pb2.ClassifyImageRequest(image=p, top_k=1) for p in photos]
            search = [gateway_pb2.SearchByImageRequest(image=p, k=K) for p in photos]
            local = threading.local()

            def http() -> httpx.Client:
                if not hasattr(local, "client"):
                    local.client = httpx.Client(base_url=f"http://{edge.address}", timeout=60)
                return local.client

            def upload(path: str, i: int, params: dict | None = None) -> None:
                reply = http().post(
                    path, params=params, files={"image": ("photo.jpg", photos[i % len(photos)], "image/jpeg")}
                )
                reply.raise_for_status()

            def grpc_classify(_worker: int, i: int) -> None:
                stub.ClassifyImage(classify[i % len(photos)], timeout=60)

            def grpc_search(_worker: int, i: int) -> None:
                stub.SearchByImage(search[i % len(photos)], timeout=60)

            calls = {
                ("predict", "g"): grpc_classify,
                ("predict", "e"): lambda _w, i: upload("/predict/image", i),
                ("search", "g"): grpc_search,
                ("search", "e"): lambda _w, i: upload("/api/search/image", i, {"k": K}),
            }
            first = (
                http()
                .post(
                    "/api/search/image", params={"k": K}, files={"image": ("p.jpg", photos[0], "image/jpeg")}
                )
                .json()
            )
            assert len(first["results"]) == K, first
            cells: dict[tuple[str, str, int], WindowCell] = {}
            for level in levels:
                for operation in OPERATIONS:
                    for round_number in range(rounds):
                        for path in ("g", "e"):
                            cell = closed_loop(calls[operation, path], level, warmup_s, measure_s / rounds)
                            print(
                                f"  {operation:7s} {'gRPC' if path == 'g' else 'edge':4s} "
                                f"c={level} round {round_number + 1}: {cell.per_s:6.1f} req/s, "
                                f"p99 {cell.percentile(99):7.1f} ms",
                                flush=True,
                            )
                            key = operation, path, level
                            if key in cells:  # rounds merged: mean rate, all latencies
                                previous = cells[key]
                                cell = WindowCell(
                                    (previous.per_s * round_number + cell.per_s) / (round_number + 1),
                                    previous.latencies_ms + cell.latencies_ms,
                                )
                            cells[key] = cell
            gateway_client.close()
        finally:
            for service in reversed(services):
                service.stop(30)

    print(
        f"\nrequests/s and latency (ms), {measure_s:g} s per cell in {rounds} alternating "
        f"rounds ({warmup_s:g} s warm-up each); "
        "(g) gRPC client -> gateway, (e) HTTP client -> edge -> gateway"
    )
    header = (
        f"{'endpoint':>26} {'conc':>4} | {'(g) req/s':>9} {'p50':>7} {'p99':>7} | "
        f"{'(e) req/s':>9} {'p50':>7} {'p99':>7} | {'p99 e/g':>7} {'rps e/g':>7}"
    )
    print(header)
    print("-" * len(header))
    names = {"predict": "POST /predict/image", "search": "POST /api/search/image"}
    for operation in OPERATIONS:
        for level in levels:
            g, e = cells[operation, "g", level], cells[operation, "e", level]
            print(
                f"{names[operation]:>26} {level:>4} | {g.per_s:>9.1f} {g.percentile(50):>7.1f} "
                f"{g.percentile(99):>7.1f} | {e.per_s:>9.1f} {e.percentile(50):>7.1f} "
                f"{e.percentile(99):>7.1f} | {e.percentile(99) / g.percentile(99):>7.2f} "
                f"{e.per_s / g.per_s:>7.2f}"
            )
    top = max(levels)
    ratios = {
        op: cells[op, "e", top].percentile(99) / cells[op, "g", top].percentile(99) for op in OPERATIONS
    }
    worst = max(ratios.values())
    print(
        f"target: p99 through the edge within 1.3x of gRPC direct at concurrency {top}: "
        f"{'met' if worst <= 1.3 else 'NOT met'} ({worst:.2f}x)"
    )
    print(f"after: {load_line()}; total {time.perf_counter() - started:.0f} s")
    print(
        f"RESULT edge_vs_grpc_p99={worst:.2f} predict_p99_ratio={ratios['predict']:.2f} "
        f"search_p99_ratio={ratios['search']:.2f} "
        f"edge_search_rps={cells['search', 'e', top].per_s:.1f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
