"""A throwaway PostgreSQL cluster for tests: the machine's own server binaries, a fresh data
directory, a free loopback port, stopped and deleted afterwards.

``initdb`` and ``postgres`` refuse to run as root, so under root (CI) the cluster belongs to the
``postgres`` system user (created by Debian's ``postgresql`` package) and its commands run through
``runuser``; otherwise as the current user. Durability settings are off (``fsync=off``): a test
cluster that dies is thrown away anyway, and the suite stays fast on a loaded machine.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from scripts.stack import free_port

PG_BIN_GLOBS = ("/usr/lib/postgresql/*/bin",)


def postgres_bin_dir() -> Path:
    """The newest installed PostgreSQL server's bin directory (``$PG_BIN`` wins)."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    found = sorted((p for g in PG_BIN_GLOBS for p in glob.glob(g) if Path(p, "initdb").exists()),
                   key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    if not found:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin: install "
                           "the Debian package `postgresql` (bash .ci/run does)")
    return Path(found[-1])


class PostgresCluster:
    """``start()`` -> a server on 127.0.0.1:``port``; ``url(db)`` for psycopg / GATEWAY_DB."""

    def __init__(self, root: Path | None = None, *, port: int | None = None) -> None:
        self.bin = postgres_bin_dir()
        self.owns_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="pgtest-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = port or free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        self._databases = 0

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        return subprocess.run(command, check=check, capture_output=True, text=True, timeout=120)

    def init(self) -> "PostgresCluster":
        self.root.mkdir(parents=True, exist_ok=True)
        if self.user:
            shutil.chown(self.root, self.user)
            os.chmod(self.root, 0o700)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--no-sync", "--locale=C")
        return self

    def start(self) -> "PostgresCluster":
        if not self.data.exists():
            self.init()
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200 "
                   "-c shared_buffers=32MB")
        result = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options,
                           "-w", "-t", "60", "start", check=False)
        if result.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start: {result.stderr.strip()} "
                               f"{self.log.read_text()[-2000:] if self.log.exists() else ''}")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        self.stop("immediate")
        if self.owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        self._databases += 1
        name = name or f"t{os.getpid()}_{self._databases}_{int(time.time() * 1000) % 100000}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)
