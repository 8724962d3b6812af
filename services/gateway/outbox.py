"""Applies the catalogue's outbox: pending vector writes pushed to the owning indexer shard.

AddListing and RemoveListing write the catalogue and queue their index writes in one transaction
(`catalogue.Catalogue.add_pending` / `remove_queued`), then ask this applier to push that
listing's entries at once (`apply_listing`, within the request's deadline). Whatever is not
acknowledged then (a shard down, the gateway killed) is pushed by the background loop of any
gateway sharing the catalogue (`start`), with backoff, until the shard acknowledges it. Writes are
idempotent (Upsert replaces by id, Delete ignores unknown ids), so applying an entry twice (a
lease that ran out, a crash after the shard acknowledged but before the entry was marked done)
changes nothing. Shard calls go through `downstream.IndexerShards` (``upsert``/``delete`` on the
listing's route at push time: every replica of its shard, and the new owner too while a rebalance
moves it), the one place that knows how a shard is reached.

Ordering: an entry is taken only when it is the first pending one of its listing and nobody
holds its lease, so an Upsert and a later Delete of the same listing never overtake each other;
the lease (``GATEWAY_OUTBOX_LEASE_S``) is longer than any single push (at most half of it), so a
push that is slow is never still running when the next holder starts.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from services.gateway.catalogue import (
    DELETE,
    PURGE,
    UPSERT,
    Catalogue,
    CatalogueError,
    CatalogueUnavailable,
    OutboxEntry,
)
from services.gateway.domain import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from services.gateway.downstream import IMAGE_COLLECTION, Deadline, IndexerShards, IndexItem

log = logging.getLogger(__name__)

#: Most seconds between two attempts at one failing entry (and at a shard that failed): short,
#: so writes queued while a shard was down land within about this long after it is back.
MAX_RETRY_DELAY_S = 2.0
#: Errors after which an Upsert certainly did not land, or could not land later: the indexer
#: refused it as a whole (it is atomic), or the connection was refused or lost (UNAVAILABLE:
#: no later delivery once the connection is gone).
REFUSALS = (Unavailable, FailedPrecondition, InvalidArgument, ResourceExhausted)


def retry_delay(attempts: int) -> float:
    """Delay before the next attempt after ``attempts`` failed ones: 0.2 s doubling, capped."""
    return min(MAX_RETRY_DELAY_S, 0.2 * 2 ** min(attempts, 10))


@dataclass(frozen=True)
class PushResult:
    """What became of a listing's queued writes in `OutboxApplier.apply_listing`: all applied
    (``done``), or not yet (``error``: the last failure), or, when the caller allowed it, the
    add was cancelled (``cancelled``: the listing is gone and its ids are queued for deletion)."""

    done: bool
    error: ServiceError | None = None
    cancelled: bool = False


class OutboxApplier:
    def __init__(
        self,
        catalogue: Catalogue,
        indexer: IndexerShards,
        *,
        lease_s: float = 30.0,
        interval_s: float = 0.5,
        batch: int = 64,
    ) -> None:
        self.catalogue = catalogue
        self.indexer = indexer
        self.lease_s = lease_s
        self.interval_s = interval_s
        self.batch = batch
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._shards_lock = threading.Lock()
        self._shard_retry_at: dict[int, float] = {}  # the loop skips a shard that just failed

    # ------------------------------------------------------------------ one entry

    def push_timeout_s(self) -> float:
        return self.lease_s / 2

    def apply(self, entry: OutboxEntry, deadline: Deadline) -> bool:
        """Push one claimed entry to its shard; mark it done (True) or schedule a retry (False)."""
        return self.push(entry, deadline) is None

    def push(
        self, entry: OutboxEntry, deadline: Deadline, *, cancel_refused_add: bool = False
    ) -> ServiceError | None:
        """Push a claimed entry; None when done. On failure the entry is released for a retry,
        or, with ``cancel_refused_add`` and an upsert the shard refused or could not be reached
        for (`REFUSALS`), the add is cancelled (`Catalogue.cancel_upsert`); the error is returned."""
        try:
            if entry.op in (DELETE, PURGE):
                self._push_delete(entry, deadline)
            else:
                self._push_upsert(entry, deadline)
        except ServiceError as exc:
            if (
                cancel_refused_add
                and entry.op == UPSERT
                and isinstance(exc, REFUSALS)
                and self._cancel(entry, exc)
            ):
                raise _Cancelled(exc) from None
            delay = retry_delay(entry.attempts)
            log.warning(
                "outbox entry %d (%s listing %s on shard %d) not applied, retry in %.1f s: %s",
                entry.seq,
                entry.op,
                entry.listing_id,
                entry.shard,
                delay,
                exc.message,
            )
            self._record_failure(entry, exc.message, delay)
            self._shard_failed(entry.shard, delay)
            return exc
        self.catalogue.complete(entry)
        self._shard_ok(entry.shard)
        return None

    def _cancel(self, entry: OutboxEntry, exc: ServiceError) -> bool:
        try:
            cancelled = self.catalogue.cancel_upsert(entry, self.holder, exc.message)
        except (CatalogueUnavailable, CatalogueError) as error:
            log.warning("could not cancel the add of listing %s: %s", entry.listing_id, error)
            return False
        if cancelled:
            log.info("add of listing %s cancelled: %s", entry.listing_id, exc.message)
            self._wake.set()  # its ids are queued for deletion in case an attempt landed
        return cancelled

    def _shard_failed(self, shard: int, delay: float) -> None:
        with self._shards_lock:
            self._shard_retry_at[shard] = time.monotonic() + delay

    def _shard_ok(self, shard: int) -> None:
        with self._shards_lock:
            self._shard_retry_at.pop(shard, None)

    def _shard_backing_off(self, shard: int) -> bool:
        with self._shards_lock:
            return self._shard_retry_at.get(shard, 0.0) > time.monotonic()

    def _record_failure(self, entry: OutboxEntry, message: str, delay: float) -> None:
        try:
            self.catalogue.fail(entry, message, delay)
        except (CatalogueUnavailable, CatalogueError) as exc:  # the lease runs out by itself
            log.warning("could not record the failure of outbox entry %d: %s", entry.seq, exc)

    def _push_upsert(self, entry: OutboxEntry, deadline: Deadline) -> None:
        listing = entry.listing
        if listing is None or not entry.vectors:
            return  # removed since (its delete entry follows): nothing to push
        by_collection: dict[str, list[IndexItem]] = {}
        for stored in entry.vectors:
            by_collection.setdefault(stored.collection, []).append(
                IndexItem(
                    stored.item_id,
                    stored.vector,
                    listing.id,
                    listing.main_category,
                    listing.price,
                    listing.location,
                )
            )
        # photos first, then the text vector: the same order the request path always used
        shard = self._route(entry)
        for collection in sorted(by_collection, key=lambda c: (c != IMAGE_COLLECTION, c)):
            self.indexer.upsert(shard, by_collection[collection], deadline, collection=collection)

    def _route(self, entry: OutboxEntry) -> int:
        """Where to push: the listing's route now (a `shards.ShardRoute`, which also names the
        shard a rebalance is moving it to), or for a purge exactly the shard it names."""
        if entry.op == PURGE:
            return entry.shard
        return self.indexer.shard_for(entry.listing_id)

    def _push_delete(self, entry: OutboxEntry, deadline: Deadline) -> None:
        shard = self._route(entry)
        for collection, ids in sorted(entry.item_ids.items()):
            if not ids:
                continue
            try:
                self.indexer.delete(shard, ids, deadline, collection=collection)
            except FailedPrecondition as exc:  # e.g. no "text" collection on this shard
                if collection == IMAGE_COLLECTION:
                    raise
                log.debug("nothing deleted from %s for listing %s: %s", collection, entry.listing_id, exc)

    # ------------------------------------------------------------------ one listing (request path)

    def apply_listing(
        self,
        listing_id: str,
        deadline: Deadline,
        *,
        cancel_refused_add: bool = False,
        leased: OutboxEntry | None = None,
    ) -> PushResult:
        """Push every pending entry of ``listing_id`` in order before ``deadline`` (an entry another
        gateway holds is waited for: it is being pushed). With ``cancel_refused_add``, an add the
        shard refused or could not be reached for is cancelled (see `push`). ``leased``: the entry
        the request just wrote, when it was written held by this applier (``lease_holder``): it is
        pushed first without a transaction to claim it, and once it is applied the request's write
        is done (it was first in line; a later entry of the listing is another request's)."""
        error: ServiceError | None = None
        own = leased if leased is not None and leased.lease_holder == self.holder else None
        while True:
            try:
                budget = min(deadline.remaining() - 0.02, self.push_timeout_s())
                if own is not None:
                    entry, own = own, None
                    if budget <= 0.01:  # no time left: hand it to the loop now, not at lease expiry
                        self._record_failure(entry, "the request's deadline ran out before the push", 0.0)
                        self._wake.set()
                        return PushResult(False, error)
                else:
                    pending = self.catalogue.pending_outbox(listing_id)
                    if not pending:
                        return PushResult(True)
                    if budget <= 0.01:
                        return PushResult(False, error)
                    entry = self.catalogue.claim(pending[0], self.holder, self.lease_s, ignore_backoff=True)
                    if entry is None:
                        time.sleep(min(0.02, max(0.0, deadline.remaining())))
                        continue
                error = self.push(entry, Deadline(budget), cancel_refused_add=cancel_refused_add)
                if error is not None:
                    self._wake.set()
                    return PushResult(False, error)
                if entry is leased:  # it was first in line: the request's write is applied
                    return PushResult(True)
            except _Cancelled as cancelled:
                return PushResult(False, cancelled.error, cancelled=True)
            except CatalogueUnavailable as exc:  # committed already: the loop finishes the job
                log.warning("outbox of listing %s not applied now: %s", listing_id, exc.message)
                return PushResult(False, exc)

    # ------------------------------------------------------------------ background loop

    def run_once(self) -> int:
        """Push every entry that is due now; returns how many were applied."""
        applied = 0
        for seq, shard in self.catalogue.due_outbox_shards(time.time(), self.batch):
            if self._stop.is_set():
                break
            if self._shard_backing_off(shard):
                continue
            entry = self.catalogue.claim(seq, self.holder, self.lease_s)
            if entry is not None and self.apply(entry, Deadline(self.push_timeout_s())):
                applied += 1
        return applied

    def drain(self, timeout_s: float) -> bool:
        """Apply until nothing is pending (True) or ``timeout_s`` passed (False)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            try:
                self.run_once()
                if not self.catalogue.pending_outbox():
                    return True
            except (CatalogueUnavailable, CatalogueError) as exc:
                log.warning("outbox: %s", exc)
            time.sleep(min(0.1, max(0.0, end - time.monotonic())))
        return False

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="outbox-applier", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                applied = self.run_once()
            except (CatalogueUnavailable, CatalogueError) as exc:
                log.warning("outbox applier: %s", exc)
                applied = 0
            except Exception:  # keep the loop alive; the entry stays queued
                log.exception("outbox applier failed")
                applied = 0
            if applied:
                continue  # more may be due
            self._wake.wait(self.interval_s)
            self._wake.clear()


class _Cancelled(Exception):
    def __init__(self, error: ServiceError) -> None:
        super().__init__(error.message)
        self.error = error
