"""A throw-away PostgreSQL cluster for the tests: `initdb` in a temporary directory, `pg_ctl start` on a free
loopback port, stopped and removed afterwards. Each test asks it for a database of its own.

Debian's `postgresql` package provides the binaries (scripts/install-postgres installs it). PostgreSQL refuses
to run as root, so as root the cluster is made and run as the `postgres` system user the package creates.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from types import TracebackType
from typing import Self

import psycopg

from .support import free_port


def postgres_bin() -> Path:
    """The directory of initdb and pg_ctl: the newest Debian version installed, else what is on PATH."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if versions:
        return versions[-1].parent
    found = shutil.which("initdb")
    if found is None:
        raise RuntimeError("PostgreSQL is not installed: run scripts/install-postgres")
    return Path(found).parent


class Cluster:
    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="goatcounter-exports-pg-"))
        self.data = self.dir / "data"
        self.user = "postgres" if os.geteuid() == 0 else os.environ.get("USER", "postgres")

    def _run(self, *args: str) -> None:
        command = [*args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def __enter__(self) -> Self:
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        binaries = postgres_bin()
        self._run(str(binaries / "initdb"), "-D", str(self.data), "-A", "trust", "-U", self.user, "--no-sync")
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        log = self.dir / "server.log"
        self._run(str(binaries / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(log), "-w", "start")
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self._run(str(postgres_bin() / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'create database "{name}"')
        return self.url(name)
