"""The warehouse_raw asset with the bigquery target, through the Dagster resources: the
``PlatformResource`` built as ``definitions.py`` builds it, whose dagster-gcp
``BigQueryResource`` and ``GCSResource`` hand the real google-cloud clients to the loader.

The clients reach the local endpoint (``fakes/bigquery_endpoint.py``) by the client
libraries' own variables (``BIGQUERY_EMULATOR_HOST``, ``STORAGE_EMULATOR_HOST``), and
BigQuery authenticates with Application Default Credentials: a service-account key file
whose token URI is the endpoint's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pytest

from starvit_assets.defs.resources import bigquery_resource, gcs_resource
from starvit_assets.defs.warehouse import ROWS_CHECK, WAREHOUSE_RAW_ASSETS, warehouse_raw_key
from starvit_assets.lake.partitions import RawLake
from starvit_assets.settings import load_settings
from starvit_assets_tests.conftest import PlatformEnv
from starvit_assets_tests.fakes.bigquery_endpoint import (
    FakeBigQueryEndpoint,
    write_service_account_key,
)

pytestmark = pytest.mark.integration

PROJECT = "starvit-ci"
BUCKET = "starvit-ci-lake"
PREFIX = "research"
TABLE = "patient"
EXPORT = "2026-06-01T00.00.00-a1"
_PROXIES = ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY")


@pytest.fixture()
def endpoint(
    platform_env: PlatformEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeBigQueryEndpoint]:
    with FakeBigQueryEndpoint(location="EU") as endpoint:
        keyfile = tmp_path / "service-account.json"
        write_service_account_key(keyfile, endpoint.token_uri, PROJECT)
        for name, value in {
            "STARVIT_WAREHOUSE_TARGET": "bigquery",
            "STARVIT_BQ_PROJECT": PROJECT,
            "STARVIT_BQ_LOCATION": "EU",
            "STARVIT_GCS_BUCKET": BUCKET,
            "STARVIT_GCS_PREFIX": PREFIX,
            "STARVIT_LAKE_DIR": str(tmp_path / "lake"),
            "GOOGLE_APPLICATION_CREDENTIALS": str(keyfile),
            "BIGQUERY_EMULATOR_HOST": endpoint.url,
            "STORAGE_EMULATOR_HOST": endpoint.url,
        }.items():
            monkeypatch.setenv(name, value)
        # Anything but the local endpoint fails instead of reaching Google.
        for name in _PROXIES:
            for spelling in (name, name.lower()):
                monkeypatch.setenv(
                    spelling, "127.0.0.1,localhost" if name == "NO_PROXY" else "http://127.0.0.1:9"
                )
        yield endpoint


def _publish(lake_dir: Path) -> Path:
    lake = RawLake(lake_dir)
    lake.stage(
        TABLE,
        EXPORT,
        pa.table(
            {
                "patient_id": pa.array(["p1", "p2"]),
                "gender": pa.array(["female", None]),
                "_export_id": pa.array([EXPORT, EXPORT]),
            }
        ),
    )
    return lake.publish(TABLE, EXPORT)


def test_warehouse_raw_loads_through_the_dagster_gcp_resources(
    endpoint: FakeBigQueryEndpoint, tmp_path: Path
) -> None:
    from starvit_assets.defs.resources import PlatformResource

    partition = _publish(tmp_path / "lake")
    endpoint.answer_queries(
        lambda sql: "GROUP BY _export_id" in sql,
        [{"name": "_export_id", "type": "STRING"}, {"name": "row_count", "type": "INTEGER"}],
        [[EXPORT, "2"]],
    )
    settings = load_settings()
    platform = PlatformResource(bigquery=bigquery_resource(settings), gcs=gcs_resource(settings))
    asset = next(a for a in WAREHOUSE_RAW_ASSETS if a.key == warehouse_raw_key(TABLE))

    result = dg.materialize([asset], resources={"platform": platform})

    assert result.success
    object_name = f"{PREFIX}/deid_raw/{TABLE}/export_id={EXPORT}/part-00000.parquet"
    assert endpoint.object(BUCKET, object_name) == partition.read_bytes()
    (load,) = endpoint.jobs("load")
    assert load["load"]["sourceUris"] == [f"gs://{BUCKET}/{object_name}"]
    assert load["load"]["destinationTable"]["datasetId"] == "sv_dev_raw"
    assert endpoint.dataset(PROJECT, "sv_dev_raw")["location"] == "EU"
    raw = endpoint.table(PROJECT, "sv_dev_raw", TABLE)
    assert raw is not None
    assert [f["name"] for f in raw["schema"]["fields"]] == [
        "patient_id",
        "gender",
        "_export_id",
        "_loaded_at",
    ]
    replace = [q for q in endpoint.jobs("query") if "BEGIN TRANSACTION" in q["query"]["query"]]
    assert len(replace) == 1
    # BigQuery was called with Application Default Credentials: a token from the key file.
    assert endpoint.token_assertions
    (check,) = result.get_asset_check_evaluations()
    assert check.check_name == ROWS_CHECK and check.passed
    (materialization,) = result.asset_materializations_for_node(asset.op.name)
    assert materialization.metadata["partitions_loaded"] == dg.IntMetadataValue(1)
    assert materialization.metadata["rows"] == dg.IntMetadataValue(2)


def test_the_bigquery_target_without_a_bucket_fails_with_a_clear_message(
    endpoint: FakeBigQueryEndpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from starvit_assets.defs.resources import PlatformResource

    monkeypatch.delenv("STARVIT_GCS_BUCKET")
    _publish(tmp_path / "lake")
    asset = next(a for a in WAREHOUSE_RAW_ASSETS if a.key == warehouse_raw_key(TABLE))

    result = dg.materialize(
        [asset], resources={"platform": PlatformResource()}, raise_on_error=False
    )

    assert not result.success
    (failure,) = result.get_step_failure_events()
    assert "STARVIT_BQ_PROJECT and STARVIT_GCS_BUCKET" in str(failure.step_failure_data.error)
    assert endpoint.requests == []


def test_the_configured_bigquery_resource_is_the_one_that_loads(
    endpoint: FakeBigQueryEndpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A BigQueryResource configured in the Dagster definitions (another project and location
    than the settings) is the client the load uses."""
    from dagster_gcp import BigQueryResource, GCSResource

    from starvit_assets.defs.resources import PlatformResource

    monkeypatch.setenv("STARVIT_BQ_LOCATION", "US")
    _publish(tmp_path / "lake")
    asset = next(a for a in WAREHOUSE_RAW_ASSETS if a.key == warehouse_raw_key(TABLE))
    platform = PlatformResource(
        bigquery=BigQueryResource(project="starvit-other", location="EU"),
        gcs=GCSResource(project="starvit-other"),
    )

    result = dg.materialize([asset], resources={"platform": platform}, raise_on_error=False)

    assert endpoint.dataset("starvit-other", "sv_dev_raw")["location"] == "EU"
    assert endpoint.dataset(PROJECT, "sv_dev_raw") is None
    # No row counts were registered for this project, so the rows check fails; the load ran.
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed
