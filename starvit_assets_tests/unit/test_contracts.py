"""The pandera contracts of the raw tables: a partition file that breaks one fails the check,
with a message that names the column and the rule and never a value."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from starvit_assets.deid.engine import LocalDeidEngine
from starvit_assets.deid.policy import load_policy
from starvit_assets.lake.contracts import CONTRACTS, validate_file
from starvit_assets.lake.filters import load_filters
from starvit_assets.lake.gate import published_schema
from starvit_assets.linkage.tokens import with_linkage_tokens
from starvit_assets.views.runner import shipped_views
from starvit_assets_tests.unit.test_gate import EXPORT_DATE, KEY, encode, observation, run

# Looks like PHI; the tests plant it in the failing cells and look for it in the messages.
PHI = "Quillon Canarywood"


def expected(table: str) -> pa.Schema:
    policy = load_policy()
    backend = with_linkage_tokens(
        LocalDeidEngine(KEY, policy, reference_date=EXPORT_DATE), policy, lambda: KEY
    )
    return published_schema(table, shipped_views()[table], backend)


@pytest.fixture
def partition(tmp_path: Path) -> pa.Table:
    """A partition the gate published from three clean Observations."""
    return run(tmp_path, [encode(observation(f"o{i}")) for i in range(3)]).table


def failures(tmp_path: Path, table: pa.Table) -> list[str]:
    path = tmp_path / "broken.parquet"
    pq.write_table(table, path)
    found = validate_file(CONTRACTS["observation"], path, expected("observation"))
    assert all(PHI.casefold() not in failure.casefold() for failure in found)
    return found


def replaced(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    index = table.schema.get_field_index(name)
    return table.set_column(index, pa.field(name, values.type), values)


def test_a_partition_the_gate_wrote_conforms(tmp_path: Path, partition: pa.Table) -> None:
    assert partition.schema == expected("observation")
    assert failures(tmp_path, partition) == []


def test_a_column_of_the_wrong_type_fails_once_for_the_file(
    tmp_path: Path, partition: pa.Table
) -> None:
    broken = replaced(partition, "value_quantity", pa.array(["70.5", PHI, PHI]))
    assert failures(tmp_path, broken) == ["value_quantity: dtype('float64') (schema)"]


def test_a_lineage_column_of_the_wrong_type_fails(tmp_path: Path, partition: pa.Table) -> None:
    broken = replaced(partition, "_source_line", pa.array(["1", "2", PHI]))
    assert failures(tmp_path, broken) == ["_source_line: dtype('Int64') (schema)"]


def test_a_column_extra_or_missing_fails_by_name(tmp_path: Path, partition: pa.Table) -> None:
    extra = partition.append_column("patient_name", pa.array([PHI] * 3))
    assert failures(tmp_path, extra) == ["patient_name: column_in_schema (schema)"]
    missing = partition.drop_columns(["_content_hash"])
    assert failures(tmp_path, missing) == ["_content_hash: column_in_dataframe (schema)"]


def test_a_null_key_and_a_duplicate_key_fail_with_their_row_counts(
    tmp_path: Path, partition: pa.Table
) -> None:
    broken = replaced(partition, "observation_id", pa.array([None, PHI, PHI], pa.string()))
    assert failures(tmp_path, broken) == [
        "observation_id: field_uniqueness (1 rows)",
        "observation_id: not_nullable (1 rows)",
    ]


def test_a_null_required_column_fails(tmp_path: Path, partition: pa.Table) -> None:
    broken = replaced(partition, "patient_id", pa.array([None, None, "p"], pa.string()))
    assert failures(tmp_path, broken) == ["patient_id: not_nullable (2 rows)"]


def test_a_status_outside_the_fhir_value_set_fails(tmp_path: Path, partition: pa.Table) -> None:
    broken = replaced(partition, "status", pa.array(["final", PHI, "done"]))
    (failure,) = failures(tmp_path, broken)
    assert failure.startswith("status: isin(") and failure.endswith("(2 rows)")
    assert "'entered-in-error'" in failure


def test_rows_are_counted_across_batches(tmp_path: Path, partition: pa.Table) -> None:
    broken = replaced(partition, "status", pa.array([PHI] * 3))
    path = tmp_path / "broken.parquet"
    pq.write_table(broken, path)
    found = validate_file(CONTRACTS["observation"], path, expected("observation"), batch_rows=1)
    assert len(found) == 1 and found[0].endswith("(3 rows)")


@pytest.mark.parametrize(
    ("table", "column"),
    [
        ("observation", "status"),
        ("condition", "clinical_status"),
        ("condition", "verification_status"),
        ("encounter", "status"),
        ("medication_request", "status"),
        ("procedure", "status"),
        ("immunization", "status"),
    ],
)
def test_every_status_column_of_the_shipped_views_has_its_value_set(
    table: str, column: str
) -> None:
    contract = CONTRACTS[table]
    assert column in expected(table).names
    assert column in contract.allowed
    # The record filter lets through only statuses the contract allows: its allowlist is
    # narrower, never a way around the value set.
    status = load_filters().tables[table].status
    if status is not None and status.column == column:
        assert set(status.allowed) <= set(contract.allowed[column])


def condition(identifier: str, clinical_status: str) -> dict[str, object]:
    def coded(system: str, code: str) -> dict[str, object]:
        return {
            "coding": [{"system": f"http://terminology.hl7.org/CodeSystem/{system}", "code": code}]
        }

    return {
        "resourceType": "Condition",
        "id": identifier,
        "meta": {"versionId": "1", "lastUpdated": "2025-01-02T03:04:05Z"},
        "clinicalStatus": coded("condition-clinical", clinical_status),
        "verificationStatus": coded("condition-ver-status", "confirmed"),
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
        "subject": {"reference": "Patient/p1"},
    }


def test_the_gate_quarantines_a_row_whose_status_is_outside_the_value_set(
    tmp_path: Path,
) -> None:
    lines = [encode(condition("c1", "active")), encode(condition("c2", PHI))]
    result = run(tmp_path, lines, table="condition")
    assert result.rows == 1
    assert result.quarantine_reasons == {"clinical_status: value not allowed": 1}
