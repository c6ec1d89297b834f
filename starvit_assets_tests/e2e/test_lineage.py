"""The whole lineage on real parts: embedded PostgreSQL, real HTTP between the exporter and the
local Bulk Data server, real dbt, Dagster's Postgres storage. Runs once per session; each test
reads its outputs."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pyarrow.parquet as pq
import pytest
from psycopg import sql

from starvit_assets_tests.conftest import PlatformEnv

pytestmark = pytest.mark.e2e

PATIENTS = 30
SEED = 11


@dataclass(frozen=True)
class Lineage:
    home: Path
    key: bytes
    warehouse_dsn: str
    dagster_dsn: str
    source: Path
    summary: object


@pytest.fixture(scope="session")
def lineage(platform_env: PlatformEnv, warehouse_dsn: str) -> Iterator[Lineage]:
    import os

    from starvit_assets import platform
    from starvit_assets.demo import ensure_source_data, materialize_all
    from starvit_assets.fhir.server import BulkDataServer
    from starvit_assets.settings import load_settings

    settings = load_settings()
    endpoints = platform.resolve_endpoints(settings)
    source = ensure_source_data(settings, patients=PATIENTS, seed=SEED)
    with BulkDataServer(source) as server:
        os.environ["STARVIT_FHIR_BASE_URL"] = server.base_url
        try:
            summary = materialize_all(load_settings())
        finally:
            del os.environ["STARVIT_FHIR_BASE_URL"]
    yield Lineage(
        home=platform_env.home,
        key=platform_env.key,
        warehouse_dsn=warehouse_dsn,
        dagster_dsn=endpoints.dagster_dsn,
        source=source,
        summary=summary,
    )


def _resources(source: Path, resource_type: str) -> list[dict]:
    with (source / f"{resource_type}.ndjson").open() as handle:
        return [json.loads(line) for line in handle if line.strip()]


def test_every_asset_materializes_and_every_check_passes(lineage: Lineage) -> None:
    from starvit_assets.definitions import defs

    summary = lineage.summary
    assert summary.success, summary.failed_steps
    assert summary.checks_failed == []
    all_keys = {key.to_user_string() for key in defs.resolve_all_asset_keys()}
    assert set(summary.materialized) == all_keys
    graph = defs.resolve_asset_graph()
    check_names = {f"{k.asset_key.to_user_string()}:{k.name}" for k in graph.asset_check_keys}
    assert set(summary.checks_passed) == check_names
    dbt_checks = [
        name
        for name in summary.checks_passed
        if name.split("/")[0] in {"staging", "refined", "derived"}
    ]
    assert dbt_checks, "dbt tests did not run as asset checks"


def test_staged_phi_is_purged_once_de_identified(lineage: Lineage) -> None:
    staging = lineage.home / "phi" / "staging"
    assert not list(staging.rglob("*.ndjson"))


def _identifying_values(source: Path) -> set[str]:
    values: set[str] = set()
    for patient in _resources(source, "Patient"):
        values.add(patient["id"])
        for name in patient.get("name", []):
            values.update(part for part in [name.get("family"), *name.get("given", [])] if part)
        values.update(i["value"] for i in patient.get("identifier", []) if i.get("value"))
        values.update(t["value"] for t in patient.get("telecom", []) if t.get("value"))
        for address in patient.get("address", []):
            values.update(address.get("line", []))
            if address.get("postalCode"):
                values.add(address["postalCode"])
        if patient.get("birthDate"):
            values.add(patient["birthDate"])
    for resource_type in ("Encounter", "Observation", "Condition", "MedicationRequest"):
        values.update(r["id"] for r in _resources(source, resource_type))
    return {value for value in values if len(value) >= 3}


def _find_phi(text: str, values: set[str]) -> list[str]:
    found = []
    for value in values:
        if re.search(rf"(?<![\w-]){re.escape(value)}(?![\w-])", text, flags=re.IGNORECASE):
            found.append(value)
    return found


def _warehouse_text(dsn: str, database_filter: str | None = None) -> str:
    chunks = []
    with psycopg.connect(dsn) as connection:
        tables = connection.execute(
            "select table_schema, table_name from information_schema.tables "
            "where table_schema like 'sv\\_%'"
        ).fetchall()
        assert tables
        for schema, table in tables:
            rows = connection.execute(
                sql.SQL("select t::text from {} t").format(sql.Identifier(schema, table))
            ).fetchall()
            chunks.extend(row[0] for row in rows)
    return "\n".join(chunks)


def test_no_identifying_value_reaches_lake_warehouse_graph_or_dagster_storage(
    lineage: Lineage,
) -> None:
    values = _identifying_values(lineage.source)
    assert len(values) > PATIENTS * 5

    lake_files = list((lineage.home / "lake").rglob("*.parquet"))
    assert len(lake_files) == 5
    lake_text = "\n".join(
        json.dumps(pq.read_table(path).to_pylist(), default=str) for path in lake_files
    )
    assert _find_phi(lake_text, values) == []

    assert _find_phi(_warehouse_text(lineage.warehouse_dsn), values) == []

    graph_text = "\n".join(
        p.read_text() for p in (lineage.home / "graph").rglob("*") if p.is_file()
    )
    assert "Patient" in graph_text
    assert _find_phi(graph_text, values) == []

    with psycopg.connect(lineage.dagster_dsn) as connection:
        events = "\n".join(
            row[0] for row in connection.execute("select event from event_logs").fetchall()
        )
    assert "ASSET_MATERIALIZATION" in events
    assert _find_phi(events, values) == []


def test_pseudonymised_patient_ids_join_across_tables(lineage: Lineage) -> None:
    from starvit_assets.settings import load_settings

    raw = load_settings().raw_schema
    with psycopg.connect(lineage.warehouse_dsn) as connection:
        orphans = connection.execute(
            sql.SQL(
                "select count(*) from {obs} o left join {pat} p using (patient_id) where p.patient_id is null"
            ).format(obs=sql.Identifier(raw, "observation"), pat=sql.Identifier(raw, "patient"))
        ).fetchone()
        patients = connection.execute(
            sql.SQL("select count(distinct patient_id) from {}").format(
                sql.Identifier(raw, "patient")
            )
        ).fetchone()
    assert orphans == (0,)
    assert patients == (PATIENTS,)


def test_graph_vertices_reconcile_with_the_feature_table(lineage: Lineage) -> None:
    from starvit_assets.graph.files import count_csv_rows
    from starvit_assets.settings import load_settings

    derived = load_settings().schema_name("derived")
    with psycopg.connect(lineage.warehouse_dsn) as connection:
        features = connection.execute(
            sql.SQL("select count(*) from {}").format(sql.Identifier(derived, "patient_features"))
        ).fetchone()
    assert features == (PATIENTS,)
    assert count_csv_rows(lineage.home / "graph" / "load")["Patient"] == PATIENTS


def test_rerunning_the_lineage_is_idempotent(lineage: Lineage) -> None:
    """A second full run with the same source data leaves the same rows everywhere."""
    import os

    from starvit_assets.demo import materialize_all, warehouse_row_counts
    from starvit_assets.fhir.server import BulkDataServer
    from starvit_assets.settings import load_settings

    settings = load_settings()
    schemas = [settings.schema_name(layer) for layer in ("refined", "derived")]
    before = warehouse_row_counts(lineage.warehouse_dsn, schemas)
    with BulkDataServer(lineage.source) as server:
        os.environ["STARVIT_FHIR_BASE_URL"] = server.base_url
        try:
            summary = materialize_all(load_settings())
        finally:
            del os.environ["STARVIT_FHIR_BASE_URL"]
    assert summary.success and not summary.checks_failed
    assert warehouse_row_counts(lineage.warehouse_dsn, schemas) == before


def _latest(observations: list[dict], loinc: str) -> dict | None:
    from datetime import datetime

    matching = [
        o
        for o in observations
        if o["code"]["coding"][0]["code"] == loinc and o.get("status") == "final"
    ]
    return max(matching, key=lambda o: datetime.fromisoformat(o["effectiveDateTime"]), default=None)


def test_bmi_of_a_patient_measured_in_inches_and_pounds_is_hand_computed(lineage: Lineage) -> None:
    import hmac
    from collections import defaultdict
    from decimal import ROUND_HALF_UP, Decimal
    from hashlib import sha256

    from starvit_assets.settings import load_settings

    by_patient: dict[str, list[dict]] = defaultdict(list)
    for observation in _resources(lineage.source, "Observation"):
        by_patient[observation["subject"]["reference"].removeprefix("Patient/")].append(observation)
    imperial = {}
    for patient_id, observations in by_patient.items():
        height, weight = _latest(observations, "8302-2"), _latest(observations, "29463-7")
        if (
            height
            and weight
            and height["valueQuantity"]["code"] == "[in_i]"
            and weight["valueQuantity"]["code"] == "[lb_av]"
        ):
            kilograms = Decimal(str(weight["valueQuantity"]["value"])) * Decimal("0.45359237")
            metres = Decimal(str(height["valueQuantity"]["value"])) * Decimal("2.54") / 100
            imperial[patient_id] = (kilograms / (metres * metres)).quantize(
                Decimal("0.1"), ROUND_HALF_UP
            )
    assert imperial, "the synthetic data has no patient measured in inches and pounds"

    derived = load_settings().schema_name("derived")
    with psycopg.connect(lineage.warehouse_dsn) as connection:
        for patient_id, expected in imperial.items():
            token = hmac.new(lineage.key, f"Patient/{patient_id}".encode(), sha256).hexdigest()[:32]
            row = connection.execute(
                sql.SQL(
                    "select bmi, requires_clinician_review, metric_version from {} where patient_id = %s"
                ).format(sql.Identifier(derived, "bmi_latest")),
                (token,),
            ).fetchone()
            assert row is not None, "patient missing from bmi_latest"
            assert Decimal(str(row[0])) == expected
            assert row[1] is True
            assert row[2]
