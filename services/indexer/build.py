"""(Re)build one collection from the training pipeline's embeddings and write a snapshot that
the indexer loads at start-up. Other collections in the data directory are kept.

    python -m services.indexer.build --embeddings artifacts/current --data-dir run/indexer \
        [--collection image] [--type flat|ivf_flat|hnsw] [--metric ip|l2] \
        [--attributes attributes.csv | --prepared build/data] [--write-attributes out.csv]

Run it while the indexer for that data directory is stopped (the directory is locked).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from common.config import REPO_ROOT
from common.logs import setup_logging
from services.indexer.attributes import Attributes
from services.indexer.core import IndexStore, StoreOptions
from common.errors import ServiceError
from services.indexer.errors import IndexerError
from services.indexer.loader import (
    attributes_from_prepared,
    load_attributes_csv,
    load_embeddings,
    write_attributes_csv,
)
from services.indexer.spec import INDEX_TYPES, METRICS, CollectionSpec
from services.indexer.vector_index import DEFAULT_BLAS_THRESHOLD, VectorIndex, tune_faiss

log = logging.getLogger("services.indexer.build")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.indexer.build", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--embeddings",
        type=Path,
        required=True,
        help="artefact dir or file: <name>_embeddings.npy (+ _ids.json), .npz or .json",
    )
    parser.add_argument("--ids", type=Path, help="ids JSON for a .npy file (default: found beside it)")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / "run" / "indexer")
    parser.add_argument("--collection", default="image")
    parser.add_argument("--type", dest="index_type", choices=INDEX_TYPES, default="flat")
    parser.add_argument("--metric", choices=METRICS, default="ip")
    parser.add_argument("--nlist", type=int, default=0, help="IVF lists (0: about sqrt(n))")
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--m", type=int, default=32, help="HNSW links per node")
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--ef-search", type=int, default=64)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--attributes", type=Path, help="CSV: id,listing_id,category,price,location")
    source.add_argument("--prepared", type=Path, help="prepared data dir with images.csv + listings.csv")
    parser.add_argument("--write-attributes", type=Path, help="also write the joined attributes CSV here")
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def build(args: argparse.Namespace) -> dict:
    """Load, build, snapshot; returns a summary."""
    started = time.perf_counter()
    tune_faiss(DEFAULT_BLAS_THRESHOLD)
    embeddings = load_embeddings(args.embeddings, args.collection, args.ids)
    if not embeddings.ids:
        raise IndexerError(f"{args.embeddings}: no embeddings found")
    lookup: dict[str, Attributes] = {}
    if args.attributes:
        lookup = load_attributes_csv(args.attributes)
    elif args.prepared:
        lookup = attributes_from_prepared(args.prepared)
    if args.write_attributes:
        write_attributes_csv(lookup, args.write_attributes)
    attributes = [lookup.get(i, Attributes()) for i in embeddings.ids]
    without = sum(1 for i in embeddings.ids if i not in lookup)
    if lookup and without:
        log.warning("%d of %d embeddings have no attributes row", without, len(embeddings.ids))
    spec = CollectionSpec(
        args.collection,
        int(embeddings.vectors.shape[1]),
        args.index_type,
        args.metric,
        nlist=args.nlist,
        nprobe=args.nprobe,
        hnsw_m=args.m,
        ef_construction=args.ef_construction,
        ef_search=args.ef_search,
    )
    index = VectorIndex.build(spec, embeddings.ids, embeddings.vectors, attributes)
    built = time.perf_counter()
    store = IndexStore.open(args.data_dir, options=StoreOptions())
    try:
        store.replace_collection(index)
    finally:
        store.close(snapshot=False)
    return {
        "collection": spec.name,
        "count": index.count,
        "dimension": spec.dimension,
        "index_type": spec.index_type,
        "metric": spec.metric,
        "nlist": index.nlist,
        "with_attributes": len(embeddings.ids) - without if lookup else 0,
        "build_s": round(built - started, 2),
        "total_s": round(time.perf_counter() - started, 2),
        "data_dir": str(args.data_dir),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("indexer-build", args.log_level)
    try:
        summary = build(args)
    except (ServiceError, FileNotFoundError, ValueError) as exc:
        print(f"build failed: {exc}", file=sys.stderr)
        return 1
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
