"""Indexer settings: environment variables, overridden by command-line flags.

Collections
    ``INDEXER_COLLECTIONS`` (default ``image:1280:flat:ip,text:384:flat:ip``) lists the named
    vector spaces as ``name:dim[:type[:metric[:key=value...]]]``, comma-separated; type is
    ``flat`` (exact, default), ``ivf_flat`` or ``hnsw``; metric ``ip`` (cosine: vectors are
    normalised) or ``l2``; options ``nlist``, ``nprobe``, ``m``, ``ef_construction``,
    ``ef_search``, ``normalize`` (see ``spec.py``). Configured collections are created empty on
    first start. Collections already in the data directory (e.g. written by
    ``python -m services.indexer.build``) are kept as stored: when the variable is set explicitly,
    a stored collection with another dimension or metric refuses start-up; the built-in default
    never overrides what is stored.
    ``INDEXER_AUTO_CREATE`` (default false): when true, an Upsert into an unknown collection
    creates it (flat, ip, dimension of the first vector). Off by default so that a typo in a
    collection name is a NOT_FOUND rather than a new, silently separate index. An empty
    collection name in a request means "image".

Durability
    ``INDEXER_DATA_DIR`` / ``--data-dir`` (default ``run/indexer``) holds the snapshot and WAL.
    ``INDEXER_SNAPSHOT_SECONDS`` (300): snapshot at most this often when something changed;
    ``INDEXER_SNAPSHOT_WAL_RECORDS`` (10000) / ``INDEXER_SNAPSHOT_WAL_MB`` (1024): snapshot
    as soon as the WAL holds this much. A final snapshot is written on SIGTERM/SIGINT.
    ``INDEXER_FSYNC`` (true): fsync the WAL before replying; false only for throwaway data.
    ``INDEXER_COMPACT_DEAD_FRACTION`` (0.3): compact a collection at snapshot time when this
    fraction of its slots is dead (deleted or replaced).

Replicas (``services.indexer.replication``, design in ``docs/indexer-replication.md``)
    ``INDEXER_SHARD`` [--shard] (unset) / ``INDEXER_PARTITIONS`` [--partitions] (256): the
    shard this replica's data belongs to and the cluster's number of logical partitions (fixed
    when the cluster is created); recorded in the data directory at first start, and a directory
    of another shard or partition count is refused, naming both.
    ``INDEXER_PEERS`` [--peers] (unset): comma list of the other replicas of the same shard. With
    peers, the replica reports NOT_SERVING and answers reads with UNAVAILABLE until it has caught
    up from a serving peer (its snapshot plus the WAL records after it); writes are accepted
    meanwhile. Without peers it serves its own data at once.

Limits
    ``INDEXER_MAX_BATCH`` (1024) items/queries/ids per request, ``INDEXER_MAX_K`` (1000),
    ``INDEXER_MAX_MESSAGE_MB`` (64) for received and sent messages.
    ``INDEXER_FAISS_THREADS`` (1; 0 = FAISS default, one per core) OpenMP threads per request.
    One: a search of one query vector does not parallelise, and a team per gRPC thread would
    only wake (and spin) idle threads on cores the embedder needs.
    ``INDEXER_BLAS_THRESHOLD`` (20): batches of at least this many queries use BLAS for exact
    distances (FAISS 1.15's own default, 128000, is several times slower for batched search).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from common.config import ConfigError, REPO_ROOT, env_bool, env_float, env_int, env_path, env_str
from common.serving import MiB, ServerLimits
from services.indexer.errors import InvalidArgument
from services.indexer.spec import CollectionSpec, parse_collections

DEFAULT_COLLECTIONS = "image:1280:flat:ip,text:384:flat:ip"


@dataclass(frozen=True)
class IndexerConfig:
    host: str
    port: int
    data_dir: Path
    log_level: str
    collections: tuple[CollectionSpec, ...] = field(default_factory=lambda: tuple(parse_collections(DEFAULT_COLLECTIONS)))
    collections_explicit: bool = False
    auto_create: bool = False
    snapshot_seconds: float = 300.0
    snapshot_wal_records: int = 10_000
    snapshot_wal_bytes: int = 1024 * MiB
    fsync: bool = True
    compact_dead_fraction: float = 0.3
    max_batch: int = 1024
    max_k: int = 1000
    max_message_bytes: int = 64 * MiB
    faiss_threads: int = 1
    blas_threshold: int = 20
    shard: int = -1
    partitions: int = 0
    peers: tuple[str, ...] = ()

    @property
    def limits(self) -> ServerLimits:
        return ServerLimits(max_receive_bytes=self.max_message_bytes, max_send_bytes=self.max_message_bytes)

    @classmethod
    def from_env(cls, argv: list[str] | None = None) -> "IndexerConfig":
        parser = argparse.ArgumentParser(prog="python -m services.indexer",
                                         description="FAISS kNN index service")
        parser.add_argument("--host", default=env_str("INDEXER_HOST", "0.0.0.0"))
        parser.add_argument("--port", type=int, default=env_int("INDEXER_PORT", 50052, minimum=0))
        parser.add_argument("--data-dir", type=Path,
                            default=env_path("INDEXER_DATA_DIR", REPO_ROOT / "run" / "indexer"))
        parser.add_argument("--collections", default=os.environ.get("INDEXER_COLLECTIONS") or None,
                            help=f"name:dim[:type[:metric]],... (default {DEFAULT_COLLECTIONS})")
        parser.add_argument("--snapshot-seconds", type=float,
                            default=env_float("INDEXER_SNAPSHOT_SECONDS", 300.0, minimum=0))
        parser.add_argument("--log-level", default=env_str("LOG_LEVEL", "info"))
        parser.add_argument("--shard", type=int, default=env_int("INDEXER_SHARD", -1, minimum=-1))
        parser.add_argument("--partitions", type=int,
                            default=env_int("INDEXER_PARTITIONS", 256, minimum=1))
        parser.add_argument("--peers", default=env_str("INDEXER_PEERS", ""),
                            help="other replicas of this shard, host:port,host:port")
        args = parser.parse_args(argv)
        if args.shard >= args.partitions:
            raise ConfigError(f"INDEXER_SHARD={args.shard} must be below INDEXER_PARTITIONS="
                              f"{args.partitions} (a shard owns at least one partition)")
        peers = tuple(p.strip() for p in args.peers.split(",") if p.strip())
        try:
            collections = tuple(parse_collections(args.collections or DEFAULT_COLLECTIONS))
        except InvalidArgument as exc:
            raise ConfigError(f"INDEXER_COLLECTIONS: {exc}") from None
        fraction = env_float("INDEXER_COMPACT_DEAD_FRACTION", 0.3, minimum=0.0)
        return cls(
            host=args.host, port=args.port, data_dir=args.data_dir, log_level=args.log_level,
            collections=collections, collections_explicit=args.collections is not None,
            auto_create=env_bool("INDEXER_AUTO_CREATE", False),
            snapshot_seconds=args.snapshot_seconds,
            snapshot_wal_records=env_int("INDEXER_SNAPSHOT_WAL_RECORDS", 10_000, minimum=0),
            snapshot_wal_bytes=env_int("INDEXER_SNAPSHOT_WAL_MB", 1024, minimum=0) * MiB,
            fsync=env_bool("INDEXER_FSYNC", True),
            compact_dead_fraction=fraction,
            max_batch=env_int("INDEXER_MAX_BATCH", 1024, minimum=1),
            max_k=env_int("INDEXER_MAX_K", 1000, minimum=1),
            max_message_bytes=env_int("INDEXER_MAX_MESSAGE_MB", 64, minimum=1) * MiB,
            faiss_threads=env_int("INDEXER_FAISS_THREADS", 1, minimum=0),
            blas_threshold=env_int("INDEXER_BLAS_THRESHOLD", 20, minimum=1),
            shard=args.shard, partitions=args.partitions if args.shard >= 0 else 0, peers=peers,
        )
