"""The versioned shard map (`common.shard_map`) stored in the catalogue database (``GATEWAY_DB``),
so every gateway, the rebalance command, reconcile and the indexing command read one map.

Table ``shard_maps`` (catalogue schema version 3, `catalogue.MIGRATIONS`)::

    shard_maps(version PK, state 'stable'|'migrating'|'switched', body JSON, created_at)

``body`` is the map as `ShardMap.to_json` writes it (the format is owned by `common.shard_map`).
The version is the primary key: two maps with one version cannot exist. `publish` is a
compare-and-set: version ``v`` is only written when the newest row is ``v - 1``, in one
transaction, and the primary key settles two writers that both saw ``v - 1`` (one insert
fails), so two rebalance commands can never both advance the map. The same SQL runs on SQLite
and PostgreSQL (`catalogue_db`).
"""

from __future__ import annotations

import json
import time

from common.shard_map import ShardMap, ShardMapConflict, ShardMapError, ShardMapUnavailable
from services.gateway.catalogue_db import Database, DatabaseError, DatabaseUnavailable, UniqueViolation

#: Catalogue migration creating the table (appended to `catalogue.MIGRATIONS`; additive only).
SHARD_MAP_MIGRATION = """
    CREATE TABLE shard_maps (
        version    INTEGER PRIMARY KEY,
        state      TEXT NOT NULL CHECK (state IN ('stable', 'migrating', 'switched')),
        body       TEXT NOT NULL,
        created_at {real} NOT NULL
    );
"""


class DatabaseShardMapStore:
    """`common.shard_map.ShardMapStore` on the catalogue database (SQLite or PostgreSQL)."""

    def __init__(self, database: Database) -> None:
        self._db = database
        self.where = f"the catalogue database {database.url.display}"

    def latest(self) -> ShardMap | None:
        try:
            with self._db.transaction() as tx:
                row = tx.execute(
                    "SELECT version, body FROM shard_maps ORDER BY version DESC LIMIT 1"
                ).fetchone()
        except DatabaseUnavailable as exc:
            raise ShardMapUnavailable(f"cannot read the shard map: {exc}") from None
        except DatabaseError as exc:
            raise ShardMapError(f"cannot read the shard map from {self.where}: {exc}") from None
        if row is None:
            return None
        version, body = int(row[0]), row[1]
        try:
            shard_map = ShardMap.from_json(json.loads(body))
        except ValueError as exc:  # JSONDecodeError and ShardMapError are ValueErrors
            raise ShardMapError(
                f"shard map v{version} in {self.where} cannot be used: {exc}; "
                "publish a corrected version or restore the database"
            ) from None
        if shard_map.version != version:
            raise ShardMapError(
                f"shard map row v{version} in {self.where} holds version "
                f"{shard_map.version}: two maps claim one version; delete the "
                "wrong row (shard_maps table)"
            )
        return shard_map

    def versions(self) -> list[int]:
        """Every stored version, oldest first (for tests and operators)."""
        with self._db.transaction() as tx:
            return [
                int(r[0]) for r in tx.execute("SELECT version FROM shard_maps ORDER BY version").fetchall()
            ]

    def publish(self, shard_map: ShardMap) -> None:
        body = json.dumps(shard_map.to_json(), separators=(",", ":"))
        try:
            with self._db.transaction() as tx:
                row = tx.execute("SELECT MAX(version) FROM shard_maps").fetchone()
                newest = int(row[0]) if row and row[0] is not None else 0
                if newest >= shard_map.version:
                    raise ShardMapConflict(
                        f"shard map version {shard_map.version} already exists in {self.where}; "
                        f"another rebalance (or gateway) published it: the newest is v{newest}"
                    )
                if newest != shard_map.version - 1:
                    raise ShardMapConflict(
                        f"shard map version {shard_map.version} cannot follow v{newest} in "
                        f"{self.where}: a version must follow the one before it"
                    )
                tx.execute(
                    "INSERT INTO shard_maps (version, state, body, created_at) VALUES (?, ?, ?, ?)",
                    (shard_map.version, shard_map.state, body, time.time()),
                )
        except UniqueViolation:  # another writer inserted this version between our two statements
            raise ShardMapConflict(
                f"shard map version {shard_map.version} already exists in "
                f"{self.where}; another rebalance (or gateway) published it "
                "first"
            ) from None
        except DatabaseUnavailable as exc:
            raise ShardMapUnavailable(f"cannot publish shard map v{shard_map.version}: {exc}") from None
        except DatabaseError as exc:
            raise ShardMapError(
                f"cannot publish shard map v{shard_map.version} in {self.where}: {exc}"
            ) from None
