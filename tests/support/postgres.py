"""A throwaway PostgreSQL cluster for tests: the machine's own server binaries (`scripts.postgres`),
a fresh data directory under /tmp, a free loopback port, fsync off (a test cluster that dies is
thrown away anyway), stopped and deleted by ``destroy()``."""

from __future__ import annotations

from pathlib import Path

from scripts.postgres import LocalPostgres
from scripts.stack import free_port


class PostgresCluster(LocalPostgres):
    def __init__(self, root: Path | None = None, *, port: int | None = None) -> None:
        super().__init__(root, port or free_port(), durable=False)
