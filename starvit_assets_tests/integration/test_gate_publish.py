"""Staging, then publishing, in Dagster: a deid_raw partition is published only when every
blocking check passes. A planted PHI leak or a reconciliation failure leaves nothing published,
discards the staging, keeps the staged export for a re-run, reports the failed check and stops
warehouse_raw; the clean re-run publishes, and a run over the same export id re-verifies the
published partition (and fails a partition that was altered since)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from starvit_assets_tests.conftest import PlatformEnv

PATIENTS = 6
TABLE = "observation"


@dataclass(frozen=True)
class Exported:
    """The staged Observation export, its original lines, and a family name of the source."""

    staged: list[Path]
    original: dict[Path, str]
    record: Path
    family: str


@pytest.fixture
def exported(
    platform_env: PlatformEnv, warehouse_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Exported]:
    from starvit_assets.defs.extract import RESOURCE_TYPES, fhir_asset_key
    from starvit_assets.demo import ensure_source_data, materialize_all
    from starvit_assets.exports import latest_staged_export
    from starvit_assets.fhir.server import BulkDataServer
    from starvit_assets.settings import load_settings

    settings = load_settings()
    source = ensure_source_data(settings, patients=PATIENTS, seed=5)
    with BulkDataServer(source) as server:
        monkeypatch.setenv("STARVIT_FHIR_BASE_URL", server.base_url)
        extracted = materialize_all(
            load_settings(), asset_keys=[fhir_asset_key(name) for name in RESOURCE_TYPES]
        )
    assert extracted.success, extracted.failed_steps
    staged = latest_staged_export(settings, "Observation").paths(settings)
    patients = [json.loads(line) for line in (source / "Patient.ndjson").read_text().splitlines()]
    yield Exported(
        staged=staged,
        original={path: path.read_text() for path in staged},
        record=settings.state_dir / "exports" / "latest" / "Observation.json",
        family=str(patients[0]["name"][0]["family"]),
    )


def _run(with_warehouse: bool = True) -> Any:
    from starvit_assets.defs.deid_raw import deid_asset_key
    from starvit_assets.defs.warehouse import warehouse_raw_key
    from starvit_assets.demo import materialize_all
    from starvit_assets.settings import load_settings

    keys = [deid_asset_key(TABLE), *([warehouse_raw_key(TABLE)] if with_warehouse else [])]
    return materialize_all(load_settings(), asset_keys=keys)


def _check_evaluations(run_id: str) -> dict[str, Any]:
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        events = instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    return {
        event.dagster_event.asset_check_evaluation_data.check_name: (
            event.dagster_event.asset_check_evaluation_data
        )
        for event in events
        if event.dagster_event is not None
    }


def _assert_nothing_published_and_staging_discarded(exported: Exported) -> None:
    from starvit_assets.exports import latest_staged_export
    from starvit_assets.lake.partitions import QUARANTINE_LAYER, RawLake
    from starvit_assets.settings import load_settings

    settings = load_settings()
    export_id = latest_staged_export(settings, "Observation").export_id
    for lake in (RawLake(settings.lake_root), RawLake(settings.lake_root, QUARANTINE_LAYER)):
        assert not lake.is_published(TABLE, export_id)
        # The session's lake may hold other tests' exports; none of this one, not even in part.
        assert export_id not in {published for published, _ in lake.partitions(TABLE)}
        assert not lake.published_dir(TABLE, export_id).exists()
        assert not lake.staging_dir(TABLE, export_id).exists()
    # The PHI zone keeps the staged export for the re-run.
    assert all(path.is_file() for path in exported.staged)


def _assert_failed_by(summary: Any, check: str) -> None:
    assert not summary.success
    assert summary.checks_failed == [f"deid_raw/{TABLE}:{check}"]
    assert summary.materialized == []
    assert summary.failed_steps == ["deid_raw__observation"]


def _plant_in_code_display(path: Path, value: str) -> None:
    resources = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for resource in resources:
        resource["code"]["coding"][0]["display"] = value
    path.write_text("".join(json.dumps(resource) + "\n" for resource in resources))


def test_a_failed_blocking_check_publishes_nothing_and_stops_the_warehouse(
    exported: Exported,
) -> None:
    import dagster as dg

    from starvit_assets.definitions import defs
    from starvit_assets.defs.deid_raw import DLP_POOL, deid_asset_key, deid_assets

    # A patient's family name where the view keeps free text: only the leak check stands
    # between it and the research zone.
    for path in exported.staged:
        _plant_in_code_display(path, exported.family)
    leaked = _run()
    _assert_failed_by(leaked, "no_phi_leak")
    evaluations = _check_evaluations(leaked.run_id)
    assert evaluations["no_phi_leak"].metadata["columns_with_hits"].value == ["code_display"]
    assert evaluations["contract"].passed and evaluations["rows_reconcile"].passed
    _assert_nothing_published_and_staging_discarded(exported)
    with dg.DagsterInstance.get() as instance:
        stored = [str(event) for event in instance.all_logs(leaked.run_id)]
    assert not any(exported.family in text for text in stored)

    # The export says one line more than the files hold: a line the gate never read.
    for path, text in exported.original.items():
        path.write_text(text)
    record = json.loads(exported.record.read_text())
    exported.record.write_text(json.dumps({**record, "count": record["count"] + 1}))
    unreconciled = _run()
    _assert_failed_by(unreconciled, "rows_reconcile")
    problems = _check_evaluations(unreconciled.run_id)["rows_reconcile"].metadata["problems"]
    assert problems.value[0] == f"lines exported ({record['count'] + 1}) != lines read " + (
        f"({record['count']})"
    )
    _assert_nothing_published_and_staging_discarded(exported)

    exported.record.write_text(json.dumps(record))
    published = _run()
    assert published.success, published.failed_steps
    assert set(published.materialized) == {"deid_raw/observation", "warehouse_raw/observation"}
    assert not any(path.exists() for path in exported.staged)

    # The same export id again: re-verified from the published files, not re-written.
    from starvit_assets.exports import latest_staged_export
    from starvit_assets.lake.partitions import RawLake
    from starvit_assets.settings import load_settings

    settings = load_settings()
    lake = RawLake(settings.lake_root)
    export_id = latest_staged_export(settings, "Observation").export_id
    (part_file,) = [path for published, path in lake.partitions(TABLE) if published == export_id]
    written = part_file.stat().st_mtime_ns
    reverified = _run(with_warehouse=False)
    assert reverified.success, reverified.failed_steps
    assert set(reverified.checks_passed) == {
        f"deid_raw/{TABLE}:{name}" for name in ("contract", "no_phi_leak", "rows_reconcile")
    }
    assert part_file.stat().st_mtime_ns == written
    with dg.DagsterInstance.get() as instance:
        event = instance.get_latest_materialization_event(deid_asset_key(TABLE))
        pool_limit = instance.get_concurrency_config().pool_config.default_pool_limit
    assert event is not None and event.run_id == reverified.run_id
    assert event.asset_materialization is not None
    assert event.asset_materialization.metadata["published"].value is True

    # A published partition that lost a row fails the re-verification: downstream stops.
    table = pq.read_table(part_file)
    pq.write_table(table.slice(1), part_file, compression="zstd")
    altered = _run()
    assert "deid_raw/observation:rows_reconcile" in altered.checks_failed
    assert "warehouse_raw/observation" not in altered.materialized

    # With Cloud DLP the steps share one pool, limited to one step at a time by dagster.yaml;
    # the local engine's steps (this test's) are in none.
    assert pool_limit == 1
    assert {asset.op.pool for asset in deid_assets("dlp")} == {DLP_POOL}
    assert defs.resolve_assets_def(deid_asset_key(TABLE)).op.pool is None
