"""A local PostgreSQL server from the machine's own packages (Debian ``postgresql``), for the
gateway's catalogue in `make up DB=postgres` (data in ``run/postgres/``) and for the tests
(a throwaway cluster on a free loopback port, `tests/support/postgres.py`).

``initdb`` and ``postgres`` refuse to run as root, so under root the cluster belongs to the
``postgres`` system user (created by the package) and its commands run through ``runuser``;
otherwise as the current user. It listens on 127.0.0.1 only, with trust authentication for
local connections: a development server, not a production one.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


PG_BIN_GLOBS = ("/usr/lib/postgresql/*/bin",)


def postgres_bin_dir() -> Path:
    """The newest installed PostgreSQL server's bin directory (``$PG_BIN`` wins)."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    found = sorted(
        (p for g in PG_BIN_GLOBS for p in glob.glob(g) if Path(p, "initdb").exists()),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
    )
    if not found:
        raise RuntimeError(
            "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin: install "
            "the Debian package `postgresql` (bash .ci/run does)"
        )
    return Path(found[-1])


class LocalPostgres:
    """``start()`` -> a server on 127.0.0.1:``port`` with its data under ``root``; ``url(db)``
    for psycopg and GATEWAY_DB. ``durable=False`` (tests) turns fsync off."""

    def __init__(self, root: Path | None, port: int, *, durable: bool = True) -> None:
        self.bin = postgres_bin_dir()
        self.owns_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="pgtest-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = port
        self.durable = durable
        self.user = "postgres" if os.geteuid() == 0 else None
        self._databases = 0

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        return subprocess.run(command, check=check, capture_output=True, text=True, timeout=120)

    def init(self) -> "LocalPostgres":
        self.root.mkdir(parents=True, exist_ok=True)
        if (
            self.user
            and subprocess.run(
                ["runuser", "-u", self.user, "--", "test", "-x", str(self.root.parent)], check=False
            ).returncode
            != 0
        ):
            raise RuntimeError(
                f"the {self.user} user cannot enter {self.root.parent}, so PostgreSQL "
                "cannot keep its data there: use a run directory others can enter"
            )
        if self.user:
            shutil.chown(self.root, self.user)
            os.chmod(self.root, 0o700)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--locale=C",
        )
        return self

    def start(self) -> "LocalPostgres":
        if not self.data.exists():
            self.init()
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
            "-c max_connections=200 -c shared_buffers=32MB"
        )
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        result = self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"PostgreSQL did not start: {result.stderr.strip()} "
                f"{self.log.read_text()[-2000:] if self.log.exists() else ''}"
            )
        return self

    def running(self) -> bool:
        return (
            self.data.exists()
            and self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0
        )

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

    def create_database(self, name: str | None = None, *, exist_ok: bool = False) -> str:
        """A new empty database (or, with ``exist_ok``, the one of that name); returns its URL."""
        import psycopg

        self._databases += 1
        name = name or f"t{os.getpid()}_{self._databases}_{int(time.time() * 1000) % 100000}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if exists and not exist_ok:
                raise RuntimeError(f"database {name} exists")
            if not exists:
                connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)
