"""Put the catalogue's photo vectors into the indexer shards, through gRPC.

    # precomputed embeddings exported with a model (embeddings/image_embeddings.npy + image_ids.json)
    python -m services.gateway.index_catalogue --db run/catalogue.sqlite3 \\
        --indexers 127.0.0.1:50052,127.0.0.1:50053 --artifact artifacts/current

    # or embed the prepared photos through a running embedder
    python -m services.gateway.index_catalogue --db run/catalogue.sqlite3 \\
        --indexers 127.0.0.1:50052 --prepared build/data --embedder 127.0.0.1:50051

Each vector is stored with its listing's attributes (listing id, main category, price, location)
on the listing's shard (`shards.shard_of`, the same routing the gateway uses), in batches, with a
progress bar. Photos that are not in the catalogue are skipped and counted. Upserts replace by
id, so running it again is harmless. ``--indexers`` defaults to ``INDEXER_ADDRS`` and the write
token to ``WRITE_TOKEN``, as for the gateway.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from common.config import REPO_ROOT, env_path, env_str
from services.gateway.catalogue import Catalogue
from services.gateway.config import (
    DEFAULT_EMBEDDER_ADDR,
    DEFAULT_INDEXER_ADDRS,
    RetryPolicy,
    embedder_target,
    parse_indexer_addrs,
)
from services.gateway.domain import GatewayError
from services.gateway.downstream import IMAGE_COLLECTION, Deadline, EmbedderClient, IndexerShards, IndexItem

EMBEDDINGS_DIR = "embeddings"
EMBEDDINGS_FILE = "image_embeddings.npy"
IDS_FILE = "image_ids.json"
BATCH_TIMEOUT_S = 120.0


@dataclass
class IndexReport:
    upserted: int = 0
    skipped_not_in_catalogue: int = 0
    per_shard: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0


def load_artifact_embeddings(artifact_dir: str | Path) -> tuple[list[str], np.ndarray]:
    """(image ids, float32 vectors) from ``<artifact>/embeddings/``."""
    folder = Path(artifact_dir) / EMBEDDINGS_DIR
    vectors_path, ids_path = folder / EMBEDDINGS_FILE, folder / IDS_FILE
    if not vectors_path.is_file() or not ids_path.is_file():
        raise FileNotFoundError(f"{folder} lacks {EMBEDDINGS_FILE} and {IDS_FILE}; export "
                                "embeddings with the model or use --prepared with --embedder")
    vectors = np.load(vectors_path, allow_pickle=False).astype(np.float32, copy=False)
    ids = json.loads(ids_path.read_text())
    if isinstance(ids, dict):
        ids = ids.get("image_ids") or ids.get("ids")
    if not isinstance(ids, list) or len(ids) != len(vectors) or vectors.ndim != 2:
        raise ValueError(f"{ids_path} and {vectors_path} disagree: {len(ids or [])} ids, "
                         f"vectors of shape {vectors.shape}")
    return [str(i) for i in ids], vectors


def embed_prepared(prepared_dir: str | Path, catalogue: Catalogue, embedder: EmbedderClient, *,
                   batch_size: int = 16, limit: int | None = None,
                   progress: bool = True) -> tuple[list[str], np.ndarray]:
    """Embed the catalogue's photos found in the prepared folder through the embedder."""
    prepared = Path(prepared_dir)
    images = pd.read_csv(prepared / "images.csv", dtype=str, keep_default_na=False)
    in_catalogue = {row.image_id for row in catalogue.image_rows()}
    rows = [(r.image_id, prepared / r.path) for r in images.itertuples(index=False)
            if r.image_id in in_catalogue and (prepared / r.path).is_file()]
    rows = rows[:limit] if limit is not None else rows
    ids: list[str] = []
    vectors: list[np.ndarray] = []
    with tqdm(total=len(rows), desc="embed", unit="photo", disable=not progress) as bar:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            vectors.append(embedder.embed([path.read_bytes() for _, path in batch],
                                          Deadline(BATCH_TIMEOUT_S)))
            ids += [image_id for image_id, _ in batch]
            bar.update(len(batch))
    return ids, (np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32))


def index_embeddings(catalogue: Catalogue, shards: IndexerShards, image_ids: Sequence[str],
                     vectors: np.ndarray, *, batch_size: int = 256, collection: str = IMAGE_COLLECTION,
                     progress: bool = True) -> IndexReport:
    """Upsert ``vectors`` (row i is photo ``image_ids[i]``) to the shards owning their listings."""
    started = time.perf_counter()
    report = IndexReport()
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    rows = catalogue.image_rows(image_ids)
    report.skipped_not_in_catalogue = len(position) - len(rows)
    by_shard: dict[int, list[IndexItem]] = {}
    for row in rows:
        by_shard.setdefault(shards.shard_for(row.listing_id), []).append(IndexItem(
            row.image_id, vectors[position[row.image_id]], row.listing_id, row.main_category,
            row.price, row.location))
    with tqdm(total=len(rows), desc="index", unit="vector", disable=not progress) as bar:
        for shard, items in sorted(by_shard.items()):
            for start in range(0, len(items), batch_size):
                batch = items[start:start + batch_size]
                shards.upsert(shard, batch, Deadline(BATCH_TIMEOUT_S), collection=collection)
                report.per_shard[shard] = report.per_shard.get(shard, 0) + len(batch)
                report.upserted += len(batch)
                bar.update(len(batch))
    report.seconds = time.perf_counter() - started
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.gateway.index_catalogue",
                                     description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path,
                        default=env_path("GATEWAY_DB", REPO_ROOT / "run" / "catalogue.sqlite3"))
    parser.add_argument("--indexers", default=env_str("INDEXER_ADDRS", DEFAULT_INDEXER_ADDRS),
                        help="comma-separated shard addresses, in shard order")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--artifact", type=Path, help="model artefact with embeddings/")
    source.add_argument("--prepared", type=Path, help="prepared data folder (embed its photos)")
    parser.add_argument("--embedder", default=env_str("EMBEDDER_ADDR", DEFAULT_EMBEDDER_ADDR),
                        help="embedder address, with --prepared")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--limit", type=int, default=None, help="with --prepared: embed at most N photos")
    parser.add_argument("--collection", default=IMAGE_COLLECTION)
    args = parser.parse_args(argv)

    policy = RetryPolicy(attempts=5, initial_backoff_s=0.2, max_backoff_s=2.0)
    shards = IndexerShards(parse_indexer_addrs(args.indexers), policy,
                           write_token=os.environ.get("WRITE_TOKEN") or None)
    try:
        with Catalogue.open(args.db) as catalogue:
            if args.artifact is not None:
                ids, vectors = load_artifact_embeddings(args.artifact)
            else:
                embedder = EmbedderClient(embedder_target(args.embedder), policy)
                try:
                    ids, vectors = embed_prepared(args.prepared, catalogue, embedder,
                                                  limit=args.limit)
                finally:
                    embedder.close()
            report = index_embeddings(catalogue, shards, ids, vectors, batch_size=args.batch_size,
                                      collection=args.collection)
    except (FileNotFoundError, ValueError, GatewayError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        shards.close()
    shards_text = ", ".join(f"shard {s}: {n:,}" for s, n in sorted(report.per_shard.items()))
    print(f"indexed {report.upserted:,} vectors ({shards_text}) in {report.seconds:.1f}s; "
          f"{report.skipped_not_in_catalogue:,} photos skipped (not in the catalogue)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
