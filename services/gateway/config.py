"""Gateway settings, each declared once in `GATEWAY_SETTINGS` (variable, flag, type, default,
bounds, help; `common.config`): environment variables, overridden by command-line flags. The
commands (rebalance, reconcile, index_catalogue, load_catalogue) read the same declarations. The
defaults are in the declarations and the README's configuration table; here is what some mean.

``GATEWAY_DB`` / ``GATEWAY_DB_PASSWORD`` / ``GATEWAY_DB_PASSWORD_FILE``
    An embedded SQLite file (created on first start; one gateway process) or a PostgreSQL
    database shared by every gateway replica; its password in the URL, or (a secret kept out of
    the URL) in ``GATEWAY_DB_PASSWORD`` or the file ``GATEWAY_DB_PASSWORD_FILE`` names. Migrated to the current schema at start (replicas
    starting together take turns). A malformed value or a database that cannot be reached at
    start stops the gateway with one line naming this setting; a database that goes away later
    makes catalogue calls UNAVAILABLE until it is back (no restart needed).
``GATEWAY_OUTBOX_INTERVAL_S`` / ``GATEWAY_OUTBOX_LEASE_S``
    The outbox applier looks for vector writes not yet acknowledged by their shard (left by a
    shard that was down or a gateway that died); pushes are given half of the lease, and after a
    crash another gateway takes the entry over once the lease ran out (``docs/catalogue.md``).
``EMBEDDER_ADDR``
    One ``host:port``; or a comma-separated list ``a:p1,b:p2`` that becomes the gRPC target
    ``ipv4:a:p1,b:p2`` (hostnames in a list are resolved once at start); or any gRPC target such
    as ``dns:///embedder:50051`` (every address the name resolves to is a replica), used as-is.
    Calls are spread over replicas by gRPC's own ``round_robin`` policy; a replica that is down
    is skipped while others are up.
``INDEXER_ADDRS`` / ``INDEXER_SHARDS``
    The order defines the shard number: without a shard map a listing lives on shard
    ``blake2b(listing_id) % N``. Searches go to every shard in parallel and are merged by score.
    With replicas (``INDEXER_SHARDS``), a search asks one replica of each shard (another replica
    of the same shard in the same call when one answers UNAVAILABLE or runs out of time); writes
    go to every replica of the listing's shard. Set one of the two, not both.
``GATEWAY_SHARD_MAP``
    The versioned shard map (`common.shard_map`) is kept in the catalogue database
    (``GATEWAY_DB``, table ``shard_maps``) so every gateway and the rebalance command read the
    same one. ``on``: when the database holds no map yet, create version 1
    (``INDEXER_PARTITIONS`` partitions on the configured shards; it routes exactly as hash
    routing when the partition count is a multiple of the shard count). Whenever the database
    holds a map (``on`` or ``off``), listings are routed listing -> partition -> the shard that
    owns it, every gateway re-reads the map every ``GATEWAY_SHARD_MAP_POLL_S`` (so they switch
    together), and shards can be added with ``python -m services.gateway.rebalance --to N``.
``GATEWAY_SEARCH_TEXT_WEIGHT`` / ``GATEWAY_SIMILAR_TEXT_WEIGHT``
    Unset, each comes from the embedder's GetModelInfo: the weights chosen on the valid split for
    the served image model (its artefact's ``fusion_weights.json``, written by ``python -m
    training.fusion_weights`` and training.text), else the built-in 0.5 and 0.7
    (`services.gateway.fusion_defaults`). Set, they override it; the log says which weight is
    used and where it came from.
``GATEWAY_RETRY_*``
    Only UNAVAILABLE is retried, and only for idempotent calls (all the gateway makes are:
    Embed, Classify, GetModelInfo, Search, Fetch, and Upsert/Delete by id), never beyond the
    request's deadline.
``WRITE_TOKEN`` / ``WRITE_TOKEN_FILE``, ``TLS_*``
    `common.security`: AddListing and RemoveListing need the token when it is set, and the
    gateway sends it on its Upsert/Delete calls to the indexer shards.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import INDEXER_PARTITIONS, LOG_LEVEL, REPO_ROOT, ConfigError, Setting, Settings, merged
from common.metrics import DEFAULT_PORTS as DEFAULT_METRICS_PORTS
from common.security import (
    TLS_CLIENT_SETTINGS,
    TLS_SERVER_SETTINGS,
    WRITE_TOKEN_SETTINGS,
    TlsFiles,
    resolve_secret,
    resolve_write_token,
)
from services.gateway.shards import ShardMapError, ShardReplicas, parse_shard_replicas, single_replica_shards

DEFAULT_EMBEDDER_ADDR = "127.0.0.1:50051"
DEFAULT_INDEXER_ADDRS = "127.0.0.1:50052"
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")

RETRY_ATTEMPTS = Setting(
    "GATEWAY_RETRY_ATTEMPTS",
    "retry_attempts",
    int,
    3,
    minimum=1,
    help="attempts per downstream call (first try included); only UNAVAILABLE is retried, only "
    "for idempotent calls, never beyond the request's deadline",
)
RETRY_BACKOFF = Setting(
    "GATEWAY_RETRY_BACKOFF_S",
    "retry_backoff_s",
    float,
    0.05,
    minimum=0.0,
    help="first retry delay, doubled per retry, with random jitter (50-100%)",
)
RETRY_BACKOFF_MAX = Setting(
    "GATEWAY_RETRY_BACKOFF_MAX_S", "retry_backoff_max_s", float, 1.0, minimum=0.0, help="longest retry delay"
)


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of UNAVAILABLE for idempotent downstream calls: exponential backoff with jitter."""

    attempts: int = RETRY_ATTEMPTS.default
    initial_backoff_s: float = RETRY_BACKOFF.default
    max_backoff_s: float = RETRY_BACKOFF_MAX.default
    multiplier: float = 2.0

    def backoff(self, retry: int) -> float:
        """Upper bound of the delay before retry number ``retry`` (0-based)."""
        return min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**retry)


def embedder_addr_setting(raw: str) -> str:
    """``EMBEDDER_ADDR`` as given, once it is known to make a gRPC target (fail fast)."""
    embedder_target(raw)
    return raw


def indexer_shards_setting(raw: str) -> ShardReplicas:
    try:
        return parse_shard_replicas(raw)
    except ShardMapError as exc:
        raise ConfigError(str(exc)) from None


#: Where the catalogue, the shards and the embedder are: the gateway's and its commands'.
DB = Setting(
    "GATEWAY_DB",
    "db_path",
    default=REPO_ROOT / "run" / "catalogue.sqlite3",
    flag="--db",
    parse=lambda raw: database_setting(raw),
    help="listing catalogue: a path or `sqlite:///path` (embedded SQLite, one gateway), "
    "or `postgresql://user:password@host:port/db` (shared by every gateway "
    "replica); migrated at start; unusable or unreachable at start: the gateway "
    "exits with one line naming it",
)
DB_PASSWORD = Setting(
    "GATEWAY_DB_PASSWORD",
    "db_password",
    secret=True,
    help="password of the PostgreSQL user `GATEWAY_DB` names, for a URL that carries none "
    "(`postgresql://user@host:port/db`)",
)
DB_PASSWORD_FILE = Setting(
    "GATEWAY_DB_PASSWORD_FILE",
    "db_password_file",
    Path,
    help="file holding that password instead (a Docker or Kubernetes secret); not both",
)
#: The catalogue database and its password: what every reader of `GATEWAY_DB` reads.
DB_SETTINGS = (DB, DB_PASSWORD, DB_PASSWORD_FILE)
DB_FIELDS = tuple(setting.field for setting in DB_SETTINGS)
EMBEDDER_ADDR = Setting(
    "EMBEDDER_ADDR",
    "embedder_addr",
    default=DEFAULT_EMBEDDER_ADDR,
    flag="--embedder",
    parse=embedder_addr_setting,
    help="the embedder replicas: one address, a comma list (hostnames resolved once at start), "
    "or any gRPC target such as `dns:///name:port`: gRPC `round_robin` over replicas",
)
INDEXER_ADDRS = Setting(
    "INDEXER_ADDRS",
    "indexer_addrs",
    default=(DEFAULT_INDEXER_ADDRS,),
    flag="--indexers",
    parse=lambda raw: parse_indexer_addrs(raw),
    shown=DEFAULT_INDEXER_ADDRS,
    help="comma list of indexer shards; order = shard number (`INDEXER_SHARDS` with one replica per shard)",
)
INDEXER_SHARDS = Setting(
    "INDEXER_SHARDS",
    "indexer_shards",
    flag="--shards",
    parse=indexer_shards_setting,
    help="shards with replicas, `0=a:50052|b:50052;1=c:50052|d:50052` (instead of "
    "`INDEXER_ADDRS`); see [Scaling the indexer](#scaling-the-indexer)",
)
SHARD_MAP = Setting(
    "GATEWAY_SHARD_MAP",
    "shard_map",
    bool,
    False,
    parse=lambda raw: shard_map_setting(raw),
    shown="off",
    help="on: create the versioned shard map in the catalogue database (`GATEWAY_DB`) "
    "when it holds none (enables `python -m services.gateway.rebalance`); a map the database "
    "holds is followed either way",
)
SHARD_MAP_POLL = Setting(
    "GATEWAY_SHARD_MAP_POLL_S",
    "shard_map_poll_s",
    float,
    2.0,
    minimum=0.05,
    help="how often gateways re-read the shard map",
)

GATEWAY_SETTINGS = merged(
    (
        Setting("GATEWAY_HOST", "host", default="0.0.0.0", help="interface to listen on"),
        Setting(
            "GATEWAY_PORT",
            "port",
            int,
            50050,
            minimum=0,
            maximum=65535,
            help="listening port (0: any free port)",
        ),
        *DB_SETTINGS,
        Setting(
            "GATEWAY_DB_CONNECT_TIMEOUT_S",
            "db_connect_timeout_s",
            float,
            5.0,
            minimum=0.1,
            help="wait for a PostgreSQL connection (at start and per request); a database that "
            "went away makes calls UNAVAILABLE until it is back",
        ),
        Setting(
            "GATEWAY_OUTBOX_INTERVAL_S",
            "outbox_interval_s",
            float,
            0.5,
            minimum=0.01,
            help="how often each gateway pushes index writes its shard has not acknowledged yet "
            "([docs/catalogue.md](docs/catalogue.md))",
        ),
        Setting(
            "GATEWAY_OUTBOX_LEASE_S",
            "outbox_lease_s",
            float,
            30.0,
            minimum=0.5,
            help="how long one gateway holds such a write (another takes it over after)",
        ),
        Setting(
            "GATEWAY_BOOTSTRAP_DIR",
            "bootstrap_dir",
            Path,
            deprecated_env=("GATEWAY_SEED_DIR",),
            deprecated_flags=("--seed-dir",),
            help="prepared data loaded into an empty catalogue at start",
        ),
        EMBEDDER_ADDR,
        INDEXER_ADDRS,
        INDEXER_SHARDS,
        SHARD_MAP,
        SHARD_MAP_POLL,
        INDEXER_PARTITIONS,
        Setting(
            "GATEWAY_DOWNSTREAM_TIMEOUT_S",
            "downstream_timeout_s",
            float,
            10.0,
            minimum=0.001,
            help="deadline when the caller set none (a caller's deadline is always propagated)",
        ),
        Setting(
            "GATEWAY_MAX_K",
            "max_k",
            int,
            100,
            minimum=1,
            help="largest `k` of the search RPCs (`k = 0` means 10)",
        ),
        Setting("GATEWAY_MAX_IMAGES", "max_images", int, 16, minimum=1, help="most photos in one AddListing"),
        Setting(
            "GATEWAY_MAX_MESSAGE_MB",
            "max_message_bytes",
            int,
            16,
            minimum=1,
            scale=1024 * 1024,
            flag="--max-message-mb",
            help="largest request accepted and response sent, in MiB (RESOURCE_EXHAUSTED beyond); "
            "keep it at least `EMBEDDER_MAX_IMAGE_BYTES`",
        ),
        RETRY_ATTEMPTS,
        RETRY_BACKOFF,
        RETRY_BACKOFF_MAX,
        Setting(
            "GATEWAY_RECONNECT_BACKOFF_MAX_S",
            "reconnect_backoff_max_s",
            float,
            2.0,
            minimum=0.1,
            help="cap on gRPC's reconnect backoff, so a restarted downstream is used again within "
            "about this time",
        ),
        Setting(
            "GATEWAY_MODEL_INFO_TTL_S",
            "model_info_ttl_s",
            float,
            60.0,
            minimum=0.0,
            help="how long the embedder's model info is cached",
        ),
        Setting(
            "GATEWAY_SEARCH_TEXT_WEIGHT",
            "search_text_weight",
            float,
            minimum=0.0,
            maximum=1.0,
            shown="unset: the artefact's",
            help="text weight `w` of hybrid Search when a request leaves `text_weight` unset: "
            "`(1 - w)·photo cosine + w·text cosine`; unset: the weight chosen on the valid "
            "split for the served image model (the embedder's GetModelInfo), else 0.5",
        ),
        Setting(
            "GATEWAY_SIMILAR_TEXT_WEIGHT",
            "similar_text_weight",
            float,
            minimum=0.0,
            maximum=1.0,
            shown="unset: the artefact's",
            help="text weight `w` of SimilarListings (0: photos only); unset: the weight chosen on "
            "the valid split for the served image model, else 0.7",
        ),
        Setting(
            "GATEWAY_MAX_WORKERS",
            "max_workers",
            int,
            16,
            minimum=1,
            help="gRPC server worker threads (concurrent requests being handled)",
        ),
        Setting(
            "GATEWAY_READINESS_INTERVAL_S",
            "readiness_interval_s",
            float,
            5.0,
            minimum=0.0,
            help="how often the health of the embedder and every indexer shard is checked "
            "(0: off, the readiness entry stays SERVING)",
        ),
        Setting(
            "GATEWAY_READINESS_TIMEOUT_S",
            "readiness_timeout_s",
            float,
            1.0,
            minimum=0.01,
            help="timeout of each readiness check",
        ),
        Setting(
            "GATEWAY_METRICS_PORT",
            "metrics_port",
            int,
            DEFAULT_METRICS_PORTS["gateway"],
            minimum=0,
            maximum=65535,
            help="HTTP port of the Prometheus /metrics endpoint (0: metrics off)",
        ),
        Setting(
            "IMAGE_STORE_DIR",
            "image_store_dir",
            Path,
            flag="--image-store",
            shown="unset: photos not kept",
            help="listing photo store folder (`common.image_store`, shared with the HTTP edge): "
            "photos of listings added through AddListing are kept there",
        ),
        LOG_LEVEL,
    ),
    WRITE_TOKEN_SETTINGS,
    TLS_SERVER_SETTINGS,
    TLS_CLIENT_SETTINGS,
)
_default = GATEWAY_SETTINGS.default


def command_settings(*fields: str) -> Settings:
    """The gateway settings a command (rebalance, reconcile, ...) reads, with the same flags."""
    return Settings(*(GATEWAY_SETTINGS[name] for name in fields))


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the gateway needs; ``from_env`` reads flags and env (`GATEWAY_SETTINGS`),
    tests build it directly (`local` for an in-process server on a free loopback port)."""

    host: str = _default("host")
    port: int = _default("port")
    db_path: Path | str = _default("db_path")  # GATEWAY_DB: a path or a URL
    #: GATEWAY_DB_PASSWORD[_FILE]: the password of a PostgreSQL URL that names only the user
    db_password: str | None = field(default=None, repr=False)
    bootstrap_dir: Path | None = _default("bootstrap_dir")
    embedder_addr: str = _default("embedder_addr")
    indexer_addrs: tuple[str, ...] = _default("indexer_addrs")
    #: Replica targets per shard (INDEXER_SHARDS); None: one replica per INDEXER_ADDRS entry.
    indexer_shards: ShardReplicas | None = _default("indexer_shards")
    #: GATEWAY_SHARD_MAP: create the shard map in the catalogue database when it has none
    shard_map: bool = _default("shard_map")
    shard_map_poll_s: float = _default("shard_map_poll_s")
    partitions: int = _default("partitions")
    downstream_timeout_s: float = _default("downstream_timeout_s")
    max_k: int = _default("max_k")
    max_images: int = _default("max_images")
    max_message_bytes: int = _default("max_message_bytes")
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    reconnect_backoff_max_s: float = _default("reconnect_backoff_max_s")
    model_info_ttl_s: float = _default("model_info_ttl_s")
    db_connect_timeout_s: float = _default("db_connect_timeout_s")
    outbox_interval_s: float = _default("outbox_interval_s")
    outbox_lease_s: float = _default("outbox_lease_s")
    #: None: the embedder's artefact decides (GetModelInfo's fusion weights)
    search_text_weight: float | None = _default("search_text_weight")
    similar_text_weight: float | None = _default("similar_text_weight")
    write_token: str | None = None
    max_workers: int = _default("max_workers")
    readiness_interval_s: float = _default("readiness_interval_s")
    readiness_timeout_s: float = _default("readiness_timeout_s")
    metrics_port: int = _default("metrics_port")
    log_level: str = _default("log_level")
    image_store_dir: Path | None = _default("image_store_dir")
    tls: TlsFiles = field(default_factory=TlsFiles.from_env)

    def __post_init__(self) -> None:
        GATEWAY_SETTINGS.check(self)

    @classmethod
    def local(cls, **overrides: Any) -> "GatewayConfig":
        """An in-process server's config: loopback, a free port, no metrics port."""
        return cls(**{"host": "127.0.0.1", "port": 0, "metrics_port": 0, **overrides})

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
        values = GATEWAY_SETTINGS.parse_args("python -m services.gateway", "public API gateway", argv)
        check_one_shard_list(values["indexer_shards"], values["indexer_addrs"])
        retry = RetryPolicy(
            attempts=values.pop("retry_attempts"),
            initial_backoff_s=values.pop("retry_backoff_s"),
            max_backoff_s=values.pop("retry_backoff_max_s"),
        )
        token = resolve_write_token(values.pop("write_token"), values.pop("write_token_file"))
        password = database_password(values)
        tls = TlsFiles.from_values(values)
        return cls(**values, db_password=password, retry=retry, write_token=token, tls=tls)


def check_one_shard_list(shards: ShardReplicas | None, addrs: tuple[str, ...]) -> None:
    """Setting ``INDEXER_SHARDS`` beside a non-default ``INDEXER_ADDRS`` is an error (which one
    would the operator mean?)."""
    if shards is not None and tuple(addrs) != (DEFAULT_INDEXER_ADDRS,):
        raise ConfigError(
            "set INDEXER_SHARDS or INDEXER_ADDRS, not both (INDEXER_SHARDS "
            "with one replica per shard is INDEXER_ADDRS)"
        )


def shard_lists(values: dict[str, Any]) -> ShardReplicas:
    """The replica targets per shard from a command's INDEXER_SHARDS / INDEXER_ADDRS values."""
    check_one_shard_list(values["indexer_shards"], values["indexer_addrs"])
    return values["indexer_shards"] or single_replica_shards(values["indexer_addrs"])


def database_setting(value: str) -> Path | str:
    """``GATEWAY_DB`` checked: a bare path stays a Path (as before), a URL a string."""
    from services.gateway.catalogue_db import DatabaseError, parse_database_url

    try:
        parse_database_url(value)
    except DatabaseError as exc:
        raise ConfigError(str(exc)) from None
    return value if "://" in value else Path(value)


def database_password(values: dict[str, Any]) -> str | None:
    """The password from the ``GATEWAY_DB_PASSWORD`` / ``GATEWAY_DB_PASSWORD_FILE`` values of a
    `Settings.read` result (removed from it), checked against its ``GATEWAY_DB``: ConfigError
    when both are set, the file cannot be read, or the URL has a password of its own or no user."""
    from services.gateway.catalogue_db import DatabaseError, parse_database_url

    password = resolve_secret(
        "GATEWAY_DB_PASSWORD", values.pop("db_password"), values.pop("db_password_file")
    )
    try:
        parse_database_url(values["db_path"], password)
    except DatabaseError as exc:
        raise ConfigError(str(exc)) from None
    return password


def shard_map_setting(value: str | None) -> bool:
    """``GATEWAY_SHARD_MAP``: on/off (also true/false, 1/0, yes/no; empty = off). A directory
    (where earlier versions kept the map as JSON files) is refused with what to do instead."""
    lowered = (value or "").strip().lower()
    if lowered in {"", "0", "false", "no", "off"}:
        return False
    if lowered in {"1", "true", "yes", "on"}:
        return True
    raise ConfigError(
        f"GATEWAY_SHARD_MAP={value!r} is not on or off: the shard map is kept in the "
        "catalogue database (GATEWAY_DB), not in a directory; set "
        "GATEWAY_SHARD_MAP=on"
    )


def parse_indexer_addrs(value: str) -> tuple[str, ...]:
    """``INDEXER_ADDRS`` -> shard targets in shard order."""
    addrs = tuple(part.strip() for part in value.split(",") if part.strip())
    if not addrs:
        raise ConfigError(f"INDEXER_ADDRS={value!r} names no indexer shard")
    if len(set(addrs)) != len(addrs):
        raise ConfigError(f"INDEXER_ADDRS={value!r} lists a shard twice")
    return addrs


def shard_replicas_setting(shards: str | None, addrs: str) -> ShardReplicas | None:
    """``INDEXER_SHARDS`` parsed, or None when unset, checked against ``INDEXER_ADDRS``."""
    if not shards:
        return None
    replicas = indexer_shards_setting(shards)
    check_one_shard_list(replicas, parse_indexer_addrs(addrs))
    return replicas


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
                ip = ipaddress.ip_address(
                    socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
                )
            except (OSError, IndexError):
                raise ConfigError(
                    f"EMBEDDER_ADDR host {host!r} does not resolve; use IP "
                    "addresses or a dns:///name:port target"
                ) from None
        resolved.append((ip.version, f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"))
    versions = {version for version, _ in resolved}
    if len(versions) > 1:
        raise ConfigError(f"EMBEDDER_ADDR={value!r} mixes IPv4 and IPv6 addresses")
    scheme = "ipv6" if versions == {6} else "ipv4"
    return f"{scheme}:" + ",".join(address for _, address in resolved)
