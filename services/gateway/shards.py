"""Which indexer shard holds a listing's vectors, and which replicas serve each shard.

A listing's vectors (all its photos, and its text vector) live on one shard, chosen by a
stable hash of the listing id modulo the number of shards. Writes, deletes and fetches for a
listing go to that shard only; searches go to every shard and are merged by score
(`ranking.merge_by_listing`).

The hash is BLAKE2b, not Python's ``hash()`` (salted per process), so every gateway replica and
every run agree. Changing the number of shards moves most listings: re-index
(`python -m services.gateway.index_catalogue`) into fresh shards after changing ``INDEXER_ADDRS``.

Replicas: each shard may be served by several indexer processes holding the same data
(``INDEXER_SHARDS="0=a:50052|b:50052;1=c:50052|d:50052"``, `parse_shard_replicas`). Reads go to
one of them, writes to all of them (`downstream.IndexerShards`); a replica that missed writes
catches up from a peer before it serves (`services.indexer.replication`).

Shard map: once the catalogue database holds a versioned map of `common.shard_map` (created at
version 1 by a gateway started with ``GATEWAY_SHARD_MAP=on``), the listing -> shard routing comes
from it (listing -> one of P partitions -> its owner shard), so shards can be added by moving
only some partitions (``python -m services.gateway.rebalance --to N``) instead of re-indexing;
`ShardRouting` applies it and `ShardMapWatch` follows new versions.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterable
from common.shard_map import ShardMap, ShardMapConflict, ShardMapError, ShardMapStore, initial, partition_of

log = logging.getLogger(__name__)

#: One tuple of replica targets per shard, in shard order.
ShardReplicas = tuple[tuple[str, ...], ...]


def shard_of(listing_id: str, num_shards: int) -> int:
    """The shard number (0-based, the position in INDEXER_ADDRS) that owns ``listing_id``."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if num_shards == 1:
        return 0
    digest = hashlib.blake2b(listing_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_shards


def group_by_shard(listing_ids: Iterable[str], num_shards: int) -> dict[int, list[str]]:
    """Listing ids grouped by owning shard (only shards that own at least one), order kept."""
    groups: dict[int, list[str]] = {}
    for listing_id in listing_ids:
        groups.setdefault(shard_of(listing_id, num_shards), []).append(listing_id)
    return groups


def parse_shard_replicas(value: str) -> ShardReplicas:
    """``INDEXER_SHARDS`` -> the replica targets of each shard, in shard order.

    Format: ``shard=target|target;shard=target``, e.g. ``0=a:50052|b:50052;1=c:50052``. Every
    shard from 0 to N-1 must appear exactly once with at least one replica, and no target may
    serve two shards or appear twice (a listing's writes would land twice on one process)."""
    shards: dict[int, tuple[str, ...]] = {}
    for part in (p.strip() for p in value.split(";")):
        if not part:
            continue
        number, equals, targets = part.partition("=")
        if not equals or not number.strip().isdigit():
            raise ShardMapError(
                f"INDEXER_SHARDS entry {part!r} is not shard=target|target "
                "(e.g. 0=10.0.0.1:50052|10.0.0.2:50052)"
            )
        shard = int(number)
        if shard in shards:
            raise ShardMapError(f"INDEXER_SHARDS lists shard {shard} twice")
        replicas = tuple(t.strip() for t in targets.split("|") if t.strip())
        if not replicas:
            raise ShardMapError(f"INDEXER_SHARDS gives shard {shard} no replica")
        shards[shard] = replicas
    if not shards:
        raise ShardMapError(f"INDEXER_SHARDS={value!r} names no indexer shard")
    missing = sorted(set(range(len(shards))) - set(shards))
    if missing:
        raise ShardMapError(
            f"INDEXER_SHARDS has shards {sorted(shards)} but no shard "
            f"{', '.join(map(str, missing))}: number shards 0..N-1"
        )
    seen: dict[str, int] = {}
    for shard in sorted(shards):
        for target in shards[shard]:
            if target in seen:
                where = "twice in shard" if seen[target] == shard else f"in shards {seen[target]} and"
                raise ShardMapError(f"INDEXER_SHARDS lists replica {target} {where} {shard}")
            seen[target] = shard
    return tuple(shards[shard] for shard in range(len(shards)))


def single_replica_shards(targets: Iterable[str]) -> ShardReplicas:
    """``INDEXER_ADDRS`` (one target per shard) as a replica map with one replica per shard."""
    return tuple((target,) for target in targets)


class ShardRoute(int):
    """A shard number (where a listing is read) that also says which other shards its writes
    must reach: while a rebalance moves the listing's partition, writes go to the old and the
    new owner (`common.shard_map`). Being an int, callers that only pass shard numbers along
    (the gateway core) need not know."""

    also: tuple[int, ...]

    def __new__(cls, shard: int, also: tuple[int, ...] = ()) -> "ShardRoute":
        route = super().__new__(cls, shard)
        route.also = tuple(s for s in also if s != shard)
        return route

    @property
    def writes(self) -> tuple[int, ...]:
        """Every shard a write must reach: this one first."""
        return (int(self), *self.also)


class ShardRouting:
    """Routes listings to shards: by the versioned shard map when there is one, else by
    `shard_of` over the configured shards (the original routing). The map is swapped whole
    (`use`), so a request sees one version throughout each routing decision."""

    def __init__(self, shards: int, shard_map: ShardMap | None = None) -> None:
        self.shards = shards
        self.map: ShardMap | None = None
        if shard_map is not None:
            self.use(shard_map)

    def use(self, shard_map: ShardMap) -> None:
        """Switch to ``shard_map``; ShardMapError if it places partitions on unconfigured shards."""
        if shard_map.shards > self.shards:
            raise ShardMapError(
                f"shard map v{shard_map.version} places partitions on shard "
                f"{shard_map.shards - 1}, but only shards 0..{self.shards - 1} are "
                "configured (INDEXER_SHARDS / INDEXER_ADDRS)"
            )
        self.map = shard_map

    def shard_for(self, listing_id: str) -> ShardRoute:
        shard_map = self.map
        if shard_map is None:
            return ShardRoute(shard_of(listing_id, self.shards))
        partition = partition_of(listing_id, shard_map.partitions)
        return ShardRoute(shard_map.read_owner(partition), shard_map.write_owners(partition))

    def search_shards(self) -> tuple[int, ...]:
        shard_map = self.map
        return tuple(range(self.shards)) if shard_map is None else shard_map.search_shards()


class ShardMapWatch:
    """Reads the newest shard map from its store every ``interval_s`` and switches the routing
    to it, so every gateway follows a rebalance within about that time (also a gateway routing
    by hash, the moment some gateway creates the first map). A map that cannot be used is logged
    (once per version) and the current one kept; so is a store that cannot be read."""

    def __init__(self, store: ShardMapStore, routing: ShardRouting, interval_s: float = 2.0) -> None:
        self.store = store
        self.routing = routing
        self.interval_s = interval_s
        self._refused: int | None = None
        self._unreadable: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> None:
        try:
            latest = self.store.latest()
        except ShardMapError as exc:
            if self._unreadable != str(exc):  # once per problem, not every poll
                log.error(
                    "cannot read the shard map: %s; keeping %s",
                    exc,
                    f"v{self.routing.map.version}" if self.routing.map else "hash routing",
                )
                self._unreadable = str(exc)
            return
        if self._unreadable is not None:
            log.info("the shard map can be read again")
            self._unreadable = None
        current = self.routing.map
        if latest is None or (current is not None and latest.version <= current.version):
            return
        try:
            self.routing.use(latest)
        except ShardMapError as exc:
            if self._refused != latest.version:
                log.error("not switching to shard map v%d: %s", latest.version, exc)
                self._refused = latest.version
            return
        log.info(
            "switched to shard map v%d (%s, %d shards, %d partition(s) moving)",
            latest.version,
            latest.state,
            latest.shards,
            len(latest.moves),
        )

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="shard-map-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 1)


def open_shard_map(
    store: ShardMapStore, shards: int, partitions: int, *, create: bool = True
) -> ShardMap | None:
    """The newest map in ``store``. With ``create``, an empty store gets version 1 for ``shards``
    shards (`common.shard_map.initial`: the original routing when ``partitions`` is a multiple);
    without it, None."""
    latest = store.latest()
    if latest is not None or not create:
        return latest
    try:
        store.publish(initial(shards, partitions))
    except ShardMapConflict:  # another gateway created it first
        pass
    latest = store.latest()
    assert latest is not None
    log.info(
        "created shard map v%d: %d partitions on %d shard(s)",
        latest.version,
        latest.partitions,
        latest.shards,
    )
    return latest


def routing_for(shards: int, store: ShardMapStore, partitions: int, *, create: bool) -> ShardRouting:
    """The routing a gateway (or a tool writing like one) uses: by the newest shard map in
    ``store`` (version 1 is created when the store is empty and ``create``), else by hash over
    ``shards``. ShardMapError when the map cannot be used with these shards."""
    shard_map = open_shard_map(store, shards, partitions, create=create)
    if shard_map is not None:
        log.info(
            "routing by shard map v%d (%s, %d partitions on %d shard(s))",
            shard_map.version,
            shard_map.state,
            shard_map.partitions,
            shard_map.shards,
        )
    return ShardRouting(shards, shard_map)
