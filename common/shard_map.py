"""The shard map: which indexer shard owns each logical partition of the listings, versioned.

One owning module for the format (STYLE: contracts declared once); the gateway routes with it,
the indexer filters partitions with `partition_of`, ``services.gateway.rebalance`` writes it.

* Partition: ``blake2b-64(listing id) mod P`` (P fixed when the cluster is created, default
  256). It is the same hash as the gateway's original ``shard_of``, so when P is a multiple of
  the shard count N, ``owners[p] = p mod N`` routes every listing exactly as before (`initial`).
* Placement: rendezvous (highest random weight) hashing of ``(partition, shard)``. Growing from
  N to N' shards moves only the partitions whose highest-weight shard is a new one, about
  ``(N' - N) / N'`` of them (`plan`); the other partitions keep their owner.
* Versions: every change is a new map with version + 1. A rebalance goes through the states
  ``migrating`` (writes of moving partitions go to the old and the new owner, reads to the old)
  -> ``switched`` (reads from the new owners; writes still to both) -> ``stable`` with ``drop``
  (what the old owners delete) -> ``stable``. Re-running an interrupted rebalance resumes from
  the newest map.

Store: `ShardMapStore` is the small interface; the gateways' implementation keeps every version
as a row of the catalogue database (``services.gateway.shard_map_store``: the version is the
primary key, so two maps can never share a version, and a new version is only written on top of
the one it follows). Every gateway reads the newest version every few seconds, so they switch
together within that time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Protocol

DEFAULT_PARTITIONS = 256
STABLE, MIGRATING, SWITCHED = "stable", "migrating", "switched"
STATES = (STABLE, MIGRATING, SWITCHED)


class ShardMapError(ValueError):
    """A shard map that cannot be used (the message says why and what to do)."""


class ShardMapConflict(ShardMapError):
    """A new version could not be published: another writer (a second rebalance, a gateway
    creating version 1) published first. Read the newest map and decide again."""


class ShardMapUnavailable(ShardMapError):
    """The store of the shard map cannot be reached right now (retrying later may succeed)."""


def listing_hash(listing_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(listing_id.encode("utf-8"), digest_size=8).digest(), "big")


def partition_of(listing_id: str, partitions: int) -> int:
    """The logical partition (0..partitions-1) of a listing; stable across processes and runs."""
    return listing_hash(listing_id) % partitions


def rendezvous_owner(partition: int, shards: int) -> int:
    """The shard with the highest rendezvous weight for ``partition`` among 0..shards-1."""

    def weight(shard: int) -> int:
        key = f"{partition}:{shard}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")

    return max(range(shards), key=weight)


def plan(owners: tuple[int, ...], shards: int) -> tuple[int, ...]:
    """New owners for ``shards`` shards, moving as little as rendezvous hashing allows: a
    partition moves when its highest-weight shard is new, or when its owner is removed."""
    if shards < 1:
        raise ShardMapError(f"a cluster needs at least one shard, got {shards}")
    current = max(owners) + 1
    new = []
    for partition, owner in enumerate(owners):
        best = rendezvous_owner(partition, shards)
        if owner >= shards or (shards > current and best >= current):
            new.append(best)
        else:
            new.append(owner)
    return tuple(new)


@dataclass(frozen=True)
class ShardMap:
    """One version of the partition -> shard assignment (see the module docstring)."""

    version: int
    partitions: int
    owners: tuple[int, ...]
    state: str = STABLE
    #: migrating/switched: partition -> the shard it moves to (writes go to both meanwhile)
    moves: dict[int, int] = field(default_factory=dict)
    #: stable after a move: shard -> partitions it still holds copies of and must drop
    drop: dict[int, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.version < 1:
            raise ShardMapError(f"shard map version must be >= 1, got {self.version}")
        if len(self.owners) != self.partitions:
            raise ShardMapError(
                f"shard map v{self.version} gives {len(self.owners)} owners for "
                f"{self.partitions} partitions: every partition needs a shard"
            )
        if any(owner < 0 for owner in self.owners):
            raise ShardMapError(f"shard map v{self.version} has a partition with no shard")
        if self.state not in STATES:
            raise ShardMapError(f"shard map v{self.version} has unknown state {self.state!r}")
        if self.state != STABLE and not self.moves:
            raise ShardMapError(f"shard map v{self.version} is {self.state} but moves nothing")
        for partition in self.moves:
            if not 0 <= partition < self.partitions:
                raise ShardMapError(
                    f"shard map v{self.version} moves partition {partition}, outside 0..{self.partitions - 1}"
                )

    @property
    def shards(self) -> int:
        """Shards that own (or receive) at least one partition: 0..max."""
        return max([*self.owners, *self.moves.values()]) + 1

    def read_owner(self, partition: int) -> int:
        """The shard searches and fetches ask for ``partition``."""
        if self.state == SWITCHED and partition in self.moves:
            return self.moves[partition]
        return self.owners[partition]

    def write_owners(self, partition: int) -> tuple[int, ...]:
        """Every shard a write of ``partition`` must reach (two while it moves)."""
        owner = self.owners[partition]
        target = self.moves.get(partition)
        if target is None or target == owner or self.state == STABLE:
            return (owner,)
        return (owner, target) if self.state == MIGRATING else (target, owner)

    def search_shards(self) -> tuple[int, ...]:
        """The shards a search fans out to: every shard some partition is read from."""
        return tuple(sorted({self.read_owner(p) for p in range(self.partitions)}))

    def to_json(self) -> dict:
        return {
            "version": self.version,
            "partitions": self.partitions,
            "state": self.state,
            "owners": list(self.owners),
            "moves": {str(p): s for p, s in sorted(self.moves.items())},
            "drop": {str(s): list(ps) for s, ps in sorted(self.drop.items())},
        }

    @classmethod
    def from_json(cls, data: dict) -> "ShardMap":
        try:
            return cls(
                version=int(data["version"]),
                partitions=int(data["partitions"]),
                owners=tuple(int(o) for o in data["owners"]),
                state=str(data["state"]),
                moves={int(p): int(s) for p, s in data.get("moves", {}).items()},
                drop={int(s): tuple(int(p) for p in ps) for s, ps in data.get("drop", {}).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ShardMapError):
                raise
            raise ShardMapError(f"shard map is malformed: {type(exc).__name__}: {exc}") from None

    def next(self, **changes) -> "ShardMap":
        return replace(self, version=self.version + 1, **changes)


def initial(shards: int, partitions: int = DEFAULT_PARTITIONS) -> ShardMap:
    """Version 1 for a cluster of ``shards`` shards. When ``partitions`` is a multiple of
    ``shards`` the owners (``p mod shards``) route exactly as ``blake2b % shards`` did, so an
    existing cluster adopts the map without moving anything; otherwise rendezvous placement
    (for a new, empty cluster)."""
    if partitions % shards == 0:
        owners = tuple(p % shards for p in range(partitions))
    else:
        owners = tuple(rendezvous_owner(p, shards) for p in range(partitions))
    return ShardMap(1, partitions, owners)


class ShardMapStore(Protocol):
    """Where the versioned shard map lives, shared by every gateway and the rebalance command."""

    def latest(self) -> ShardMap | None:
        """The newest version (None before the first); ShardMapError if it cannot be used."""

    def publish(self, shard_map: ShardMap) -> None:
        """Store ``shard_map`` as the version after the newest one (compare-and-set);
        ShardMapConflict if that version exists or another version came first."""
