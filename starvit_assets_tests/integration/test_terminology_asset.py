"""The terminology/code_validation asset on the real embedded PostgreSQL: reads the coded raw
columns, writes the validation table idempotently, judges the share check; against the
embedded service and against the local terminology server over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dagster as dg
import psycopg
import pytest

from starvit_assets.defs.resources import PlatformResource
from starvit_assets.defs.terminology import SHARE_CHECK, TABLE, terminology_code_validation
from starvit_assets.fhir import synth
from starvit_assets.terminology.server import TerminologyServer

# A schema of its own (env "stage"), so the e2e lineage's sv_dev_raw is never touched.
ENV = "stage"
SCHEMA = f"sv_{ENV}_raw"

OBSERVATIONS = [
    *[(synth.LOINC, "8302-2")] * 40,
    *[(synth.LOINC, "29463-7")] * 40,
    (synth.LOINC, "99999-9"),  # a planted unknown code
    ("http://loinc.org/", "8867-4"),  # a planted unknown system
    (None, None),  # an observation without a code
]
CONDITIONS = [("38341003", "I10"), ("44054006", "E11.9"), ("11111111", None), (None, "J45.909")]


@pytest.fixture
def raw_tables(warehouse_dsn: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("STARVIT_ENV", ENV)
    with psycopg.connect(warehouse_dsn) as connection:
        connection.execute(f"drop schema if exists {SCHEMA} cascade")
        connection.execute(f"create schema {SCHEMA}")
        connection.execute(f"create table {SCHEMA}.observation (code_system text, code text)")
        connection.cursor().executemany(
            f"insert into {SCHEMA}.observation values (%s, %s)", OBSERVATIONS
        )
        connection.execute(f"create table {SCHEMA}.condition (snomed_code text, icd10_code text)")
        connection.cursor().executemany(
            f"insert into {SCHEMA}.condition values (%s, %s)", CONDITIONS
        )
        connection.execute(f"create table {SCHEMA}.medication_request (rxnorm_code text)")
        connection.execute(f"insert into {SCHEMA}.medication_request values ('197361'), ('1')")
        # A SNOMED CT code the conditions use too: one validation row for both tables.
        connection.execute(f"create table {SCHEMA}.procedure (snomed_code text)")
        connection.execute(f"insert into {SCHEMA}.procedure values ('73761001'), ('38341003')")
        connection.execute(f"create table {SCHEMA}.immunization (cvx_code text)")
        connection.execute(f"insert into {SCHEMA}.immunization values ('208'), ('999'), (null)")
        # Two SNOMED CT columns of one table: the substance and the reaction manifestation.
        connection.execute(
            f"create table {SCHEMA}.allergy_intolerance (snomed_code text, reaction_snomed_code text)"
        )
        connection.execute(
            f"insert into {SCHEMA}.allergy_intolerance values ('91936005', '39579001'), "
            "('91936005', null)"
        )
        # encounter is not loaded: the asset skips it and says so.
    yield warehouse_dsn
    with psycopg.connect(warehouse_dsn) as connection:
        connection.execute(f"drop schema if exists {SCHEMA} cascade")


def _materialize() -> dg.ExecuteInProcessResult:
    return dg.materialize([terminology_code_validation], resources={"platform": PlatformResource()})


def _table(dsn: str) -> dict[tuple[str, str], dict[str, Any]]:
    with psycopg.connect(dsn) as connection, connection.cursor() as cursor:
        cursor.execute(f"select * from {SCHEMA}.{TABLE}")
        names = [column.name for column in cursor.description or []]
        return {(row[0], row[1]): dict(zip(names, row, strict=True)) for row in cursor.fetchall()}


def _check(result: dg.ExecuteInProcessResult) -> dg.AssetCheckEvaluation:
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.check_name == SHARE_CHECK
    return evaluation


def test_the_asset_validates_maps_and_replaces_the_table(raw_tables: str) -> None:
    result = _materialize()
    assert result.success
    table = _table(raw_tables)
    assert len(table) == 17
    assert table[(synth.LOINC, "8302-2")]["is_valid"] is True
    assert table[(synth.LOINC, "8302-2")]["occurrences"] == 40
    assert table[(synth.LOINC, "99999-9")]["is_valid"] is False
    assert table[("http://loinc.org/", "8867-4")]["system_known"] is False
    hypertension = table[(synth.SNOMED, "38341003")]
    assert (hypertension["mapped_system"], hypertension["mapped_code"]) == (synth.ICD10CM, "I10")
    assert (hypertension["occurrences"], hypertension["source_tables"]) == (
        2,
        "condition,procedure",
    )
    assert table[(synth.SNOMED, "73761001")]["is_valid"] is True
    assert table[(synth.CVX, "208")]["is_valid"] is True
    penicillin = table[(synth.SNOMED, "91936005")]
    assert (penicillin["is_valid"], penicillin["occurrences"]) == (True, 2)
    assert penicillin["source_tables"] == "allergy_intolerance"
    assert table[(synth.SNOMED, "39579001")]["is_valid"] is True
    assert table[(synth.CVX, "999")]["is_valid"] is False
    assert table[(synth.CVX, "999")]["system_known"] is True
    assert table[(synth.SNOMED, "11111111")]["is_valid"] is False
    assert table[(synth.ICD10CM, "J45.909")]["is_valid"] is True
    assert table[(synth.RXNORM, "1")]["is_valid"] is False
    assert {row["terminology_service"] for row in table.values()} == {"embedded"}

    (materialization,) = result.asset_materializations_for_node("terminology__code_validation")
    metadata = materialization.metadata
    assert metadata["invalid_codes"].value == 5
    assert metadata["tables_not_loaded"].value == ["encounter"]

    # One planted unknown LOINC code in 81 LOINC rows (98.8 %), 1 of 94 coded rows in an
    # unknown system; SNOMED CT, RxNorm and CVX are below 95 % in this tiny set: a warning only.
    evaluation = _check(result)
    assert not evaluation.passed
    assert evaluation.severity == dg.AssetCheckSeverity.WARN
    by_system = evaluation.metadata["by_code_system"].value
    assert by_system[synth.LOINC]["valid_share"] == pytest.approx(80 / 81, abs=1e-6)
    assert by_system["http://loinc.org/"]["system_known"] is False
    assert set(evaluation.metadata["below_threshold"].value) == {
        synth.SNOMED,
        synth.RXNORM,
        synth.CVX,
    }

    # A re-run replaces the table with the same rows: idempotent.
    assert _materialize().success
    again = _table(raw_tables)
    assert {k: {**v, "validated_at": None} for k, v in again.items()} == {
        k: {**v, "validated_at": None} for k, v in table.items()
    }


def test_the_share_check_passes_within_its_configured_thresholds(
    raw_tables: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STARVIT_TERMINOLOGY_MIN_VALID_SHARE", "0.5")
    evaluation = _check(_materialize())
    assert evaluation.passed, evaluation.description


def test_a_remote_terminology_server_answers_when_configured(
    raw_tables: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with TerminologyServer() as server:
        monkeypatch.setenv("STARVIT_TERMINOLOGY_URL", server.base_url)
        assert _materialize().success
        assert {row["terminology_service"] for row in _table(raw_tables).values()} == {
            server.base_url
        }
        # Validations and translations each went in batch Bundles.
        assert [r.path for r in server.requests] == ["/fhir", "/fhir"]


def test_an_unreachable_terminology_server_fails_the_asset_clearly(
    raw_tables: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with TerminologyServer() as server:
        server.faults.statuses[:] = [503] * 20
        monkeypatch.setenv("STARVIT_TERMINOLOGY_URL", server.base_url)
        monkeypatch.setenv("STARVIT_TERMINOLOGY_TIMEOUT_SECONDS", "2")
        result = dg.materialize(
            [terminology_code_validation],
            resources={"platform": PlatformResource()},
            raise_on_error=False,
        )
    assert not result.success
    (failure,) = [event for event in result.all_events if event.is_step_failure]
    message = failure.step_failure_data.error.message if failure.step_failure_data.error else ""
    description = failure.step_failure_data.user_failure_data
    text = f"{message} {description.description if description else ''}"
    assert "terminology batch of" in text and "(HTTP 503)" in text
