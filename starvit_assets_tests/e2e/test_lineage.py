"""The whole lineage on real parts: embedded PostgreSQL, real HTTP between the exporter and the
local Bulk Data server, real dbt, Dagster's Postgres storage. Runs once per session; each test
reads its outputs."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import psycopg
import pyarrow.parquet as pq
import pytest
from psycopg import sql

from starvit_assets_tests.conftest import PlatformEnv

pytestmark = pytest.mark.e2e

PATIENTS = 30
SEED = 11
# One planted value per HIPAA Safe Harbor identifier class (45 CFR 164.514(b)(2)); none may
# surface anywhere in the research zone, in logs or in Dagster's storage.
CANARIES = {
    "name": "Quillon Canarywood",
    "family": "Canarywood",
    "address_line": "77 Canaryfinch Lane",
    "city": "Canaryfinchville",
    "postal_code": "55512",
    # Aged 90 or over at any export date: the published birth year must collapse (#3).
    "birth_date": "1921-07-23",
    "phone": "+1-555-0100-7788",
    "fax": "+1-555-0199-8866",
    "email": "quillon.canary@example.org",
    "ssn": "987-65-4329",
    "mrn": "MRN-CANARY-0001",
    "health_plan": "HPB-CANARY-4242",
    "account": "ACCT-CANARY-9191",
    "license": "LIC-CANARY-7070",
    "vehicle": "1HGCM82633A004352",
    "device": "DEV-SN-CANARY-5151",
    "url": "https://canary.example.org/quillon",
    "ip": "203.0.113.77",
    "photo": "https://photos.example.org/canary-face.jpg",
    "other_id": "UID-CANARY-1818",
    # Biometric identifiers (#16): a fingerprint template id, a voiceprint enrolment id.
    "fingerprint": "FPR-CANARY-2424",
    "voiceprint": "VPR-CANARY-6363",
    "patient_id": "canary-patient-0001",
    "observation_id": "canary-observation-0001",
}
# The demo data plants unlinked duplicate Patient records (docs/linkage.md): the patient
# records, canary included, are counted from the source, the persons from its persons.json.


def all_patients(lineage: Lineage) -> int:
    return len(_resources(lineage.source, "Patient"))


# The demo data gives some patients a research opt-out (docs/synthetic-data.md): the gate holds
# back all their records, so downstream counts are of the patients it lets through.
def opted_out(lineage: Lineage) -> set[str]:
    from starvit_assets.fhir.synth import OPTED_OUT_CASE, load_consent_cases

    cases = load_consent_cases(lineage.source)
    return {patient for patient, case in cases.items() if case == OPTED_OUT_CASE}


def published_patients(lineage: Lineage) -> int:
    held_back = opted_out(lineage)
    return sum(1 for p in _resources(lineage.source, "Patient") if p["id"] not in held_back)


def plant_canaries(source: Path) -> None:
    c = CANARIES
    identifier = [
        {"system": system, "value": c[field]}
        for system, field in (
            ("http://hl7.org/fhir/sid/us-ssn", "ssn"),
            ("http://hospital.example.org/mrn", "mrn"),
            ("http://payer.example.org/member", "health_plan"),
            ("http://hospital.example.org/account", "account"),
            ("http://licenses.example.org", "license"),
            ("urn:ietf:rfc:3986", "other_id"),
            ("http://biometrics.example.org/fingerprint-template", "fingerprint"),
        )
    ]
    patient = {
        "resourceType": "Patient",
        "id": c["patient_id"],
        "meta": {"versionId": "1", "lastUpdated": "2024-05-06T07:08:09Z"},
        "identifier": identifier,
        "name": [{"family": c["family"], "given": ["Quillon"], "text": c["name"]}],
        "telecom": [
            {"system": "phone", "value": c["phone"]},
            {"system": "fax", "value": c["fax"]},
            {"system": "email", "value": c["email"]},
            {"system": "url", "value": c["url"]},
        ],
        "gender": "female",
        "birthDate": c["birth_date"],
        "address": [
            {"line": [c["address_line"]], "city": c["city"], "postalCode": c["postal_code"]}
        ],
        "photo": [{"url": c["photo"]}],
        "extension": [
            {"url": "http://example.org/last-login-ip", "valueString": c["ip"]},
            {"url": "http://example.org/vehicle", "valueString": c["vehicle"]},
            {"url": "http://biometrics.example.org/voiceprint-id", "valueString": c["voiceprint"]},
        ],
    }
    observation = {
        "resourceType": "Observation",
        "id": c["observation_id"],
        "meta": {"versionId": "1", "lastUpdated": "2024-05-06T07:08:09Z"},
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
        "subject": {"reference": f"Patient/{c['patient_id']}", "display": c["name"]},
        "effectiveDateTime": "2024-05-06T07:08:09+02:00",
        "valueQuantity": {
            "value": 61.2,
            "unit": "kg",
            "system": "http://unitsofmeasure.org",
            "code": "kg",
        },
        "device": {"display": c["device"]},
        "note": [{"text": f"{c['name']} drove in ({c['vehicle']}), call {c['phone']}."}],
    }
    for resource in (patient, observation):
        path = source / f"{resource['resourceType']}.ndjson"
        with path.open("a") as handle:
            handle.write(json.dumps(resource) + "\n")


# Planted codes the terminology validation must find invalid (docs/terminology.md): an
# unassigned LOINC code, and a known code under a misspelt system (a trailing slash).
PLANTED_UNKNOWN_CODES = {
    "terminology-unknown-code-0001": ("http://loinc.org", "99999-9"),
    "terminology-unknown-system-0001": ("http://loinc.org/", "8867-4"),
}


def plant_unknown_codes(source: Path) -> None:
    with (source / "Observation.ndjson").open("a") as handle:
        for observation_id, (system, code) in PLANTED_UNKNOWN_CODES.items():
            observation = {
                "resourceType": "Observation",
                "id": observation_id,
                "meta": {"versionId": "1", "lastUpdated": "2024-05-06T07:08:09Z"},
                "status": "final",
                "code": {"coding": [{"system": system, "code": code}]},
                "subject": {"reference": f"Patient/{CANARIES['patient_id']}"},
                "effectiveDateTime": "2024-05-06T07:08:09+02:00",
                "valueQuantity": {
                    "value": 72,
                    "unit": "/min",
                    "system": "http://unitsofmeasure.org",
                    "code": "/min",
                },
            }
            handle.write(json.dumps(observation) + "\n")


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
    plant_canaries(source)
    plant_unknown_codes(source)
    with BulkDataServer(source) as server:
        os.environ["STARVIT_FHIR_BASE_URL"] = server.base_url
        try:
            summary = materialize_all(
                load_settings(), log_path=platform_env.home / "logs" / "e2e-run.log"
            )
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
    assert set(summary.checks_passed) | set(summary.checks_warned) == check_names
    # Only the k-anonymity report may warn: a 30-patient set cannot be 5-anonymous.
    assert set(summary.checks_warned) <= {"deid_raw/patient:k_anonymity"}
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
    for resource_type in (
        "Encounter",
        "Observation",
        "Condition",
        "MedicationRequest",
        "Procedure",
        "Immunization",
        "AllergyIntolerance",
        "Consent",
    ):
        values.update(r["id"] for r in _resources(source, resource_type))
    values.update(CANARIES.values())
    return {value for value in values if len(value) >= 3}


_WORD_RUN = re.compile(r"[\w-]+")


def _find_phi(text: str, values: set[str]) -> list[str]:
    """The values that stand in ``text`` as a whole (not inside a longer run of word characters
    or hyphens), ignoring case: what ``(?<![\w-])value(?![\w-])`` finds, in one pass over the
    text. An occurrence starts its first run of word characters exactly where a run of the text
    starts, so only those places are tried."""
    by_first_run: dict[str, list[tuple[str, int]]] = {}
    for value in values:
        lowered = value.lower()
        first = _WORD_RUN.search(lowered)
        if first is not None:
            by_first_run.setdefault(first.group(), []).append((lowered, first.start()))
    haystack = text.lower()
    found: set[str] = set()
    for run in _WORD_RUN.finditer(haystack):
        for lowered, offset in by_first_run.get(run.group(), ()):
            start = run.start() - offset
            end = start + len(lowered)
            if (
                start >= 0
                and haystack.startswith(lowered, start)
                and (start == 0 or not _WORD_RUN.match(haystack[start - 1]))
                and (end == len(haystack) or not _WORD_RUN.match(haystack[end]))
            ):
                found.add(lowered)
    return sorted(value for value in values if value.lower() in found)


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
    # Eight view tables and the (empty) deletions of the export; no quarantine for deletions.
    assert len(list((lineage.home / "lake" / "deid_raw").rglob("*.parquet"))) == 9
    assert len(list((lineage.home / "lake" / "deid_quarantine").rglob("*.parquet"))) == 8
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

    log_files = [
        path
        for folder in (lineage.home / "logs", lineage.home / "dagster_home")
        for path in folder.rglob("*")
        if path.is_file() and path.suffix in {".log", ".out", ".err", ".txt", ".json", ""}
    ]
    assert any(path.parent.name == "logs" for path in log_files), "no run log was written"
    logs = "\n".join(path.read_text(errors="replace") for path in log_files)
    assert _find_phi(logs, values) == []


def test_every_safe_harbor_canary_is_held_back(lineage: Lineage) -> None:
    """The planted patient crosses, de-identified: present by count, absent by every value."""
    raw_text = "\n".join(
        json.dumps(pq.read_table(path).to_pylist(), default=str)
        for path in (lineage.home / "lake").rglob("*.parquet")
    )
    assert _find_phi(raw_text, set(CANARIES.values())) == []
    from starvit_assets.exports import latest_staged_export
    from starvit_assets.settings import load_settings

    patients = pq.read_table(
        next((lineage.home / "lake" / "deid_raw" / "patient").rglob("*.parquet"))
    )
    # Born 1921: aged 90 or over at the export, so published with the collapsed year (#3).
    export_year = int(latest_staged_export(load_settings(), "Patient").transaction_time[:4])
    collapsed = export_year - 90
    canary = [
        row
        for row in patients.to_pylist()
        if row["birth_year"] == collapsed and row["postal_code_3"] == "555"
    ]
    assert len(canary) == 1
    assert min(year for year in patients.column("birth_year").to_pylist() if year) == collapsed


def test_gate_counts_reconcile_for_every_table(lineage: Lineage) -> None:
    from starvit_assets.lake.gate import GateCounts

    folders = [
        path.parent
        for path in (lineage.home / "lake" / "deid_raw").rglob("*.parquet")
        if path.parent.parent.name != "deleted_resource"
    ]
    assert len(folders) == 8
    for folder in folders:
        counts = GateCounts.load(folder)
        assert counts.reconciles, folder
        assert (
            counts.resources_read
            == counts.resources_with_rows + counts.resources_without_rows + counts.lines_quarantined
        )
        assert (
            counts.rows_flattened
            == counts.rows_published + counts.rows_quarantined + counts.rows_held_back
        )


def test_research_opt_outs_are_held_back_and_lapsed_ones_are_not(lineage: Lineage) -> None:
    """Every record of a patient whose research Consent denies is held back (consents.json
    has the truth); a deny that expired, was superseded by a later permit or was withdrawn
    holds nothing back. The gate's metadata counts them, and its counts still reconcile."""
    from starvit_assets.deid.engine import pseudonym
    from starvit_assets.fhir.synth import OPTED_OUT_CASE, load_consent_cases
    from starvit_assets.lake.gate import GateCounts
    from starvit_assets.settings import load_settings

    cases = load_consent_cases(lineage.source)
    denied = {patient for patient, case in cases.items() if case == OPTED_OUT_CASE}
    lapsed = {
        patient
        for patient, case in cases.items()
        if case in {"expired_deny", "superseded_deny", "withdrawn_deny"}
    }
    assert denied and lapsed, "the demo data exercises no consent case"
    tokens = {patient: pseudonym(lineage.key, "Patient", patient) for patient in cases}
    settings = load_settings()
    found: dict[str, set[str]] = {}
    with psycopg.connect(lineage.warehouse_dsn) as connection:
        for schema in (settings.raw_schema, settings.schema_name("refined")):
            tables = connection.execute(
                "select table_name from information_schema.columns "
                "where table_schema = %s and column_name = 'patient_id'",
                (schema,),
            ).fetchall()
            assert len(tables) >= 5, schema
            for (table,) in tables:
                rows = connection.execute(
                    sql.SQL("select distinct patient_id from {}").format(
                        sql.Identifier(schema, table)
                    )
                ).fetchall()
                found[f"{schema}.{table}"] = {row[0] for row in rows}
    for table, patients in found.items():
        assert not patients & {tokens[p] for p in denied}, table
    everywhere = set().union(*found.values())
    assert {tokens[p] for p in lapsed} <= everywhere
    assert {tokens[p] for p in lapsed} <= found[f"{settings.raw_schema}.patient"]

    # The lake's Parquet holds none of the opted-out patients either (their records were
    # filtered before any row was written, so no quarantine holds them).
    lake = lineage.home / "lake"
    for path in lake.rglob("*.parquet"):
        text = json.dumps(pq.read_table(path).to_pylist(), default=str)
        assert not any(tokens[p] in text for p in denied), path

    with dg.DagsterInstance.get() as instance:
        for table in ("patient", "encounter", "observation"):
            event = instance.get_latest_materialization_event(dg.AssetKey(["deid_raw", table]))
            assert event is not None and event.asset_materialization is not None
            metadata = {k: v.value for k, v in event.asset_materialization.metadata.items()}
            assert metadata["consent_resources_read"] == len(_resources(lineage.source, "Consent"))
            assert metadata["research_opt_out_patients"] == len(denied)
            assert metadata["held_back_by_reason"]["consent: research opt-out"] > 0, table
    for folder in {path.parent for path in (lake / "deid_raw").rglob("*.parquet")}:
        if folder.parent.name == "deleted_resource":
            continue
        counts = GateCounts.load(folder)
        assert counts.reconciles, folder
        assert (
            counts.rows_flattened
            == counts.rows_published + counts.rows_quarantined + counts.rows_held_back
        )


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
    assert patients == (published_patients(lineage),)


def test_graph_vertices_reconcile_with_the_feature_table(lineage: Lineage) -> None:
    from starvit_assets.graph.files import count_csv_rows
    from starvit_assets.graph.schema import VERTEX_TYPES, per_type
    from starvit_assets.settings import load_settings

    settings = load_settings()
    derived, refined = settings.schema_name("derived"), settings.schema_name("refined")
    loinc = "code_system = 'loinc' and code is not null"
    source_counts = {
        "Patient": (derived, "patient_features", "count(*)", "true"),
        "Encounter": (refined, "encounter", "count(*)", "true"),
        "Condition": (refined, "condition", "count(distinct snomed_code)", "true"),
        "Medication": (refined, "medication_request", "count(distinct rxnorm_code)", "true"),
        "ObservationType": (refined, "observation", "count(distinct code)", loinc),
        "has_encounter": (refined, "encounter", "count(*)", "true"),
        "has_condition": (refined, "condition", "count(*)", "snomed_code is not null"),
        "prescribed": (refined, "medication_request", "count(*)", "rxnorm_code is not null"),
        "has_observation": (refined, "observation", "count(*)", loinc),
    }
    expected = {}
    with psycopg.connect(lineage.warehouse_dsn) as connection:
        for name, (schema, table, aggregate, where) in source_counts.items():
            row = connection.execute(
                sql.SQL("select " + aggregate + " from {} where " + where).format(
                    sql.Identifier(schema, table)
                )
            ).fetchone()
            assert row is not None
            expected[name] = row[0]
    files = count_csv_rows(lineage.home / "graph" / "load")
    on_disk = {vertex.name: files[vertex.name] for vertex in VERTEX_TYPES} | per_type(files)

    assert expected["Patient"] == published_patients(lineage)
    assert on_disk == expected
    assert all(expected.values()), expected
    # Observations hang off their encounters; the planted one names none, so its patient.
    assert files["has_observation_from_Encounter"] > 0
    assert files["has_observation_from_Patient"] >= 1


def test_graph_load_upserts_the_same_counts_into_tigergraph_over_restpp(
    lineage: Lineage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The graph asset again, now with a TigerGraph configured: real pyTigerGraph, real
    HTTP, the local RESTPP endpoint; it must hold what the loading files hold."""
    from starvit_assets.demo import materialize_all
    from starvit_assets.graph.files import count_csv_rows
    from starvit_assets.graph.schema import EDGE_TYPES, VERTEX_TYPES, per_type, schema_gsql
    from starvit_assets.settings import load_settings
    from starvit_assets_tests.fakes.tigergraph_endpoint import FakeTigerGraphEndpoint

    files = count_csv_rows(lineage.home / "graph" / "load")
    expected = {vertex.name: files[vertex.name] for vertex in VERTEX_TYPES} | per_type(files)
    secret = "e2e-tigergraph-secret"
    with FakeTigerGraphEndpoint(schema_gsql(), secret=secret, require_token=True) as endpoint:
        monkeypatch.setenv("STARVIT_TIGERGRAPH_HOST", endpoint.url)
        monkeypatch.setenv("STARVIT_TIGERGRAPH_SECRET", secret)
        monkeypatch.setenv("STARVIT_TIGERGRAPH_BATCH_SIZE", "40")
        endpoint.fail_next(1, status=503)
        summary = materialize_all(
            load_settings(), asset_keys=[dg.AssetKey(["graph", "tigergraph_load"])]
        )
        held = {vertex.name: endpoint.vertex_count(vertex.name) for vertex in VERTEX_TYPES} | {
            edge.name: endpoint.edge_count(edge.name) for edge in EDGE_TYPES
        }
        upserts = [r for r in endpoint.requests if r.path == "/restpp/graph/starvit"]

    assert summary.success, summary.failed_steps  # type: ignore[attr-defined]
    assert summary.checks_passed == ["graph/tigergraph_load:counts_reconcile"]  # type: ignore[attr-defined]
    assert held == expected
    assert upserts[0].status == 503 and upserts[1].status == 200
    assert max(r.vertices + r.edges for r in upserts) <= 40
    assert files == count_csv_rows(lineage.home / "graph" / "load")  # the files stay as they were


# Pairwise scores of the demo data's persons (docs/linkage.md): a false merge mixes two
# people's records, so precision must be perfect on 30 patients; recall may miss a record
# that differs from its person's other record in two fields at once.
MIN_LINKAGE_PRECISION = 0.99
MIN_LINKAGE_RECALL = 0.8


def test_duplicate_patient_records_resolve_to_persons(lineage: Lineage) -> None:
    from starvit_assets.deid.engine import pseudonym
    from starvit_assets.fhir.synth import TRUTH_FILE, load_person_clusters
    from starvit_assets.linkage.match import pairwise_score
    from starvit_assets.settings import load_settings

    source = load_settings().source_name
    held_back = opted_out(lineage)

    def record(patient: str) -> tuple[str, str]:
        return (source, pseudonym(lineage.key, "Patient", patient))

    # The true persons over the records the gate published: the canary is a person of its
    # own; an opted-out record never crosses the gate, but another record of the same person
    # (a linked or unlinked duplicate, which the Consent does not name) still does.
    truth = {
        person: {record(patient) for _, patient in records if patient not in held_back}
        for person, records in load_person_clusters(lineage.source).items()
    }
    truth = {person: records for person, records in truth.items() if records}
    truth["canary"] = {record(CANARIES["patient_id"])}
    assert len(truth) < published_patients(lineage), "the demo data plants no duplicates"
    derived = load_settings().schema_name("derived")
    with psycopg.connect(lineage.warehouse_dsn) as connection:
        rows = connection.execute(
            sql.SQL("select person_key, source, patient_id, match_rule from {}").format(
                sql.Identifier(derived, "person_patient_map")
            )
        ).fetchall()
        person_rows = connection.execute(
            sql.SQL("select count(*), sum(patient_count) from {}").format(
                sql.Identifier(derived, "person")
            )
        ).fetchone()
    predicted: dict[str, set[tuple[str, str]]] = {}
    for person_key, record_source, patient_id, _ in rows:
        predicted.setdefault(person_key, set()).add((record_source, patient_id))
    mapped = len(rows)
    assert mapped == published_patients(lineage)
    assert {r for records in predicted.values() for r in records} == set().union(*truth.values())
    assert person_rows == (len(predicted), mapped)
    # Pairwise precision (no false merge) and recall (duplicates found) against the truth.
    score = pairwise_score(predicted, truth)
    assert score.true_pairs > 0
    assert score.precision >= MIN_LINKAGE_PRECISION, score
    assert score.recall >= MIN_LINKAGE_RECALL, score
    # Every planted Patient.link joins its two records, whichever rule names the match.
    person_of = {r: key for key, records in predicted.items() for r in records}
    truth_faults = json.loads((lineage.source / TRUTH_FILE).read_text())
    links = [
        (entry["id"], entry["detail"]["value"].removeprefix("Patient/"))
        for entry in truth_faults["duplicate_person"]
        if not {entry["id"], entry["detail"]["value"].removeprefix("Patient/")} & held_back
    ]
    assert links, "the demo data plants no linked duplicate"
    assert all(person_of[record(a)] == person_of[record(b)] for a, b in links)

    # The linkage rates are in the materialization metadata of the asset that computes them.
    with dg.DagsterInstance.get() as instance:
        event = instance.get_latest_materialization_event(
            dg.AssetKey(["linkage", "person_patient_map"])
        )
    assert event is not None and event.asset_materialization is not None
    metadata = {k: v.value for k, v in event.asset_materialization.metadata.items()}
    assert (metadata["patients"], metadata["persons"]) == (mapped, len(predicted))
    assert metadata["patients_linked"] == sum(1 for *_, rule in rows if rule != "none") > 0
    assert 0 < metadata["share_linked"] < 1
    assert metadata["linked_by_patient_link"] >= 2 * len(links) > 0
    assert metadata["patients_by_source"] == {source: mapped}


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
    held_back = opted_out(lineage)
    for patient_id, observations in by_patient.items():
        if patient_id in held_back:
            continue
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


def test_refined_codes_carry_their_validation_and_planted_unknown_codes_are_invalid(
    lineage: Lineage,
) -> None:
    from starvit_assets.deid.engine import pseudonym
    from starvit_assets.fhir.synth import TRUTH_FILE
    from starvit_assets.settings import load_settings

    refined = load_settings().schema_name("refined")
    tables: dict[str, set[str] | None] = {
        "condition": None,
        "observation": None,
        "medication_request": None,
        "procedure": None,
        "immunization": None,
        "allergy_intolerance": None,
    }
    with psycopg.connect(lineage.warehouse_dsn) as connection:
        for table in tables:
            tables[table] = {
                row[0]
                for row in connection.execute(
                    "select column_name from information_schema.columns "
                    "where table_schema = %s and table_name = %s",
                    (refined, table),
                ).fetchall()
            }

        def rows(query: str, *args: object) -> list[tuple]:
            return connection.execute(
                sql.SQL(query).format(schema=sql.Identifier(refined)), args
            ).fetchall()

        planted = {
            pseudonym(lineage.key, "Observation", observation_id): expected
            for observation_id, expected in PLANTED_UNKNOWN_CODES.items()
        }
        found = rows(
            "select observation_id, code_system_uri, code, code_is_valid, code_system_known "
            "from {schema}.observation where observation_id = any(%s)",
            list(planted),
        )
        unvalidated = rows(
            "select count(*) from {schema}.observation where code is not null "
            "and code_is_valid is null"
        )
        invalid = rows("select observation_id from {schema}.observation where not code_is_valid")
        conditions = rows(
            "select count(*), count(*) filter (where snomed_code_is_valid and "
            "icd10_code_is_valid and mapped_code = icd10_code) from {schema}.condition "
            "where snomed_code is not null"
        )
        medications = rows(
            "select count(*), count(*) filter (where code_is_valid) "
            "from {schema}.medication_request where rxnorm_code is not null"
        )
        procedures = rows(
            "select count(*), count(*) filter (where snomed_code_is_valid) "
            "from {schema}.procedure where snomed_code is not null"
        )
        immunizations = rows(
            "select count(*), count(*) filter (where cvx_code_is_valid) "
            "from {schema}.immunization where cvx_code is not null"
        )
        allergies = rows(
            "select count(*), count(*) filter (where snomed_code_is_valid), "
            "count(reaction_snomed_code), count(*) filter (where reaction_snomed_code_is_valid) "
            "from {schema}.allergy_intolerance where snomed_code is not null"
        )
    assert {"snomed_code_is_valid", "icd10_code_is_valid", "mapped_system", "mapped_code"} <= (
        tables["condition"] or set()
    )
    assert {"code_is_valid", "code_system_known", "mapped_system", "mapped_code"} <= (
        tables["observation"] or set()
    )
    assert {"code_is_valid", "mapped_code"} <= (tables["medication_request"] or set())
    assert "snomed_code_is_valid" in (tables["procedure"] or set())
    assert "cvx_code_is_valid" in (tables["immunization"] or set())
    assert {"snomed_code_is_valid", "reaction_snomed_code_is_valid"} <= (
        tables["allergy_intolerance"] or set()
    )
    by_id = {row[0]: row[1:] for row in found}
    unknown_code, unknown_system = (
        pseudonym(lineage.key, "Observation", observation_id)
        for observation_id in PLANTED_UNKNOWN_CODES
    )
    assert by_id[unknown_code] == ("http://loinc.org", "99999-9", False, True)
    assert by_id[unknown_system] == ("http://loinc.org/", "8867-4", False, False)
    assert unvalidated == [(0,)]
    # Exactly the planted codes are invalid: ours, and those the generator planted (truth.json:
    # the demo data's few unknown LOINC codes, DEMO_FAULT_RATES), but for the observations of
    # patients who opted out of research, which never cross the gate.
    truth_file = lineage.source / TRUTH_FILE
    truth = json.loads(truth_file.read_text()) if truth_file.is_file() else {}
    held_back = opted_out(lineage)
    subject = {
        o["id"]: o["subject"]["reference"].removeprefix("Patient/")
        for o in _resources(lineage.source, "Observation")
    }
    generator_planted = {
        pseudonym(lineage.key, "Observation", fault["id"])
        for kind in ("unknown_code", "unknown_code_system")
        for fault in truth.get(kind, [])
        if fault["resource_type"] == "Observation" and subject[fault["id"]] not in held_back
    }
    assert generator_planted, "the demo data plants no unknown code"
    assert {row[0] for row in invalid} == set(planted) | generator_planted
    # Every synthetic condition is valid in both systems and maps to the ICD-10-CM code the
    # generator paired it with; every medication is a valid RxNorm code.
    assert conditions[0][0] > 0 and conditions[0][0] == conditions[0][1]
    assert medications[0][0] > 0 and medications[0][0] == medications[0][1]
    # Every synthetic procedure is a valid SNOMED CT code, every vaccine a valid CVX code.
    assert procedures[0][0] > 0 and procedures[0][0] == procedures[0][1]
    assert immunizations[0][0] > 0 and immunizations[0][0] == immunizations[0][1]
    # Every synthetic allergy and its reaction manifestation are valid SNOMED CT codes.
    assert allergies[0][0] > 0 and allergies[0][0] == allergies[0][1]
    assert allergies[0][2] > 0 and allergies[0][2] == allergies[0][3]


# The two tests below change the warehouse: they stay last in this file.
def _rerun_lineage(lineage: Lineage) -> object:
    from starvit_assets.fhir.server import BulkDataServer

    with BulkDataServer(lineage.source) as server:
        return _run_against(server.base_url)


def _run_against(base_url: str, *, incremental: bool = False) -> object:
    import os

    from starvit_assets.demo import materialize_all
    from starvit_assets.settings import load_settings

    os.environ["STARVIT_FHIR_BASE_URL"] = base_url
    try:
        return materialize_all(load_settings(), incremental=incremental)
    finally:
        del os.environ["STARVIT_FHIR_BASE_URL"]


def _bmi_rows(dsn: str) -> dict[str, tuple[object, float]]:
    from starvit_assets.settings import load_settings

    derived = load_settings().schema_name("derived")
    with psycopg.connect(dsn) as connection:
        rows = connection.execute(
            sql.SQL("select patient_id, computed_at, weight_kg from {}").format(
                sql.Identifier(derived, "bmi_latest")
            )
        ).fetchall()
    return {patient: (computed_at, weight) for patient, computed_at, weight in rows}


def test_rerunning_the_lineage_is_idempotent(lineage: Lineage) -> None:
    """A second full run with the same source data leaves the same rows everywhere, and the
    incremental BMI recomputes nobody: a re-export of unchanged content is no change."""
    from starvit_assets.demo import warehouse_row_counts
    from starvit_assets.settings import load_settings

    settings = load_settings()
    schemas = [settings.schema_name(layer) for layer in ("refined", "derived")]
    before = warehouse_row_counts(lineage.warehouse_dsn, schemas)
    bmi_before = _bmi_rows(lineage.warehouse_dsn)
    summary = _rerun_lineage(lineage)
    assert summary.success and not summary.checks_failed  # type: ignore[attr-defined]
    assert warehouse_row_counts(lineage.warehouse_dsn, schemas) == before
    assert _bmi_rows(lineage.warehouse_dsn) == bmi_before


def test_a_changed_weight_recomputes_only_that_patients_bmi(lineage: Lineage) -> None:
    from starvit_assets.deid.engine import pseudonym

    observations = _resources(lineage.source, "Observation")
    weighed = next(
        o
        for o in observations
        if o["code"]["coding"][0]["code"] == "29463-7"
        and o["subject"]["reference"] != f"Patient/{CANARIES['patient_id']}"
        and o["subject"]["reference"].removeprefix("Patient/") not in opted_out(lineage)
    )
    patient_id = weighed["subject"]["reference"].removeprefix("Patient/")
    newer = {
        **weighed,
        "id": "weight-change-0001",
        "meta": {"versionId": "1", "lastUpdated": "2026-11-02T08:00:00Z"},
        "effectiveDateTime": "2026-11-02T08:00:00+00:00",
        "valueQuantity": {
            "value": 99.0,
            "unit": "kg",
            "system": "http://unitsofmeasure.org",
            "code": "kg",
        },
    }
    newer.pop("note", None)
    before = _bmi_rows(lineage.warehouse_dsn)
    with (lineage.source / "Observation.ndjson").open("a") as handle:
        handle.write(json.dumps(newer) + "\n")

    summary = _rerun_lineage(lineage)

    assert summary.success and not summary.checks_failed  # type: ignore[attr-defined]
    after = _bmi_rows(lineage.warehouse_dsn)
    token = pseudonym(lineage.key, "Patient", patient_id)
    recomputed = {
        patient for patient in after if after[patient][0] != before.get(patient, (None,))[0]
    }
    assert recomputed == {token}
    assert after[token][1] == 99.0


def _refined_ids(dsn: str, table: str) -> set[str]:
    from starvit_assets.settings import load_settings

    refined = load_settings().schema_name("refined")
    with psycopg.connect(dsn) as connection:
        rows = connection.execute(
            sql.SQL("select {} from {}").format(
                sql.Identifier(f"{table}_id"), sql.Identifier(refined, table)
            )
        ).fetchall()
    return {row[0] for row in rows}


def test_a_resource_deleted_in_an_incremental_export_leaves_its_refined_table(
    lineage: Lineage,
) -> None:
    """The server lists a deleted procedure in the incremental export's deleted[]; it crosses
    the gate pseudonymised and disappears from refined.procedure, the other rows stay."""
    import datetime as dt

    from starvit_assets.deid.engine import pseudonym
    from starvit_assets.fhir.server import BulkDataServer
    from starvit_assets.settings import load_settings

    held_back = opted_out(lineage)
    procedure = next(
        p
        for p in _resources(lineage.source, "Procedure")
        if p["subject"]["reference"].removeprefix("Patient/") not in held_back
    )
    token = pseudonym(lineage.key, "Procedure", procedure["id"])
    before = _refined_ids(lineage.warehouse_dsn, "procedure")
    assert token in before
    # The watermark belongs to the server's URL: a full export from this server first, then
    # the deletion, then an incremental export from the same server.
    with BulkDataServer(lineage.source) as server:
        full = _run_against(server.base_url)
        assert full.success, full  # type: ignore[attr-defined]
        deleted_at = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        with (lineage.source / "_deleted.ndjson").open("a") as handle:
            tombstone = {"resourceType": "Procedure", "id": procedure["id"]}
            handle.write(json.dumps({**tombstone, "meta": {"lastUpdated": deleted_at}}) + "\n")
        summary = _run_against(server.base_url, incremental=True)

    assert summary.success and not summary.checks_failed, summary  # type: ignore[attr-defined]
    assert _refined_ids(lineage.warehouse_dsn, "procedure") == before - {token}
    raw = load_settings().raw_schema
    with psycopg.connect(lineage.warehouse_dsn) as connection:
        deletions = connection.execute(
            sql.SQL("select resource_type, resource_id from {}").format(
                sql.Identifier(raw, "deleted_resource")
            )
        ).fetchall()
    assert deletions == [("Procedure", token)]
    assert not list((lineage.home / "phi" / "staging").rglob("*.ndjson"))
    assert _find_phi(_warehouse_text(lineage.warehouse_dsn), {procedure["id"]}) == []


def test_a_failed_blocking_dbt_test_stops_the_downstream_assets_and_fails_the_run(
    lineage: Lineage,
) -> None:
    """A row that breaks refined.patient's accepted_values test (error severity, so a blocking
    check): the run fails and nothing downstream of refined.patient is materialized."""
    from starvit_assets.definitions import defs
    from starvit_assets.demo import materialize_all
    from starvit_assets.settings import load_settings

    raw = sql.Identifier(load_settings().raw_schema, "patient")
    insert = sql.SQL(
        "insert into {} (patient_id, gender, _export_id, _source_file, _source_line, "
        "_content_hash, _policy_version) values ('broken-gender', 'bogus', 'broken', 'x', 1, "
        "'broken', 'x')"
    ).format(raw)
    with psycopg.connect(lineage.warehouse_dsn) as connection:
        connection.execute(insert)
    downstream_of_raw = [
        key
        for key in defs.resolve_all_asset_keys()
        if key.path[0] in {"staging", "refined", "derived", "graph"}
    ]
    try:
        summary = materialize_all(load_settings(), asset_keys=downstream_of_raw)
    finally:
        with psycopg.connect(lineage.warehouse_dsn) as connection:
            connection.execute(sql.SQL("delete from {} where _export_id = 'broken'").format(raw))

    assert not summary.success  # type: ignore[attr-defined]
    failed = summary.checks_failed  # type: ignore[attr-defined]
    assert any(name.startswith("refined/patient:accepted_values") for name in failed), failed
    materialized = set(summary.materialized)  # type: ignore[attr-defined]
    assert "refined/patient" in materialized  # the checked asset itself is recorded...
    for blocked in (
        "derived/patient_features",
        "derived/patient_age_bracket",
        "graph/tigergraph_load",
    ):
        assert blocked not in materialized  # ...but nothing downstream of it runs
