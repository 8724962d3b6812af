"""The indexer core without gRPC: ``VectorIndex`` (one collection) and ``IndexStore`` (all
collections of a data directory, with the write-ahead log, snapshots and crash recovery).

Write path (``IndexStore.upsert`` / ``delete``), serialised by one store-wide lock:
    validate (nothing changes if invalid) -> append to the WAL and fsync -> apply to the index
    under its exclusive lock -> reply. An acknowledged write is therefore always in the WAL, and
    a search sees a batch entirely or not at all.

Snapshots (``IndexStore.snapshot``), periodically, every N WAL records, and on close:
    rotate the WAL to a new segment -> write every collection into a new snapshot directory ->
    switch CURRENT -> delete WAL segments older than the rotation. Searches go on meanwhile;
    writes wait. Collections with many dead slots are compacted first.

Start-up (``IndexStore.open``): load the snapshot named by CURRENT (checksums verified), replay
the newer WAL records, drop a torn tail with a warning; any other damage raises CorruptData.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from services.indexer.attributes import Attributes
from common.errors import ServiceError
from services.indexer.errors import CorruptData, IndexerError, InvalidArgument, NotFound
from services.indexer.filters import Condition
from services.indexer.snapshot import CURRENT, SNAPSHOTS, read_snapshot, write_snapshot
from services.indexer.spec import DEFAULT_COLLECTION, CollectionSpec
from services.indexer.vector_index import (
    DeleteResult,
    Hit,
    StoredItem,
    UpsertBatch,
    UpsertResult,
    VectorIndex,
)
from services.indexer.wal import RecordKind, WalRecord, WriteAheadLog

__all__ = [
    "Attributes",
    "Condition",
    "DeleteResult",
    "Hit",
    "IndexStore",
    "StoreOptions",
    "StoredItem",
    "UpsertResult",
    "VectorIndex",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreOptions:
    """How the store persists: see the config module for the matching environment variables."""

    fsync: bool = True
    snapshot_every_records: int = 10_000  # snapshot once the WAL holds this many records ...
    snapshot_every_bytes: int = 1 << 30  # ... or this many bytes (0 disables either trigger)
    compact_dead_fraction: float = 0.3  # compact a collection at snapshot time above this
    auto_create: bool = False  # Upsert into an unknown collection creates it


class IndexStore:
    """Named collections with durable writes. Use ``open`` (durable) or ``in_memory``."""

    def __init__(self, data_dir: Path | None, options: StoreOptions = StoreOptions()) -> None:
        self.data_dir = data_dir
        self.options = options
        self._collections: dict[str, VectorIndex] = {}
        self._write_lock = threading.RLock()
        self._wal: WriteAheadLog | None = None
        self._lock_file = None
        self._closed = False
        self._dirty = False
        self._snapshot_wanted = threading.Event()
        self._stop = threading.Event()
        self._snapshotter: threading.Thread | None = None
        self.last_snapshot_error: str | None = None
        #: called with the seconds each snapshot took (metrics: `services.indexer.metrics`)
        self.snapshot_observer: Callable[[float], None] | None = None
        #: Wall-clock ms of the newest write applied (persisted in WAL headers and snapshots).
        self.last_write_ms = 0
        #: Writes logged while a catch-up runs (`begin_journal`), re-applied by `adopt`.
        self._journal: list[WalRecord] | None = None
        self._snapshot_pins = 0

    # -- opening -------------------------------------------------------------------------------------
    @classmethod
    def in_memory(
        cls, specs: Iterable[CollectionSpec] = (), options: StoreOptions = StoreOptions()
    ) -> "IndexStore":
        """A store without persistence (benchmarks, tests, tools)."""
        store = cls(None, options)
        for spec in specs:
            store._collections[spec.name] = VectorIndex(spec)
        return store

    @classmethod
    def open(
        cls,
        data_dir: Path,
        specs: Iterable[CollectionSpec] = (),
        *,
        specs_are_explicit: bool = True,
        options: StoreOptions = StoreOptions(),
    ) -> "IndexStore":
        """Open (creating if needed) the data directory: lock it, load the snapshot, replay the
        WAL, then create configured collections that do not exist yet.

        A configured collection that exists with another dimension or metric is a configuration
        error when ``specs_are_explicit`` (the operator set them) and is ignored otherwise (the
        defaults never override what a data directory holds). A different index type only warns:
        the stored index is kept (rebuild with ``python -m services.indexer.build`` to change it).
        """
        store = cls(data_dir, options)
        data_dir.mkdir(parents=True, exist_ok=True)
        store._lock_data_dir()
        try:
            started = time.perf_counter()
            snapshot = read_snapshot(data_dir)
            if snapshot is not None:
                store._collections.update(snapshot.collections)
                store.last_write_ms = snapshot.last_write_ms
            wal = WriteAheadLog(data_dir / "wal", fsync=options.fsync)
            replayed = 0
            for record in wal.recover(
                snapshot.wal_segment if snapshot else 1, snapshot.last_seq if snapshot else 0
            ):
                store._replay(record, f"WAL record {record.seq} in {wal.directory}")
                replayed += 1
            store._wal = wal
            store._dirty = replayed > 0
            log.info(
                "recovered %s in %.2fs: %d WAL record(s) replayed",
                data_dir,
                time.perf_counter() - started,
                replayed,
                extra={"fields": {"collections": {n: c.count for n, c in store._collections.items()}}},
            )
            for spec in specs:
                store._reconcile(spec, specs_are_explicit)
        except BaseException:
            store._release_data_dir()
            raise
        return store

    def _lock_data_dir(self) -> None:
        assert self.data_dir is not None
        path = self.data_dir / "LOCK"
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise IndexerError(
                f"data directory {self.data_dir} is in use by another indexer process (lock {path} is held)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock_file = handle

    def _release_data_dir(self) -> None:
        if self._wal is not None:
            self._wal.close()
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def _reconcile(self, spec: CollectionSpec, explicit: bool) -> None:
        existing = self._collections.get(spec.name)
        if existing is None:
            self.create_collection(spec)
            return
        have = existing.spec
        if (have.dimension, have.metric) != (spec.dimension, spec.metric):
            message = (
                f"collection {spec.name!r} is stored with dimension {have.dimension} / metric "
                f"{have.metric} but configured as {spec.dimension} / {spec.metric}"
            )
            if explicit:
                raise InvalidArgument(message + "; fix INDEXER_COLLECTIONS or rebuild the collection")
            log.info("%s; keeping the stored collection (configuration is the default)", message)
        elif have.index_type != spec.index_type:
            log.warning(
                "collection %r is stored as %s, configured as %s; keeping %s (rebuild with "
                "python -m services.indexer.build to change it)",
                spec.name,
                have.index_type,
                spec.index_type,
                have.index_type,
            )

    def _replay(self, record: WalRecord, where: str) -> None:
        """Apply one logged record; anything that does not fit is corruption."""
        self.last_write_ms = max(self.last_write_ms, int(record.header.get("at", 0)))
        try:
            if record.kind == RecordKind.CREATE_COLLECTION:
                spec = CollectionSpec.from_json(record.header["spec"])
                if spec.name not in self._collections:  # a catch-up journal may repeat one
                    self._collections[spec.name] = VectorIndex(spec)
                return
            index = self._collections.get(record.header["collection"])
            if index is None:
                raise CorruptData(
                    f"{where} writes to collection {record.header['collection']!r}, which does not exist"
                )
            if record.kind == RecordKind.UPSERT:
                index.apply_upsert(decode_upsert(record, index.dimension))
            elif record.kind == RecordKind.DELETE:
                stored, _ = index.prepare_delete(record.header["ids"], False)
                index.apply_delete(stored)
        except CorruptData:
            raise
        except (KeyError, ValueError, TypeError, ServiceError) as exc:
            raise CorruptData(f"{where} cannot be applied: {type(exc).__name__}: {exc}") from None

    # -- collections -----------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._collections)

    def collection(self, name: str) -> VectorIndex:
        """The collection called ``name`` (empty means "image"); NotFound if there is none."""
        name = name or DEFAULT_COLLECTION
        index = self._collections.get(name)
        if index is None:
            known = ", ".join(sorted(self._collections)) or "none"
            raise NotFound(f"collection {name!r} does not exist (collections: {known})")
        return index

    def create_collection(self, spec: CollectionSpec) -> VectorIndex:
        """Create an empty collection (durably); InvalidArgument if the name is taken."""
        with self._write_lock:
            if spec.name in self._collections:
                raise InvalidArgument(f"collection {spec.name!r} already exists")
            self._log(RecordKind.CREATE_COLLECTION, {"spec": spec.to_json()})
            index = VectorIndex(spec)
            self._collections[spec.name] = index
            log.info("created collection %s", spec.to_json())
            return index

    def replace_collection(self, index: VectorIndex) -> None:
        """Swap in a (re)built collection and snapshot at once, so the swap is durable when this
        returns. Used by the build command (the server is not running then)."""
        with self._write_lock:
            self._collections[index.name] = index
            self._dirty = True
            if self.data_dir is not None:
                self.snapshot()

    # -- writes --------------------------------------------------------------------------------------
    def upsert(
        self, collection: str, ids: Sequence[str], vectors, attributes: Sequence[Attributes] | None = None
    ) -> UpsertResult:
        """Insert or replace items atomically; durable when it returns."""
        with self._write_lock:
            index = self._collection_for_upsert(collection, vectors)
            with index.writer_lock:
                batch = index.prepare_upsert(ids, vectors, attributes)
                if not batch.ids:
                    return UpsertResult(0, 0)
                self._log(RecordKind.UPSERT, *encode_upsert(index.name, batch))
                return index.apply_upsert(batch)

    def delete(self, collection: str, ids: Sequence[str], strict: bool = False) -> DeleteResult:
        """Remove items; unknown ids are reported, or fail the whole call when ``strict``."""
        with self._write_lock:
            index = self.collection(collection)
            with index.writer_lock:
                stored, unknown = index.prepare_delete(ids, strict)
                if stored:
                    self._log(RecordKind.DELETE, {"collection": index.name, "ids": stored})
                return DeleteResult(index.apply_delete(stored), unknown)

    def _collection_for_upsert(self, collection: str, vectors) -> VectorIndex:
        name = collection or DEFAULT_COLLECTION
        if name in self._collections or not self.options.auto_create:
            return self.collection(name)
        array = np.asarray(vectors)
        if array.ndim != 2 or not array.shape[0]:
            raise InvalidArgument(
                f"collection {name!r} does not exist and cannot be created from an empty upsert"
            )
        return self.create_collection(CollectionSpec(name, int(array.shape[1])))

    def _log(self, kind: RecordKind, header: dict, body: bytes = b"") -> None:
        if self._closed:
            raise IndexerError("the index store is closed")
        if kind != RecordKind.CREATE_COLLECTION:
            self.last_write_ms = max(self.last_write_ms + 1, int(time.time() * 1000))
            header = {**header, "at": self.last_write_ms}
        if self._wal is None:
            return  # in-memory store
        seq = self._wal.append(kind, header, body)
        if self._journal is not None:
            self._journal.append(WalRecord(seq, kind, header, body))
        self._dirty = True
        wal = self._wal
        if (
            self.options.snapshot_every_records
            and wal.records_since_rotation >= self.options.snapshot_every_records
        ) or (
            self.options.snapshot_every_bytes
            and wal.bytes_since_rotation >= self.options.snapshot_every_bytes
        ):
            self._snapshot_wanted.set()

    # -- reads ---------------------------------------------------------------------------------------
    def search(
        self,
        collection: str,
        queries,
        k: int,
        conditions: Iterable[Condition] = (),
        *,
        group_by_listing: bool = False,
        nprobe: int = 0,
        ef_search: int = 0,
    ) -> list[list[Hit]]:
        return self.collection(collection).search(
            queries, k, conditions, group_by_listing=group_by_listing, nprobe=nprobe, ef_search=ef_search
        )

    def fetch(self, collection: str, ids: Sequence[str]) -> tuple[list[StoredItem], list[str]]:
        return self.collection(collection).fetch(ids)

    def list_ids(self, collection: str, after: str, limit: int) -> list[tuple[str, str]]:
        return self.collection(collection).list_ids(after, limit)

    def stats(self, collection: str = "") -> list[dict]:
        chosen = [self.collection(collection)] if collection else list(self._collections.values())
        return [
            {
                "name": c.name,
                "count": c.count,
                "dimension": c.dimension,
                "index_type": c.spec.index_type,
                "metric": c.spec.metric,
            }
            for c in chosen
        ]

    # -- snapshots -------------------------------------------------------------------------------------
    def snapshot(self, force: bool = False) -> str | None:
        """Write a snapshot now (if anything changed since the last one, or ``force``) and
        truncate the WAL; returns the snapshot name, or None for an in-memory or unchanged store,
        or while a replica copies the current snapshot (`pinned_snapshot`)."""
        if self.data_dir is None or self._wal is None:
            return None
        with self._write_lock:
            self._snapshot_wanted.clear()
            if self._snapshot_pins and not force:
                return None
            if not self._dirty and not force:
                return None
            started = time.perf_counter()
            for index in self._collections.values():
                if index.needs_compaction(self.options.compact_dead_fraction):
                    dead = index.dead_count
                    index.compact()
                    log.info("compacted collection %s: %d dead slot(s) dropped", index.name, dead)
            last_seq = self._wal.next_seq - 1
            segment = self._wal.rotate()
            name = write_snapshot(
                self.data_dir,
                segment,
                last_seq,
                list(self._collections.values()),
                fsync=self.options.fsync,
                last_write_ms=self.last_write_ms,
            )
            self._wal.drop_before(segment)
            self._dirty = False
            seconds = time.perf_counter() - started
            log.info("snapshot %s written in %.2fs (WAL truncated up to seq %d)", name, seconds, last_seq)
            if self.snapshot_observer is not None:
                self.snapshot_observer(seconds)
            return name

    # -- replication (services.indexer.replication) --------------------------------------------------
    @contextmanager
    def pinned_snapshot(self) -> Iterator[tuple[Path, int]]:
        """Write a fresh snapshot and keep it (and the WAL after it) on disk while the block runs;
        yields (snapshot directory, its last WAL seq). A peer copies it to catch up."""
        if self.data_dir is None or self._wal is None:
            raise IndexerError("an in-memory index store has no snapshot to copy")
        with self._write_lock:
            self.snapshot(force=True)
            self._snapshot_pins += 1
            snapshot = (self.data_dir / CURRENT).read_text(encoding="utf-8").strip()
            last_seq = self._wal.next_seq - 1
        try:
            yield self.data_dir / SNAPSHOTS / snapshot, last_seq
        finally:
            with self._write_lock:
                self._snapshot_pins -= 1

    def records_after(self, seq: int) -> list[WalRecord]:
        """The logged writes after WAL position ``seq`` (inside `pinned_snapshot`)."""
        with self._write_lock:
            assert self._wal is not None
            return self._wal.records_after(seq)

    def begin_journal(self) -> None:
        """Keep every write logged from now on, to be re-applied on top of a peer's copy."""
        with self._write_lock:
            self._journal = []

    def end_journal(self) -> None:
        with self._write_lock:
            self._journal = None

    def adopt(self, collections: dict[str, VectorIndex], last_write_ms: int) -> int:
        """Replace every collection with a peer's copy, re-apply the writes logged here since
        `begin_journal`, and snapshot (durable when this returns). Returns the re-applied count.
        A crash before the snapshot leaves the old state plus those writes: the catch-up reruns."""
        with self._write_lock:
            journal, self._journal = self._journal or [], None
            self._collections = dict(collections)
            self.last_write_ms = max(self.last_write_ms, last_write_ms)
            for record in journal:
                self._replay(record, f"catch-up journal record {record.seq}")
            self._dirty = True
            self.snapshot(force=True)
            return len(journal)

    def merge_partitions(self, collections: dict[str, VectorIndex], belongs: Callable[[str], bool]) -> int:
        """Take over a peer's items whose listing (``belongs(listing_id)``) moves to this shard:
        drop what this store holds of them (an interrupted earlier import), upsert the peer's,
        re-apply the writes journalled since `begin_journal`, and snapshot. Returns how many
        items were taken over."""
        with self._write_lock:
            journal, self._journal = self._journal or [], None
            taken = 0
            for name, source in collections.items():
                if name not in self._collections:
                    self.create_collection(source.spec)
                local = self._collections[name]
                held, _ = local.fetch(local.ids())
                stale = [item.id for item in held if belongs(item.attributes.listing_id or item.id)]
                if stale:
                    self.delete(name, stale)
                items, _ = source.fetch(source.ids())
                chosen = [item for item in items if belongs(item.attributes.listing_id or item.id)]
                for start in range(0, len(chosen), 1024):
                    batch = chosen[start : start + 1024]
                    self.upsert(
                        name,
                        [i.id for i in batch],
                        np.stack([i.vector for i in batch]),
                        [i.attributes for i in batch],
                    )
                taken += len(chosen)
            for record in journal:
                self._replay(record, f"import journal record {record.seq}")
            self._dirty = True
            self.snapshot(force=True)
            return taken

    def drop_partitions(self, belongs: Callable[[str], bool]) -> int:
        """Delete (durably) every item whose listing ``belongs``; returns how many."""
        with self._write_lock:
            dropped = 0
            for name, index in list(self._collections.items()):
                held, _ = index.fetch(index.ids())
                ids = [item.id for item in held if belongs(item.attributes.listing_id or item.id)]
                for start in range(0, len(ids), 1024):
                    dropped += self.delete(name, ids[start : start + 1024]).deleted
            return dropped

    def start_snapshots(self, interval_s: float) -> None:
        """Snapshot in a background thread every ``interval_s`` seconds (if changed) and whenever
        the WAL passes the size thresholds."""
        if self.data_dir is None or self._snapshotter is not None:
            return

        def loop() -> None:
            while not self._stop.is_set():
                self._snapshot_wanted.wait(interval_s if interval_s > 0 else None)
                if self._stop.is_set():
                    return
                try:
                    self.snapshot()
                    self.last_snapshot_error = None
                except Exception as exc:  # keep serving: the WAL still holds every write
                    self.last_snapshot_error = f"{type(exc).__name__}: {exc}"
                    log.exception("snapshot failed; writes stay in the WAL")
                    self._stop.wait(min(60.0, interval_s or 60.0))

        self._snapshotter = threading.Thread(target=loop, name="indexer-snapshots", daemon=True)
        self._snapshotter.start()

    def close(self, snapshot: bool = True) -> None:
        """Stop background snapshots, write a final snapshot (optional) and release the data
        directory. Idempotent."""
        if self._closed:
            return
        self._stop.set()
        self._snapshot_wanted.set()
        if self._snapshotter is not None:
            self._snapshotter.join()
        with self._write_lock:
            try:
                if snapshot:
                    self.snapshot()
            finally:
                self._closed = True
                self._release_data_dir()


# -- WAL encodings of writes (JSON header + raw float32 body; no pickle) -----------------------------
def encode_upsert(collection: str, batch: UpsertBatch) -> tuple[dict, bytes]:
    header = {
        "collection": collection,
        "ids": batch.ids,
        "n": len(batch.ids),
        "dim": int(batch.vectors.shape[1]),
        "attributes": [a.to_row() for a in batch.attributes],
    }
    return header, np.ascontiguousarray(batch.vectors, dtype="<f4").tobytes()


def decode_upsert(record: WalRecord, dimension: int) -> UpsertBatch:
    header = record.header
    n, dim = int(header["n"]), int(header["dim"])
    if dim != dimension or len(record.body) != n * dim * 4 or len(header["ids"]) != n:
        raise ValueError(
            f"upsert of {n} x {dim} does not match its {len(record.body)}-byte body "
            f"or the collection dimension {dimension}"
        )
    vectors = np.frombuffer(record.body, dtype="<f4").reshape(n, dim).astype(np.float32)
    attributes = [Attributes.from_row(row) for row in header["attributes"]]
    return UpsertBatch(list(header["ids"]), vectors, attributes)
