"""Shared fixtures. The expensive ones (embedded PostgreSQL, the whole lineage with dbt) run
once per test session; tests then read their outputs."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

TEST_KEY_HEX = "5eed" * 16
SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"

_ISOLATED_VARIABLES = (
    "STARVIT_FHIR_BASE_URL",
    "STARVIT_WAREHOUSE_DSN",
    "STARVIT_DAGSTER_DSN",
    "STARVIT_SOURCE_DIR",
    "STARVIT_LAKE_DIR",
    "STARVIT_PSEUDONYMISATION_KEY_FILE",
    "DAGSTER_HOME",
    "STARVIT_TIGERGRAPH_HOST",
    "STARVIT_TIGERGRAPH_SECRET",
    "STARVIT_TIGERGRAPH_TOKEN",
    "STARVIT_TIGERGRAPH_PASSWORD",
)


@dataclass(frozen=True)
class PlatformEnv:
    home: Path
    key: bytes


@pytest.fixture(scope="session")
def platform_env() -> Iterator[PlatformEnv]:
    """A private STARVIT_HOME with its own embedded PostgreSQL, stopped at the end."""
    from starvit_assets.warehouse.embedded import stop_embedded_postgres

    # Not under pytest's basetemp: a concurrent pytest session may rotate that away while the
    # server (running as another user when we are root) still needs its data directory.
    home = Path(tempfile.mkdtemp(prefix="starvit-test-home-"))
    home.chmod(0o755)
    saved = dict(os.environ)
    for name in _ISOLATED_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update(
        {
            "STARVIT_HOME": str(home),
            "STARVIT_ENV": "dev",
            "STARVIT_PSEUDONYMISATION_KEY": TEST_KEY_HEX,
        }
    )
    try:
        yield PlatformEnv(home=home, key=bytes.fromhex(TEST_KEY_HEX))
    finally:
        stop_embedded_postgres(home / "pgdata")
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def warehouse_dsn(platform_env: PlatformEnv) -> str:
    from starvit_assets import platform
    from starvit_assets.settings import load_settings

    settings = load_settings()
    platform.ensure_dirs(settings)
    return platform.activate(settings).warehouse_dsn
