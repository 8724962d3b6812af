"""The listing catalogue: listings, their photos, their vectors and the outbox of index writes,
in SQLite (embedded default) or PostgreSQL (shared by gateway replicas); see `catalogue_db` for
``GATEWAY_DB`` and the two back ends, and ``docs/catalogue.md`` for the write path.

Tables (schema version 3)::

    listings(id PK, title, description, category, main_category, price NULL, currency, location,
             price_flag, created_at, state 'live'|'pending', write_id)
    listing_images(image_id PK, listing_id -> listings ON DELETE CASCADE, position)
    listing_vectors(collection, item_id, listing_id -> listings ON DELETE CASCADE, vector)  PK (collection, item_id)
    outbox(seq PK, listing_id, write_id, shard, op 'upsert'|'delete', item_ids JSON, created_at,
           attempts, last_error, next_attempt_at, lease_holder, lease_until)
    shard_maps(version PK, state, body JSON, created_at)  the versioned shard map (`shard_map_store`)

A listing written by AddListing is inserted ``pending`` together with its vectors (float32 bytes,
kept so a lost shard can be repaired) and one outbox ``upsert`` entry, in one transaction; it turns
``live`` in the transaction that marks that entry done, after the owning shard acknowledged the
vectors (`outbox.OutboxApplier`). RemoveListing deletes the row and queues a ``delete`` entry in
one transaction. Entries of one listing are applied strictly in order (``seq``); an entry is held
by one applier at a time through a lease (a conditional UPDATE, the same on both back ends).
Reads return live listings only unless asked for pending ones.

Migrations: `MIGRATIONS[i]` upgrades version ``i`` to ``i + 1``, inside one transaction that holds
the back end's migration lock, so gateways starting together migrate once; a catalogue from newer
code is refused rather than misread. Add a migration by appending to the list. Nothing here
knows about gRPC.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.prepared_data import IMAGES_FILE, LISTINGS_FILE, UNUSABLE_PRICE_FLAGS, read_rows
from common.prices import price_value
from services.gateway.catalogue_db import (
    Database,
    DatabaseError,
    DatabaseUnavailable,
    Transaction,
    UniqueViolation,
    open_database,
)
from services.gateway.domain import Listing, Unavailable
from services.gateway.shard_map_store import SHARD_MAP_MIGRATION, DatabaseShardMapStore

log = logging.getLogger(__name__)

MIGRATIONS: list[str] = [
    # 0 -> 1: listings and their photos.
    """
    CREATE TABLE listings (
        id            TEXT PRIMARY KEY,
        title         TEXT NOT NULL,
        description   TEXT NOT NULL DEFAULT '',
        category      TEXT NOT NULL DEFAULT '',
        main_category TEXT NOT NULL DEFAULT '',
        price         {real},
        currency      TEXT NOT NULL DEFAULT '',
        location      TEXT NOT NULL DEFAULT '',
        price_flag    TEXT NOT NULL DEFAULT '',
        created_at    {real} NOT NULL
    );
    CREATE INDEX listings_main_category ON listings(main_category);
    CREATE TABLE listing_images (
        image_id   TEXT PRIMARY KEY,
        listing_id TEXT NOT NULL REFERENCES listings(id) ON DELETE CASCADE,
        position   INTEGER NOT NULL
    );
    CREATE INDEX listing_images_listing ON listing_images(listing_id, position);
    """,
    # 1 -> 2: pending listings, their vectors and the outbox of index writes.
    """
    ALTER TABLE listings ADD COLUMN state TEXT NOT NULL DEFAULT 'live';
    ALTER TABLE listings ADD COLUMN write_id TEXT NOT NULL DEFAULT '';
    CREATE TABLE listing_vectors (
        collection TEXT NOT NULL,
        item_id    TEXT NOT NULL,
        listing_id TEXT NOT NULL REFERENCES listings(id) ON DELETE CASCADE,
        position   INTEGER NOT NULL,
        vector     {blob} NOT NULL,
        PRIMARY KEY (collection, item_id)
    );
    CREATE INDEX listing_vectors_listing ON listing_vectors(listing_id);
    CREATE TABLE outbox (
        seq             {serial},
        listing_id      TEXT NOT NULL,
        write_id        TEXT NOT NULL,
        shard           INTEGER NOT NULL,
        op              TEXT NOT NULL,
        item_ids        TEXT NOT NULL,
        created_at      {real} NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        last_error      TEXT NOT NULL DEFAULT '',
        next_attempt_at {real} NOT NULL DEFAULT 0,
        lease_holder    TEXT NOT NULL DEFAULT '',
        lease_until     {real} NOT NULL DEFAULT 0
    );
    CREATE INDEX outbox_listing ON outbox(listing_id, seq);
    """,
    # 2 -> 3: the versioned shard map (`shard_map_store`).
    SHARD_MAP_MIGRATION,
]
SCHEMA_VERSION = len(MIGRATIONS)

_SQL_VARS = 500  # ids per IN (...) query, below SQLite's variable limit
LIVE, PENDING = "live", "pending"
#: Outbox operations. ``upsert`` and ``delete`` follow the listing to wherever the routing puts it
#: when they are pushed (both old and new owner while a rebalance moves it); ``purge`` deletes
#: from the one shard it names (reconcile: vectors on a shard that does not own them).
UPSERT, DELETE, PURGE = "upsert", "delete", "purge"
_LISTING_COLUMNS = "id, title, description, category, main_category, price, currency, location"
#: The same, of ``listings l`` in a join.
_L_COLUMNS = ", ".join(f"l.{name.strip()}" for name in _LISTING_COLUMNS.split(","))


class CatalogueError(DatabaseError):
    """The catalogue cannot be used (bad GATEWAY_DB, newer schema, not a database, ...)."""


class CatalogueUnavailable(Unavailable):
    """The catalogue database is unreachable right now (UNAVAILABLE; the message names it)."""


class DuplicateListing(ValueError):
    """A listing id or image id is already in the catalogue."""


@dataclass(frozen=True)
class LoadReport:
    listings: int
    images: int
    images_skipped_missing_file: int
    images_skipped_unknown_listing: int
    prices_unusable: int


@dataclass(frozen=True)
class ImageRow:
    """A catalogue photo with the attributes the index stores beside its vector."""

    image_id: str
    listing_id: str
    main_category: str
    price: float | None
    location: str


@dataclass(frozen=True)
class StoredVector:
    """A vector the catalogue keeps for a listing: ``collection`` "image" (item id = image id) or
    "text" (item id = listing id)."""

    collection: str
    item_id: str
    vector: np.ndarray


@dataclass(frozen=True)
class OutboxEntry:
    """One pending index write. ``upsert``: push the listing's stored vectors (``vectors``, with
    the listing's attributes in ``listing``; empty when the listing is gone since); ``delete``:
    remove ``item_ids`` ({collection: ids}) from the shard."""

    seq: int
    listing_id: str
    write_id: str
    shard: int
    op: str
    item_ids: dict[str, list[str]]
    attempts: int = 0
    listing: Listing | None = None
    vectors: tuple[StoredVector, ...] = field(default=())
    #: Who holds the entry's lease ("" for none): an entry written with a lease is pushed by the
    #: request that wrote it without another transaction to claim it.
    lease_holder: str = ""


@dataclass(frozen=True)
class OutboxStats:
    pending: int
    oldest_age_s: float
    failing: int  # entries with at least one failed attempt
    last_error: str


def _chunks(items: Sequence[str], size: int = _SQL_VARS) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _marks(count: int) -> str:
    return ",".join("?" * count)


class Catalogue:
    """Listings by id, with their image ids, stored vectors and pending index writes. Thread-safe."""

    def __init__(self, database: Database) -> None:
        self._db = database
        self.url = database.url
        self.path = database.url.display  # what logs and messages name

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(
        cls,
        target: str | Path,
        *,
        password: str | None = None,
        max_connections: int = 16,
        connect_timeout_s: float = 5.0,
        min_connections: int = 1,
    ) -> "Catalogue":
        """Open ``GATEWAY_DB`` (a path, ``sqlite:///path`` or ``postgresql://...``; a SQLite file
        and its folder are created if needed) and migrate it to `SCHEMA_VERSION`. ``password``:
        GATEWAY_DB_PASSWORD[_FILE], for a PostgreSQL URL that names only the user.

        CatalogueError for an unusable value or database, CatalogueUnavailable when a database
        server cannot be reached. PostgreSQL: a pool of ``max_connections``, ``min_connections``
        of them opened at once (a server passes its full size)."""
        try:
            database = open_database(
                target,
                password=password,
                max_connections=max_connections,
                connect_timeout_s=connect_timeout_s,
                min_connections=min_connections,
            )
        except DatabaseUnavailable as exc:
            raise CatalogueUnavailable(str(exc)) from None
        except DatabaseError as exc:
            raise CatalogueError(str(exc)) from None
        catalogue = cls(database)
        try:
            catalogue._migrate()
        except BaseException:
            database.close()
            raise
        return catalogue

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Catalogue":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def is_sqlite(self) -> bool:
        return self.url.is_sqlite

    def shard_map_store(self) -> DatabaseShardMapStore:
        """The versioned shard map kept in this catalogue's database (shared by every gateway)."""
        return DatabaseShardMapStore(self._db)

    def _tx(self):
        """A transaction whose database errors are catalogue errors."""
        return _translated(self._db.transaction())

    def _query(self, sql: str, params: Sequence = ()) -> list[tuple]:
        """One read statement, outside an explicit transaction (PostgreSQL: one round trip)."""
        try:
            return self._db.query(sql, params)
        except DatabaseError as exc:
            raise _catalogue_error(exc) from None

    @property
    def schema_version(self) -> int:
        with self._tx() as tx:
            return self._db.schema_version(tx)

    def _migrate(self) -> None:
        with self._tx() as tx:
            self._db.migration_lock(tx)
            version = self._db.schema_version(tx)
            if version > SCHEMA_VERSION:
                raise CatalogueError(
                    f"catalogue {self.path} has schema version {version}; this "
                    f"code knows up to {SCHEMA_VERSION} (newer gateway?)"
                )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target - 1].format(**self._db.types).split(";"):
                    if statement.strip():
                        tx.execute(statement)
                self._db.set_schema_version(tx, target)
                log.info("catalogue %s migrated to schema version %d", self.path, target)

    # ------------------------------------------------------------------ reads

    def count(self, *, include_pending: bool = False) -> int:
        with self._tx() as tx:
            if include_pending:
                return int(tx.execute("SELECT COUNT(*) FROM listings").fetchone()[0])
            return int(tx.execute("SELECT COUNT(*) FROM listings WHERE state = ?", (LIVE,)).fetchone()[0])

    def count_images(self) -> int:
        with self._tx() as tx:
            return int(tx.execute("SELECT COUNT(*) FROM listing_images").fetchone()[0])

    def main_categories(self) -> list[str]:
        with self._tx() as tx:
            rows = tx.execute(
                "SELECT DISTINCT main_category FROM listings WHERE main_category != '' ORDER BY main_category"
            ).fetchall()
        return [row[0] for row in rows]

    def get(self, listing_id: str, *, include_pending: bool = False) -> Listing | None:
        return self.get_many([listing_id], include_pending=include_pending).get(listing_id)

    def get_many(self, listing_ids: Iterable[str], *, include_pending: bool = False) -> dict[str, Listing]:
        """Listings by id (unknown ids are simply absent; pending ones too unless asked for)."""
        ids = list(dict.fromkeys(listing_ids))
        if not ids:
            return {}
        state = "" if include_pending else " AND l.state = 'live'"
        rows: list[tuple] = []
        for chunk in _chunks(ids):  # one statement (one round trip) per chunk
            rows += self._query(
                f"SELECT {_L_COLUMNS}, i.image_id FROM listings l LEFT JOIN listing_images i "
                f"ON i.listing_id = l.id WHERE l.id IN ({_marks(len(chunk))}){state} "
                "ORDER BY l.id, i.position",
                chunk,
            )
        return _listings_with_images(rows)

    def listing_ids(self, *, include_pending: bool = False) -> list[str]:
        state = "" if include_pending else " WHERE state = 'live'"
        with self._tx() as tx:
            return [row[0] for row in tx.execute(f"SELECT id FROM listings{state} ORDER BY id").fetchall()]

    def image_rows(self, image_ids: Iterable[str] | None = None) -> list[ImageRow]:
        """Photos with their listing's attributes (all photos, or those of ``image_ids`` found)."""
        query = (
            "SELECT i.image_id, l.id, l.main_category, l.price, l.location FROM listing_images i "
            "JOIN listings l ON l.id = i.listing_id"
        )
        with self._tx() as tx:
            if image_ids is None:
                rows = tx.execute(query + " ORDER BY l.id, i.position").fetchall()
            else:
                rows = []
                for chunk in _chunks(list(image_ids)):
                    rows += tx.execute(
                        query + f" WHERE i.image_id IN ({_marks(len(chunk))})", chunk
                    ).fetchall()
        return [ImageRow(*row) for row in rows]

    def index_expectation(self) -> tuple[dict[str, tuple[str, ...]], set[str], dict[str, str]]:
        """What the index should hold, for reconciling: ({listing id: its image ids},
        {listing ids with a stored text vector}, {listing id: state}), every listing."""
        with self._tx() as tx:
            states = dict(tx.execute("SELECT id, state FROM listings").fetchall())
            images: dict[str, list[str]] = {}
            for image_id, listing_id in tx.execute(
                "SELECT image_id, listing_id FROM listing_images ORDER BY listing_id, position"
            ).fetchall():
                images.setdefault(listing_id, []).append(image_id)
            texts = {
                row[0]
                for row in tx.execute(
                    "SELECT listing_id FROM listing_vectors WHERE collection = 'text'"
                ).fetchall()
            }
        return {i: tuple(images.get(i, ())) for i in states}, texts, states

    def stored_vector_listings(self) -> set[str]:
        with self._tx() as tx:
            return {
                row[0] for row in tx.execute("SELECT DISTINCT listing_id FROM listing_vectors").fetchall()
            }

    # ------------------------------------------------------------------ writes

    def add(self, listing: Listing, *, price_flag: str = "") -> None:
        """Insert a live listing and its image ids in one transaction (no vectors: for bulk and
        test loads indexed separately); DuplicateListing if the listing id or an image id exists
        (and nothing is written)."""
        try:
            with self._tx() as tx:
                _insert(tx, listing, price_flag, time.time())
        except UniqueViolation as exc:
            raise DuplicateListing(
                f"listing {listing.id} or one of its image ids is already in the catalogue ({exc})"
            ) from None

    def add_pending(
        self,
        listing: Listing,
        vectors: Sequence[StoredVector],
        shard: int,
        *,
        lease_holder: str = "",
        lease_s: float = 0.0,
    ) -> OutboxEntry:
        """AddListing's one transaction: the listing (``pending``), its photos, its vectors and the
        outbox entry that will push them to ``shard``. DuplicateListing if the listing id or an
        image id exists (nothing written). With ``lease_holder`` the entry is written already
        held by it for ``lease_s`` (when it is first in line for its listing, as `claim` would
        take it), and carries the listing and vectors, so the caller pushes it at once."""
        write_id = uuid.uuid4().hex
        now = time.time()
        item_ids: dict[str, list[str]] = {}
        for stored in vectors:
            item_ids.setdefault(stored.collection, []).append(stored.item_id)
        try:
            with self._tx() as tx:
                _insert(tx, listing, "", now, state=PENDING, write_id=write_id)
                tx.executemany(
                    "INSERT INTO listing_vectors (collection, item_id, listing_id, position, vector) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [
                        (v.collection, v.item_id, listing.id, n, np.asarray(v.vector, dtype="<f4").tobytes())
                        for n, v in enumerate(vectors)
                    ],
                )
                seq, holder = _enqueue(
                    tx,
                    listing.id,
                    write_id,
                    shard,
                    UPSERT,
                    item_ids,
                    now,
                    lease_holder=lease_holder,
                    lease_s=lease_s,
                )
        except UniqueViolation as exc:
            raise DuplicateListing(
                f"listing {listing.id} or one of its image ids is already in the catalogue ({exc})"
            ) from None
        if not holder:
            return OutboxEntry(seq, listing.id, write_id, shard, UPSERT, item_ids)
        as_stored = tuple(
            StoredVector(v.collection, v.item_id, np.asarray(v.vector, dtype="<f4")) for v in vectors
        )  # exactly what `claim` would read back
        return OutboxEntry(seq, listing.id, write_id, shard, UPSERT, item_ids, 0, listing, as_stored, holder)

    def remove(self, listing_id: str) -> Listing | None:
        """Delete a listing and its image ids (no index write queued); returns what was removed."""
        with self._tx() as tx:
            listing = _read_listing(tx, listing_id, include_pending=True)
            if listing is not None:
                tx.execute("DELETE FROM listings WHERE id = ?", (listing_id,))
        return listing

    def remove_queued(
        self,
        listing_id: str,
        shard: int,
        *,
        text_collection: str = "text",
        lease_holder: str = "",
        lease_s: float = 0.0,
    ) -> tuple[Listing, OutboxEntry] | None:
        """RemoveListing's one transaction: delete the listing (with its photos and vectors;
        pending or live) and queue the deletion of its photo and text vectors on ``shard``, after
        any write of it still queued. None if no listing has that id."""
        now = time.time()
        with self._tx() as tx:
            listing = _read_listing(tx, listing_id, include_pending=True)
            if listing is None:
                return None
            item_ids = {"image": list(listing.image_ids), text_collection: [listing_id]}
            tx.execute("DELETE FROM listings WHERE id = ?", (listing_id,))
            seq, holder = _enqueue(
                tx, listing_id, "", shard, DELETE, item_ids, now, lease_holder=lease_holder, lease_s=lease_s
            )
        return listing, OutboxEntry(seq, listing_id, "", shard, DELETE, item_ids, lease_holder=holder)

    def queue_delete(self, listing_id: str, shard: int, item_ids: dict[str, list[str]]) -> int:
        """Queue the deletion of index items from ``shard`` exactly (reconcile: vectors without a
        listing, or on a shard that does not own them)."""
        with self._tx() as tx:
            return _enqueue(tx, listing_id, "", shard, PURGE, item_ids, time.time())[0]

    def queue_upsert(self, listing_id: str, shard: int) -> int | None:
        """Queue re-pushing a listing's stored vectors (reconcile: listings without vectors);
        None when the catalogue keeps no vectors for it."""
        with self._tx() as tx:
            row = tx.execute("SELECT write_id FROM listings WHERE id = ?", (listing_id,)).fetchone()
            stored = tx.execute(
                "SELECT collection, item_id FROM listing_vectors WHERE listing_id = ? ORDER BY position",
                (listing_id,),
            ).fetchall()
            if row is None or not stored:
                return None
            item_ids: dict[str, list[str]] = {}
            for collection, item_id in stored:
                item_ids.setdefault(collection, []).append(item_id)
            return _enqueue(tx, listing_id, row[0], shard, UPSERT, item_ids, time.time())[0]

    # ------------------------------------------------------------------ outbox

    def due_outbox(self, now: float, limit: int = 64, listing_id: str | None = None) -> list[int]:
        """Sequence numbers of entries an applier may take now: not leased, not backing off, and
        first in line for their listing (entries of one listing apply strictly in order)."""
        return [seq for seq, _ in self.due_outbox_shards(now, limit, listing_id)]

    def due_outbox_shards(
        self, now: float, limit: int = 64, listing_id: str | None = None
    ) -> list[tuple[int, int]]:
        """`due_outbox` with each entry's shard: [(seq, shard)]."""
        where = " AND o.listing_id = ?" if listing_id is not None else ""
        params: tuple = (now, now) + ((listing_id,) if listing_id is not None else ()) + (limit,)
        return [
            (int(row[0]), int(row[1]))
            for row in self._query(
                "SELECT o.seq, o.shard FROM outbox o WHERE o.next_attempt_at <= ? AND o.lease_until < ?"
                f"{where} AND NOT EXISTS (SELECT 1 FROM outbox e WHERE e.listing_id = o.listing_id "
                "AND e.seq < o.seq) ORDER BY o.seq LIMIT ?",
                params,
            )
        ]

    def pending_outbox(self, listing_id: str | None = None) -> list[int]:
        if listing_id is None:
            return [int(r[0]) for r in self._query("SELECT seq FROM outbox ORDER BY seq")]
        return [
            int(r[0])
            for r in self._query("SELECT seq FROM outbox WHERE listing_id = ? ORDER BY seq", (listing_id,))
        ]

    def pending_listing_ids(self) -> set[str]:
        with self._tx() as tx:
            return {row[0] for row in tx.execute("SELECT DISTINCT listing_id FROM outbox").fetchall()}

    def claim(
        self, seq: int, holder: str, lease_s: float, *, ignore_backoff: bool = False
    ) -> OutboxEntry | None:
        """Take entry ``seq`` for ``lease_s`` seconds if nobody holds it and it is first in line
        for its listing; returns it with what applying it needs, or None."""
        now = time.time()
        backoff = "" if ignore_backoff else " AND next_attempt_at <= ?"
        params: tuple = (holder, now + lease_s, seq, now) + (() if ignore_backoff else (now,))
        with self._tx() as tx:
            row = tx.execute(
                "UPDATE outbox SET lease_holder = ?, lease_until = ? WHERE seq = ? AND lease_until < ?"
                f"{backoff} AND NOT EXISTS (SELECT 1 FROM outbox e WHERE e.listing_id = outbox.listing_id "
                "AND e.seq < outbox.seq) RETURNING seq, listing_id, write_id, shard, op, item_ids, attempts",
                params,
            ).fetchone()
            if row is None:
                return None
            seq, listing_id, write_id, shard, op, item_ids, attempts = row
            listing = None
            vectors: list[StoredVector] = []
            if op == UPSERT:
                found = _read_listing_and_write_id(tx, listing_id, include_pending=True)
                listing = None if found is None else found[0]
                if found is not None and found[1] == write_id:
                    for collection, item_id, blob in tx.execute(
                        "SELECT collection, item_id, vector FROM listing_vectors WHERE listing_id = ? "
                        "ORDER BY collection, position",
                        (listing_id,),
                    ).fetchall():
                        vectors.append(
                            StoredVector(collection, item_id, np.frombuffer(bytes(blob), dtype="<f4").copy())
                        )
                else:
                    listing = None  # removed (or removed and added again) since: nothing to push
        return OutboxEntry(
            int(seq),
            listing_id,
            write_id,
            int(shard),
            op,
            json.loads(item_ids),
            int(attempts),
            listing,
            tuple(vectors),
            holder,
        )

    def complete(self, entry: OutboxEntry) -> None:
        """The shard acknowledged ``entry``: drop it, and an upsert makes its listing live."""
        with self._tx() as tx:
            tx.execute("DELETE FROM outbox WHERE seq = ?", (entry.seq,))
            if entry.op == UPSERT:
                tx.execute(
                    "UPDATE listings SET state = ? WHERE id = ? AND write_id = ?",
                    (LIVE, entry.listing_id, entry.write_id),
                )

    def cancel_upsert(self, entry: OutboxEntry, holder: str, error: str) -> bool:
        """AddListing's shard refused or could not be reached: while ``holder`` still holds the
        entry, drop the pending listing and turn the entry into a deletion of the same ids (in
        case an attempt landed after all), in one transaction. False if the entry moved on."""
        with self._tx() as tx:
            changed = tx.execute(
                "UPDATE outbox SET op = ?, write_id = '', lease_holder = '', lease_until = 0, "
                "attempts = 0, next_attempt_at = 0, last_error = ? WHERE seq = ? AND op = ? "
                "AND lease_holder = ? RETURNING seq",
                (DELETE, error[:1000], entry.seq, UPSERT, holder),
            ).fetchone()
            if changed is None:
                return False
            tx.execute(
                "DELETE FROM listings WHERE id = ? AND write_id = ?", (entry.listing_id, entry.write_id)
            )
        return True

    def fail(self, entry: OutboxEntry, error: str, retry_in_s: float) -> None:
        """Applying ``entry`` failed: release it and try again after ``retry_in_s``."""
        with self._tx() as tx:
            tx.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_attempt_at = ?, "
                "lease_holder = '', lease_until = 0 WHERE seq = ?",
                (error[:1000], time.time() + retry_in_s, entry.seq),
            )

    def outbox_stats(self) -> OutboxStats:
        with self._tx() as tx:
            count, oldest, failing = tx.execute(
                "SELECT COUNT(*), MIN(created_at), SUM(CASE WHEN attempts > 0 THEN 1 ELSE 0 END) FROM outbox"
            ).fetchone()
            last = tx.execute(
                "SELECT last_error FROM outbox WHERE last_error != '' ORDER BY seq LIMIT 1"
            ).fetchone()
        return OutboxStats(
            int(count), time.time() - oldest if oldest else 0.0, int(failing or 0), last[0] if last else ""
        )

    # ------------------------------------------------------------------ bulk load

    def load_prepared(
        self,
        prepared_dir: str | Path,
        *,
        replace: bool = False,
        check_files: bool = True,
        only_with_images: bool = False,
    ) -> LoadReport:
        """Load ``listings.csv`` and ``images.csv`` written by ``python -m training.prepare``.

        Prices flagged unparseable or absurd become unknown (NULL). An image is kept only if its
        listing is in listings.csv and (with ``check_files``) its file exists (``path`` is relative
        to the prepared folder). ``replace`` empties the catalogue first; otherwise listings
        already present are left as they are. One transaction: all rows or none.
        """
        prepared = Path(prepared_dir)
        listings = read_rows(prepared, LISTINGS_FILE, required=("product_id", "title", "main_category"))
        images = read_rows(prepared, IMAGES_FILE, required=("image_id", "product_id"))

        known = {row["product_id"] for row in listings}
        per_listing: dict[str, list[str]] = {}
        missing_file = unknown_listing = 0
        for row in images:
            if row["product_id"] not in known:
                unknown_listing += 1
                continue
            path = row.get("path", "")
            if check_files and path and not (prepared / path).is_file():
                missing_file += 1
                continue
            per_listing.setdefault(row["product_id"], []).append(row["image_id"])

        unusable = 0
        records: list[tuple[Listing, str]] = []
        for row in listings:
            pid, flag = row["product_id"], row.get("price_flag", "")
            if only_with_images and pid not in per_listing:
                continue
            value = price_value(row.get("price"))
            if flag in UNUSABLE_PRICE_FLAGS:
                unusable += 1
                value = None
            records.append(
                (
                    Listing(
                        pid,
                        row["title"],
                        row.get("description", ""),
                        row.get("category", ""),
                        row["main_category"],
                        value,
                        row.get("currency", ""),
                        row.get("location", ""),
                        tuple(per_listing.get(pid, ())),
                    ),
                    flag,
                )
            )

        now = time.time()
        with self._tx() as tx:
            if replace:
                tx.execute("DELETE FROM listings")
            present = set() if replace else {r[0] for r in tx.execute("SELECT id FROM listings").fetchall()}
            added = [(listing, flag) for listing, flag in records if listing.id not in present]
            _insert_many(tx, added, now)
        return LoadReport(
            listings=len(added),
            images=sum(len(listing.image_ids) for listing, _ in added),
            images_skipped_missing_file=missing_file,
            images_skipped_unknown_listing=unknown_listing,
            prices_unusable=unusable,
        )


def _insert(
    tx: Transaction,
    listing: Listing,
    price_flag: str,
    created_at: float,
    *,
    state: str = LIVE,
    write_id: str = "",
) -> None:
    _insert_many(tx, [(listing, price_flag)], created_at, state=state, write_id=write_id)


def _insert_many(
    tx: Transaction,
    records: Sequence[tuple[Listing, str]],
    created_at: float,
    *,
    state: str = LIVE,
    write_id: str = "",
) -> None:
    tx.executemany(
        "INSERT INTO listings (id, title, description, category, main_category, price, currency, "
        "location, price_flag, created_at, state, write_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                l.id,
                l.title,
                l.description,
                l.category,
                l.main_category,
                l.price,
                l.currency,
                l.location,
                flag,
                created_at,
                state,
                write_id,
            )
            for l, flag in records
        ],
    )
    tx.executemany(
        "INSERT INTO listing_images (image_id, listing_id, position) VALUES (?, ?, ?)",
        [(image_id, l.id, position) for l, _ in records for position, image_id in enumerate(l.image_ids)],
    )


def _listings_with_images(rows: Sequence[tuple]) -> dict[str, Listing]:
    """Rows of (listing columns..., image id or NULL), ordered by listing and photo position ->
    listings by id."""
    columns: dict[str, tuple] = {}
    images: dict[str, list[str]] = {}
    for *listing, image_id in rows:
        columns.setdefault(listing[0], tuple(listing))
        if image_id is not None:
            images.setdefault(listing[0], []).append(image_id)
    return {i: Listing(*row, image_ids=tuple(images.get(i, ()))) for i, row in columns.items()}


def _read_listing_and_write_id(
    tx: Transaction, listing_id: str, *, include_pending: bool
) -> tuple[Listing, str] | None:
    """A listing with its photos and its ``write_id``, in one statement."""
    state = "" if include_pending else " AND l.state = 'live'"
    rows = tx.execute(
        f"SELECT l.write_id, {_L_COLUMNS}, i.image_id FROM listings l LEFT JOIN "
        f"listing_images i ON i.listing_id = l.id WHERE l.id = ?{state} ORDER BY i.position",
        (listing_id,),
    ).fetchall()
    if not rows:
        return None
    return _listings_with_images([row[1:] for row in rows])[listing_id], rows[0][0]


def _read_listing(tx: Transaction, listing_id: str, *, include_pending: bool) -> Listing | None:
    found = _read_listing_and_write_id(tx, listing_id, include_pending=include_pending)
    return None if found is None else found[0]


def _enqueue(
    tx: Transaction,
    listing_id: str,
    write_id: str,
    shard: int,
    op: str,
    item_ids: dict[str, list[str]],
    now: float,
    *,
    lease_holder: str = "",
    lease_s: float = 0.0,
) -> tuple[int, str]:
    """Queue an entry; returns (seq, its lease holder). With ``lease_holder`` the entry is born
    held by it, but only when no earlier entry of the listing is queued (entries of one listing
    apply in order). The check runs after the statements that wrote the listing row, so on
    PostgreSQL it sees every entry of a transaction that touched the same row before this one."""
    if (
        lease_holder
        and tx.execute("SELECT 1 FROM outbox WHERE listing_id = ? LIMIT 1", (listing_id,)).fetchone()
        is not None
    ):
        lease_holder = ""
    lease_until = now + lease_s if lease_holder else 0.0
    row = tx.execute(
        "INSERT INTO outbox (listing_id, write_id, shard, op, item_ids, created_at, "
        "lease_holder, lease_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING seq",
        (listing_id, write_id, shard, op, json.dumps(item_ids), now, lease_holder, lease_until),
    ).fetchone()
    return int(row[0]), lease_holder


class _translated:
    """Wraps a back end's transaction: DatabaseUnavailable -> CatalogueUnavailable (UNAVAILABLE
    for callers), other DatabaseErrors -> CatalogueError; UniqueViolation passes through."""

    def __init__(self, context) -> None:
        self._context = context

    def __enter__(self) -> Transaction:
        try:
            return self._context.__enter__()
        except DatabaseError as exc:
            raise _catalogue_error(exc) from None

    def __exit__(self, kind, value, traceback) -> bool:
        try:
            return bool(self._context.__exit__(kind, value, traceback))
        except DatabaseError as exc:
            raise _catalogue_error(exc) from None


def _catalogue_error(exc: DatabaseError) -> Exception:
    if isinstance(exc, (UniqueViolation, CatalogueError)):
        return exc
    if isinstance(exc, DatabaseUnavailable):
        return CatalogueUnavailable(str(exc))
    return CatalogueError(str(exc))
