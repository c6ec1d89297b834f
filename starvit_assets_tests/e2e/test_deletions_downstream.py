"""Deletions and retractions reach the derived layer, the snapshot and the graph files: a full
lineage run, then an incremental export whose deleted[] lists one Patient and the weight
Observation another patient's BMI was computed from, which re-exports a third patient's used
weight Observation as entered-in-error (the gate holds it back and retracts the published
version), and carries a new Consent by which a fourth patient opts out of research (the gate
retracts every row of theirs published before), and one more (incremental) run.

Isolated from the session's main lineage (e2e/test_lineage.py): its own STARVIT_HOME (lake,
PHI staging, export watermarks, graph files) and its own warehouse and Dagster databases on
the session's embedded PostgreSQL, so neither run sees the other's data.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from starvit_assets_tests.conftest import PlatformEnv

pytestmark = pytest.mark.e2e

PATIENTS = 10
SEED = 29
WAREHOUSE_DATABASE = "warehouse_deletions"
DAGSTER_DATABASE = "dagster_deletions"


@dataclass(frozen=True)
class Scene:
    """What the test deleted, and the state before and after the incremental run."""

    warehouse_dsn: str
    home: Path
    deleted_patient: str  # pseudonymised, as in the warehouse
    reweighed_patient: str  # whose used weight observation was deleted
    deleted_weight: str  # pseudonymised id of that observation
    retracted_patient: str  # whose used weight observation is now entered-in-error
    retracted_weight: str  # pseudonymised id of that observation
    opted_out_patient: str  # who opted out of research in the incremental export
    deletions_metadata: dict[str, Any]  # of deid_raw/deleted_resource's last materialization
    bmi_before: dict[str, dict[str, Any]]
    bmi_after: dict[str, dict[str, Any]]
    first: Any  # RunSummary of the full run
    second: Any  # RunSummary of the incremental run


def _database_dsn(dsn: str, database: str) -> str:
    """The same server's URL for another database (a URL: Dagster's storage needs one)."""
    parts = urlsplit(dsn)
    assert parts.scheme.startswith("postgres"), "the embedded server's DSN is a URL"
    return urlunsplit(parts._replace(path=f"/{database}"))


def _recreate(dsn: str, *databases: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as connection:
        for database in databases:
            name = sql.Identifier(database)
            connection.execute(sql.SQL("drop database if exists {} with (force)").format(name))
            connection.execute(sql.SQL("create database {}").format(name))


def _drop(dsn: str, *databases: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as connection:
        for database in databases:
            name = sql.Identifier(database)
            connection.execute(sql.SQL("drop database if exists {} with (force)").format(name))


def _rows(dsn: str, query: sql.Composable, params: tuple[object, ...] = ()) -> list[dict]:
    with psycopg.connect(dsn) as connection, connection.cursor() as cursor:
        cursor.execute(query, params)
        names = [column.name for column in cursor.description or []]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _table(layer: str, table: str) -> sql.Composable:
    from starvit_assets.settings import load_settings

    return sql.Identifier(load_settings().schema_name(layer), table)


def _bmi_rows(dsn: str) -> dict[str, dict[str, Any]]:
    rows = _rows(dsn, sql.SQL("select * from {}").format(_table("derived", "bmi_latest")))
    return {row["patient_id"]: row for row in rows}


def _source_ids(source: Path, resource_type: str) -> list[str]:
    with (source / f"{resource_type}.ndjson").open() as handle:
        return [json.loads(line)["id"] for line in handle if line.strip()]


def _run(base_url: str, *, incremental: bool) -> Any:
    from starvit_assets.demo import materialize_all
    from starvit_assets.settings import load_settings

    os.environ["STARVIT_FHIR_BASE_URL"] = base_url
    try:
        return materialize_all(load_settings(), incremental=incremental)
    finally:
        del os.environ["STARVIT_FHIR_BASE_URL"]


def _mark_entered_in_error(source: Path, observation_id: str, when: str) -> None:
    """A new version of the Observation in the source: entered-in-error since ``when``."""
    path = source / "Observation.ndjson"
    resources = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    (resource,) = [r for r in resources if r["id"] == observation_id]
    assert resource["status"] == "final"
    resource["status"] = "entered-in-error"
    meta = resource.setdefault("meta", {})
    meta["versionId"] = str(int(meta.get("versionId", "1")) + 1)
    meta["lastUpdated"] = when
    path.write_text("".join(json.dumps(r) + "\n" for r in resources))


def _opt_out(source: Path, patient_id: str, when: str) -> None:
    """A research Consent denying research use, newer than every Consent of the patient."""
    from starvit_assets_tests.unit.test_consent import consent

    resource = consent(patient_id, "deny", when=when)
    resource["id"] = f"late-opt-out-{patient_id}"
    resource["meta"] = {"lastUpdated": when}
    with (source / "Consent.ndjson").open("a") as handle:
        handle.write(json.dumps(resource) + "\n")


def _latest_metadata(path: list[str]) -> dict[str, Any]:
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey(path))
    assert event is not None and event.asset_materialization is not None
    return {name: value.value for name, value in event.asset_materialization.metadata.items()}


def _latest_usable_weight(dsn: str, patient: str) -> dict[str, Any]:
    """The latest usable weight left (the model's own order: effective_at, last_updated_at,
    id)."""
    (expected,) = _rows(
        dsn,
        sql.SQL(
            "select observation_id, value_normalised from {} where patient_id = %s "
            "and body_measure = 'body_weight' and unit_normalised = 'kg' "
            "and status in ('final', 'amended', 'corrected') "
            "order by effective_at desc nulls last, last_updated_at desc nulls last, "
            "observation_id desc limit 1"
        ).format(_table("refined", "observation")),
        (patient,),
    )
    return expected


@pytest.fixture(scope="module")
def scene(platform_env: PlatformEnv, warehouse_dsn: str) -> Iterator[Scene]:
    from starvit_assets import platform
    from starvit_assets.deid.engine import pseudonym
    from starvit_assets.demo import ensure_source_data
    from starvit_assets.fhir.server import TOMBSTONES, BulkDataServer
    from starvit_assets.settings import load_settings

    saved = dict(os.environ)
    home = Path(tempfile.mkdtemp(prefix="starvit-test-deletions-"))
    home.chmod(0o755)
    _recreate(warehouse_dsn, WAREHOUSE_DATABASE, DAGSTER_DATABASE)
    own_dsn = _database_dsn(warehouse_dsn, WAREHOUSE_DATABASE)
    try:
        os.environ.update(
            {
                "STARVIT_HOME": str(home),
                "STARVIT_WAREHOUSE_DSN": own_dsn,
                "STARVIT_DAGSTER_DSN": _database_dsn(warehouse_dsn, DAGSTER_DATABASE),
            }
        )
        settings = load_settings()
        platform.ensure_dirs(settings)
        platform.activate(settings)
        assert conninfo_to_dict(own_dsn)["dbname"] == WAREHOUSE_DATABASE
        source = ensure_source_data(settings, patients=PATIENTS, seed=SEED)
        key = platform_env.key
        with BulkDataServer(source) as server:
            first = _run(server.base_url, incremental=False)
            assert first.success and not first.checks_failed, first
            before = _bmi_rows(own_dsn)
            patients = {pseudonym(key, "Patient", i): i for i in _source_ids(source, "Patient")}
            observations = {
                pseudonym(key, "Observation", i): i for i in _source_ids(source, "Observation")
            }
            # Two patients with a BMI and more than one weight: one is deleted, the other
            # loses the weight observation its BMI used and keeps its older ones.
            weighed_more_than_once = [
                row["patient_id"]
                for row in _rows(
                    own_dsn,
                    sql.SQL(
                        "select patient_id from {} where body_measure = 'body_weight' "
                        "group by patient_id having count(*) > 1 order by patient_id"
                    ).format(_table("refined", "observation")),
                )
                if row["patient_id"] in before
            ]
            reweighed, deleted, retracted = weighed_more_than_once[:3]
            deleted_weight = before[reweighed]["weight_observation_id"]
            retracted_weight = before[retracted]["weight_observation_id"]
            opted_out = sorted(set(before) - {reweighed, deleted, retracted})[0]
            deleted_at = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
            _mark_entered_in_error(source, observations[retracted_weight], deleted_at)
            _opt_out(source, patients[opted_out], deleted_at)
            with (source / TOMBSTONES).open("a") as handle:
                for resource_type, resource_id in (
                    ("Patient", patients[deleted]),
                    ("Observation", observations[deleted_weight]),
                ):
                    tombstone = {
                        "resourceType": resource_type,
                        "id": resource_id,
                        "meta": {"lastUpdated": deleted_at},
                    }
                    handle.write(json.dumps(tombstone) + "\n")
            second = _run(server.base_url, incremental=True)
            deletions_metadata = _latest_metadata(["deid_raw", "deleted_resource"])
        yield Scene(
            warehouse_dsn=own_dsn,
            home=home,
            deleted_patient=deleted,
            reweighed_patient=reweighed,
            deleted_weight=deleted_weight,
            retracted_patient=retracted,
            retracted_weight=retracted_weight,
            opted_out_patient=opted_out,
            deletions_metadata=deletions_metadata,
            bmi_before=before,
            bmi_after=_bmi_rows(own_dsn),
            first=first,
            second=second,
        )
    finally:
        os.environ.clear()
        os.environ.update(saved)
        _drop(warehouse_dsn, WAREHOUSE_DATABASE, DAGSTER_DATABASE)
        shutil.rmtree(home, ignore_errors=True)


def test_both_runs_succeed_and_no_relationship_test_fails(scene: Scene) -> None:
    assert scene.first.success and not scene.first.checks_failed, scene.first
    assert scene.second.success, scene.second
    assert scene.second.checks_failed == [], scene.second.checks_failed
    passed = scene.second.checks_passed
    for relationship in (
        "derived/bmi_latest:relationships_bmi_latest_patient_id__patient_id__ref_patient_",
        "derived/bmi_latest:relationships_bmi_latest_weight_observation_id__observation_id__ref_observation_",
        "derived/person_patient_map:relationships_person_patient_map_patient_id__patient_id__ref_patient_",
    ):
        assert relationship in passed, sorted(passed)


def test_the_deleted_patient_leaves_bmi_latest_features_and_the_person_map(scene: Scene) -> None:
    deleted = scene.deleted_patient
    assert deleted in scene.bmi_before
    assert deleted not in scene.bmi_after
    for table in ("patient_features", "patient_weight_category", "person_patient_map"):
        rows = _rows(
            scene.warehouse_dsn,
            sql.SQL("select patient_id from {} where patient_id = %s").format(
                _table("derived", table)
            ),
            (deleted,),
        )
        assert rows == [], table
    features = _rows(
        scene.warehouse_dsn,
        sql.SQL("select count(*) as n from {}").format(_table("derived", "patient_features")),
    )
    patients = _rows(
        scene.warehouse_dsn,
        sql.SQL("select count(*) as n from {}").format(_table("refined", "patient")),
    )
    assert features == patients


def test_the_other_patients_bmi_is_recomputed_from_its_remaining_weights(scene: Scene) -> None:
    patient = scene.reweighed_patient
    before, after = scene.bmi_before[patient], scene.bmi_after[patient]
    assert before["weight_observation_id"] == scene.deleted_weight
    expected = _latest_usable_weight(scene.warehouse_dsn, patient)
    assert expected["observation_id"] != scene.deleted_weight
    assert after["weight_observation_id"] == expected["observation_id"]
    assert after["weight_kg"] == expected["value_normalised"]
    height_m = after["height_cm"] / 100
    assert float(after["bmi"]) == pytest.approx(after["weight_kg"] / height_m**2, abs=0.05)
    assert after["computed_at"] > before["computed_at"]


def test_only_the_patients_touched_by_the_deletions_change(scene: Scene) -> None:
    gone = {scene.deleted_patient, scene.opted_out_patient}
    recomputed = {scene.reweighed_patient, scene.retracted_patient}
    untouched = set(scene.bmi_before) - gone - recomputed
    assert untouched and set(scene.bmi_after) == untouched | recomputed
    for patient in untouched:
        assert scene.bmi_after[patient] == scene.bmi_before[patient]


def test_the_snapshot_invalidates_the_deleted_patients_row(scene: Scene) -> None:
    history = _rows(
        scene.warehouse_dsn,
        sql.SQL(
            "select patient_id, weight_observation_id, dbt_valid_to from {} "
            "where patient_id in (%s, %s) order by dbt_valid_from"
        ).format(_table("snapshots", "bmi_snapshot")),
        (scene.deleted_patient, scene.reweighed_patient),
    )
    deleted = [row for row in history if row["patient_id"] == scene.deleted_patient]
    assert len(deleted) == 1 and deleted[0]["dbt_valid_to"] is not None
    reweighed = [
        (row["weight_observation_id"], row["dbt_valid_to"] is None)
        for row in history
        if row["patient_id"] == scene.reweighed_patient
    ]
    assert reweighed == [
        (scene.deleted_weight, False),
        (scene.bmi_after[scene.reweighed_patient]["weight_observation_id"], True),
    ]


def test_the_graph_files_leave_the_deleted_patient_out(scene: Scene) -> None:
    patients = (scene.home / "graph" / "load" / "Patient.csv").read_text()
    assert scene.deleted_patient not in patients
    assert scene.reweighed_patient in patients


def _raw_deletions(scene: Scene) -> list[dict[str, Any]]:
    return _rows(
        scene.warehouse_dsn,
        sql.SQL("select resource_type, resource_id, reason, _export_id from {}").format(
            _table("staging", "stg_fhir__deleted_resource")
        ),
    )


def test_the_incremental_export_carries_its_deletions_and_retractions_only(scene: Scene) -> None:
    # Only what removes a published row crosses: the first (full) export's held-back records
    # and the patients opted out from the start never crossed, so nothing of theirs does now.
    rows = _raw_deletions(scene)
    partitions = sorted((scene.home / "lake" / "deid_raw" / "deleted_resource").iterdir())
    assert len(partitions) == 2  # the first export's is empty
    incremental = partitions[-1].name.removeprefix("export_id=")
    assert {row["_export_id"] for row in rows} == {incremental}, rows
    assert sorted((r["resource_type"], r["resource_id"], r["reason"]) for r in rows) == sorted(
        [
            ("Patient", scene.deleted_patient, "deleted"),
            ("Observation", scene.deleted_weight, "deleted"),
            ("Observation", scene.retracted_weight, "status"),
            ("Patient", scene.opted_out_patient, "research_opt_out"),
        ]
    )
    assert scene.deletions_metadata["retracted_by_reason"] == {"research_opt_out": 1, "status": 1}
    assert scene.deletions_metadata["exports_waiting_for_gates"] == []
    # The side files of the PHI zone went with the staged export.
    assert not list((scene.home / "phi" / "staging").rglob("_retracted.*"))


def test_an_observation_re_exported_entered_in_error_leaves_refined_and_the_bmi(
    scene: Scene,
) -> None:
    patient = scene.retracted_patient
    assert scene.bmi_before[patient]["weight_observation_id"] == scene.retracted_weight
    left = _rows(
        scene.warehouse_dsn,
        sql.SQL("select observation_id from {} where observation_id = %s").format(
            _table("refined", "observation")
        ),
        (scene.retracted_weight,),
    )
    assert left == []
    expected = _latest_usable_weight(scene.warehouse_dsn, patient)
    after = scene.bmi_after[patient]
    assert after["weight_observation_id"] == expected["observation_id"] != scene.retracted_weight
    assert after["weight_kg"] == expected["value_normalised"]
    assert after["computed_at"] > scene.bmi_before[patient]["computed_at"]


def test_a_patient_who_opts_out_later_leaves_every_refined_and_derived_table(
    scene: Scene,
) -> None:
    from starvit_assets.settings import load_settings

    patient = scene.opted_out_patient
    assert patient in scene.bmi_before and patient not in scene.bmi_after
    settings = load_settings()
    schemas = [settings.schema_name(layer) for layer in ("refined", "derived")]
    tables = _rows(
        scene.warehouse_dsn,
        sql.SQL(
            "select table_schema, table_name from information_schema.columns "
            "where column_name = 'patient_id' and table_schema = any(%s) "
            "order by table_schema, table_name"
        ),
        (schemas,),
    )
    assert len(tables) >= 10, tables
    for table in tables:
        name = sql.Identifier(table["table_schema"], table["table_name"])
        left = _rows(
            scene.warehouse_dsn,
            sql.SQL("select count(*) as n from {} where patient_id = %s").format(name),
            (patient,),
        )
        assert left == [{"n": 0}], table
    history = _rows(
        scene.warehouse_dsn,
        sql.SQL("select dbt_valid_to from {} where patient_id = %s").format(
            _table("snapshots", "bmi_snapshot")
        ),
        (patient,),
    )
    assert len(history) == 1 and history[0]["dbt_valid_to"] is not None
    graph = scene.home / "graph" / "load"
    assert not any(patient in path.read_text() for path in graph.glob("*.csv"))
