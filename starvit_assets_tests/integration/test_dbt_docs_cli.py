"""``starvit dbt docs --no-serve``: one real ``dbt docs generate`` against the embedded
warehouse, into its own target path, leaving the prepared manifest Dagster loads alone."""

from __future__ import annotations

import hashlib
import time

import pytest

from starvit_assets.cli import main
from starvit_assets.defs.dbt import DBT_DOCS_TARGET_DIR, manifest_path

pytestmark = pytest.mark.e2e


@pytest.mark.usefixtures("warehouse_dsn")
def test_docs_are_generated_apart_from_the_prepared_manifest() -> None:
    prepared = manifest_path()
    before = (hashlib.sha256(prepared.read_bytes()).hexdigest(), prepared.stat().st_mtime_ns)
    started = time.time()

    assert main(["dbt", "docs", "--no-serve"]) == 0

    after = (hashlib.sha256(prepared.read_bytes()).hexdigest(), prepared.stat().st_mtime_ns)
    assert after == before
    for name in ("catalog.json", "index.html", "manifest.json"):
        generated = DBT_DOCS_TARGET_DIR / name
        assert generated.is_file(), name
        assert generated.stat().st_mtime >= started - 1, f"{name} is left over from before"
