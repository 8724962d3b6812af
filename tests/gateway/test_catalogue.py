"""The listing catalogue, one suite run against both back ends (SQLite file, real PostgreSQL):
migrations, reads and writes, bulk load, the outbox (order, leases, backoff), concurrency, and
faults (bad GATEWAY_DB, unreachable or vanished database, recovery without restart)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import psycopg
import pytest

from common.config import REPO_ROOT, ConfigError
from scripts.stack import free_port
from services.gateway.catalogue import (
    SCHEMA_VERSION,
    Catalogue,
    CatalogueError,
    CatalogueUnavailable,
    DuplicateListing,
    StoredVector,
)
from services.gateway.catalogue_db import DatabaseError, mask_password, parse_database_url
from services.gateway.config import GatewayConfig, database_password
from services.gateway import load_catalogue
from services.gateway.index_catalogue import INDEX_CATALOGUE_SETTINGS
from services.gateway.load_catalogue import LOAD_CATALOGUE_SETTINGS
from services.gateway.rebalance import REBALANCE_SETTINGS
from services.gateway.reconcile import RECONCILE_SETTINGS
from services.gateway.domain import Listing
from tests.gateway.test_gateway_units import listing, write_prepared
from tests.support.postgres import PostgresCluster

pytestmark = pytest.mark.timeout(180)


def vectors_of(item: Listing, dim: int = 4, text: bool = True) -> list[StoredVector]:
    rng = np.random.default_rng(len(item.id))
    stored = [
        StoredVector("image", image_id, rng.standard_normal(dim).astype(np.float32))
        for image_id in item.image_ids
    ]
    if text:
        stored.append(StoredVector("text", item.id, rng.standard_normal(3).astype(np.float32)))
    return stored


def set_schema_version(url: str, version: int) -> None:
    parsed = parse_database_url(url)
    if parsed.is_sqlite:
        db = sqlite3.connect(parsed.target)
        db.execute(f"PRAGMA user_version = {version}")
        db.close()
    else:
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute("UPDATE catalogue_schema SET version = %s", (version,))


# ----------------------------------------------------------------------------- GATEWAY_DB


@pytest.mark.parametrize(
    "value, kind, target",
    [
        ("run/catalogue.sqlite3", "sqlite", "run/catalogue.sqlite3"),
        ("/abs/c.sqlite3", "sqlite", "/abs/c.sqlite3"),
        ("sqlite:///run/c.sqlite3", "sqlite", "run/c.sqlite3"),
        ("sqlite:////abs/c.sqlite3", "sqlite", "/abs/c.sqlite3"),
        ("postgresql://u:pw@db:5432/cat", "postgresql", "postgresql://u:pw@db:5432/cat"),
        ("postgres://u@db/cat?sslmode=require", "postgresql", "postgres://u@db/cat?sslmode=require"),
    ],
)
def test_gateway_db_values(value, kind, target):
    parsed = parse_database_url(value)
    assert (parsed.kind, parsed.target) == (kind, target)
    assert "pw" not in parsed.display


@pytest.mark.parametrize(
    "value, message",
    [
        ("mysql://u@h/db", "unknown scheme"),
        ("postgresql://u:secret@/cat", "no host"),
        ("postgresql://u:secret@h:5432/", "no database name"),
        ("postgresql://u:secret@h:port/cat", "port"),
        ("sqlite://relative", "sqlite:///"),
        ("", "empty"),
    ],
)
def test_bad_gateway_db_values_name_the_setting(value, message):
    with pytest.raises(DatabaseError, match=message) as raised:
        parse_database_url(value)
    assert "GATEWAY_DB" in str(raised.value) and "secret" not in str(raised.value)


def test_passwords_are_masked():
    assert mask_password("postgresql://me:s3cr@t@h:1/d") == "postgresql://me:***@h:1/d"
    assert mask_password("postgresql://me@h/d") == "postgresql://me@h/d"


def test_the_password_can_come_from_a_secret_file(monkeypatch, tmp_path):
    """GATEWAY_DB_PASSWORD_FILE is a declared setting of the gateway (and of its commands):
    the config object gets the password, the URL stays without it."""
    secret = tmp_path / "db_password"
    secret.write_text("p@ss/w:rd\n")
    monkeypatch.delenv("GATEWAY_DB_PASSWORD", raising=False)
    monkeypatch.setenv("GATEWAY_DB_PASSWORD_FILE", str(secret))
    monkeypatch.setenv("GATEWAY_DB", "postgresql://marketplace@postgres:5432/catalogue")
    config = GatewayConfig.from_env([])
    assert config.db_password == "p@ss/w:rd" and "p@ss" not in repr(config)
    assert config.db_path == "postgresql://marketplace@postgres:5432/catalogue"
    parsed = parse_database_url(config.db_path, config.db_password)
    assert parsed.target == "postgresql://marketplace:p%40ss%2Fw%3Ard@postgres:5432/catalogue"
    assert psycopg.conninfo.conninfo_to_dict(parsed.target)["password"] == "p@ss/w:rd"
    assert "p%40ss" not in parsed.display and "***" in parsed.display
    assert parse_database_url("run/c.sqlite3", "p").target == "run/c.sqlite3"  # SQLite ignores it
    for command in (
        LOAD_CATALOGUE_SETTINGS,
        RECONCILE_SETTINGS,
        REBALANCE_SETTINGS,
        INDEX_CATALOGUE_SETTINGS,
    ):
        values = command.read()
        assert database_password(values) == "p@ss/w:rd" and "db_password" not in values


def test_the_password_from_the_environment(monkeypatch):
    monkeypatch.delenv("GATEWAY_DB_PASSWORD_FILE", raising=False)
    monkeypatch.setenv("GATEWAY_DB_PASSWORD", "env-pw")
    monkeypatch.setenv("GATEWAY_DB", "postgresql://marketplace@postgres:5432/catalogue")
    assert GatewayConfig.from_env([]).db_password == "env-pw"
    monkeypatch.setenv("GATEWAY_DB_PASSWORD", "")
    assert GatewayConfig.from_env([]).db_password is None


@pytest.mark.parametrize(
    "url, message", [("postgresql://u:inline@h/cat", "keep one"), ("postgresql://h/cat", "names no user")]
)
def test_a_password_beside_an_unfit_url_is_refused(url, message):
    with pytest.raises(DatabaseError, match=message) as raised:
        parse_database_url(url, "from-file")
    assert "from-file" not in str(raised.value) and "inline" not in str(raised.value)


@pytest.mark.parametrize(
    "case, message",
    [
        ("inline", "keep one"),
        ("no user", "names no user"),
        ("both", "both set"),
        ("missing", "cannot be read"),
        ("empty", "is empty"),
    ],
)
def test_unusable_password_settings_stop_the_start_naming_them(monkeypatch, tmp_path, case, message):
    secret = tmp_path / "db_password"
    if case != "missing":
        secret.write_text("\n" if case == "empty" else "from-file")
    monkeypatch.setenv("GATEWAY_DB_PASSWORD_FILE", str(secret))
    monkeypatch.delenv("GATEWAY_DB_PASSWORD", raising=False)
    if case == "both":
        monkeypatch.setenv("GATEWAY_DB_PASSWORD", "from-env")
    url = {"inline": "postgresql://u:inline@h/cat", "no user": "postgresql://h/cat"}.get(
        case, "postgresql://u@h/c"
    )
    monkeypatch.setenv("GATEWAY_DB", url)
    with pytest.raises(ConfigError, match=message) as raised:
        GatewayConfig.from_env([])
    assert "GATEWAY_DB" in str(raised.value)
    assert "from-file" not in str(raised.value) and "inline" not in str(raised.value)


def test_a_real_postgres_user_logs_in_with_the_password_from_the_secret_file(postgres, monkeypatch, tmp_path):
    """A role that needs its password (scram-sha-256): refused with the bare URL, let in by the
    gateway's config and by a command (load_catalogue) with GATEWAY_DB_PASSWORD_FILE."""
    url = postgres.create_database()
    database, role = url.rsplit("/", 1)[1], f"pw_{os.getpid()}_{int(time.time() * 1000) % 100000}"
    password = "p@ss/w:rd"
    with psycopg.connect(postgres.url(), autocommit=True) as connection:
        connection.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        connection.execute(f'ALTER DATABASE "{database}" OWNER TO {role}')
        hba = postgres.data / "pg_hba.conf"  # this role only: password, before the trust lines
        hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        connection.execute("SELECT pg_reload_conf()")
    user_url = f"postgresql://{role}@127.0.0.1:{postgres.port}/{database}"
    with pytest.raises((CatalogueError, CatalogueUnavailable), match="password"):
        Catalogue.open(user_url).close()
    secret = tmp_path / "db_password"
    secret.write_text(password + "\n")
    monkeypatch.delenv("GATEWAY_DB_PASSWORD", raising=False)
    monkeypatch.setenv("GATEWAY_DB_PASSWORD_FILE", str(secret))
    monkeypatch.setenv("GATEWAY_DB", user_url)
    config = GatewayConfig.from_env([])
    with Catalogue.open(config.db_path, password=config.db_password) as catalogue:
        assert catalogue.count() == 0 and password not in catalogue.path
    write_prepared(tmp_path / "prepared")
    assert load_catalogue.main(["--prepared", str(tmp_path / "prepared"), "--no-check-files"]) == 0
    with Catalogue.open(user_url, password=password) as catalogue:
        assert catalogue.count() == 3


# ----------------------------------------------------------------------------- lifecycle


def test_created_migrated_and_reopened(catalogue_url):
    with Catalogue.open(catalogue_url) as catalogue:
        assert catalogue.schema_version == SCHEMA_VERSION
        catalogue.add(listing("L1"))
    with Catalogue.open(catalogue_url) as catalogue:  # second open: no migration re-run, data kept
        assert catalogue.schema_version == SCHEMA_VERSION
        assert catalogue.get("L1") == listing("L1")


def test_refuses_a_newer_schema(catalogue_url):
    Catalogue.open(catalogue_url).close()
    set_schema_version(catalogue_url, SCHEMA_VERSION + 1)
    with pytest.raises(CatalogueError, match="schema version"):
        Catalogue.open(catalogue_url)


def test_a_file_that_is_not_a_database_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a database, just some text " * 100)
    with pytest.raises(CatalogueError, match="notes.txt"):
        Catalogue.open(f"sqlite:///{path}")


def test_a_catalogue_path_under_a_file_is_refused_naming_it(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    with pytest.raises(CatalogueError, match=r"cannot make its folder .*a-file"):
        Catalogue.open(f"sqlite:///{blocker / 'catalogue.sqlite3'}")


@pytest.mark.parametrize("tool", ["reconcile", "index_catalogue"])
def test_the_tools_report_an_unusable_catalogue_path_without_a_traceback(tmp_path, tool):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    result = subprocess.run(
        [sys.executable, "-m", f"services.gateway.{tool}", "--db", str(blocker / "c.sqlite3")]
        + (["--prepared", str(tmp_path)] if tool == "index_catalogue" else []),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "GATEWAY_DB" in result.stderr and "cannot make its folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_version_1_catalogue_is_migrated_and_keeps_its_listings(tmp_path):
    """A file written by the gateway before the outbox (schema 1) opens as live listings."""
    path = tmp_path / "old.sqlite3"
    from services.gateway.catalogue import MIGRATIONS
    from services.gateway.catalogue_db import SqliteDatabase

    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0].format(**SqliteDatabase.types))
    db.execute("INSERT INTO listings (id, title, created_at) VALUES ('old', 'Old chair', 0)")
    db.execute("INSERT INTO listing_images VALUES ('old-a', 'old', 0)")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    with Catalogue.open(path) as catalogue:
        assert catalogue.schema_version == SCHEMA_VERSION
        assert catalogue.get("old").image_ids == ("old-a",)


def test_gateways_starting_together_migrate_once(catalogue_url):
    """Eight openers at once on an empty database: one migrates, the others wait and find it done."""
    errors: list[BaseException] = []
    opened: list[Catalogue] = []
    barrier = threading.Barrier(8)

    def open_one():
        barrier.wait()
        try:
            opened.append(Catalogue.open(catalogue_url))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert not errors, errors
        assert {c.schema_version for c in opened} == {SCHEMA_VERSION}
        opened[0].add(listing("L1"))
        assert all(c.get("L1") is not None for c in opened)
    finally:
        for catalogue in opened:
            catalogue.close()


def test_a_gateway_starting_while_another_migrates_waits_and_reads_the_version(postgres):
    """The migration lock held elsewhere (a replica migrating): the opener waits for it, then reads
    the schema version right (the lock's own result is not mistaken for it)."""
    from services.gateway.catalogue_db import MIGRATION_LOCK_KEY

    url = postgres.create_database()
    Catalogue.open(url).close()
    for _ in range(2):  # the migrated database, then one whose version row another opener wrote
        with psycopg.connect(url) as holder:
            holder.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            threading.Timer(0.5, holder.rollback).start()
            started = time.monotonic()
            with Catalogue.open(url) as catalogue:
                assert time.monotonic() - started >= 0.4  # it waited for the lock
                assert catalogue.schema_version == SCHEMA_VERSION


# ----------------------------------------------------------------------------- reads and writes


def test_add_get_remove_and_duplicates(catalogue_url):
    with Catalogue.open(catalogue_url) as catalogue:
        catalogue.add(listing("L1", price=None, currency=""))
        catalogue.add(listing("L2", images=("x",)))
        assert catalogue.get("L1").price is None
        assert catalogue.get("L1").image_ids == ("L1-a", "L1-b")  # order kept
        with pytest.raises(DuplicateListing):
            catalogue.add(listing("L1"))
        with pytest.raises(DuplicateListing):  # an image id already used: nothing written
            catalogue.add(Listing("L3", "t", image_ids=("L2-x",)))
        assert catalogue.get("L3") is None and catalogue.count() == 2
        assert set(catalogue.get_many(["L1", "L2", "nope"])) == {"L1", "L2"}
        assert catalogue.main_categories() == ["Home & Garden"]
        assert [(r.image_id, r.listing_id) for r in catalogue.image_rows(["L2-x", "zz"])] == [("L2-x", "L2")]
        assert catalogue.remove("L1") == listing("L1", price=None, currency="")
        assert catalogue.remove("L1") is None
        assert catalogue.count_images() == 1


def test_unicode_and_long_text_round_trip(catalogue_url):
    item = listing("L-ü", title="Schöner Stuhl — 椅子 🙂", description="x" * 20_000, location="Zürich")
    with Catalogue.open(catalogue_url) as catalogue:
        catalogue.add(item)
        assert catalogue.get("L-ü") == item


def test_get_many_beyond_sql_variable_limit(catalogue_url):
    with Catalogue.open(catalogue_url) as catalogue:
        for start in range(0, 1200, 300):
            with catalogue._tx() as tx:  # bulk insert for speed; add() is one transaction each
                from services.gateway.catalogue import _insert_many

                _insert_many(
                    tx, [(listing(f"L{i:04d}", images=("p",)), "") for i in range(start, start + 300)], 0.0
                )
        found = catalogue.get_many([f"L{i:04d}" for i in range(1200)])
        assert len(found) == 1200 and found["L0999"].image_ids == ("L0999-p",)


def test_load_prepared(catalogue_url, tmp_path):
    prepared = write_prepared(tmp_path / "prepared")
    with Catalogue.open(catalogue_url) as catalogue:
        report = catalogue.load_prepared(prepared)
        assert (report.listings, report.images) == (3, 2)
        assert report.images_skipped_missing_file == 1 and report.images_skipped_unknown_listing == 1
        table = catalogue.get("p1")
        assert table.description == "Solid oak,\nseats 4" and table.location == "Leeds, West Yorkshire"
        assert table.price == 40.0 and table.image_ids == ("i1",)
        assert catalogue.get("p2").price is None  # absurd price -> unknown
        assert catalogue.get("p3").price is None and catalogue.get("p3").image_ids == ()
        again = catalogue.load_prepared(prepared)  # idempotent: nothing new
        assert again.listings == 0 and catalogue.count() == 3
        only = catalogue.load_prepared(prepared, replace=True, only_with_images=True)
        assert only.listings == 2 and catalogue.count() == 2


# ----------------------------------------------------------------------------- outbox


def test_pending_listing_is_hidden_until_its_entry_is_done(catalogue_url):
    item = listing("L1")
    with Catalogue.open(catalogue_url) as catalogue:
        entry = catalogue.add_pending(item, vectors_of(item), shard=1)
        assert catalogue.get("L1") is None and catalogue.count() == 0
        assert catalogue.get("L1", include_pending=True) == item
        assert catalogue.count(include_pending=True) == 1
        assert catalogue.due_outbox(time.time()) == [entry.seq]
        claimed = catalogue.claim(entry.seq, "A", lease_s=30)
        assert claimed.op == "upsert" and claimed.shard == 1 and claimed.listing == item
        assert [(v.collection, v.item_id) for v in claimed.vectors] == [
            ("image", "L1-a"),
            ("image", "L1-b"),
            ("text", "L1"),
        ]
        np.testing.assert_array_equal(claimed.vectors[0].vector, vectors_of(item)[0].vector)
        assert catalogue.claim(entry.seq, "B", lease_s=30) is None  # held by A
        assert catalogue.due_outbox(time.time()) == []
        catalogue.complete(claimed)
        assert catalogue.get("L1") == item and catalogue.pending_outbox() == []


def test_add_pending_duplicate_writes_nothing(catalogue_url):
    with Catalogue.open(catalogue_url) as catalogue:
        catalogue.add(listing("L1"))
        with pytest.raises(DuplicateListing):
            catalogue.add_pending(listing("L1", images=("z",)), vectors_of(listing("L1", images=("z",))), 0)
        assert catalogue.pending_outbox() == [] and catalogue.count_images() == 2


def test_entries_of_one_listing_apply_in_order(catalogue_url):
    item = listing("L1")
    with Catalogue.open(catalogue_url) as catalogue:
        add = catalogue.add_pending(item, vectors_of(item), shard=0)
        removed, delete = catalogue.remove_queued("L1", 0)  # still pending: removable all the same
        assert catalogue.due_outbox(time.time()) == [add.seq]  # the deletion waits for the upsert
        assert catalogue.claim(delete.seq, "B", 30) is None
        first = catalogue.claim(add.seq, "A", 30)
        assert first.listing is None  # gone since: nothing to push
        catalogue.complete(first)
        assert catalogue.remove_queued("L1", 0) is None
        assert removed == item and delete.op == "delete"
        assert delete.item_ids == {"image": ["L1-a", "L1-b"], "text": ["L1"]}
        again = catalogue.add_pending(item, vectors_of(item), shard=0)  # same id added again
        assert again.seq > delete.seq
        assert catalogue.due_outbox(time.time()) == [delete.seq]  # the re-add waits its turn
        assert catalogue.claim(again.seq, "B", 30) is None
        catalogue.complete(catalogue.claim(delete.seq, "A", 30))
        assert catalogue.due_outbox(time.time()) == [again.seq]
        catalogue.complete(catalogue.claim(again.seq, "B", 30))
        assert catalogue.get("L1") == item


def test_a_request_writes_its_entry_already_leased_when_first_in_line(catalogue_url):
    """AddListing and RemoveListing push their entry without a claim: written held by the
    request's applier, with what `claim` would have read; nobody else can take it meanwhile."""
    item = listing("L1")
    with Catalogue.open(catalogue_url) as catalogue:
        add = catalogue.add_pending(item, vectors_of(item), shard=1, lease_holder="A", lease_s=30)
        assert (add.lease_holder, add.listing, add.attempts) == ("A", item, 0)
        assert [(v.collection, v.item_id) for v in add.vectors] == [
            ("image", "L1-a"),
            ("image", "L1-b"),
            ("text", "L1"),
        ]
        for mine, stored in zip(add.vectors, vectors_of(item)):
            assert mine.vector.dtype == np.dtype("<f4")
            np.testing.assert_array_equal(mine.vector, stored.vector)
        assert catalogue.due_outbox(time.time()) == []  # held: the loops leave it alone
        assert catalogue.claim(add.seq, "B", 30) is None
        removed, delete = catalogue.remove_queued("L1", 1, lease_holder="A", lease_s=30)
        assert delete.lease_holder == ""  # the upsert is still queued: the deletion waits its turn
        catalogue.complete(add)
        assert catalogue.claim(delete.seq, "B", 30) is not None

        other = listing("L2")
        catalogue.add(other)
        _, alone = catalogue.remove_queued("L2", 0, lease_holder="A", lease_s=30)
        assert alone.lease_holder == "A" and catalogue.claim(alone.seq, "B", 30) is None
        plain = catalogue.add_pending(listing("L3"), vectors_of(listing("L3")), 0)
        assert plain.lease_holder == "" and plain.listing is None  # no lease asked: claim it


def test_upsert_entry_of_a_removed_listing_pushes_nothing(catalogue_url):
    item = listing("L1")
    with Catalogue.open(catalogue_url) as catalogue:
        add = catalogue.add_pending(item, vectors_of(item), shard=0)
        catalogue.remove("L1")
        entry = catalogue.claim(add.seq, "A", 30)
        assert entry.listing is None and entry.vectors == ()


def test_lease_expiry_and_backoff(catalogue_url):
    item = listing("L1")
    with Catalogue.open(catalogue_url) as catalogue:
        entry = catalogue.add_pending(item, vectors_of(item), shard=0)
        held = catalogue.claim(entry.seq, "dead gateway", lease_s=0.3)
        assert held is not None and catalogue.claim(entry.seq, "B", 30) is None
        time.sleep(0.4)
        taken = catalogue.claim(entry.seq, "B", 30)  # the lease ran out: B takes over
        assert taken is not None
        catalogue.fail(taken, "shard down", retry_in_s=60)
        stats = catalogue.outbox_stats()
        assert (stats.pending, stats.failing, stats.last_error) == (1, 1, "shard down")
        assert catalogue.due_outbox(time.time()) == []  # backing off
        assert catalogue.claim(entry.seq, "C", 30) is None
        urgent = catalogue.claim(entry.seq, "C", 30, ignore_backoff=True)  # a request retrying it
        assert urgent is not None and urgent.attempts == 1


def test_concurrent_claims_give_each_entry_to_one_holder(catalogue_url):
    with Catalogue.open(catalogue_url) as catalogue:
        seqs = [
            catalogue.add_pending(listing(f"L{i}"), vectors_of(listing(f"L{i}"), text=False), 0).seq
            for i in range(20)
        ]
        won: dict[int, list[str]] = {seq: [] for seq in seqs}
        barrier = threading.Barrier(4)

        def claimer(name: str):
            barrier.wait()
            for seq in seqs:
                if catalogue.claim(seq, name, 30) is not None:
                    won[seq].append(name)

        threads = [threading.Thread(target=claimer, args=(f"h{i}",)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(len(holders) == 1 for holders in won.values()), won


# ----------------------------------------------------------------------------- faults


def test_unreachable_postgres_at_open_is_unavailable_and_masks_the_password():
    url = f"postgresql://me:s3cret@127.0.0.1:{free_port()}/cat"
    started = time.monotonic()
    with pytest.raises(CatalogueUnavailable, match="cannot connect") as raised:
        Catalogue.open(url, connect_timeout_s=1.0)
    assert time.monotonic() - started < 10
    assert "127.0.0.1" in str(raised.value) and "s3cret" not in str(raised.value)


def test_a_missing_postgres_database_is_named(postgres):
    with pytest.raises(CatalogueUnavailable, match='database "nosuchdb" does not exist'):
        Catalogue.open(postgres.url("nosuchdb"), connect_timeout_s=2.0)


@pytest.mark.parametrize(
    "value, expect",
    [
        ("mysql://u@h/db", "unknown scheme"),
        (None, "cannot connect to the catalogue database"),
    ],
)
def test_gateway_refuses_to_start_with_one_line_naming_gateway_db(value, expect):
    value = value or f"postgresql://me:s3cret@127.0.0.1:{free_port()}/cat"
    env = {
        **os.environ,
        "GATEWAY_DB": value,
        "GATEWAY_DB_CONNECT_TIMEOUT_S": "1",
        "GATEWAY_PORT": "0",
        "EMBEDDER_ADDR": "127.0.0.1:1",
        "INDEXER_ADDRS": "127.0.0.1:2",
    }
    result = subprocess.run(
        [sys.executable, "-m", "services.gateway"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "GATEWAY_DB" in last and expect in last and "s3cret" not in result.stderr
    assert "Traceback" not in result.stderr


def test_a_restarted_postgres_costs_no_failed_call(tmp_path):
    """Pooled connections the server dropped are found by the call's first statement, the pool
    replaces them, and the call runs on a fresh one: no caller sees the restart."""
    cluster = PostgresCluster().start()
    try:
        url = cluster.create_database("restart")
        with Catalogue.open(url, max_connections=4, min_connections=4, connect_timeout_s=5) as catalogue:
            catalogue.add(listing("L1"))
            cluster.restart()
            assert catalogue.get("L1") == listing("L1")  # a read
            catalogue.add(listing("L2"))  # a transaction
            cluster.restart()
            catalogue.add(listing("L3"))
            assert catalogue.count() == 3
    finally:
        cluster.destroy()


def test_postgres_going_away_is_unavailable_then_recovers_without_reopening(tmp_path):
    cluster = PostgresCluster().start()
    try:
        url = cluster.create_database("outage")
        with Catalogue.open(url, connect_timeout_s=1.0) as catalogue:
            catalogue.add(listing("L1"))
            cluster.stop()
            with pytest.raises(CatalogueUnavailable) as raised:
                catalogue.get("L1")
            assert f"127.0.0.1:{cluster.port}/outage" in str(raised.value)
            with pytest.raises(CatalogueUnavailable):
                catalogue.add(listing("L2"))
            cluster.start()
            deadline = time.monotonic() + 30
            while True:
                try:
                    assert catalogue.get("L1") == listing("L1")
                    break
                except CatalogueUnavailable:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            catalogue.add(listing("L2"))
            assert catalogue.count() == 2
    finally:
        cluster.destroy()
