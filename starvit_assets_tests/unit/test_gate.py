"""The de-identification gate without Dagster: quarantine, record filter, reconciliation."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from starvit_assets.deid.engine import LocalDeidEngine
from starvit_assets.deid.kanonymity import k_anonymity
from starvit_assets.deid.policy import load_policy
from starvit_assets.lake.filters import FilterError, load_filters, record_filter
from starvit_assets.lake.gate import QUARANTINE_REASON, GateResult, build_gate
from starvit_assets.views.runner import shipped_views

KEY = b"gate-test-key-000000000000000000"
EXPORT_DATE = dt.date(2026, 6, 1)


def observation(identifier: str, **changes: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": identifier,
        "meta": {"versionId": "1", "lastUpdated": "2025-01-02T03:04:05Z"},
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2025-01-02T10:00:00+02:00",
        "valueQuantity": {"value": 70.5, "unit": "kg", "system": "http://unitsofmeasure.org"},
    }
    resource.update(changes)
    return resource


def run(
    tmp_path: Path,
    lines: list[bytes],
    table: str = "observation",
    workers: int = 1,
    research_opt_outs: frozenset[str] = frozenset(),
) -> GateResult:
    source = tmp_path / "Observation.ndjson"
    source.write_bytes(b"\n".join(lines) + b"\n")
    policy = load_policy()
    gate = build_gate(
        table_name=table,
        view=shipped_views()[table],
        backend=LocalDeidEngine(KEY, policy, reference_date=EXPORT_DATE),
        policy=policy,
        key=KEY,
        export_date=EXPORT_DATE,
        workers=workers,
        research_opt_outs=research_opt_outs,
    )
    return gate.run([source], "export-1", tmp_path / "out.parquet", tmp_path / "quarantine.parquet")


def encode(resource: dict[str, Any]) -> bytes:
    return json.dumps(resource).encode()


def test_clean_input_is_published_whole(tmp_path: Path) -> None:
    result = run(tmp_path, [encode(observation(f"o{i}")) for i in range(5)])
    assert result.rows == 5
    assert result.quarantine.num_rows == 0
    assert result.held_back == {}
    assert result.reconciles()
    assert result.table.column("_source_line").to_pylist() == [1, 2, 3, 4, 5]
    assert set(result.table.column("_policy_version").to_pylist()) == {load_policy().version}


def test_every_bad_line_is_quarantined_with_its_reason_and_counts_reconcile(
    tmp_path: Path,
) -> None:
    lines = [
        encode(observation("good")),
        encode(observation("bad-date", effectiveDateTime="2023-02-30T10:00:00Z")),
        encode(observation("good")),  # the same key again
        b'{"resourceType": "Observation", "id": "cut-off',
        encode({"resourceType": "Patient", "id": "p1"}),
        encode(observation("restricted", meta={"security": [{"code": "R"}]})),
        encode(observation("cancelled", status="cancelled")),
        encode(observation("future", effectiveDateTime="2030-01-01")),
        encode(observation("no-subject", subject=None)),
    ]
    result = run(tmp_path, lines)

    assert result.table.column("_source_line").to_pylist() == [1]
    assert result.quarantine_reasons == {
        "effective_datetime: not a FHIR date": 1,
        "line: not valid JSON": 1,
        "line: resource type is not Observation": 1,
        "observation_id: duplicate key": 1,
    }
    assert result.held_back == {
        "effective_datetime after export": 1,
        "missing patient_id": 1,
        "security label R": 1,
        "status not allowed": 1,
    }
    # Each held-back record is listed for retraction (PHI zone: plain id), by kind of hold.
    assert sorted(result.retracted) == [
        ("Observation", "cancelled", "status"),
        ("Observation", "future", "date_range"),
        ("Observation", "no-subject", "missing_element"),
        ("Observation", "restricted", "security_label"),
    ]
    assert result.resources_read == 9
    assert result.lines_quarantined == 2
    assert result.rows_quarantined == 2
    assert result.reconciles()
    by_line = dict(
        zip(
            result.quarantine.column("_source_line").to_pylist(),
            result.quarantine.column(QUARANTINE_REASON).to_pylist(),
            strict=True,
        )
    )
    assert by_line[4] == "line: not valid JSON"
    # The malformed date never crosses, shifted or not.
    bad_date_row = result.quarantine.filter(
        pa.compute.equal(result.quarantine.column("_source_line"), 2)
    )
    assert bad_date_row.column("effective_datetime").to_pylist() == [None]


def test_quarantine_holds_no_source_content(tmp_path: Path) -> None:
    secret = "Zebulon Quarantinetest"
    lines = [
        encode(observation("x1", note=[{"text": secret}])),
        b'{"resourceType": "Observation", "id": "' + secret.encode(),
        encode(observation("x1", note=[{"text": secret}])),
    ]
    result = run(tmp_path, lines)
    assert result.quarantine.num_rows == 2
    cells = [str(cell) for column in result.quarantine.columns for cell in column.to_pylist()]
    assert not any("Zebulon" in cell or cell == "x1" for cell in cells)


def test_quarantine_and_output_share_a_schema_apart_from_the_reason(tmp_path: Path) -> None:
    result = run(tmp_path, [encode(observation("a")), b"not json"])
    assert result.quarantine.schema.names == [*result.table.schema.names, QUARANTINE_REASON]


def test_filter_refuses_columns_the_view_does_not_have() -> None:
    config = load_filters().model_copy(
        update={
            "tables": {
                "observation": load_filters()
                .tables["observation"]
                .model_copy(update={"required": ("no_such_column",)})
            }
        }
    )
    with pytest.raises(FilterError, match="no_such_column"):
        record_filter(config, "observation", EXPORT_DATE).check_columns(["observation_id"])


def test_filter_configuration_errors_name_the_place(tmp_path: Path) -> None:
    broken = tmp_path / "filters.yaml"
    broken.write_text("version: '1'\ntables:\n  observation:\n    required: 5\n")
    with pytest.raises(FilterError, match=r"tables\.observation\.required"):
        load_filters(broken)


def test_k_anonymity_counts_small_classes() -> None:
    rows = pa.table(
        {
            "birth_year": [1980, 1980, 1980, 1990, None],
            "gender": ["female", "female", "female", "male", None],
            "postal_code_3": ["021", "021", "021", "100", None],
        }
    )
    report = k_anonymity(rows, ("birth_year", "gender", "postal_code_3"), k=3)
    assert (report.classes, report.smallest_class, report.classes_below_k) == (3, 1, 2)
    assert report.records_below_k == 2
    assert not report.satisfied
    assert k_anonymity(rows.slice(0, 3), ("birth_year", "gender", "postal_code_3"), 3).satisfied


def test_batches_split_the_input_without_changing_the_outcome(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import starvit_assets.lake.gate as gate_module

    lines = [encode(observation(f"o{i % 7}")) for i in range(20)] + [b"not json"]
    (tmp_path / "whole").mkdir()
    (tmp_path / "batched").mkdir()
    whole = run(tmp_path / "whole", lines)
    monkeypatch.setattr(gate_module, "BATCH_LINES", 3)
    batched = run(tmp_path / "batched", lines)
    assert batched.counts() == whole.counts()
    assert batched.table.equals(whole.table)
    assert batched.quarantine_reasons == {
        "line: not valid JSON": 1,
        "observation_id: duplicate key": 13,
    }
    assert batched.reconciles()


def test_worker_processes_give_the_same_partition_in_the_same_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import starvit_assets.lake.gate as gate_module

    lines = [
        encode(observation(f"o{i % 11}", subject={"reference": f"Patient/p{i % 3}"}))
        for i in range(40)
    ]
    lines[7] = b"not json"
    lines[20] = b""
    lines[21] = encode(observation("cancelled", status="cancelled"))
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    monkeypatch.setattr(gate_module, "BATCH_LINES", 4)
    alone = run(tmp_path / "one", lines)
    parallel = run(tmp_path / "two", lines, workers=2)
    assert parallel.counts() == alone.counts()
    assert parallel.table.equals(alone.table)
    assert parallel.quarantine.equals(alone.quarantine)
    assert parallel.table.column("_source_line").to_pylist() == sorted(
        parallel.table.column("_source_line").to_pylist()
    )
    assert parallel.quarantine_reasons["observation_id: duplicate key"] == 37 - 11
    assert parallel.held_back == {"status not allowed": 1}
    assert parallel.retracted == alone.retracted == (("Observation", "cancelled", "status"),)
    assert parallel.reconciles()


def test_an_opted_out_patients_records_are_not_listed_one_by_one(tmp_path: Path) -> None:
    # The opt-out retracts the Patient (every row naming it); only a hold of the record itself
    # lists the record.
    lines = [
        observation("mine", subject={"reference": "Patient/opted-out"}),
        observation("mine-too", subject={"reference": "Patient/opted-out"}, status="cancelled"),
        observation("theirs", status="entered-in-error"),
        observation("kept"),
    ]
    result = run(
        tmp_path, [encode(line) for line in lines], research_opt_outs=frozenset({"opted-out"})
    )
    assert result.held_back == {"consent: research opt-out": 2, "status not allowed": 1}
    assert result.retracted == (("Observation", "theirs", "status"),)
    # The counts saved beside the partition (research zone) name no id.
    result.counts().save(tmp_path)
    saved = (tmp_path / "gate-counts.json").read_text()
    assert "theirs" not in saved and "opted-out" not in saved


def test_source_lines_count_blank_lines_and_crlf(tmp_path: Path) -> None:
    source = tmp_path / "Observation.ndjson"
    source.write_bytes(
        encode(observation("a"))
        + b"\r\n\r\n"
        + encode(observation("b"))
        + b"\n\n\n"
        + encode(observation("c"))
    )
    policy = load_policy()
    gate = build_gate(
        table_name="observation",
        view=shipped_views()["observation"],
        backend=LocalDeidEngine(KEY, policy, reference_date=EXPORT_DATE),
        policy=policy,
        key=KEY,
        export_date=EXPORT_DATE,
    )
    result = gate.run([source], "e", tmp_path / "out.parquet", tmp_path / "q.parquet")
    assert result.resources_read == 3
    assert result.table.column("_source_line").to_pylist() == [1, 3, 6]


def test_a_worker_that_dies_fails_the_gate_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    import starvit_assets.lake.gate as gate_module
    from starvit_assets.lake.gate import GateError

    def die(self: object, chunk: object, job: object) -> None:
        os._exit(9)

    monkeypatch.setattr(gate_module, "BATCH_LINES", 2)
    monkeypatch.setattr(gate_module.Gate, "_first_pass", die)
    with pytest.raises(GateError, match="a gate worker process died"):
        run(tmp_path, [encode(observation(f"o{i}")) for i in range(6)], workers=2)
