"""Resolves settings into running endpoints: the embedded PostgreSQL, DSNs, the dbt environment.

Shared by the CLI, the Dagster resources and the tests, so that each starts the same
embedded services in the same way.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict

from starvit_assets.settings import REPO_ROOT, StarvitSettings
from starvit_assets.warehouse.embedded import (
    DAGSTER_DATABASE,
    WAREHOUSE_DATABASE,
    PostgresEndpoint,
    start_embedded_postgres,
)

DAGSTER_YAML = REPO_ROOT / "dagster.yaml"


@dataclass(frozen=True)
class Endpoints:
    warehouse_dsn: str
    dagster_dsn: str


def resolve_endpoints(settings: StarvitSettings) -> Endpoints:
    """External DSNs when configured; otherwise start (or reuse) the embedded server."""
    warehouse = settings.warehouse_dsn.get_secret_value() if settings.warehouse_dsn else None
    dagster = settings.dagster_dsn.get_secret_value() if settings.dagster_dsn else None
    if warehouse is None or dagster is None:
        endpoint = start_embedded_postgres(settings.pgdata_dir)
        warehouse = warehouse or endpoint.dsn(WAREHOUSE_DATABASE)
        dagster = dagster or endpoint.dsn(DAGSTER_DATABASE)
    return Endpoints(warehouse_dsn=warehouse, dagster_dsn=dagster)


def dbt_environment(settings: StarvitSettings, warehouse_dsn: str) -> dict[str, str]:
    """The variables ``dbt_project/profiles.yml`` reads for the postgres target."""
    parts = conninfo_to_dict(warehouse_dsn)
    endpoint = PostgresEndpoint(
        host=str(parts.get("host") or "localhost"),
        port=int(parts.get("port") or 5432),
        user=str(parts.get("user") or "postgres"),
        password=str(parts.get("password") or ""),
    )
    return {
        "STARVIT_ENV": settings.env.value,
        "STARVIT_PG_HOST": endpoint.host,
        "STARVIT_PG_PORT": str(endpoint.port),
        "STARVIT_PG_USER": endpoint.user,
        "STARVIT_PG_PASSWORD": endpoint.password,
        "STARVIT_PG_DATABASE": str(parts.get("dbname") or WAREHOUSE_DATABASE),
    }


def prepare_dagster_home(settings: StarvitSettings, dagster_dsn: str) -> dict[str, str]:
    """Put ``dagster.yaml`` into DAGSTER_HOME and return the variables it reads."""
    settings.dagster_home.mkdir(parents=True, exist_ok=True)
    target = settings.dagster_home / "dagster.yaml"
    if not target.exists() or target.read_bytes() != DAGSTER_YAML.read_bytes():
        shutil.copyfile(DAGSTER_YAML, target)
    return {
        "DAGSTER_HOME": str(settings.dagster_home),
        "STARVIT_DAGSTER_PG_URL": sqlalchemy_psycopg2_url(dagster_dsn),
    }


def sqlalchemy_psycopg2_url(dsn: str) -> str:
    """dagster-postgres issues ``NOTIFY channel, $1``, which only psycopg2's client-side
    binding accepts; SQLAlchemy 2.1 would pick psycopg 3 for a plain postgresql:// URL."""
    for prefix in ("postgresql://", "postgres://"):
        if dsn.startswith(prefix):
            return "postgresql+psycopg2://" + dsn.removeprefix(prefix)
    return dsn


def activate(settings: StarvitSettings) -> Endpoints:
    """Start what is needed and export the environment dbt and Dagster read."""
    endpoints = resolve_endpoints(settings)
    os.environ.update(dbt_environment(settings, endpoints.warehouse_dsn))
    os.environ.update(prepare_dagster_home(settings, endpoints.dagster_dsn))
    os.environ["STARVIT_HOME"] = str(settings.home)
    return endpoints


def ensure_dirs(settings: StarvitSettings) -> None:
    for folder in (settings.phi_dir, settings.state_dir, settings.lake_root, settings.graph_dir):
        folder.mkdir(parents=True, exist_ok=True)
    # PHI staging is readable only by the platform's own user.
    settings.phi_dir.chmod(0o700)


def is_within(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())
