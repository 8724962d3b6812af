"""Catalogue back ends for the gateway tests: SQLite files and a real throwaway PostgreSQL."""

from __future__ import annotations

import pytest

from tests.support.postgres import PostgresCluster

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL 15 cluster for the session (real server binaries, free loopback port)."""
    cluster = PostgresCluster().start()
    yield cluster
    cluster.destroy()


@pytest.fixture(params=BACKENDS)
def catalogue_url(request, tmp_path) -> str:
    """A fresh, empty catalogue location on each back end: ``GATEWAY_DB`` as a user writes it."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalogue.sqlite3'}"
    return request.getfixturevalue("postgres").create_database()
