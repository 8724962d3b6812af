"""Put the catalogue's photo vectors (and listing text vectors) into the indexer shards, through gRPC.

    # precomputed embeddings exported with a model (embeddings/image_embeddings.npy + image_ids.json)
    python -m services.gateway.index_catalogue --db run/catalogue.sqlite3 \\
        --indexers 127.0.0.1:50052,127.0.0.1:50053 --artifact artifacts/current

    # or embed the prepared photos through a running embedder
    python -m services.gateway.index_catalogue --db run/catalogue.sqlite3 \\
        --indexers 127.0.0.1:50052 --prepared build/data --embedder 127.0.0.1:50051

Each vector is stored with its listing's attributes (listing id, main category, price, location)
on the listing's shard (`shards.shard_of`, the same routing the gateway uses), in batches, with a
progress bar. Photos that are not in the catalogue are skipped and counted. Upserts replace by
id, so running it again is harmless. ``--indexers`` defaults to ``INDEXER_ADDRS``
(``--shards`` / ``INDEXER_SHARDS`` for replicas: every replica gets the writes;
by the shard map in the catalogue database when it holds one, as the gateways do; with
``--shard-map on`` / ``GATEWAY_SHARD_MAP=on`` an empty one gets version 1) and the write token to
``WRITE_TOKEN`` (or ``WRITE_TOKEN_FILE``), as for the gateway.

Text (``--text auto|on|off``, default auto): the "text" collection gets one vector per catalogue
listing (item id = listing id), from ``<artefact>/embeddings/text_embeddings.npy`` +
``text_ids.json`` (written by ``python -m training.text``) when ``--artifact`` has them, else by
calling the embedder's EmbedText on ``common.text.listing_text(title, description)`` of every
catalogue listing. ``auto`` skips text (with a note) when neither is possible; ``on`` fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.artifact import EMBEDDINGS_DIR, TEXT_EMBEDDINGS_FILE, read_image_embeddings, read_text_embeddings
from common.config import Settings
from common.listing_text import listing_text
from common.prepared_data import IMAGES_FILE, read_rows
from common.security import TLS_CLIENT_SETTINGS, WRITE_TOKEN_SETTINGS, TlsFiles
from services.gateway.catalogue import Catalogue
from services.gateway.config import DB_FIELDS, GATEWAY_SETTINGS, RetryPolicy, embedder_target
from services.gateway.domain import ServiceError
from services.gateway.downstream import (
    IMAGE_COLLECTION,
    TEXT_COLLECTION,
    Deadline,
    EmbedderClient,
    IndexerShards,
    IndexItem,
)
from services.gateway.tools import ToolSetupError, open_catalogue_and_shards

TEXT_MODES = ("auto", "on", "off")
BATCH_TIMEOUT_S = 120.0


@dataclass
class IndexReport:
    upserted: int = 0
    skipped_not_in_catalogue: int = 0
    per_shard: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0


def embed_catalogue_texts(
    catalogue: Catalogue, embedder: EmbedderClient, *, batch_size: int = 128, progress: bool = True
) -> tuple[list[str], np.ndarray]:
    """Embed ``listing_text(title, description)`` of every catalogue listing through EmbedText
    (listings whose text is empty are skipped)."""
    all_ids = catalogue.listing_ids()
    ids: list[str] = []
    vectors: list[np.ndarray] = []
    with tqdm(total=len(all_ids), desc="embed text", unit="listing", disable=not progress) as bar:
        for start in range(0, len(all_ids), batch_size):
            chunk = all_ids[start : start + batch_size]
            listings = catalogue.get_many(chunk)
            texts = {
                i: listing_text(listings[i].title, listings[i].description) for i in chunk if i in listings
            }
            texts = {i: text for i, text in texts.items() if text}
            if texts:
                vectors.append(embedder.embed_text(list(texts.values()), Deadline(BATCH_TIMEOUT_S)))
                ids += list(texts)
            bar.update(len(chunk))
    return ids, (np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32))


def index_text_embeddings(
    catalogue: Catalogue,
    shards: IndexerShards,
    listing_ids: Sequence[str],
    vectors: np.ndarray,
    *,
    batch_size: int = 256,
    collection: str = TEXT_COLLECTION,
    progress: bool = True,
) -> IndexReport:
    """Upsert text ``vectors`` (row i is listing ``listing_ids[i]``; item id = listing id) to the
    shards owning those listings; listings not in the catalogue are skipped and counted."""
    started = time.perf_counter()
    position = {listing_id: i for i, listing_id in enumerate(listing_ids)}
    listings = catalogue.get_many(position)
    items = [
        IndexItem(
            listing_id,
            vectors[position[listing_id]],
            listing_id,
            listing.main_category,
            listing.price,
            listing.location,
        )
        for listing_id, listing in ((i, listings.get(i)) for i in position)
        if listing is not None
    ]
    return _upsert_by_shard(
        shards,
        items,
        len(position) - len(listings),
        batch_size=batch_size,
        collection=collection,
        desc="index text",
        progress=progress,
        started=started,
    )


def _upsert_by_shard(
    shards: IndexerShards,
    items: Sequence[IndexItem],
    skipped: int,
    *,
    batch_size: int,
    collection: str,
    desc: str,
    progress: bool,
    started: float,
) -> IndexReport:
    """Upsert ``items`` in batches to the shard owning each one's listing, shard by shard."""
    report = IndexReport(skipped_not_in_catalogue=skipped)
    by_shard: dict[int, list[IndexItem]] = {}
    for item in items:
        by_shard.setdefault(shards.shard_for(item.listing_id), []).append(item)
    with tqdm(total=len(items), desc=desc, unit="vector", disable=not progress) as bar:
        for shard, shard_items in sorted(by_shard.items()):
            for start in range(0, len(shard_items), batch_size):
                batch = shard_items[start : start + batch_size]
                shards.upsert(shard, batch, Deadline(BATCH_TIMEOUT_S), collection=collection)
                report.per_shard[shard] = report.per_shard.get(shard, 0) + len(batch)
                report.upserted += len(batch)
                bar.update(len(batch))
    report.seconds = time.perf_counter() - started
    return report


def text_vectors(
    mode: str, artifact_dir: Path | None, catalogue: Catalogue, embedder_addr: str, policy: RetryPolicy
) -> tuple[list[str], np.ndarray] | str:
    """The text vectors to index for ``--text mode``: from the artefact, else through the
    embedder's EmbedText; or, when there are none, the reason (a string). ``on`` raises instead
    of returning a reason."""
    if mode == "off":
        return "--text off"
    if artifact_dir is not None:
        loaded = read_text_embeddings(artifact_dir)
        if loaded is not None:
            return loaded
    embedder = EmbedderClient(embedder_target(embedder_addr), policy)
    try:
        try:
            info = embedder.model_info(Deadline(30))
        except ServiceError as exc:
            if mode == "on":
                raise
            return f"no text embeddings in the artefact and the embedder is not reachable: {exc}"
        if "text" not in info.modalities:
            reason = (
                f"the embedder at {embedder_addr} serves no text model (EMBEDDER_TEXT_MODEL) "
                f"and the artefact has no {EMBEDDINGS_DIR}/{TEXT_EMBEDDINGS_FILE}"
            )
            if mode == "on":
                raise ValueError(reason)
            return reason
        return embed_catalogue_texts(catalogue, embedder)
    finally:
        embedder.close()


def embed_prepared(
    prepared_dir: str | Path,
    catalogue: Catalogue,
    embedder: EmbedderClient,
    *,
    batch_size: int = 16,
    limit: int | None = None,
    progress: bool = True,
) -> tuple[list[str], np.ndarray]:
    """Embed the catalogue's photos found in the prepared folder through the embedder."""
    prepared = Path(prepared_dir)
    images = read_rows(prepared, IMAGES_FILE, required=("image_id", "path"))
    in_catalogue = {row.image_id for row in catalogue.image_rows()}
    rows = [
        (r["image_id"], prepared / r["path"])
        for r in images
        if r["image_id"] in in_catalogue and (prepared / r["path"]).is_file()
    ]
    rows = rows[:limit] if limit is not None else rows
    ids: list[str] = []
    vectors: list[np.ndarray] = []
    with tqdm(total=len(rows), desc="embed", unit="photo", disable=not progress) as bar:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            vectors.append(
                embedder.embed([path.read_bytes() for _, path in batch], Deadline(BATCH_TIMEOUT_S))
            )
            ids += [image_id for image_id, _ in batch]
            bar.update(len(batch))
    return ids, (np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32))


def index_embeddings(
    catalogue: Catalogue,
    shards: IndexerShards,
    image_ids: Sequence[str],
    vectors: np.ndarray,
    *,
    batch_size: int = 256,
    collection: str = IMAGE_COLLECTION,
    progress: bool = True,
) -> IndexReport:
    """Upsert ``vectors`` (row i is photo ``image_ids[i]``) to the shards owning their listings."""
    started = time.perf_counter()
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    rows = catalogue.image_rows(image_ids)
    items = [
        IndexItem(
            row.image_id,
            vectors[position[row.image_id]],
            row.listing_id,
            row.main_category,
            row.price,
            row.location,
        )
        for row in rows
    ]
    return _upsert_by_shard(
        shards,
        items,
        len(position) - len(rows),
        batch_size=batch_size,
        collection=collection,
        desc="index",
        progress=progress,
        started=started,
    )


#: What the command reads, declared with the gateway's settings (same variables, same flags).
INDEX_CATALOGUE_SETTINGS = Settings(
    *(
        GATEWAY_SETTINGS[name]
        for name in (
            *DB_FIELDS,
            "indexer_addrs",
            "indexer_shards",
            "shard_map",
            "partitions",
            "embedder_addr",
        )
    ),
    *WRITE_TOKEN_SETTINGS,
    *TLS_CLIENT_SETTINGS,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.gateway.index_catalogue",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--artifact", type=Path, help="model artefact with embeddings/")
    source.add_argument("--prepared", type=Path, help="prepared data folder (embed its photos)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--limit", type=int, default=None, help="with --prepared: embed at most N photos")
    parser.add_argument("--collection", default=IMAGE_COLLECTION)
    parser.add_argument(
        "--text",
        choices=TEXT_MODES,
        default="auto",
        help='also fill the "text" collection: auto (if text vectors can be had), on (fail if not), off',
    )
    args = INDEX_CATALOGUE_SETTINGS.add_flags(parser).parse_args(argv)
    settings = INDEX_CATALOGUE_SETTINGS.read(args)
    # the embedder: with --prepared, and for text without precomputed text embeddings
    args.embedder, args.db = settings["embedder_addr"], settings["db_path"]

    policy = RetryPolicy(attempts=5, initial_backoff_s=0.2, max_backoff_s=2.0)
    tls = TlsFiles.from_values(settings)
    try:
        catalogue, shards = open_catalogue_and_shards(settings, policy, tls)
    except ToolSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with catalogue:
            if args.artifact is not None:
                ids, vectors = read_image_embeddings(args.artifact)
            else:
                embedder = EmbedderClient(embedder_target(args.embedder), policy, tls=tls)
                try:
                    ids, vectors = embed_prepared(args.prepared, catalogue, embedder, limit=args.limit)
                finally:
                    embedder.close()
            report = index_embeddings(
                catalogue, shards, ids, vectors, batch_size=args.batch_size, collection=args.collection
            )
            texts = text_vectors(args.text, args.artifact, catalogue, args.embedder, policy)
            text_report = None
            if not isinstance(texts, str):
                text_report = index_text_embeddings(catalogue, shards, *texts, batch_size=args.batch_size)
    except (FileNotFoundError, ValueError, ServiceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        shards.close()
    shards_text = ", ".join(f"shard {s}: {n:,}" for s, n in sorted(report.per_shard.items()))
    print(
        f"indexed {report.upserted:,} vectors ({shards_text}) in {report.seconds:.1f}s; "
        f"{report.skipped_not_in_catalogue:,} photos skipped (not in the catalogue)"
    )
    if text_report is None:
        print(f"text not indexed: {texts}")
    else:
        shards_text = ", ".join(f"shard {s}: {n:,}" for s, n in sorted(text_report.per_shard.items()))
        print(
            f"indexed {text_report.upserted:,} listing text vectors ({shards_text}) in "
            f"{text_report.seconds:.1f}s; {text_report.skipped_not_in_catalogue:,} listings "
            "skipped (not in the catalogue)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
