"""The listing catalogue: one SQLite file, created on first open, migrated by version number.

Tables (schema version 1)::

    listings(id PK, title, description, category, main_category, price REAL NULL, currency,
             location, price_flag, created_at)
    listing_images(image_id PK, listing_id -> listings ON DELETE CASCADE, position)

The schema version is SQLite's ``PRAGMA user_version``; `MIGRATIONS[i]` upgrades version ``i`` to
``i + 1`` inside one transaction, so a catalogue is always at a version this code knows (a file
from newer code is refused rather than misread). Add a migration by appending to the list.

One connection in WAL mode is shared by the gateway's worker threads behind a lock: lookups by
primary key take microseconds, and writes are single transactions (`add`, `remove`, `load_prepared`
are all-or-nothing). Nothing here knows about gRPC.
"""
from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from services.gateway.domain import Listing

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
        price         REAL,
        currency      TEXT NOT NULL DEFAULT '',
        location      TEXT NOT NULL DEFAULT '',
        price_flag    TEXT NOT NULL DEFAULT '',
        created_at    REAL NOT NULL
    );
    CREATE INDEX listings_main_category ON listings(main_category);
    CREATE TABLE listing_images (
        image_id   TEXT PRIMARY KEY,
        listing_id TEXT NOT NULL REFERENCES listings(id) ON DELETE CASCADE,
        position   INTEGER NOT NULL
    );
    CREATE INDEX listing_images_listing ON listing_images(listing_id, position);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)

#: Prepared-data price flags whose price is not a real price: stored as unknown (NULL).
UNUSABLE_PRICE_FLAGS = frozenset({"unparseable", "absurd"})
_SQL_VARS = 500  # ids per IN (...) query, below SQLite's variable limit


class CatalogueError(RuntimeError):
    """The catalogue file cannot be used (newer schema, not a database, ...)."""


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


def _chunks(items: Sequence[str], size: int = _SQL_VARS) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Catalogue:
    """Listings by id, with their image ids. Thread-safe."""

    def __init__(self, connection: sqlite3.Connection, path: str) -> None:
        self._db = connection
        self._lock = threading.RLock()
        self.path = path

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(cls, path: str | Path) -> "Catalogue":
        """Open (creating file and parent folder if needed) and migrate to `SCHEMA_VERSION`."""
        target = str(path)
        if target != ":memory:":
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(target, check_same_thread=False, isolation_level=None, timeout=30)
            db.execute("PRAGMA foreign_keys = ON")
            if target != ":memory:":
                db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            catalogue = cls(db, target)
            catalogue._migrate()
        except sqlite3.DatabaseError as exc:
            raise CatalogueError(f"catalogue {target} cannot be opened: {exc}") from None
        return catalogue

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "Catalogue":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        with self._lock:
            version = self.schema_version
            if version > SCHEMA_VERSION:
                raise CatalogueError(f"catalogue {self.path} has schema version {version}; this "
                                     f"code knows up to {SCHEMA_VERSION} (newer gateway?)")
            for target in range(version + 1, SCHEMA_VERSION + 1):
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in MIGRATIONS[target - 1].split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version = {target}")
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                log.info("catalogue %s migrated to schema version %d", self.path, target)

    # ------------------------------------------------------------------ reads

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM listings").fetchone()[0])

    def count_images(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM listing_images").fetchone()[0])

    def main_categories(self) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT main_category FROM listings WHERE main_category != '' "
                "ORDER BY main_category").fetchall()
        return [row[0] for row in rows]

    def get(self, listing_id: str) -> Listing | None:
        return self.get_many([listing_id]).get(listing_id)

    def get_many(self, listing_ids: Iterable[str]) -> dict[str, Listing]:
        """Listings by id (unknown ids are simply absent)."""
        ids = list(dict.fromkeys(listing_ids))
        if not ids:
            return {}
        rows: list[tuple] = []
        images: dict[str, list[str]] = {}
        with self._lock:
            for chunk in _chunks(ids):
                marks = ",".join("?" * len(chunk))
                rows += self._db.execute(
                    "SELECT id, title, description, category, main_category, price, currency, "
                    f"location FROM listings WHERE id IN ({marks})", chunk).fetchall()
                for image_id, listing_id in self._db.execute(
                        f"SELECT image_id, listing_id FROM listing_images WHERE listing_id IN ({marks}) "
                        "ORDER BY listing_id, position", chunk):
                    images.setdefault(listing_id, []).append(image_id)
        return {row[0]: Listing(*row, image_ids=tuple(images.get(row[0], ()))) for row in rows}

    def listing_ids(self) -> list[str]:
        with self._lock:
            return [row[0] for row in self._db.execute("SELECT id FROM listings ORDER BY id")]

    def image_rows(self, image_ids: Iterable[str] | None = None) -> list[ImageRow]:
        """Photos with their listing's attributes (all photos, or those of ``image_ids`` found)."""
        query = ("SELECT i.image_id, l.id, l.main_category, l.price, l.location FROM listing_images i "
                 "JOIN listings l ON l.id = i.listing_id")
        with self._lock:
            if image_ids is None:
                rows = self._db.execute(query + " ORDER BY l.id, i.position").fetchall()
            else:
                rows = []
                for chunk in _chunks(list(image_ids)):
                    rows += self._db.execute(
                        query + f" WHERE i.image_id IN ({','.join('?' * len(chunk))})", chunk).fetchall()
        return [ImageRow(*row) for row in rows]

    # ------------------------------------------------------------------ writes

    def add(self, listing: Listing, *, price_flag: str = "") -> None:
        """Insert a listing and its image ids in one transaction; DuplicateListing if the listing
        id or an image id exists (and nothing is written)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._insert(listing, price_flag, time.time())
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError as exc:
                self._db.execute("ROLLBACK")
                raise DuplicateListing(f"listing {listing.id} or one of its image ids is already "
                                       f"in the catalogue ({exc})") from None
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _insert(self, listing: Listing, price_flag: str, created_at: float) -> None:
        self._db.execute(
            "INSERT INTO listings (id, title, description, category, main_category, price, currency, "
            "location, price_flag, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (listing.id, listing.title, listing.description, listing.category, listing.main_category,
             listing.price, listing.currency, listing.location, price_flag, created_at))
        self._db.executemany(
            "INSERT INTO listing_images (image_id, listing_id, position) VALUES (?, ?, ?)",
            [(image_id, listing.id, position) for position, image_id in enumerate(listing.image_ids)])

    def remove(self, listing_id: str) -> Listing | None:
        """Delete a listing and its image ids; returns what was removed (None if unknown)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                listing = self.get(listing_id)
                if listing is not None:
                    self._db.execute("DELETE FROM listings WHERE id = ?", (listing_id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return listing

    # ------------------------------------------------------------------ bulk load

    def load_prepared(self, prepared_dir: str | Path, *, replace: bool = False,
                      check_files: bool = True, only_with_images: bool = False) -> LoadReport:
        """Load ``listings.csv`` and ``images.csv`` written by ``python -m training.prepare``.

        Prices flagged unparseable or absurd become unknown (NULL). An image is kept only if its
        listing is in listings.csv and (with ``check_files``) its file exists (``path`` is relative
        to the prepared folder). ``replace`` empties the catalogue first; otherwise listings
        already present are left as they are. One transaction: all rows or none.
        """
        prepared = Path(prepared_dir)
        listings_csv, images_csv = prepared / "listings.csv", prepared / "images.csv"
        for path in (listings_csv, images_csv):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found; run `python -m training.prepare` first "
                                        "or pass --prepared DIR")
        read = dict(lineterminator="\n", dtype=str, keep_default_na=False)
        listings = pd.read_csv(listings_csv, **read)
        images = pd.read_csv(images_csv, **read)
        for frame, path, needed in (
                (listings, listings_csv, ("product_id", "title", "main_category")),
                (images, images_csv, ("image_id", "product_id"))):
            missing = [c for c in needed if c not in frame.columns]
            if missing:
                raise ValueError(f"{path} lacks columns {missing}; found {list(frame.columns)}")

        known = set(listings["product_id"])
        per_listing: dict[str, list[str]] = {}
        missing_file = unknown_listing = 0
        has_path = "path" in images.columns
        for row in images.itertuples(index=False):
            if row.product_id not in known:
                unknown_listing += 1
                continue
            if check_files and has_path and row.path and not (prepared / row.path).is_file():
                missing_file += 1
                continue
            per_listing.setdefault(row.product_id, []).append(row.image_id)

        def col(name: str) -> list[str]:
            return list(listings[name]) if name in listings.columns else [""] * len(listings)

        unusable = 0
        records: list[tuple[Listing, str]] = []
        for pid, title, description, category, main_category, price, currency, location, flag in zip(
                col("product_id"), col("title"), col("description"), col("category"),
                col("main_category"), col("price"), col("currency"), col("location"), col("price_flag")):
            if only_with_images and pid not in per_listing:
                continue
            value = _parse_price(price)
            if flag in UNUSABLE_PRICE_FLAGS:
                unusable += 1
                value = None
            records.append((Listing(pid, title, description, category, main_category, value, currency,
                                    location, tuple(per_listing.get(pid, ()))), flag))

        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if replace:
                    self._db.execute("DELETE FROM listings")
                present = set() if replace else {r[0] for r in self._db.execute("SELECT id FROM listings")}
                added = [(listing, flag) for listing, flag in records if listing.id not in present]
                for listing, flag in added:
                    self._insert(listing, flag, now)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return LoadReport(
            listings=len(added), images=sum(len(listing.image_ids) for listing, _ in added),
            images_skipped_missing_file=missing_file, images_skipped_unknown_listing=unknown_listing,
            prices_unusable=unusable)


def _parse_price(raw: str) -> float | None:
    if raw is None or str(raw).strip() == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
