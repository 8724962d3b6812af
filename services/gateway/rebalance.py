"""Move partitions between indexer shards while reads and writes go on: ``python -m
services.gateway.rebalance --to 3``.

It reads the shard map from the catalogue database the gateways share (``GATEWAY_DB``, table
``shard_maps``, `services.gateway.shard_map_store`) and the replicas of every shard from ``INDEXER_SHARDS`` / ``INDEXER_ADDRS`` (list the new shards there first;
they start empty), plans the new owners with rendezvous hashing (`common.shard_map.plan`: only
partitions whose owner changes move, about 1/3 of them going from 2 to 3 shards) and walks the
map through its states, waiting ``--settle-s`` after each new version so every gateway (polling
every ``GATEWAY_SHARD_MAP_POLL_S``) has switched:

1. ``migrating``: gateways write moving partitions to the old and the new owner, read the old.
2. every replica of each new owner imports its partitions from a serving replica of the old
   owner (`ImportPartitions`: the old owner's snapshot + WAL records, writes meanwhile kept).
3. ``switched``: gateways read moving partitions from the new owner (writes still to both).
4. ``stable`` with ``drop``: writes only to the new owner; then every replica of each old owner
   deletes the partitions it gave away (`DropPartitions`), and a last ``stable`` map clears
   ``drop``.

Every new version is published with a compare-and-set on the version (the version after the
newest, or nothing), so two rebalance commands run at once cannot both advance the map: the
second stops with a message and can be run again once the first is done.

Interrupted (SIGKILL of the command, a node, a timeout)? Run the same command again: it resumes
from the newest map's state; imports and drops are idempotent, so no listing is lost or kept
twice. A replica down during an import or a drop is skipped with a warning: it catches up from a
peer of its own shard (which has the result) before it serves again.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import Message

from common.config import Settings
from common.security import (
    TLS_CLIENT_SETTINGS,
    WRITE_TOKEN_SETTINGS,
    TlsFiles,
    bearer_metadata,
    resolve_write_token,
)
from common.shard_map import (
    MIGRATING,
    STABLE,
    SWITCHED,
    ShardMap,
    ShardMapConflict,
    ShardMapError,
    ShardMapStore,
    plan,
)
from marketplace.indexer.v1 import indexer_pb2, indexer_pb2_grpc
from services.gateway.catalogue import Catalogue, CatalogueError, CatalogueUnavailable
from services.gateway.config import DB_FIELDS, GATEWAY_SETTINGS, database_password, shard_lists
from services.gateway.shards import ShardReplicas

#: What the command reads, declared with the gateway's settings (same variables, same flags).
REBALANCE_SETTINGS = Settings(
    *(GATEWAY_SETTINGS[name] for name in (*DB_FIELDS, "shard_map_poll_s", "indexer_addrs", "indexer_shards")),
    *WRITE_TOKEN_SETTINGS,
    *TLS_CLIENT_SETTINGS,
)

log = logging.getLogger("rebalance")


@dataclass
class RebalanceReport:
    """What a rebalance did (summed over the runs it took only for this run's steps)."""

    from_shards: int = 0
    to_shards: int = 0
    partitions: int = 0
    moved_partitions: int = 0
    vectors_before: int = 0
    vectors_moved: int = 0
    vectors_dropped: int = 0
    versions: list[int] = field(default_factory=list)

    @property
    def moved_fraction(self) -> float:
        return self.vectors_moved / self.vectors_before if self.vectors_before else 0.0


class Rebalancer:
    def __init__(
        self,
        store: ShardMapStore,
        replicas: ShardReplicas,
        *,
        write_token: str | None,
        settle_s: float,
        rpc_timeout_s: float = 600.0,
        say=print,
        tls: TlsFiles | None = None,
    ) -> None:
        self.store = store
        self.tls = tls or TlsFiles.from_env()
        self.replicas = replicas
        self.metadata = bearer_metadata(write_token)
        self.settle_s = settle_s
        self.rpc_timeout_s = rpc_timeout_s
        self.say = say
        self._channels: dict[str, grpc.Channel] = {}

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    def _stub(self, target: str) -> indexer_pb2_grpc.ReplicationStub:
        if target not in self._channels:
            self._channels[target] = self.tls.open_channel(target)
        return indexer_pb2_grpc.ReplicationStub(self._channels[target])

    def _publish(self, shard_map: ShardMap, report: RebalanceReport) -> ShardMap:
        self.store.publish(shard_map)
        report.versions.append(shard_map.version)
        self.say(
            f"published shard map v{shard_map.version} ({shard_map.state}); waiting "
            f"{self.settle_s:.1f}s for every gateway to switch"
        )
        time.sleep(self.settle_s)
        return shard_map

    def _vectors(self, shards: Sequence[int]) -> int:
        total = 0
        for shard in shards:
            for target in self.replicas[shard]:
                try:
                    channel = self._channels.get(target) or self.tls.open_channel(target)
                    self._channels[target] = channel
                    stats = indexer_pb2_grpc.IndexerStub(channel).GetStats(
                        indexer_pb2.GetStatsRequest(), timeout=10
                    )
                except grpc.RpcError:
                    continue
                total += sum(c.count for c in stats.collections)
                break
        return total

    def run(self, to: int) -> RebalanceReport:
        if to > len(self.replicas):
            raise ShardMapError(
                f"--to {to} needs shards 0..{to - 1} in INDEXER_SHARDS / "
                f"INDEXER_ADDRS; only {len(self.replicas)} are configured"
            )
        current = self.store.latest()
        if current is None:
            raise ShardMapError(
                "there is no shard map in the catalogue database yet: start "
                "the gateways with GATEWAY_SHARD_MAP=on (they create version 1 "
                "from the shards they route to), then rebalance"
            )
        report = RebalanceReport(from_shards=current.shards, to_shards=to, partitions=current.partitions)
        if current.state == STABLE and not current.drop:
            if current.shards == to:
                self.say(
                    f"shard map v{current.version} already places every partition on {to} "
                    "shard(s): nothing to move"
                )
                return report
            report.vectors_before = self._vectors(range(current.shards))
            owners = plan(current.owners, to)
            moves = {p: new for p, (old, new) in enumerate(zip(current.owners, owners)) if old != new}
            self.say(
                f"moving {len(moves)} of {current.partitions} partitions from "
                f"{current.shards} to {to} shard(s)"
            )
            current = self._publish(current.next(state=MIGRATING, moves=moves), report)
        report.moved_partitions = len(current.moves) or sum(map(len, current.drop.values()))
        if current.state == MIGRATING:
            report.vectors_moved = self._import(current)
            current = self._publish(current.next(state=SWITCHED), report)
        if current.state == SWITCHED:
            owners = tuple(current.moves.get(p, o) for p, o in enumerate(current.owners))
            drop: dict[int, list[int]] = defaultdict(list)
            for partition, _ in sorted(current.moves.items()):
                drop[current.owners[partition]].append(partition)
            current = self._publish(
                current.next(
                    state=STABLE, owners=owners, moves={}, drop={s: tuple(ps) for s, ps in drop.items()}
                ),
                report,
            )
        if current.drop:
            report.vectors_dropped = self._drop(current)
            self.store.publish(current.next(drop={}))
            report.versions.append(current.version + 1)
            self.say(f"published shard map v{current.version + 1} (stable): rebalance complete")
        return report

    def _import(self, shard_map: ShardMap) -> int:
        """Each new owner's replicas take over their partitions; returns vectors moved."""
        by_route: dict[tuple[int, int], list[int]] = defaultdict(list)
        for partition, target in sorted(shard_map.moves.items()):
            by_route[(shard_map.owners[partition], target)].append(partition)
        moved = 0
        for (source, target), partitions in sorted(by_route.items()):
            request = indexer_pb2.ImportPartitionsRequest(
                sources=list(self.replicas[source]),
                partitions=partitions,
                partition_count=shard_map.partitions,
            )
            imported = []
            for replica, reply, seconds in self._on_each_replica(
                target, "import into", "ImportPartitions", request
            ):
                imported.append(reply.imported)
                self.say(
                    f"  shard {source} -> {target}: {len(partitions)} partition(s), "
                    f"{reply.imported} vector(s) into {replica} from {reply.source} in {seconds:.2f}s"
                )
            if not imported:
                raise ShardMapError(
                    f"no replica of shard {target} took partitions from shard "
                    f"{source}; start one and run the rebalance again"
                )
            moved += max(imported)
        return moved

    def _drop(self, shard_map: ShardMap) -> int:
        dropped = 0
        for shard, partitions in sorted(shard_map.drop.items()):
            request = indexer_pb2.DropPartitionsRequest(
                partitions=list(partitions), partition_count=shard_map.partitions
            )
            for replica, reply, _seconds in self._on_each_replica(
                shard, "drop on", "DropPartitions", request
            ):
                dropped += reply.dropped
                self.say(
                    f"  shard {shard} replica {replica}: dropped {reply.dropped} vector(s) of "
                    f"{len(partitions)} partition(s) it gave away"
                )
        return dropped

    def _on_each_replica(
        self, shard: int, what: str, method: str, request: Message
    ) -> Iterator[tuple[str, Any, float]]:
        """The indexer RPC ``method`` with ``request`` on every replica of ``shard``: (replica,
        reply, seconds) for each that answered. A replica that is down is said and passed over
        (it catches up from a peer of its shard when it is back); any other error stops the
        rebalance, naming ``what`` failed."""
        for replica in self.replicas[shard]:
            started = time.perf_counter()
            try:
                reply = getattr(self._stub(replica), method)(
                    request, timeout=self.rpc_timeout_s, metadata=self.metadata
                )
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise ShardMapError(
                        f"{what} shard {shard} replica {replica} failed: {error.code().name}: {error.details()}"
                    ) from None
                self.say(
                    f"  shard {shard} replica {replica} is down: it catches up from a "
                    "peer of its shard when it is back"
                )
                continue
            yield replica, reply, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.gateway.rebalance", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--to", type=int, required=True, help="number of shards to spread over")
    parser.add_argument(
        "--settle-s",
        type=float,
        default=None,
        help="wait after each new map version (default 2 x poll interval + 1 s)",
    )
    args = REBALANCE_SETTINGS.add_flags(parser).parse_args(argv)
    settings = REBALANCE_SETTINGS.read(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settle_s = args.settle_s if args.settle_s is not None else 2 * settings["shard_map_poll_s"] + 1
    token = resolve_write_token(settings.pop("write_token"), settings.pop("write_token_file"))
    replicas = shard_lists(settings)
    try:
        catalogue = Catalogue.open(settings["db_path"], password=database_password(settings))
    except (CatalogueError, CatalogueUnavailable) as exc:
        print(f"rebalance: GATEWAY_DB: {exc}", file=sys.stderr)
        return 2
    rebalancer = Rebalancer(
        catalogue.shard_map_store(),
        replicas,
        write_token=token,
        settle_s=settle_s,
        tls=TlsFiles.from_values(settings),
    )
    started = time.perf_counter()
    try:
        report = rebalancer.run(args.to)
    except ShardMapConflict as exc:
        print(
            f"rebalance: {exc}. Is another rebalance running? Run this one again once it has "
            "finished (it resumes from the newest map).",
            file=sys.stderr,
        )
        return 1
    except ShardMapError as exc:
        print(f"rebalance: {exc}", file=sys.stderr)
        return 1
    finally:
        rebalancer.close()
        catalogue.close()
    print(
        f"rebalance done in {time.perf_counter() - started:.1f}s: {report.moved_partitions} "
        f"partition(s), {report.vectors_moved} of {report.vectors_before} vectors moved "
        f"(fraction {report.moved_fraction:.3f}), {report.vectors_dropped} dropped from old "
        f"owners; map versions {report.versions}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
