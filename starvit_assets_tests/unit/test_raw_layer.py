"""The raw Parquet layer the gate writes: lineage on every row, zstd-compressed files, and the
reconciliation check counted from the files themselves (so a lost or altered file fails it)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from starvit_assets.deid.engine import content_hashes
from starvit_assets.lake.gate import QUARANTINE_REASON, GateResult, reconcile
from starvit_assets.lake.partitions import RawLake
from starvit_assets_tests.unit.test_gate import KEY, encode, observation, run

# A line that is not JSON, one duplicate key, one held back by the filter, three published.
LINES = [
    encode(observation("o1")),
    encode(observation("o2")),
    b'{"resourceType": "Observation", "id": "cut-off',
    encode(observation("o1")),
    encode(observation("cancelled", status="cancelled")),
    encode(observation("o3")),
]


@pytest.fixture
def result(tmp_path: Path) -> GateResult:
    return run(tmp_path, LINES)


def test_every_row_names_its_export_file_and_line(result: GateResult) -> None:
    for table in (result.table, result.quarantine):
        assert set(table.column("_export_id").to_pylist()) == {"export-1"}
        assert set(table.column("_source_file").to_pylist()) == {"Observation.ndjson"}
    assert result.table.column("_source_line").to_pylist() == [1, 2, 6]
    assert sorted(result.quarantine.column("_source_line").to_pylist()) == [3, 4]


def test_the_content_hash_is_the_keyed_hash_of_the_source_line(result: GateResult) -> None:
    published = result.table.column("_content_hash").to_pylist()
    assert published == content_hashes(KEY, [LINES[0], LINES[1], LINES[5]])
    assert len(set(published)) == 3
    # Keyed: not a plain digest anyone could recompute from a guessed resource.
    assert hashlib.sha256(LINES[0]).hexdigest() not in published
    assert content_hashes(b"another-key-0000000000000000000", [LINES[0]])[0] != published[0]
    # The line that is not JSON still carries its hash, for tracing it in the PHI zone.
    by_line = dict(
        zip(
            result.quarantine.column("_source_line").to_pylist(),
            result.quarantine.column("_content_hash").to_pylist(),
            strict=True,
        )
    )
    assert by_line == dict(zip([3, 4], content_hashes(KEY, [LINES[2], LINES[3]]), strict=True))


def _compressions(path: Path) -> set[str]:
    metadata = pq.ParquetFile(path).metadata
    return {
        metadata.row_group(group).column(column).compression
        for group in range(metadata.num_row_groups)
        for column in range(metadata.num_columns)
    }


def test_partition_and_quarantine_files_are_zstd_compressed(
    tmp_path: Path, result: GateResult
) -> None:
    assert _compressions(result.output) == {"ZSTD"}
    assert _compressions(result.quarantine_output) == {"ZSTD"}
    staged = RawLake(tmp_path / "lake").stage("observation", "export-1", result.table)
    assert _compressions(staged) == {"ZSTD"}


def test_the_files_the_gate_wrote_reconcile_with_the_export(result: GateResult) -> None:
    found = reconcile(result.counts(), len(LINES), result.output, result.quarantine_output)
    assert found.passed, found.problems
    assert (found.rows_in_output, found.rows_in_quarantine, found.lines_in_quarantine) == (3, 1, 1)


def test_a_missing_quarantine_file_fails_reconciliation(result: GateResult) -> None:
    result.quarantine_output.unlink()
    found = reconcile(result.counts(), len(LINES), result.output, result.quarantine_output)
    assert not found.passed
    assert found.problems == ("quarantine.parquet: the quarantine file is missing or unreadable",)


def test_a_partition_file_that_lost_a_row_fails_reconciliation(result: GateResult) -> None:
    pq.write_table(result.table.slice(1), result.output, compression="zstd")
    found = reconcile(result.counts(), len(LINES), result.output, result.quarantine_output)
    assert found.problems == (
        "rows flattened (5) != rows in the partition file (2) + row-level rows in the "
        "quarantine file (1) + held back (1)",
        "rows published: the gate counted 3, the files hold 2",
    )


def test_a_truncated_partition_file_fails_reconciliation(result: GateResult) -> None:
    data = result.output.read_bytes()
    result.output.write_bytes(data[: len(data) // 2])
    found = reconcile(result.counts(), len(LINES), result.output, result.quarantine_output)
    assert found.problems == ("out.parquet: the partition file is missing or unreadable",)


def test_a_line_level_quarantine_row_passed_off_as_a_row_fails(result: GateResult) -> None:
    quarantine = result.quarantine
    reasons = [
        "observation_id: duplicate key" if str(reason).startswith("line: ") else reason
        for reason in quarantine.column(QUARANTINE_REASON).to_pylist()
    ]
    index = quarantine.schema.get_field_index(QUARANTINE_REASON)
    altered = quarantine.set_column(index, QUARANTINE_REASON, pa.array(reasons, pa.string()))
    pq.write_table(altered, result.quarantine_output)
    found = reconcile(result.counts(), len(LINES), result.output, result.quarantine_output)
    assert not found.passed
    assert "lines quarantined: the gate counted 1, the files hold 0" in found.problems


def test_a_line_the_gate_never_read_fails_reconciliation(result: GateResult) -> None:
    found = reconcile(result.counts(), len(LINES) + 1, result.output, result.quarantine_output)
    assert found.problems[0] == f"lines exported ({len(LINES) + 1}) != lines read ({len(LINES)})"
