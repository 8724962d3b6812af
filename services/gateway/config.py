"""Gateway settings: environment variables, overridden by command-line flags.

Environment variables (flag in brackets; defaults in parentheses):

``GATEWAY_HOST`` [--host] (0.0.0.0)
    Interface to listen on.
``GATEWAY_PORT`` [--port] (50050)
    Port to listen on; 0 picks a free one.
``GATEWAY_DB`` [--db] (run/catalogue.sqlite3)
    The listing catalogue: a path or ``sqlite:///path`` (an embedded SQLite file, created on
    first start; one gateway process), or ``postgresql://user:password@host:port/dbname`` (a
    PostgreSQL database shared by every gateway replica). Migrated to the current schema at start
    (replicas starting together take turns). A malformed value or a database that cannot be
    reached at start stops the gateway with one line naming this setting; a database that goes
    away later makes catalogue calls UNAVAILABLE until it is back (no restart needed).
``GATEWAY_DB_CONNECT_TIMEOUT_S`` (5)
    How long to wait for a PostgreSQL connection (at start, and per request from the pool).
``GATEWAY_OUTBOX_INTERVAL_S`` (0.5) / ``GATEWAY_OUTBOX_LEASE_S`` (30)
    How often the outbox applier looks for vector writes not yet acknowledged by their shard
    (left by a shard that was down or a gateway that died), and how long one gateway holds an
    entry while pushing it (pushes are given half of it; after a crash another gateway takes the
    entry over once the lease ran out). See ``docs/catalogue.md``.
``GATEWAY_SEED_DIR`` [--seed-dir] (unset)
    A prepared-data folder (``listings.csv`` + ``images.csv`` from ``python -m training.prepare``)
    loaded into the catalogue at start when the catalogue is empty. Unset: start empty (load with
    ``python -m services.gateway.load_catalogue``).
``EMBEDDER_ADDR`` [--embedder] (127.0.0.1:50051)
    The embedder replicas. One ``host:port``; or a comma-separated list ``a:p1,b:p2`` that becomes
    the gRPC target ``ipv4:a:p1,b:p2`` (hostnames in a list are resolved once at start); or any
    gRPC target such as ``dns:///embedder:50051`` (every address the name resolves to is a
    replica), used as-is. Calls are spread over replicas by gRPC's own ``round_robin``
    load-balancing policy; a replica that is down is skipped while others are up.
``INDEXER_ADDRS`` [--indexers] (127.0.0.1:50052)
    Comma-separated indexer shard addresses (each ``host:port`` or a gRPC target). The order
    defines the shard number: a listing lives on shard ``blake2b(listing_id) % N``. Searches go to
    every shard in parallel and are merged by score. Changing N requires re-indexing. Same as
    ``INDEXER_SHARDS`` with one replica per shard.
``INDEXER_SHARDS`` [--shards] (unset)
    Indexer shards with replicas: ``0=a:50052|b:50052;1=c:50052|d:50052`` (shard number =
    replica targets separated by ``|``; shards ``;``-separated, numbered 0..N-1). A search asks
    one replica of each shard (spread over the replicas, another replica of the same shard in the
    same call when one answers UNAVAILABLE or runs out of time); writes go to every replica of the
    listing's shard. Set either this or ``INDEXER_ADDRS``, not both.
``GATEWAY_SHARD_MAP`` [--shard-map] (off) / ``GATEWAY_SHARD_MAP_POLL_S`` (2) / ``INDEXER_PARTITIONS`` (256)
    The versioned shard map (`common.shard_map`), kept in the catalogue database (``GATEWAY_DB``,
    table ``shard_maps``) so every gateway and the rebalance command read the same one. ``on``:
    when the database holds no map yet, create version 1 (``INDEXER_PARTITIONS`` partitions on
    the configured shards; it routes exactly as hash routing when the partition count is a
    multiple of the shard count). Whenever the database holds a map (``on`` or ``off``), listings
    are routed listing -> partition -> the shard that owns it, every gateway re-reads the map
    every ``GATEWAY_SHARD_MAP_POLL_S`` seconds (so they switch together), and shards can be added
    with ``python -m services.gateway.rebalance --to N``. No map: shard
    ``blake2b(listing_id) % N``.
``GATEWAY_DOWNSTREAM_TIMEOUT_S`` (10)
    Deadline for a request whose caller set none. A caller's deadline is always propagated to the
    embedder and indexer calls made for it (minus a small margin so the gateway answers first).
``GATEWAY_MAX_K`` (100)
    Largest ``k`` accepted by the search RPCs (``k = 0`` means 10).
``GATEWAY_MAX_IMAGES`` (16)
    Most photos accepted in one AddListing.
``GATEWAY_MAX_MESSAGE_MB`` (16)
    Largest request the gateway accepts (and response it sends), in MiB; a bigger request is
    RESOURCE_EXHAUSTED from gRPC itself, naming the limit in bytes. Keep it at least
    ``EMBEDDER_MAX_IMAGE_BYTES`` so one full-size photo fits.
``GATEWAY_RETRY_ATTEMPTS`` (3)
    Attempts per downstream call (first try included). Only UNAVAILABLE is retried, and only for
    idempotent calls (all the gateway makes are: Embed, Classify, GetModelInfo, Search, Fetch, and
    Upsert/Delete by id). Never beyond the request's deadline.
``GATEWAY_RETRY_BACKOFF_S`` (0.05) / ``GATEWAY_RETRY_BACKOFF_MAX_S`` (1.0)
    First retry delay, doubled per retry up to the maximum, with random jitter (50-100%).
``GATEWAY_RECONNECT_BACKOFF_MAX_S`` (2.0)
    Cap on gRPC's reconnect backoff to a downstream that went away, so a restarted embedder or
    indexer is used again within about this time (gRPC's own default grows to 120 s).
``GATEWAY_MODEL_INFO_TTL_S`` (60)
    How long the embedder's model info (categories, dimension, batch limit) is cached.
``GATEWAY_SEARCH_TEXT_WEIGHT`` / ``GATEWAY_SIMILAR_TEXT_WEIGHT`` (unset: the embedder's artefact)
    Text weight ``w`` in [0, 1] of hybrid Search when a request leaves ``text_weight`` unset, and
    of SimilarListings: ``(1 - w) * photo cosine + w * text cosine`` (SimilarListings' 0: photos
    only, as a request's ``photos_only``). Unset, each comes from the embedder's GetModelInfo: the
    weights chosen on the valid split for the served image model (its artefact's
    ``fusion_weights.json``, written by ``python -m training.fusion_weights`` and training.text),
    else the built-in 0.5 and 0.7 (`services.gateway.fusion_defaults`). Set, they override it; the
    log says which weight is used and where it came from.
``WRITE_TOKEN`` / ``WRITE_TOKEN_FILE`` (unset; shared with the indexer, see `common.security`)
    When set, AddListing and RemoveListing require the metadata ``authorization: Bearer <token>``
    (UNAUTHENTICATED without it, PERMISSION_DENIED with a wrong one), and the gateway sends the
    same token on its Upsert/Delete calls to the indexer shards. Unset: writes are open (a
    warning is logged at start).
``TLS_CERT`` / ``TLS_KEY`` / ``TLS_CLIENT_CA``, ``TLS_CA`` / ``TLS_CLIENT_CERT`` / ``TLS_CLIENT_KEY``
    Optional TLS for the gateway's own port and for its channels to embedder and indexers
    (`common.security`); plaintext when unset.
``GATEWAY_MAX_WORKERS`` (16)
    gRPC server worker threads (concurrent requests being handled).
``GATEWAY_READINESS_INTERVAL_S`` (5) / ``GATEWAY_READINESS_TIMEOUT_S`` (1)
    How often the gateway checks the health of the embedder and every indexer shard, and the
    timeout of each check; the health entry ``marketplace.gateway.v1.Gateway`` is SERVING only
    while all of them are (`services.gateway.readiness`). 0 turns the checks off: the entry then
    stays SERVING like the server's own ``""``.
``GATEWAY_METRICS_PORT`` [--metrics-port] (9450)
    HTTP port of the Prometheus ``/metrics`` endpoint (`common.metrics`): the gateway's own RPCs,
    its calls to every downstream, the catalogue size and each downstream's readiness. 0 turns
    metrics off.
``IMAGE_STORE_DIR`` (unset)
    Folder of the listing photo store (`common.image_store`, shared with the HTTP edge): the photos
    of listings added through AddListing are kept there (removed with the listing). Unset: they
    are embedded and indexed but not kept.
``LOG_LEVEL`` [--log-level] (info)
"""
from __future__ import annotations

import argparse
import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path

from common.config import REPO_ROOT, ConfigError, env_float, env_int, env_path, env_str
from common.security import write_token
from common.metrics import DEFAULT_PORTS as DEFAULT_METRICS_PORTS
from services.gateway.shards import (ShardMapError, ShardReplicas, parse_shard_replicas,
                                     single_replica_shards)

DEFAULT_EMBEDDER_ADDR = "127.0.0.1:50051"
DEFAULT_INDEXER_ADDRS = "127.0.0.1:50052"
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of UNAVAILABLE for idempotent downstream calls: exponential backoff with jitter."""

    attempts: int = 3
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    multiplier: float = 2.0

    def backoff(self, retry: int) -> float:
        """Upper bound of the delay before retry number ``retry`` (0-based)."""
        return min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** retry)


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 0
    db_path: Path | str = REPO_ROOT / "run" / "catalogue.sqlite3"  # GATEWAY_DB: a path or a URL
    seed_dir: Path | None = None
    embedder_addr: str = DEFAULT_EMBEDDER_ADDR
    indexer_addrs: tuple[str, ...] = (DEFAULT_INDEXER_ADDRS,)
    #: Replica targets per shard (INDEXER_SHARDS); None: one replica per INDEXER_ADDRS entry.
    indexer_shards: ShardReplicas | None = None
    #: GATEWAY_SHARD_MAP: create the shard map in the catalogue database when it has none
    shard_map: bool = False
    shard_map_poll_s: float = 2.0
    partitions: int = 256
    downstream_timeout_s: float = 10.0
    max_k: int = 100
    max_images: int = 16
    max_message_bytes: int = 16 * 1024 * 1024
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    reconnect_backoff_max_s: float = 2.0
    model_info_ttl_s: float = 60.0
    db_connect_timeout_s: float = 5.0
    outbox_interval_s: float = 0.5
    outbox_lease_s: float = 30.0
    search_text_weight: float | None = None    # None: the embedder's artefact decides
    similar_text_weight: float | None = None
    write_token: str | None = None
    max_workers: int = 16
    readiness_interval_s: float = 5.0
    readiness_timeout_s: float = 1.0
    metrics_port: int = 0             # 0: off (from_env defaults to 9450)
    log_level: str = "info"
    image_store_dir: Path | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port={self.metrics_port} must be 0 (off) or a TCP port")

    @property
    def embedder_target(self) -> str:
        return embedder_target(self.embedder_addr)

    @property
    def indexer_targets(self) -> tuple[str, ...]:
        """Every indexer replica target, shard by shard."""
        return tuple(target for replicas in self.indexer_replicas for target in replicas)

    @property
    def indexer_replicas(self) -> ShardReplicas:
        """The replica targets of each shard, in shard order."""
        return self.indexer_shards or single_replica_shards(self.indexer_addrs)

    @classmethod
    def from_env(cls, argv: list[str] | None = None) -> "GatewayConfig":
        parser = argparse.ArgumentParser(prog="python -m services.gateway",
                                         description="public API gateway (see config docstring for env)")
        parser.add_argument("--host", default=env_str("GATEWAY_HOST", "0.0.0.0"))
        parser.add_argument("--port", type=int, default=env_int("GATEWAY_PORT", 50050, minimum=0))
        parser.add_argument("--db", default=env_str("GATEWAY_DB", str(REPO_ROOT / "run" / "catalogue.sqlite3")))
        parser.add_argument("--seed-dir", type=Path,
                            default=env_str("GATEWAY_SEED_DIR", "") or None)
        parser.add_argument("--embedder", default=env_str("EMBEDDER_ADDR", DEFAULT_EMBEDDER_ADDR))
        parser.add_argument("--indexers", default=env_str("INDEXER_ADDRS", DEFAULT_INDEXER_ADDRS))
        parser.add_argument("--metrics-port", type=int,
                            default=env_int("GATEWAY_METRICS_PORT", DEFAULT_METRICS_PORTS["gateway"],
                                            minimum=0))
        parser.add_argument("--shards", default=env_str("INDEXER_SHARDS", "") or None,
                            help="indexer shards with replicas: 0=a:p|b:p;1=c:p|d:p")
        parser.add_argument("--shard-map", default=env_str("GATEWAY_SHARD_MAP", "off"),
                            help="on: create the versioned shard map in the catalogue database "
                                 "(enables rebalancing); off (default)")
        parser.add_argument("--log-level", default=env_str("LOG_LEVEL", "info"))
        args = parser.parse_args(argv)
        token = write_token()
        image_store = env_str("IMAGE_STORE_DIR", "")
        config = cls(
            host=args.host,
            port=args.port,
            db_path=database_setting(args.db),
            seed_dir=Path(args.seed_dir) if args.seed_dir else None,
            embedder_addr=args.embedder,
            indexer_addrs=parse_indexer_addrs(args.indexers),
            indexer_shards=shard_replicas_setting(args.shards, args.indexers),
            shard_map=shard_map_setting(args.shard_map),
            shard_map_poll_s=env_float("GATEWAY_SHARD_MAP_POLL_S", 2.0, minimum=0.05),
            partitions=env_int("INDEXER_PARTITIONS", 256, minimum=1),
            downstream_timeout_s=env_float("GATEWAY_DOWNSTREAM_TIMEOUT_S", 10.0, minimum=0.001),
            max_k=env_int("GATEWAY_MAX_K", 100, minimum=1),
            max_images=env_int("GATEWAY_MAX_IMAGES", 16, minimum=1),
            max_message_bytes=env_int("GATEWAY_MAX_MESSAGE_MB", 16, minimum=1) * 1024 * 1024,
            retry=RetryPolicy(
                attempts=env_int("GATEWAY_RETRY_ATTEMPTS", 3, minimum=1),
                initial_backoff_s=env_float("GATEWAY_RETRY_BACKOFF_S", 0.05, minimum=0.0),
                max_backoff_s=env_float("GATEWAY_RETRY_BACKOFF_MAX_S", 1.0, minimum=0.0),
            ),
            reconnect_backoff_max_s=env_float("GATEWAY_RECONNECT_BACKOFF_MAX_S", 2.0, minimum=0.1),
            model_info_ttl_s=env_float("GATEWAY_MODEL_INFO_TTL_S", 60.0, minimum=0.0),
            db_connect_timeout_s=env_float("GATEWAY_DB_CONNECT_TIMEOUT_S", 5.0, minimum=0.1),
            outbox_interval_s=env_float("GATEWAY_OUTBOX_INTERVAL_S", 0.5, minimum=0.01),
            outbox_lease_s=env_float("GATEWAY_OUTBOX_LEASE_S", 30.0, minimum=0.5),
            search_text_weight=text_weight_from_env("GATEWAY_SEARCH_TEXT_WEIGHT"),
            similar_text_weight=text_weight_from_env("GATEWAY_SIMILAR_TEXT_WEIGHT"),
            write_token=token,
            max_workers=env_int("GATEWAY_MAX_WORKERS", 16, minimum=1),
            readiness_interval_s=env_float("GATEWAY_READINESS_INTERVAL_S", 5.0, minimum=0.0),
            readiness_timeout_s=env_float("GATEWAY_READINESS_TIMEOUT_S", 1.0, minimum=0.01),
            metrics_port=args.metrics_port,
            log_level=args.log_level,
            image_store_dir=Path(image_store) if image_store else None,
        )
        embedder_target(config.embedder_addr)  # fail fast on a malformed value
        return config


def text_weight_from_env(name: str) -> float | None:
    """A fusion text weight setting: a number in [0, 1], or None when unset."""
    if not env_str(name, ""):
        return None
    weight = env_float(name, 0.0, minimum=0.0)
    if weight > 1.0:
        raise ConfigError(f"{name} must be between 0 and 1, got {weight}")
    return weight


def database_setting(value: str) -> Path | str:
    """``GATEWAY_DB`` checked: a bare path stays a Path (as before), a URL a string."""
    from services.gateway.catalogue_db import DatabaseError, parse_database_url

    try:
        parse_database_url(value)
    except DatabaseError as exc:
        raise ConfigError(str(exc)) from None
    return value if "://" in value else Path(value)


def shard_map_setting(value: str | None) -> bool:
    """``GATEWAY_SHARD_MAP``: on/off (also true/false, 1/0, yes/no; empty = off). A directory
    (where earlier versions kept the map as JSON files) is refused with what to do instead."""
    lowered = (value or "").strip().lower()
    if lowered in {"", "0", "false", "no", "off"}:
        return False
    if lowered in {"1", "true", "yes", "on"}:
        return True
    raise ConfigError(f"GATEWAY_SHARD_MAP={value!r} is not on or off: the shard map is kept in the "
                      "catalogue database (GATEWAY_DB), not in a directory; set "
                      "GATEWAY_SHARD_MAP=on")


def parse_indexer_addrs(value: str) -> tuple[str, ...]:
    """``INDEXER_ADDRS`` -> shard targets in shard order."""
    addrs = tuple(part.strip() for part in value.split(",") if part.strip())
    if not addrs:
        raise ConfigError(f"INDEXER_ADDRS={value!r} names no indexer shard")
    if len(set(addrs)) != len(addrs):
        raise ConfigError(f"INDEXER_ADDRS={value!r} lists a shard twice")
    return addrs


def shard_replicas_setting(shards: str | None, addrs: str) -> ShardReplicas | None:
    """``INDEXER_SHARDS`` parsed, or None when unset; setting it beside a non-default
    ``INDEXER_ADDRS`` is an error (which one would the operator mean?)."""
    if not shards:
        return None
    if addrs.strip() != DEFAULT_INDEXER_ADDRS:
        raise ConfigError("set INDEXER_SHARDS or INDEXER_ADDRS, not both (INDEXER_SHARDS "
                          "with one replica per shard is INDEXER_ADDRS)")
    try:
        return parse_shard_replicas(shards)
    except ShardMapError as exc:
        raise ConfigError(str(exc)) from None


def _split_host_port(address: str) -> tuple[str, str]:
    if address.startswith("["):  # [v6]:port
        host, _, port = address[1:].partition("]:")
    else:
        host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"EMBEDDER_ADDR entry {address!r} is not host:port")
    return host, port


def embedder_target(value: str) -> str:
    """``EMBEDDER_ADDR`` -> a gRPC target string (see the module docstring).

    ``"10.0.0.1:50051"`` -> as-is; ``"10.0.0.1:1,10.0.0.2:2"`` -> ``"ipv4:10.0.0.1:1,10.0.0.2:2"``;
    ``"dns:///embedder:50051"`` -> as-is; ``"localhost:1,localhost:2"`` -> ``"ipv4:127.0.0.1:1,..."``.
    """
    value = value.strip()
    if not value:
        raise ConfigError("EMBEDDER_ADDR is empty")
    if value.startswith(_SCHEMES):
        return value
    parts = [part.strip() for part in value.split(",") if part.strip()]
    if len(parts) == 1:
        _split_host_port(parts[0])
        return parts[0]
    resolved: list[tuple[int, str]] = []
    for part in parts:
        host, port = _split_host_port(part)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            try:
                ip = ipaddress.ip_address(socket.getaddrinfo(host, int(port), socket.AF_INET,
                                                             socket.SOCK_STREAM)[0][4][0])
            except (OSError, IndexError):
                raise ConfigError(f"EMBEDDER_ADDR host {host!r} does not resolve; use IP "
                                  "addresses or a dns:///name:port target") from None
        resolved.append((ip.version, f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"))
    versions = {version for version, _ in resolved}
    if len(versions) > 1:
        raise ConfigError(f"EMBEDDER_ADDR={value!r} mixes IPv4 and IPv6 addresses")
    scheme = "ipv6" if versions == {6} else "ipv4"
    return f"{scheme}:" + ",".join(address for _, address in resolved)
