"""Retention on real files and the real embedded PostgreSQL: what is past its window goes,
what is not stays, and the verification fails when something past its window resists."""

import datetime as dt
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pyarrow as pa
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from starvit_assets.defs import retention as retention_defs
from starvit_assets.defs.resources import PlatformResource
from starvit_assets.lake.partitions import RawLake
from starvit_assets.ops import retention
from starvit_assets.ops.retention import (
    RetentionSettings,
    deidentified_in_lake,
    expired_phi_files,
    lake_retention_report,
    months_before,
    prune_tables,
    purge_phi_staging,
)
from starvit_assets.settings import StarvitSettings, load_settings

pytestmark = pytest.mark.integration

NOW = dt.datetime(2025, 6, 15, 12, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
WEEK = dt.timedelta(days=7)
TABLES = {"Patient": ["patient"], "Observation": ["observation"]}
WAREHOUSE_DB = "retention_test_warehouse"
AUDIT_DB = "retention_test_audit"


def _touch(path: Path, age: dt.timedelta, now: dt.datetime = NOW, text: str = "{}\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    stamp = (now - age).timestamp()
    os.utime(path, (stamp, stamp))
    return path


def _never(export_id: str, resource_type: str) -> bool:
    return False


def _publish(lake_root: Path, table: str, export_id: str) -> None:
    lake = RawLake(lake_root)
    lake.stage(table, export_id, pa.table({"id": ["synthetic-1"]}))
    lake.publish(table, export_id)


# --- pure functions on the filesystem ------------------------------------------------------
def test_months_before_clamps_to_month_end() -> None:
    assert months_before(dt.datetime(2024, 3, 31, tzinfo=dt.UTC), 1).date() == dt.date(2024, 2, 29)
    assert months_before(dt.datetime(2025, 1, 15, tzinfo=dt.UTC), 13).date() == dt.date(
        2023, 12, 15
    )
    assert months_before(NOW, 72).date() == dt.date(2019, 6, 15)


def test_phi_max_age_can_only_be_lowered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STARVIT_PHI_MAX_AGE_DAYS", "3")
    assert RetentionSettings().phi_max_age == dt.timedelta(days=3)
    monkeypatch.setenv("STARVIT_PHI_MAX_AGE_DAYS", "30")
    with pytest.raises(ValueError, match="less than or equal to 7"):
        RetentionSettings()


def test_old_staging_is_purged_and_young_kept(tmp_path: Path) -> None:
    staging = tmp_path / "phi" / "staging"
    old = _touch(staging / "20250601T000000Z" / "Patient.ndjson", age=8 * DAY)
    # One stale file condemns its whole export folder, young siblings included.
    old_sibling = _touch(staging / "20250601T000000Z" / "Observation.ndjson", age=DAY)
    young = _touch(staging / "20250614T000000Z" / "Patient.ndjson", age=DAY)
    stale_download = _touch(staging / "_incoming" / "Observation.ndjson.part", age=9 * DAY)
    live_download = _touch(staging / "_incoming2" / "Patient.ndjson.part", age=DAY / 24)
    loose = _touch(staging / "stray.ndjson", age=30 * DAY)

    result = purge_phi_staging(staging, max_age=WEEK, now=NOW, is_deidentified=_never)

    assert not old.exists() and not old_sibling.exists() and not old.parent.exists()
    assert not stale_download.exists() and not loose.exists()
    assert young.exists() and live_download.exists()
    assert result.files_deleted == 4
    assert result.expired_files_deleted == 4
    assert result.deidentified_files_deleted == 0
    assert result.folders_deleted == 2
    assert result.files_kept == 2
    assert result.errors == 0
    assert expired_phi_files(staging, max_age=WEEK, now=NOW) == []


def test_dry_run_deletes_nothing(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    old = _touch(staging / "20250601T000000Z" / "Patient.ndjson", age=8 * DAY)
    result = purge_phi_staging(staging, max_age=WEEK, now=NOW, is_deidentified=_never, dry_run=True)
    assert old.exists()
    assert result.files_deleted == 1
    assert expired_phi_files(staging, max_age=WEEK, now=NOW) == [old]


def test_deidentified_types_are_purged_before_the_age_limit(tmp_path: Path) -> None:
    staging = tmp_path / "phi" / "staging"
    lake_root = tmp_path / "lake"
    export_id = "20250614T000000Z"
    folder = staging / export_id
    patient = _touch(folder / "Patient.ndjson", age=DAY)
    observations = [
        _touch(folder / "Observation.ndjson", age=DAY),
        _touch(folder / "Observation.2.ndjson", age=DAY),
    ]
    errors = _touch(folder / "_error.1.ndjson", age=DAY)
    predicate = deidentified_in_lake(RawLake(lake_root), TABLES)

    _publish(lake_root, "patient", export_id)
    first = purge_phi_staging(staging, max_age=WEEK, now=NOW, is_deidentified=predicate)
    assert not patient.exists()
    assert all(path.exists() for path in observations) and errors.exists()
    assert first.deidentified_files_deleted == 1

    _publish(lake_root, "observation", export_id)
    second = purge_phi_staging(staging, max_age=WEEK, now=NOW, is_deidentified=predicate)
    # With every type de-identified, the export's own error list goes with the folder.
    assert not folder.exists()
    assert second.deidentified_files_deleted == 3
    assert second.folders_deleted == 1


@pytest.mark.parametrize("waiting_list", ["_deleted.1.ndjson", "_retracted.observation.ndjson"])
def test_deletions_and_retractions_wait_for_the_deletions_asset(
    tmp_path: Path, waiting_list: str
) -> None:
    staging = tmp_path / "phi" / "staging"
    lake_root = tmp_path / "lake"
    export_id = "20250614T000000Z"
    folder = staging / export_id
    patient = _touch(folder / "Patient.ndjson", age=DAY)
    waiting = _touch(folder / waiting_list, age=DAY)
    errors = _touch(folder / "_error.1.ndjson", age=DAY)
    _publish(lake_root, "patient", export_id)
    predicate = deidentified_in_lake(RawLake(lake_root), TABLES)

    result = purge_phi_staging(staging, max_age=WEEK, now=NOW, is_deidentified=predicate)
    # Every type is de-identified, but deid_raw/deleted_resource has not read the list yet.
    assert not patient.exists()
    assert waiting.exists() and errors.exists()
    assert result.folders_deleted == 0

    expired = purge_phi_staging(staging, max_age=WEEK, now=NOW + 8 * DAY, is_deidentified=predicate)
    assert not folder.exists()
    assert expired.expired_files_deleted == 2


def test_symlinks_are_not_followed(tmp_path: Path) -> None:
    outside = _touch(tmp_path / "outside" / "keep.txt", age=30 * DAY)
    staging = tmp_path / "staging"
    staging.mkdir()
    link = staging / "link"
    link.symlink_to(outside.parent, target_is_directory=True)
    stamp = (NOW - 30 * DAY).timestamp()
    os.utime(link, (stamp, stamp), follow_symlinks=False)
    purge_phi_staging(staging, max_age=WEEK, now=NOW, is_deidentified=_never)
    assert outside.exists()
    assert not link.is_symlink()


def test_lake_is_reported_never_deleted(tmp_path: Path) -> None:
    lake_root = tmp_path / "lake"
    _publish(lake_root, "patient", "20150101T000000Z")
    _publish(lake_root, "patient", "20240101T000000Z")
    report = lake_retention_report(lake_root, months=72, now=NOW)
    assert report.partitions == 2
    assert report.past_retention == 1
    assert report.past_retention_by_table == {"deid_raw/patient": 1}
    assert report.oldest_partition_date == dt.date(2015, 1, 1)
    assert RawLake(lake_root).is_published("patient", "20150101T000000Z")


# --- the warehouse and audit databases -----------------------------------------------------
def _recreate_database(admin_dsn: str, name: str) -> str:
    with psycopg.connect(admin_dsn, autocommit=True) as connection:
        connection.execute(
            sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name))
        )
        connection.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    return make_conninfo(admin_dsn, dbname=name)


@dataclass(frozen=True)
class Databases:
    warehouse: str
    audit: str


@pytest.fixture
def databases(warehouse_dsn: str) -> Iterator[Databases]:
    """Private databases: the job prunes every audit table it finds, so it must not meet the
    tables other tests leave in the shared ones."""
    created = Databases(
        warehouse=_recreate_database(warehouse_dsn, WAREHOUSE_DB),
        audit=_recreate_database(warehouse_dsn, AUDIT_DB),
    )
    yield created
    with psycopg.connect(warehouse_dsn, autocommit=True) as connection:
        for name in (WAREHOUSE_DB, AUDIT_DB):
            connection.execute(
                sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name))
            )


AUDIT_DDL = """
create schema audit;
create table audit.analytics_event (id int primary key, occurred_at timestamptz not null);
create table audit.run (run_id text primary key, recorded_at timestamptz not null);
create table audit.materialization (
    run_id text not null references audit.run (run_id),
    event_id bigint not null,
    created_at timestamptz not null,
    primary key (run_id, event_id)
);
create table audit.materialization_input (
    run_id text not null,
    event_id bigint not null,
    input_asset_key text not null,
    foreign key (run_id, event_id) references audit.materialization (run_id, event_id)
);
create table audit.untimed (id int);
"""

AUDIT_ROWS = """
insert into audit.analytics_event values
    (1, now() - interval '14 months'), (2, now() - interval '12 months'), (3, now());
insert into audit.run values
    ('old-run', now() - interval '7 years'),
    ('old-run-young-child', now() - interval '7 years'),
    ('young-run', now() - interval '5 years');
insert into audit.materialization values
    ('old-run', 1, now() - interval '7 years'),
    ('old-run-young-child', 2, now() - interval '5 years'),
    ('young-run', 3, now() - interval '5 years');
insert into audit.materialization_input values
    ('old-run', 1, 'fhir/Patient'), ('young-run', 3, 'fhir/Patient');
insert into audit.untimed values (1);
"""


def _fill_audit(dsn: str) -> None:
    with psycopg.connect(dsn) as connection:
        connection.execute(AUDIT_DDL)
        connection.execute(AUDIT_ROWS)


def _rows(dsn: str, query: str) -> list[Any]:
    with psycopg.connect(dsn) as connection:
        return [row[0] for row in connection.execute(query).fetchall()]


def test_rows_past_their_window_are_deleted(
    databases: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "STARVIT_ANALYTICS_EVENT_TABLES", "audit.analytics_event:occurred_at, web.page_view"
    )
    _fill_audit(databases.audit)
    now = dt.datetime.now(dt.UTC)

    results = {r.rule.name: r for r in prune_tables(databases.audit, RetentionSettings(), now=now)}

    # Analytics events: 13 months, even though the table sits in the audit schema.
    assert _rows(databases.audit, "select id from audit.analytics_event order by id") == [2, 3]
    assert results["audit.analytics_event"].rows_deleted == 1
    assert results["audit.analytics_event"].rule.category == "analytics"
    # Audit: 6 years. A run still referenced by a younger materialization is held, not forced.
    assert _rows(databases.audit, "select run_id from audit.run order by run_id") == [
        "old-run-young-child",
        "young-run",
    ]
    assert results["audit.run"].rows_held_by_references == 1
    assert _rows(databases.audit, "select event_id from audit.materialization order by 1") == [2, 3]
    # The input list has no time of its own and goes with its materialization.
    assert _rows(databases.audit, "select run_id from audit.materialization_input") == ["young-run"]
    assert results["audit.materialization_input"].rows_deleted == 1
    assert results["audit.untimed"].status == "no_time_column"
    assert results["web.page_view"].status == "missing"
    assert all(r.rows_past_window == 0 for r in results.values())

    again = prune_tables(databases.audit, RetentionSettings(), now=now)
    assert sum(r.rows_deleted for r in again) == 0


def test_missing_audit_schema_is_skipped(databases: Databases) -> None:
    results = prune_tables(databases.warehouse, RetentionSettings(), now=NOW)
    assert [(r.rule.name, r.status) for r in results] == [("audit.analytics_event", "missing")]


def test_small_batches_delete_everything(databases: Databases) -> None:
    with psycopg.connect(databases.warehouse) as connection:
        connection.execute(
            "create schema audit; create table audit.access_log (recorded_at timestamptz);"
            "insert into audit.access_log select now() - interval '7 years' "
            "from generate_series(1, 25)"
        )
    results = prune_tables(
        databases.warehouse, RetentionSettings(), now=dt.datetime.now(dt.UTC), batch_size=10
    )
    by_name = {r.rule.name: r for r in results}
    assert by_name["audit.access_log"].rows_deleted == 25
    assert _rows(databases.warehouse, "select count(*) from audit.access_log") == [0]


# --- the Dagster job -----------------------------------------------------------------------
@pytest.fixture
def job_home(tmp_path: Path, databases: Databases) -> Iterator[StarvitSettings]:
    """A private STARVIT_HOME pointed at the private databases. ``platform.activate`` writes
    to os.environ directly, so the whole environment is restored afterwards."""
    saved = dict(os.environ)
    os.environ.update(
        {
            "STARVIT_HOME": str(tmp_path / "home"),
            "STARVIT_WAREHOUSE_DSN": databases.warehouse,
            "STARVIT_DAGSTER_DSN": databases.audit,
        }
    )
    try:
        yield load_settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _run_job(**run_config: Any) -> dg.ExecuteInProcessResult:
    return retention_defs.retention_prune_job.execute_in_process(
        resources={"platform": PlatformResource()},
        instance=dg.DagsterInstance.ephemeral(),
        run_config=run_config or None,
        raise_on_error=False,
    )


def _metadata(result: dg.ExecuteInProcessResult, step: str) -> dict[str, Any]:
    for event in result.events_for_node(step):
        if event.is_successful_output:
            return {k: getattr(v, "value", v) for k, v in event.step_output_data.metadata.items()}
    raise AssertionError(f"no output from {step}")


def _failure_metadata(result: dg.ExecuteInProcessResult, step: str) -> tuple[str, dict[str, Any]]:
    for event in result.events_for_node(step):
        if event.is_step_failure:
            data = event.step_failure_data
            assert data.user_failure_data is not None
            metadata = {
                k: getattr(v, "value", v) for k, v in data.user_failure_data.metadata.items()
            }
            return str(data.user_failure_data.description), metadata
    raise AssertionError(f"{step} did not fail")


def test_job_prunes_and_verifies(job_home: StarvitSettings, databases: Databases) -> None:
    now = dt.datetime.now(dt.UTC)
    staging = job_home.phi_staging_dir
    old = _touch(staging / "20250101T000000Z" / "Patient.ndjson", age=8 * DAY, now=now)
    young = _touch(staging / "20250614T000000Z" / "Patient.ndjson", age=DAY, now=now)
    _fill_audit(databases.audit)
    _publish(job_home.lake_root, "patient", "20150101T000000Z")

    result = _run_job()

    assert result.success
    assert not old.exists() and young.exists()
    pruned = _metadata(result, "prune")
    assert pruned["phi_files_deleted_expired"] == 1
    assert pruned["phi_files_kept"] == 1
    assert pruned["table_rows_deleted"] == 4
    assert pruned["lake_partitions_past_retention"] == 1
    assert pruned["tables"]["audit:audit.run"]["rows_deleted"] == 1
    verified = _metadata(result, "verify_retention")
    assert verified["phi_staging_within_max_age/passed"] is True
    assert verified["tables_within_retention/passed"] is True
    # Report only: an old lake partition warns and stays.
    assert verified["lake_partitions_within_retention/passed"] is False
    assert RawLake(job_home.lake_root).is_published("patient", "20150101T000000Z")
    # Counts and table names only: no file name or row value reaches the metadata.
    assert "Patient.ndjson" not in repr(pruned) + repr(verified)


def test_dry_run_job_counts_without_deleting(job_home: StarvitSettings) -> None:
    old = _touch(
        job_home.phi_staging_dir / "20250101T000000Z" / "Patient.ndjson",
        age=8 * DAY,
        now=dt.datetime.now(dt.UTC),
    )
    result = _run_job(ops={"prune": {"config": {"dry_run": True}}})
    assert old.exists()
    assert _metadata(result, "prune")["phi_files_deleted"] == 1
    assert not result.success  # the verification still sees the old file


def test_check_fails_when_an_old_file_cannot_be_removed(
    job_home: StarvitSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    stuck = _touch(
        job_home.phi_staging_dir / "20250101T000000Z" / "Patient.ndjson",
        age=8 * DAY,
        now=dt.datetime.now(dt.UTC),
    )

    def refuse(path: Path, onerror: Callable[..., None]) -> None:
        # As if the file were immutable (chattr +i) or on a read-only mount; a chmod would not
        # stop the root user these tests may run as.
        error = PermissionError(13, "Operation not permitted")
        onerror(os.unlink, str(path), (PermissionError, error, None))

    monkeypatch.setattr(retention.shutil, "rmtree", refuse)
    result = _run_job()

    assert not result.success
    assert stuck.exists()
    assert _metadata(result, "prune")["phi_delete_errors"] == 1
    description, metadata = _failure_metadata(result, "verify_retention")
    assert retention_defs.PHI_CHECK in description
    assert metadata["phi_staging_within_max_age/passed"] is False
    assert metadata["phi_staging_within_max_age/expired_files"] == 1
    assert "Patient" not in description


def test_check_fails_when_rows_resist_deletion(
    job_home: StarvitSettings, databases: Databases
) -> None:
    with psycopg.connect(databases.audit) as connection:
        connection.execute(
            """
            create schema audit;
            create table audit.manual_override (id int, who text, occurred_at timestamptz);
            insert into audit.manual_override values (1, 'jane@example.org', now() - interval '7 years');
            create function audit.refuse_change() returns trigger language plpgsql as $$
            begin raise exception 'append-only: %', old.who; end $$;
            create trigger append_only before update or delete on audit.manual_override
                for each row execute function audit.refuse_change();
            """
        )
    result = _run_job()

    assert not result.success
    assert _metadata(result, "prune")["tables"]["audit:audit.manual_override"]["status"] == "error"
    description, metadata = _failure_metadata(result, "verify_retention")
    assert retention_defs.TABLES_CHECK in description
    assert metadata["tables_within_retention/rows_past_window"] == 1
    # The trigger's message quotes the row; only the exception class may surface.
    assert "jane@example.org" not in description + repr(metadata)


def test_schedule_is_nightly_at_three_utc() -> None:
    schedule = retention_defs.nightly_retention_prune
    assert schedule.cron_schedule == "0 3 * * *"
    assert schedule.execution_timezone == "UTC"
    assert schedule.job_name == retention_defs.JOB_NAME
    assert retention_defs.RETENTION_DEFS.jobs == [retention_defs.retention_prune_job]
    assert retention_defs.RETENTION_DEFS.schedules == [schedule]
