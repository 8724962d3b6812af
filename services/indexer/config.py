"""Indexer settings, each declared once in `INDEXER_SETTINGS` (variable, flag, type, default,
bounds, help; `common.config`): environment variables, overridden by command-line flags. The
defaults are in the declarations and the README's configuration table; here is why they are so.

Collections
    ``INDEXER_COLLECTIONS``: configured collections are created empty on first start.
    Collections already in the data directory (e.g. written by ``python -m
    services.indexer.build``) are kept as stored: when the variable is set explicitly, a stored
    collection with another dimension or metric refuses start-up; the built-in default never
    overrides what is stored. ``INDEXER_AUTO_CREATE`` is off so that a typo in a collection name
    is a NOT_FOUND rather than a new, silently separate index (on: flat, ip, the dimension of the
    first vector). An empty collection name in a request means "image".

Durability
    A snapshot is written after ``INDEXER_SNAPSHOT_SECONDS`` when something changed, as soon as
    the WAL holds ``INDEXER_SNAPSHOT_WAL_RECORDS`` / ``INDEXER_SNAPSHOT_WAL_MB``, and on
    SIGTERM/SIGINT.

Replicas (``services.indexer.replication``, design in ``docs/indexer-replication.md``)
    ``INDEXER_SHARD`` / ``INDEXER_PARTITIONS`` are recorded in the data directory at first start,
    and a directory of another shard or partition count is refused, naming both. With
    ``INDEXER_PEERS`` the replica reports NOT_SERVING and answers reads with UNAVAILABLE until it
    has caught up from a serving peer (its snapshot plus the WAL records after it); writes are
    accepted meanwhile. Without peers it serves its own data at once.

Limits
    ``INDEXER_FAISS_THREADS`` is 1: a search of one query vector does not parallelise, and a team
    per gRPC thread would only wake (and spin) idle threads on cores the embedder needs.
    ``INDEXER_BLAS_THRESHOLD`` is 20: FAISS 1.15's own default, 128000, is several times slower
    for batched search.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import INDEXER_PARTITIONS, LOG_LEVEL, REPO_ROOT, ConfigError, Setting, merged
from common.metrics import DEFAULT_PORTS as DEFAULT_METRICS_PORTS
from common.security import (
    TLS_CLIENT_SETTINGS,
    TLS_SERVER_SETTINGS,
    WRITE_TOKEN_SETTINGS,
    TlsFiles,
    resolve_write_token,
    write_token,
)
from common.serving import MiB, ServerLimits
from services.indexer.errors import InvalidArgument
from services.indexer.spec import CollectionSpec, parse_collections

DEFAULT_COLLECTIONS = "image:1280:flat:ip,text:384:flat:ip"


def collections_setting(raw: str) -> tuple[CollectionSpec, ...]:
    """``INDEXER_COLLECTIONS`` parsed; a bad spec is a ConfigError naming the variable."""
    try:
        return tuple(parse_collections(raw))
    except InvalidArgument as exc:
        raise ConfigError(f"INDEXER_COLLECTIONS: {exc}") from None


def peers_setting(raw: str) -> tuple[str, ...]:
    """``INDEXER_PEERS``: ``host:port,host:port`` -> the targets."""
    return tuple(p.strip() for p in raw.split(",") if p.strip())


INDEXER_SETTINGS = merged(
    (
        Setting("INDEXER_HOST", "host", default="0.0.0.0", help="interface to listen on"),
        Setting(
            "INDEXER_PORT",
            "port",
            int,
            50052,
            minimum=0,
            maximum=65535,
            help="listening port (0: any free port)",
        ),
        Setting(
            "INDEXER_DATA_DIR",
            "data_dir",
            Path,
            REPO_ROOT / "run" / "indexer",
            help="snapshot + write-ahead log",
        ),
        Setting(
            "INDEXER_COLLECTIONS",
            "collections",
            parse=collections_setting,
            shown=f"`{DEFAULT_COLLECTIONS}`",
            help="the named vector spaces, `name:dim[:type[:metric[:key=value...]]]`, "
            "comma-separated; type flat/ivf_flat/hnsw, metric ip/l2 (see `spec.py`). "
            "Created empty on first start; when set, a stored collection of another "
            "dimension or metric refuses start-up (the built-in default never overrides "
            "what is stored)",
        ),
        Setting(
            "INDEXER_AUTO_CREATE",
            "auto_create",
            bool,
            False,
            help="an Upsert into an unknown collection creates it (off: a typo is NOT_FOUND)",
        ),
        Setting(
            "INDEXER_SNAPSHOT_SECONDS",
            "snapshot_seconds",
            float,
            300.0,
            minimum=0,
            help="snapshot at most this often when something changed",
        ),
        Setting(
            "INDEXER_SNAPSHOT_WAL_RECORDS",
            "snapshot_wal_records",
            int,
            10_000,
            minimum=0,
            help="snapshot as soon as the WAL holds this many records",
        ),
        Setting(
            "INDEXER_SNAPSHOT_WAL_MB",
            "snapshot_wal_bytes",
            int,
            1024,
            minimum=0,
            scale=MiB,
            flag="--snapshot-wal-mb",
            help="snapshot as soon as the WAL holds this many MiB",
        ),
        Setting(
            "INDEXER_FSYNC",
            "fsync",
            bool,
            True,
            help="fsync the WAL before replying (false only for throwaway data)",
        ),
        Setting(
            "INDEXER_COMPACT_DEAD_FRACTION",
            "compact_dead_fraction",
            float,
            0.3,
            minimum=0.0,
            help="compact a collection at snapshot time when this fraction of its slots is dead",
        ),
        Setting(
            "INDEXER_MAX_BATCH",
            "max_batch",
            int,
            1024,
            minimum=1,
            help="most items, queries or ids in one request",
        ),
        Setting("INDEXER_MAX_K", "max_k", int, 1000, minimum=1, help="largest k of a Search"),
        Setting(
            "INDEXER_MAX_MESSAGE_MB",
            "max_message_bytes",
            int,
            64,
            minimum=1,
            scale=MiB,
            flag="--max-message-mb",
            help="largest message received or sent, in MiB",
        ),
        Setting(
            "INDEXER_FAISS_THREADS",
            "faiss_threads",
            int,
            1,
            minimum=0,
            help="OpenMP threads per search (0: one per core); the indexer also sets "
            "`OMP_WAIT_POLICY=PASSIVE` unless set, so idle OpenMP threads sleep instead of "
            "spinning on the embedder's cores",
        ),
        Setting(
            "INDEXER_BLAS_THRESHOLD",
            "blas_threshold",
            int,
            20,
            minimum=1,
            help="batches of at least this many queries use BLAS for exact distances",
        ),
        Setting(
            "INDEXER_SHARD",
            "shard",
            int,
            -1,
            minimum=-1,
            shown="unset",
            help="which shard this replica holds (refuses another shard's data)",
        ),
        INDEXER_PARTITIONS,
        Setting(
            "INDEXER_PEERS",
            "peers",
            parse=peers_setting,
            default=(),
            shown="unset",
            help="the other replicas of this shard, `host:port,host:port`, to catch up from before serving",
        ),
        Setting(
            "INDEXER_METRICS_PORT",
            "metrics_port",
            int,
            DEFAULT_METRICS_PORTS["indexer"],
            minimum=0,
            maximum=65535,
            help="HTTP port of the Prometheus /metrics endpoint (0: metrics off)",
        ),
        LOG_LEVEL,
    ),
    WRITE_TOKEN_SETTINGS,
    TLS_SERVER_SETTINGS,
    TLS_CLIENT_SETTINGS,
)
_default = INDEXER_SETTINGS.default


@dataclass(frozen=True)
class IndexerConfig:
    """Everything the indexer needs; ``from_env`` reads flags and env (`INDEXER_SETTINGS`),
    tests build it directly (`local` for an in-process server on a free loopback port).

    ``partitions`` is 0 for an indexer that is no shard's replica (``INDEXER_SHARD`` unset);
    ``collections_explicit`` says the collections were configured rather than the default.
    """

    host: str = _default("host")
    port: int = _default("port")
    data_dir: Path = _default("data_dir")
    log_level: str = _default("log_level")
    collections: tuple[CollectionSpec, ...] = field(
        default_factory=lambda: collections_setting(DEFAULT_COLLECTIONS)
    )
    collections_explicit: bool = False
    auto_create: bool = _default("auto_create")
    snapshot_seconds: float = _default("snapshot_seconds")
    snapshot_wal_records: int = _default("snapshot_wal_records")
    snapshot_wal_bytes: int = _default("snapshot_wal_bytes")
    fsync: bool = _default("fsync")
    compact_dead_fraction: float = _default("compact_dead_fraction")
    max_batch: int = _default("max_batch")
    max_k: int = _default("max_k")
    max_message_bytes: int = _default("max_message_bytes")
    faiss_threads: int = _default("faiss_threads")
    blas_threshold: int = _default("blas_threshold")
    shard: int = _default("shard")
    partitions: int = 0
    peers: tuple[str, ...] = _default("peers")
    metrics_port: int = _default("metrics_port")
    write_token: str | None = field(default_factory=write_token)
    tls: TlsFiles = field(default_factory=TlsFiles.from_env)

    def __post_init__(self) -> None:
        INDEXER_SETTINGS.check(self, skip=() if self.shard >= 0 else ("partitions",))

    @classmethod
    def local(cls, **overrides: Any) -> "IndexerConfig":
        """An in-process server's config: loopback, a free port, no metrics port."""
        return cls(**{"host": "127.0.0.1", "port": 0, "metrics_port": 0, **overrides})

    @property
    def limits(self) -> ServerLimits:
        return ServerLimits(max_receive_bytes=self.max_message_bytes, max_send_bytes=self.max_message_bytes)

    @classmethod
    def from_env(cls, argv: list[str] | None = None) -> "IndexerConfig":
        values = INDEXER_SETTINGS.parse_args("python -m services.indexer", "FAISS kNN index service", argv)
        if values["shard"] >= values["partitions"]:
            raise ConfigError(
                f"INDEXER_SHARD={values['shard']} must be below INDEXER_PARTITIONS="
                f"{values['partitions']} (a shard owns at least one partition)"
            )
        tls = TlsFiles.from_values(values)
        token = resolve_write_token(values.pop("write_token"), values.pop("write_token_file"))
        collections = values.pop("collections")
        if values["shard"] < 0:
            values["partitions"] = 0
        return cls(
            **values,
            tls=tls,
            write_token=token,
            collections=collections or collections_setting(DEFAULT_COLLECTIONS),
            collections_explicit=collections is not None,
        )
