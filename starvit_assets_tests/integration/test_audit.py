"""The audit trail on the real embedded PostgreSQL, fed by real runs on a Dagster instance whose
storage is that same server (as in production)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import dagster as dg
import psycopg
import pytest

from starvit_assets import platform
from starvit_assets.defs.alerting import AUDIT_SENSORS
from starvit_assets.ops.audit import (
    AuditError,
    allowlisted_metadata,
    check_results_for_run,
    ensure_audit_schema,
    inputs_of_run,
    launched_by,
    record_manual_override,
    record_run,
    runs_for_asset,
)
from starvit_assets.settings import load_settings
from starvit_assets_tests.conftest import PlatformEnv

pytestmark = pytest.mark.integration

PHI_TEXT = "Jane Roe, MRN 4711-0815, born 1961-07-03"


@pytest.fixture(scope="module")
def dagster_dsn(platform_env: PlatformEnv) -> str:
    settings = load_settings()
    platform.ensure_dirs(settings)
    return platform.activate(settings).dagster_dsn


@pytest.fixture(scope="module")
def pg_instance(dagster_dsn: str) -> Iterator[dg.DagsterInstance]:
    url = platform.sqlalchemy_psycopg2_url(dagster_dsn)
    with dg.instance_for_test(overrides={"storage": {"postgres": {"postgres_url": url}}}) as inst:
        assert type(inst.event_log_storage).__name__ == "PostgresEventLogStorage"
        yield inst


@dg.asset(key=["audit_test", "source"])
def source() -> dg.MaterializeResult:
    return dg.MaterializeResult(
        metadata={
            "export_id": "20240301T000000Z",
            "rows": dg.MetadataValue.int(3),
            "rows_quarantined": dg.MetadataValue.int(1),
            "policy_version": "2",
            # Free-form values that must stay out of the audit trail.
            "note": PHI_TEXT,
            "held_back_by_reason": dg.MetadataValue.json({"reason": PHI_TEXT}),
            "path": dg.MetadataValue.path("/phi/staging/x.ndjson"),
        }
    )


@dg.asset(
    key=["audit_test", "derived"],
    deps=[source],
    check_specs=[dg.AssetCheckSpec("contract", asset=["audit_test", "derived"])],
)
def derived() -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    yield dg.AssetCheckResult(check_name="contract", passed=False, metadata={"first": PHI_TEXT})
    yield dg.MaterializeResult(metadata={"dagster/row_count": dg.MetadataValue.int(2)})


@dg.asset(key=["audit_test", "broken"], deps=[source])
def broken() -> None:
    raise ValueError(PHI_TEXT)


def _sensor(status: dg.DagsterRunStatus) -> dg.SensorDefinition:
    return next(s for s in AUDIT_SENSORS if s.name == f"audit_run_{status.value.lower()}")


def _run_sensor(
    instance: dg.DagsterInstance, result: dg.ExecuteInProcessResult, status: dg.DagsterRunStatus
) -> None:
    event = result.get_run_success_event() if result.success else result.get_run_failure_event()
    sensor = _sensor(status)
    context = dg.build_run_status_sensor_context(
        sensor_name=sensor.name,
        dagster_event=event,
        dagster_instance=instance,
        dagster_run=result.dagster_run,
    )
    sensor(context)


def _audit_text(dsn: str, run_id: str) -> str:
    """Every audit value stored for a run, as one string, to search for leaked PHI."""
    with psycopg.connect(dsn) as connection:
        parts = []
        for table in ("run", "materialization", "materialization_input", "check_result"):
            rows = connection.execute(
                f"select to_jsonb(t) from audit.{table} t where run_id = %s", (run_id,)
            ).fetchall()
            parts.extend(json.dumps(row[0]) for row in rows)
    return "\n".join(parts)


def test_schema_is_idempotent(dagster_dsn: str) -> None:
    ensure_audit_schema(dagster_dsn)
    ensure_audit_schema(dagster_dsn)
    with psycopg.connect(dagster_dsn) as connection:
        tables = {
            row[0]
            for row in connection.execute(
                "select table_name from information_schema.tables where table_schema = 'audit'"
            )
        }
    assert {"run", "materialization", "materialization_input", "check_result"} <= tables
    assert "manual_override" in tables


def test_successful_run_is_recorded_once(pg_instance: dg.DagsterInstance, dagster_dsn: str) -> None:
    result = dg.materialize([source, derived], instance=pg_instance, raise_on_error=False)
    assert result.success
    run_id = result.run_id

    _run_sensor(pg_instance, result, dg.DagsterRunStatus.SUCCESS)

    with psycopg.connect(dagster_dsn) as connection:
        run = connection.execute(
            "select job_name, status, launched_by, started_at, ended_at, code_version, "
            "policy_version from audit.run where run_id = %s",
            (run_id,),
        ).fetchone()
        materializations = connection.execute(
            "select asset_key, export_id, row_count, counts, policy_version "
            "from audit.materialization where run_id = %s order by asset_key",
            (run_id,),
        ).fetchall()
    assert run is not None
    job_name, status, who, started, ended, code_version, policy_version = run
    assert (job_name, status, who, policy_version) == (
        result.dagster_run.job_name,
        "SUCCESS",
        "manual",
        "2",
    )
    assert started is not None and ended is not None and started <= ended
    assert code_version  # the checkout's git sha, or STARVIT_CODE_VERSION
    assert materializations == [
        ("audit_test/derived", None, 2, {"dagster/row_count": 2}, None),
        ("audit_test/source", "20240301T000000Z", 3, {"rows": 3, "rows_quarantined": 1}, "2"),
    ]
    assert check_results_for_run(dagster_dsn, run_id) == [
        ("audit_test/derived", "contract", False, "ERROR")
    ]
    inputs = inputs_of_run(dagster_dsn, run_id)
    assert [
        (i.asset_key, i.input_asset_key, i.input_run_id, i.input_export_id) for i in inputs
    ] == [("audit_test/derived", "audit_test/source", run_id, "20240301T000000Z")]

    stored = _audit_text(dagster_dsn, run_id)
    for fragment in ("Jane", "Roe", "4711", "1961", "/phi/"):
        assert fragment not in stored

    # The sensor can see the same run again (a retried tick, a backfill): nothing is duplicated.
    again = record_run(dagster_dsn, pg_instance, run_id)
    assert (again.materializations, again.inputs, again.checks) == (0, 0, 0)
    _run_sensor(pg_instance, result, dg.DagsterRunStatus.SUCCESS)
    with psycopg.connect(dagster_dsn) as connection:
        counts = connection.execute(
            "select (select count(*) from audit.run where run_id = %(r)s),"
            " (select count(*) from audit.materialization where run_id = %(r)s),"
            " (select count(*) from audit.materialization_input where run_id = %(r)s),"
            " (select count(*) from audit.check_result where run_id = %(r)s)",
            {"r": run_id},
        ).fetchone()
    assert counts == (1, 2, 1, 1)


def test_inputs_point_to_the_run_that_produced_them(
    pg_instance: dg.DagsterInstance, dagster_dsn: str
) -> None:
    first = dg.materialize([source, derived], instance=pg_instance, raise_on_error=False)
    second = dg.materialize(
        [source, derived], instance=pg_instance, selection=[derived.key], raise_on_error=False
    )
    for result in (first, second):
        record_run(dagster_dsn, pg_instance, result.run_id)

    [link] = inputs_of_run(dagster_dsn, second.run_id)
    assert (link.asset_key, link.input_asset_key) == ("audit_test/derived", "audit_test/source")
    assert link.input_run_id == first.run_id
    assert link.input_export_id == "20240301T000000Z"

    history = runs_for_asset(dagster_dsn, "audit_test/derived")
    assert [run.run_id for run in history[:2]] == [second.run_id, first.run_id]
    assert history[0].row_count == 2


def test_failed_run_is_recorded_with_its_status(
    pg_instance: dg.DagsterInstance, dagster_dsn: str
) -> None:
    result = dg.materialize([source, broken], instance=pg_instance, raise_on_error=False)
    assert not result.success
    _run_sensor(pg_instance, result, dg.DagsterRunStatus.FAILURE)

    with psycopg.connect(dagster_dsn) as connection:
        status = connection.execute(
            "select status from audit.run where run_id = %s", (result.run_id,)
        ).fetchone()
    assert status == ("FAILURE",)
    assert runs_for_asset(dagster_dsn, "audit_test/source")[0].run_id == result.run_id
    assert runs_for_asset(dagster_dsn, "audit_test/broken") == []
    assert "Jane" not in _audit_text(dagster_dsn, result.run_id)


def test_manual_overrides_are_append_only(dagster_dsn: str) -> None:
    override_id = record_manual_override(
        dagster_dsn,
        who="oncall@example.org",
        what="re-ran deid_raw/patient after a waived k-anonymity warning",
        why="TICKET-123",
        asset_key="deid_raw/patient",
    )
    with pytest.raises(AuditError):
        record_manual_override(dagster_dsn, who="x", what=" ", why="y")
    with psycopg.connect(dagster_dsn) as connection:
        who = connection.execute(
            "select who from audit.manual_override where override_id = %s", (override_id,)
        ).fetchone()
        assert who == ("oncall@example.org",)
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            connection.execute("delete from audit.manual_override")


def test_manual_overrides_past_the_audit_window_may_be_pruned(dagster_dsn: str) -> None:
    with psycopg.connect(dagster_dsn) as connection:
        old_id, recent_id = (
            connection.execute(
                "insert into audit.manual_override (who, what, why, occurred_at) "
                "values ('a', 'b', 'c', now() - %s::interval) returning override_id",
                (age,),
            ).fetchone()[0]  # type: ignore[index]
            for age in ("6 years 1 day", "5 years")
        )
        connection.execute("delete from audit.manual_override where override_id = %s", (old_id,))
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            connection.execute(
                "delete from audit.manual_override where override_id = %s", (recent_id,)
            )


def test_only_allowlisted_metadata_is_kept() -> None:
    texts, counts = allowlisted_metadata(
        {
            "export_id": "20240301T000000Z",
            "policy_version": PHI_TEXT,  # wrong shape: dropped, not copied
            "rows": dg.MetadataValue.int(5),
            "rows/Patient": 7,
            "published": True,
            "first_name": "Jane",
            "hits": 3,
        }
    )
    assert texts == {"export_id": "20240301T000000Z"}
    assert counts == {"rows": 5, "rows/Patient": 7}


def test_launched_by_names_the_trigger() -> None:
    assert launched_by({"dagster/schedule_name": "daily_full_lineage"}) == (
        "schedule:daily_full_lineage"
    )
    assert launched_by({"dagster/sensor_name": "new_fhir_data"}) == "sensor:new_fhir_data"
    assert launched_by({"user": "Jane Roe"}) == "user:[redacted]"
    assert launched_by({}) == "manual"
