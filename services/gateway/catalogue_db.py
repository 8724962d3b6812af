"""Where the listing catalogue lives: ``GATEWAY_DB`` as a URL, and the two database back ends.

``GATEWAY_DB`` is one of

* ``sqlite:///relative/path.sqlite3``, ``sqlite:////absolute/path.sqlite3`` or a bare path (the
  default ``run/catalogue.sqlite3``): an embedded SQLite file, zero set-up, one gateway process;
* ``postgresql://user:password@host:port/dbname`` (also ``postgres://``, and libpq's query
  parameters such as ``?sslmode=require``): a PostgreSQL server shared by any number of gateways.
  The password may instead come from the settings ``GATEWAY_DB_PASSWORD`` or the file
  ``GATEWAY_DB_PASSWORD_FILE`` names (a Docker or Kubernetes secret; `services.gateway.config`),
  given here as ``password``, with the URL naming only the user:
  ``postgresql://marketplace@postgres:5432/catalogue``.

Both back ends give `catalogue.Catalogue` the same small interface, so every catalogue statement
is written once (SQL with ``?`` placeholders; PostgreSQL's driver gets them as ``%s``):

* ``transaction()``: a context manager yielding a `Transaction` (``execute``, ``executemany``,
  ``fetchall``...) that commits on success and rolls back on any error. SQLite starts it with
  ``BEGIN IMMEDIATE`` (writers queue instead of failing on lock upgrade); PostgreSQL runs at READ
  COMMITTED on a pooled connection (psycopg 3 + psycopg-pool).
* ``query(sql, params)``: one read statement outside any explicit transaction (PostgreSQL: one
  round trip, no BEGIN/COMMIT; at READ COMMITTED a statement sees one snapshot either way).
* ``migration_lock(tx)``: what makes two gateways starting at once migrate one after the other:
  a transaction-scoped advisory lock on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` already is one.
* ``schema_version(tx)`` / ``set_schema_version(tx, v)``: SQLite's ``PRAGMA user_version`` (as
  catalogues written by earlier versions have it); a one-row ``catalogue_schema`` table on
  PostgreSQL.
* Errors are classified here so nothing above knows a driver: a unique-key violation becomes
  `UniqueViolation`, a lost or unreachable server `DatabaseUnavailable` naming the database (with
  its password masked).

PostgreSQL round trips are what a request pays for (each one a wake-up of the server's backend
process), so a server's pool is opened at its full size at start (no connection is set up while a
request waits) and a connection is not probed on checkout: a transaction's own ``BEGIN`` (or a
read's statement) is the probe. When it fails on a connection the server dropped (it restarted),
every idle connection is checked, the dead ones replaced, and the statement tried once more on a
fresh one (nothing had been done on the dead connection), so a restarted server is used again
without restarting the gateway and without failing requests on stale connections. Write
transactions run in pipeline mode: statements whose results are not read go out without waiting
(AddListing's inserts and COMMIT in one round trip).
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

log = logging.getLogger(__name__)

#: Key of PostgreSQL's advisory lock held while migrating (any constant shared by all gateways).
MIGRATION_LOCK_KEY = 0x6D6B7463  # "mktc"


class DatabaseError(RuntimeError):
    """The catalogue database cannot be used as it is (bad URL, newer schema, not a database)."""


class DatabaseUnavailable(DatabaseError):
    """The database server cannot be reached or went away; retrying later may succeed."""


class UniqueViolation(DatabaseError):
    """A row with the same unique key exists."""


@dataclass(frozen=True)
class DatabaseUrl:
    """A parsed ``GATEWAY_DB``: ``kind`` is "sqlite" or "postgresql"."""

    kind: str
    target: str  # SQLite: the file path (or ":memory:"); PostgreSQL: the libpq URL
    display: str  # safe to log: password masked

    @property
    def is_sqlite(self) -> bool:
        return self.kind == "sqlite"


def parse_database_url(value: str | Path, password: str | None = None) -> DatabaseUrl:
    """``GATEWAY_DB`` -> `DatabaseUrl`, with ``password`` (GATEWAY_DB_PASSWORD[_FILE]) put into a
    PostgreSQL URL (SQLite has none); DatabaseError naming the setting when it cannot be used."""
    text = str(value).strip()
    if not text:
        raise DatabaseError("GATEWAY_DB is empty: give a path, sqlite:///path or postgresql://...")
    if isinstance(value, Path) or "://" not in text:
        return DatabaseUrl("sqlite", text, f"sqlite:///{text}")
    scheme = text.split("://", 1)[0].lower()
    if scheme == "sqlite":
        path = text[len("sqlite://") :]
        if not path.startswith("/") or path == "/":
            raise DatabaseError(
                f"GATEWAY_DB={text!r}: a SQLite URL is sqlite:///relative/path or sqlite:////absolute/path"
            )
        path = path[1:]  # sqlite:///run/x -> run/x ; sqlite:////abs/x -> /abs/x
        return DatabaseUrl("sqlite", path, f"sqlite:///{path}")
    if scheme in ("postgresql", "postgres"):
        parts = urlsplit(text)
        if not parts.hostname and "host=" not in parts.query:
            raise DatabaseError(
                f"GATEWAY_DB={mask_password(text)!r}: no host; expected "
                "postgresql://user:password@host:port/dbname"
            )
        try:
            parts.port  # noqa: B018 - raises ValueError on a malformed port
        except ValueError:
            raise DatabaseError(f"GATEWAY_DB={mask_password(text)!r}: the port is not a number") from None
        if not parts.path.strip("/"):
            raise DatabaseError(
                f"GATEWAY_DB={mask_password(text)!r}: no database name; expected "
                "postgresql://user:password@host:port/dbname"
            )
        if password is not None:
            text = with_password(text, password)
        return DatabaseUrl("postgresql", text, mask_password(text))
    raise DatabaseError(
        f"GATEWAY_DB={mask_password(text)!r}: unknown scheme {scheme!r}; use a path, "
        "sqlite:///path or postgresql://user:password@host:port/dbname"
    )


def with_password(url: str, password: str) -> str:
    """The PostgreSQL URL with ``password`` (from GATEWAY_DB_PASSWORD[_FILE]) put in; the URL must
    name the user and must not carry a password of its own."""
    parts = urlsplit(url)
    if parts.password is not None:
        raise DatabaseError(
            f"GATEWAY_DB={mask_password(url)!r} has a password and GATEWAY_DB_PASSWORD"
            "(_FILE) is set too: keep one"
        )
    if not parts.username:
        raise DatabaseError(
            f"GATEWAY_DB={url!r} names no user for the password of GATEWAY_DB_PASSWORD"
            "(_FILE): postgresql://user@host:port/dbname"
        )
    user, host = parts.netloc.rsplit("@", 1)
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def mask_password(url: str) -> str:
    """The URL with its password replaced by ``***`` (for logs and error messages)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"://([^:/@]*):[^@]*@", r"://\1:***@", url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


class Transaction:
    """Statements inside one open transaction; ``?`` placeholders. ``fetch*`` and ``rowcount``
    are those of the last statement. With ``new_cursor`` every statement runs on a cursor of its
    own (PostgreSQL's pipeline mode: a cursor reused before its results arrived would collect the
    results of several statements)."""

    def __init__(self, cursor, placeholder: str, new_cursor=None) -> None:
        self._cursor = cursor
        self._placeholder = placeholder
        self._new_cursor = new_cursor

    def _sql(self, sql: str) -> str:
        return sql if self._placeholder == "?" else sql.replace("?", self._placeholder)

    def _next_cursor(self):
        if self._new_cursor is not None:
            self._cursor = self._new_cursor()
        return self._cursor

    def execute(self, sql: str, params: Sequence = ()) -> "Transaction":
        self._next_cursor().execute(self._sql(sql), tuple(params))
        return self

    def executemany(self, sql: str, rows: Sequence[Sequence]) -> None:
        if rows:
            self._next_cursor().executemany(self._sql(sql), [tuple(row) for row in rows])

    def fetchall(self) -> list[tuple]:
        return [tuple(row) for row in self._cursor.fetchall()]

    def fetchone(self) -> tuple | None:
        row = self._cursor.fetchone()
        return None if row is None else tuple(row)

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)


class SqliteDatabase:
    """One SQLite connection in WAL mode shared by the gateway's threads behind a lock (lookups
    by primary key take microseconds; writes are single short transactions)."""

    kind = "sqlite"
    #: DDL words that differ between the back ends (filled into migrations).
    types = {"real": "REAL", "blob": "BLOB", "serial": "INTEGER PRIMARY KEY AUTOINCREMENT"}

    def __init__(self, url: DatabaseUrl) -> None:
        self.url = url
        target = url.target
        self._lock = threading.RLock()
        try:
            if target != ":memory:":
                Path(target).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(target, check_same_thread=False, isolation_level=None, timeout=30)
            db.execute("PRAGMA foreign_keys = ON")
            if target != ":memory:":
                db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
        except sqlite3.DatabaseError as exc:
            raise DatabaseError(f"catalogue {target} cannot be opened: {exc}") from None
        except OSError as exc:
            raise DatabaseError(
                f"catalogue {target}: cannot make its folder {exc.filename} ({exc.strerror});"
                " give a path in a writable folder"
            ) from None
        self._db = db

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.DatabaseError as exc:
                raise self._classify(exc) from None
            try:
                yield Transaction(self._db.cursor(), "?")
                self._db.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                self._rollback()
                raise self._classify(exc) from None
            except BaseException:
                self._rollback()
                raise

    def query(self, sql: str, params: Sequence = ()) -> list[tuple]:
        """One read statement (autocommit: SQLite reads one snapshot for it)."""
        with self._lock:
            try:
                return [tuple(row) for row in self._db.execute(sql, tuple(params)).fetchall()]
            except sqlite3.DatabaseError as exc:
                raise self._classify(exc) from None

    def _rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def _classify(self, exc: sqlite3.DatabaseError) -> DatabaseError:
        if isinstance(exc, sqlite3.IntegrityError) and "UNIQUE" in str(exc).upper():
            return UniqueViolation(str(exc))
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            return DatabaseUnavailable(f"catalogue database {self.url.display} is busy: {exc}")
        return DatabaseError(f"catalogue database {self.url.display}: {exc}")

    def migration_lock(self, tx: Transaction) -> None:
        """Nothing to take: the transaction began with BEGIN IMMEDIATE (one writer at a time)."""

    def schema_version(self, tx: Transaction) -> int:
        return int(tx.execute("PRAGMA user_version").fetchone()[0])

    def set_schema_version(self, tx: Transaction, version: int) -> None:
        tx.execute(f"PRAGMA user_version = {int(version)}")

    def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresDatabase:
    """A psycopg 3 connection pool on one PostgreSQL database."""

    kind = "postgresql"
    types = {"real": "DOUBLE PRECISION", "blob": "BYTEA", "serial": "BIGSERIAL PRIMARY KEY"}

    def __init__(
        self,
        url: DatabaseUrl,
        *,
        max_connections: int = 16,
        connect_timeout_s: float = 5.0,
        min_connections: int = 1,
    ) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool

        self.url = url
        self._psycopg = psycopg
        self.connect_timeout_s = connect_timeout_s
        timeout = max(1, int(round(connect_timeout_s)))
        try:  # one direct connection first: its error says why (refused, no such database, ...)
            psycopg.connect(url.target, connect_timeout=timeout).close()
        except psycopg.Error as exc:
            raise DatabaseUnavailable(
                f"cannot connect to the catalogue database {url.display}: {_reason(exc)}"
            ) from None
        size = max(2, max_connections)
        warm = max(1, min(size, min_connections))
        self._pool = ConnectionPool(
            # a server opens it at full size (min_connections = max_connections): no request ever
            # waits for a connection to be set up; tools start with one and grow on demand
            url.target,
            min_size=warm,
            max_size=size,
            open=False,
            # autocommit: transactions are explicit BEGIN ... COMMIT (see `transaction`)
            kwargs={"autocommit": True, "connect_timeout": timeout},
            timeout=connect_timeout_s,
            name="catalogue",
        )
        try:
            self._pool.open(wait=True, timeout=max(connect_timeout_s, 2.0 * warm))
        except Exception as exc:  # PoolTimeout, OperationalError: the server is unreachable
            self._pool.close(timeout=0)
            raise DatabaseUnavailable(
                f"cannot connect to the catalogue database {url.display}: "
                f"{_first_line(exc) or type(exc).__name__}"
            ) from None

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        psycopg = self._psycopg
        with self._classified():
            connection = self._checkout("BEGIN")
            try:
                # pipeline mode: statements whose results are not read are sent without waiting
                # (a transaction of inserts is one round trip, its COMMIT included)
                with connection.pipeline():
                    yield Transaction(None, "%s", new_cursor=connection.cursor)
                    connection.execute("COMMIT")
            except BaseException:
                with suppress(psycopg.Error):  # a lost connection has nothing to roll back
                    connection.execute("ROLLBACK")
                raise
            finally:
                self._pool.putconn(connection)

    def query(self, sql: str, params: Sequence = ()) -> list[tuple]:
        """One read statement in autocommit (one round trip), tried once more on a fresh
        connection when the server had dropped this one."""
        sql = sql.replace("?", "%s")
        with self._classified():
            for attempt in range(2):
                connection = self._pool.getconn()
                try:
                    return [tuple(row) for row in connection.execute(sql, tuple(params)).fetchall()]
                except (self._psycopg.OperationalError, self._psycopg.InterfaceError):
                    if attempt or not self._replace_dropped(connection):
                        raise
                finally:
                    self._pool.putconn(connection)
        raise AssertionError("unreachable")

    def _checkout(self, statement: str):
        """A pooled connection on which ``statement`` ran (a second one if the first was dead)."""
        for attempt in range(2):
            connection = self._pool.getconn()
            try:
                connection.execute(statement)
                return connection
            except (self._psycopg.OperationalError, self._psycopg.InterfaceError):
                self._pool.putconn(connection)
                if attempt or not self._replace_dropped(connection):
                    raise
            except BaseException:
                self._pool.putconn(connection)
                raise
        raise AssertionError("unreachable")

    def _replace_dropped(self, connection) -> bool:
        """After a failure on ``connection``: whether it was dropped by the server (then every
        idle connection is checked and the dead ones replaced, so retrying makes sense)."""
        if not connection.closed and not connection.broken:
            return False  # a live connection failed: retrying would fail the same way
        log.warning(
            "catalogue database %s dropped pooled connections (server restarted?); checking the pool",
            self.url.display,
        )
        self._pool.check()
        return True

    @contextmanager
    def _classified(self) -> Iterator[None]:
        """Driver errors -> this module's (`UniqueViolation`, `DatabaseUnavailable`, ...)."""
        from psycopg_pool import PoolTimeout

        psycopg = self._psycopg
        try:
            yield
        except psycopg.errors.UniqueViolation as exc:
            raise UniqueViolation(_first_line(exc)) from None
        except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as exc:
            raise DatabaseUnavailable(
                f"catalogue database {self.url.display} unavailable: {_first_line(exc) or type(exc).__name__}"
            ) from None
        except psycopg.Error as exc:
            raise DatabaseError(f"catalogue database {self.url.display}: {_first_line(exc)}") from None

    def migration_lock(self, tx: Transaction) -> None:
        """Serialise migrations across gateways; released when the transaction ends."""
        tx.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK_KEY,))

    def schema_version(self, tx: Transaction) -> int:
        tx.execute("CREATE TABLE IF NOT EXISTS catalogue_schema (version INTEGER NOT NULL)")
        row = tx.execute("SELECT version FROM catalogue_schema").fetchone()
        return int(row[0]) if row else 0

    def set_schema_version(self, tx: Transaction, version: int) -> None:
        tx.execute("DELETE FROM catalogue_schema")
        tx.execute("INSERT INTO catalogue_schema (version) VALUES (?)", (int(version),))

    def close(self) -> None:
        self._pool.close(timeout=2.0)


Database = SqliteDatabase | PostgresDatabase


def open_database(
    value: str | Path,
    *,
    password: str | None = None,
    max_connections: int = 16,
    connect_timeout_s: float = 5.0,
    min_connections: int = 1,
) -> Database:
    url = parse_database_url(value, password)
    if url.is_sqlite:
        return SqliteDatabase(url)
    return PostgresDatabase(
        url,
        max_connections=max_connections,
        connect_timeout_s=connect_timeout_s,
        min_connections=min_connections,
    )


def _reason(exc: BaseException) -> str:
    """libpq's message without its "connection to server at ... failed:" preamble."""
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return re.sub(r"^connection failed: ", "", text) or type(exc).__name__


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else ""
