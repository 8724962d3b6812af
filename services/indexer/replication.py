"""Replicas of one indexer shard: who the data belongs to, and catching up from a peer.

Design and failure cases: ``docs/indexer-replication.md``. In short:

* Identity. A data directory records which shard it holds and the cluster's partition count
  (``REPLICA.json``, written at first start from ``INDEXER_SHARD`` / ``INDEXER_PARTITIONS``).
  Starting on another shard's directory is refused, naming both; so is catching up from a peer
  that holds another shard.
* Catch-up. A replica started with ``INDEXER_PEERS`` serves no reads (health NOT_SERVING,
  Search/Fetch UNAVAILABLE) until it has caught up: it keeps accepting writes (logged in its own
  WAL and journalled), copies a serving peer's fresh snapshot (the snapshot files, checksums
  verified by the snapshot reader) plus the peer's WAL records written after that snapshot (the
  WAL's own record encoding, CRC-checked), replays those records onto the copy, re-applies its
  journal on top, snapshots, and only then serves. Writes are idempotent by id, so a write that
  reached both the peer and the journal is applied twice with the same result.
* First to serve. When no peer is serving (every replica of the shard was down), a replica
  serves its own data only once every peer answers and none holds a newer write
  (``last_write_unix_ms``); otherwise it waits, so the replica with the newest data goes first
  and the others catch up from it.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from common.security import TlsFiles
from marketplace.indexer.v1 import indexer_pb2, indexer_pb2_grpc
from common.shard_map import partition_of
from services.indexer.core import IndexStore
from services.indexer.errors import CorruptData, IndexerError
from services.indexer.snapshot import CURRENT, MANIFEST, SNAPSHOTS, read_snapshot
from services.indexer.wal import decode_record, encode_record

log = logging.getLogger(__name__)

IDENTITY_FILE = "REPLICA.json"
CATCH_UP_DIR = "catch-up"
CHUNK_BYTES = 1 << 20
SERVING = "serving"
CATCHING_UP = "catching_up"
REFUSING = "refusing"


class ReplicaMismatch(IndexerError):
    """Data that belongs to another shard or another shard count (the message names both)."""


@dataclass(frozen=True)
class ReplicaIdentity:
    """Which shard a replica's data belongs to, in a cluster of how many logical partitions
    (-1 / 0: not configured)."""

    shard: int = -1
    partitions: int = 0

    @property
    def configured(self) -> bool:
        return self.shard >= 0

    def __str__(self) -> str:
        return (
            f"shard {self.shard} of a {self.partitions}-partition cluster" if self.configured else "no shard"
        )


def check_identity(data_dir: Path, identity: ReplicaIdentity) -> None:
    """Refuse a data directory that holds another shard's data; record the identity of a new one."""
    if not identity.configured:
        return
    path = data_dir / IDENTITY_FILE
    if path.exists():
        stored = json.loads(path.read_text(encoding="utf-8"))
        have = ReplicaIdentity(int(stored["shard"]), int(stored["partitions"]))
        if have != identity:
            raise ReplicaMismatch(
                f"data directory {data_dir} holds {have}, but this replica is "
                f"configured as {identity} (INDEXER_SHARD / INDEXER_PARTITIONS); "
                "point it at the right directory or an empty one"
            )
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"shard": identity.shard, "partitions": identity.partitions}) + "\n", encoding="utf-8"
    )


def stream_state(store: IndexStore, status: indexer_pb2.ReplicaStatus) -> Iterator[indexer_pb2.StateChunk]:
    """A consistent copy of ``store`` for a peer: a fresh snapshot's files (manifest last), then
    every WAL record logged after that snapshot up to now."""
    first = True

    def chunk(**fields) -> indexer_pb2.StateChunk:
        nonlocal first
        message = indexer_pb2.StateChunk(**fields)
        if first:
            message.source.CopyFrom(status)
            first = False
        return message

    with store.pinned_snapshot() as (directory, last_seq):
        files = sorted((p for p in directory.iterdir() if p.name != MANIFEST), key=lambda p: p.name)
        for path in [*files, directory / MANIFEST]:
            with open(path, "rb") as handle:
                data = handle.read(CHUNK_BYTES)
                yield chunk(
                    snapshot_file=indexer_pb2.SnapshotFileChunk(
                        snapshot=directory.name, file=path.name, data=data
                    )
                )
                while data := handle.read(CHUNK_BYTES):
                    yield chunk(
                        snapshot_file=indexer_pb2.SnapshotFileChunk(
                            snapshot=directory.name, file=path.name, data=data
                        )
                    )
        for record in store.records_after(last_seq):
            yield chunk(wal_record=encode_record(record.seq, record.kind, record.header, record.body))


class Replicator:
    """The replication state of one indexer replica: serving, catching up, or refusing."""

    def __init__(
        self,
        store: IndexStore,
        identity: ReplicaIdentity,
        peers: Sequence[str],
        on_serving: Callable[[bool], None],
        *,
        retry_s: float = 1.0,
        write_metadata: tuple[tuple[str, str], ...] = (),
        tls: TlsFiles | None = None,
    ) -> None:
        self.store = store
        self.tls = tls or TlsFiles.from_env()
        self.identity = identity
        self.peers = list(peers)
        self.on_serving = on_serving
        self.retry_s = retry_s
        self.state = SERVING if not self.peers else CATCHING_UP
        self.detail = "" if not self.peers else "starting: catching up from a peer"
        self.caught_up_count = 0
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._channels = {peer: self.tls.open_channel(peer) for peer in self.peers}

    # -- what the servicers ask ---------------------------------------------------------------------
    @property
    def serving(self) -> bool:
        return self.state == SERVING

    def status(self) -> indexer_pb2.ReplicaStatus:
        items = sum(entry["count"] for entry in self.store.stats())
        return indexer_pb2.ReplicaStatus(
            shard=self.identity.shard,
            partitions=self.identity.partitions,
            state=self.state,
            last_write_unix_ms=self.store.last_write_ms,
            items=items,
            detail=self.detail,
        )

    def request_catch_up(self) -> str:
        """Catch up now (a gateway saw this replica miss a write); NOT_SERVING until done."""
        if not self.peers:
            return REFUSING  # nobody to catch up from: this replica's data is the shard's
        with self._lock:
            if self.state != REFUSING:
                self._set(CATCHING_UP, "asked to catch up: it missed a write")
            self._wanted.set()
        return self.state

    # -- the catch-up loop --------------------------------------------------------------------------
    def start(self) -> None:
        if not self.peers:
            self.on_serving(True)
            return
        self.on_serving(False)
        self._wanted.set()
        self._thread = threading.Thread(target=self._run, name="indexer-catch-up", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wanted.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for channel in self._channels.values():
            channel.close()

    def _set(self, state: str, detail: str) -> None:
        if (state, detail) != (self.state, self.detail):
            log.log(
                logging.ERROR if state == REFUSING else logging.INFO,
                "replica %s: %s%s",
                self.identity,
                state,
                f" ({detail})" if detail else "",
            )
        self.state, self.detail = state, detail
        self.on_serving(state == SERVING)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wanted.wait()
            if self._stop.is_set():
                return
            self._wanted.clear()
            self._set(CATCHING_UP, self.detail or "catching up from a peer")
            while not self._stop.is_set():
                try:
                    if self.catch_up_once():
                        break
                except Exception:  # keep trying: a peer may come back
                    log.exception("catch-up failed; retrying")
                self._stop.wait(self.retry_s)

    def _peer_statuses(self) -> dict[str, indexer_pb2.ReplicaStatus | None]:
        statuses = {}
        for peer, channel in self._channels.items():
            try:
                statuses[peer] = indexer_pb2_grpc.ReplicationStub(channel).GetReplicaStatus(
                    indexer_pb2.GetReplicaStatusRequest(), timeout=2
                )
            except grpc.RpcError:
                statuses[peer] = None
        return statuses

    def catch_up_once(self) -> bool:
        """One try: copy a serving peer, or serve first if this replica's data is the newest.
        True when this replica now serves."""
        statuses = self._peer_statuses()
        matching = {}
        for peer, status in statuses.items():
            if status is None:
                continue
            theirs = ReplicaIdentity(status.shard, status.partitions)
            if theirs != self.identity:
                log.error(
                    "peer %s holds %s but this replica is %s: not copying from it; fix "
                    "INDEXER_PEERS or that peer's INDEXER_SHARD",
                    peer,
                    theirs,
                    self.identity,
                )
                continue
            matching[peer] = status
        serving = [peer for peer, status in matching.items() if status.state == SERVING]
        if not serving:
            if not matching and any(status is not None for status in statuses.values()):
                self._set(REFUSING, "every reachable peer holds another shard's data")
                self._wanted.set()
                return False
            unreachable = [peer for peer, status in statuses.items() if status is None]
            newer = [
                peer
                for peer, status in matching.items()
                if status.last_write_unix_ms > self.store.last_write_ms
            ]
            if unreachable or newer:
                self.detail = (
                    f"waiting: no peer serving; unreachable {', '.join(unreachable)}"
                    if unreachable
                    else f"waiting for {', '.join(newer)} (newer data) to serve"
                )
                return False
            self._set(SERVING, "no peer serving and none holds newer data: serving own data")
            return True
        peer = serving[self.caught_up_count % len(serving)]
        started = time.perf_counter()
        self.store.begin_journal()
        try:
            collections, last_write_ms, copied = self._copy_from(peer)
            replayed = self.store.adopt(collections, last_write_ms)
        except BaseException:
            self.store.end_journal()
            raise
        self.caught_up_count += 1
        items = sum(index.count for index in collections.values())
        log.info(
            "caught up from %s in %.2fs: %d item(s), %d WAL record(s) after its snapshot, "
            "%d write(s) received meanwhile re-applied",
            peer,
            time.perf_counter() - started,
            items,
            copied,
            replayed,
        )
        self._set(SERVING, "")
        return True

    def _channel(self, target: str) -> grpc.Channel:
        if target not in self._channels:
            self._channels[target] = self.tls.open_channel(target)
        return self._channels[target]

    def import_partitions(
        self, sources: Sequence[str], partitions: set[int], partition_count: int
    ) -> tuple[int, str]:
        """Rebalance: take over ``partitions`` from a serving replica among ``sources`` (another
        shard's). Returns (items taken over, the source copied)."""
        if self.identity.configured and partition_count != self.identity.partitions:
            raise ReplicaMismatch(
                f"the rebalance uses {partition_count} partitions, this replica is {self.identity}"
            )
        source = None
        for target in sources:
            try:
                status = indexer_pb2_grpc.ReplicationStub(self._channel(target)).GetReplicaStatus(
                    indexer_pb2.GetReplicaStatusRequest(), timeout=5
                )
            except grpc.RpcError:
                continue
            if status.state == SERVING and status.partitions in (0, partition_count):
                source = target
                break
        if source is None:
            raise IndexerError(f"no serving replica among {', '.join(sources)} to import partitions from")
        self.store.begin_journal()
        try:
            try:
                collections, _, _ = self._copy_from(source, same_shard=False)
            except grpc.RpcError as error:  # the source went away mid-copy: the caller retries
                raise IndexerError(
                    f"copying from {source} failed: {error.code().name}: {error.details()}"
                ) from None
            taken = self.store.merge_partitions(
                collections, lambda listing_id: partition_of(listing_id, partition_count) in partitions
            )
        except BaseException:
            self.store.end_journal()
            raise
        log.info("imported %d item(s) of %d partition(s) from %s", taken, len(partitions), source)
        return taken, source

    def drop_partitions(self, partitions: set[int], partition_count: int) -> int:
        if self.identity.configured and partition_count != self.identity.partitions:
            raise ReplicaMismatch(
                f"the rebalance uses {partition_count} partitions, this replica is {self.identity}"
            )
        dropped = self.store.drop_partitions(
            lambda listing_id: partition_of(listing_id, partition_count) in partitions
        )
        log.info("dropped %d item(s) of %d partition(s) moved to another shard", dropped, len(partitions))
        return dropped

    def _copy_from(self, peer: str, *, same_shard: bool = True):
        """The peer's collections (snapshot + WAL records after it) and its newest write time."""
        assert self.store.data_dir is not None
        root = self.store.data_dir / CATCH_UP_DIR
        shutil.rmtree(root, ignore_errors=True)
        records = []
        snapshot_name = None
        stub = indexer_pb2_grpc.ReplicationStub(self._channel(peer))
        try:
            handles: dict[str, object] = {}
            for chunk in stub.StreamState(indexer_pb2.StreamStateRequest(), timeout=600):
                if chunk.HasField("source") and same_shard:
                    theirs = ReplicaIdentity(chunk.source.shard, chunk.source.partitions)
                    if theirs != self.identity:
                        raise ReplicaMismatch(f"peer {peer} holds {theirs}, this replica is {self.identity}")
                part = chunk.WhichOneof("part")
                if part == "snapshot_file":
                    piece = chunk.snapshot_file
                    if "/" in piece.file or "/" in piece.snapshot or piece.file.startswith("."):
                        raise CorruptData(f"peer {peer} sent a file named {piece.file!r}")
                    snapshot_name = piece.snapshot
                    if piece.file not in handles:
                        directory = root / SNAPSHOTS / piece.snapshot
                        directory.mkdir(parents=True, exist_ok=True)
                        handles[piece.file] = open(directory / piece.file, "wb")
                    handles[piece.file].write(piece.data)
                elif part == "wal_record":
                    records.append(decode_record(chunk.wal_record))
            for handle in handles.values():
                handle.close()
            if snapshot_name is None:
                raise CorruptData(f"peer {peer} sent no snapshot")
            (root / CURRENT).write_text(snapshot_name + "\n", encoding="utf-8")
            loaded = read_snapshot(root)  # verifies sizes and checksums from the manifest
            assert loaded is not None
            copy = IndexStore.in_memory()
            copy._collections.update(loaded.collections)
            copy.last_write_ms = loaded.last_write_ms
            expected = loaded.last_seq + 1
            for record in records:
                if record.seq != expected:
                    raise CorruptData(f"peer {peer} sent WAL record {record.seq}, expected {expected}")
                copy._replay(record, f"peer {peer} WAL record {record.seq}")
                expected += 1
            return dict(copy._collections), copy.last_write_ms, len(records)
        finally:
            shutil.rmtree(root, ignore_errors=True)
