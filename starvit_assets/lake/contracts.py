"""Data contracts of the raw tables as pandera schemas: types, nullability, keys, allowed values.

The column types come from the de-identified Arrow schema; the rules below add what a type
cannot say. Failures are reported by column and check only, never by cell value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

if TYPE_CHECKING:
    import pandera.pandas as pa_schema

LINEAGE_COLUMNS = ("_export_id", "_source_file", "_source_line", "_content_hash", "_policy_version")
GENDERS = ("male", "female", "other", "unknown")


@dataclass(frozen=True)
class TableContract:
    table: str
    key: str
    required: tuple[str, ...] = ()
    allowed: dict[str, tuple[str, ...]] = field(default_factory=dict)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    grain: str = ""

    def describe(self) -> dict[str, str]:
        return {
            "grain": self.grain,
            "key": self.key,
            "required": ", ".join(self.required),
        }


CONTRACTS: dict[str, TableContract] = {
    "patient": TableContract(
        "patient",
        key="patient_id",
        allowed={"gender": GENDERS},
        ranges={"birth_year": (1850, 2100)},
        grain="one row per Patient resource version in an export",
    ),
    "encounter": TableContract(
        "encounter",
        key="encounter_id",
        required=("patient_id",),
        grain="one row per Encounter resource version in an export",
    ),
    "observation": TableContract(
        "observation",
        key="observation_id",
        required=("patient_id",),
        grain="one row per Observation resource version in an export",
    ),
    "condition": TableContract(
        "condition",
        key="condition_id",
        required=("patient_id",),
        grain="one row per Condition resource version in an export",
    ),
    "medication_request": TableContract(
        "medication_request",
        key="medication_request_id",
        required=("patient_id",),
        grain="one row per MedicationRequest resource version in an export",
    ),
    "procedure": TableContract(
        "procedure",
        key="procedure_id",
        required=("patient_id",),
        grain="one row per Procedure resource version in an export",
    ),
    "immunization": TableContract(
        "immunization",
        key="immunization_id",
        required=("patient_id",),
        grain="one row per Immunization resource version in an export",
    ),
    "allergy_intolerance": TableContract(
        "allergy_intolerance",
        key="allergy_intolerance_id",
        required=("patient_id",),
        # FHIR R4 binds these code elements to their value sets as required: a conformant
        # server sends nothing else, so another value is quarantined, not guessed at.
        allowed={
            "type": ("allergy", "intolerance"),
            "criticality": ("low", "high", "unable-to-assess"),
            "reaction_severity": ("mild", "moderate", "severe"),
        },
        grain="one row per AllergyIntolerance resource version in an export",
    ),
}


class ContractViolation(Exception):
    pass


def _dtype(arrow_type: pa.DataType) -> str:
    if pa.types.is_boolean(arrow_type):
        return "boolean"
    if pa.types.is_integer(arrow_type):
        return "Int64"
    if pa.types.is_floating(arrow_type):
        return "float64"
    return "string"


def pandera_schema(
    contract: TableContract, arrow_schema: pa.Schema, *, unique_key: bool = True
) -> pa_schema.DataFrameSchema:
    # pandera (and pandas) load only for the contract check: the gate needs neither.
    import pandera.pandas as pa_schema

    columns: dict[str, pa_schema.Column] = {}
    for arrow_field in arrow_schema:
        name = arrow_field.name
        checks: list[pa_schema.Check] = []
        if name in contract.allowed:
            checks.append(pa_schema.Check.isin(list(contract.allowed[name])))
        if name in contract.ranges:
            low, high = contract.ranges[name]
            checks.append(pa_schema.Check.in_range(low, high))
        columns[name] = pa_schema.Column(
            _dtype(arrow_field.type),
            checks=checks,
            nullable=not (
                name == contract.key or name in contract.required or name in LINEAGE_COLUMNS
            ),
            unique=unique_key and name == contract.key,
        )
    return pa_schema.DataFrameSchema(columns, strict=True, coerce=False)


def validate_file(contract: TableContract, path: Path, batch_rows: int = 50_000) -> list[str]:
    """Contract failures of a Parquet file as 'column: check (n rows)' strings; empty when it
    conforms. Read batch by batch: memory stays bounded by one batch (and the key column, read
    alone for uniqueness across the whole file)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    counts = _failure_counts(contract, parquet.schema_arrow.empty_table(), unique_key=False)
    for record_batch in parquet.iter_batches(batch_rows):
        batch = pa.Table.from_batches([record_batch])
        for name, count in _failure_counts(contract, batch, unique_key=False).items():
            counts[name] = counts.get(name, 0) + count
    keys = pq.read_table(path, columns=[contract.key]).column(contract.key).combine_chunks()
    repeated = int(pc.sum(later_duplicates(keys)).as_py() or 0)
    if repeated:
        counts[f"{contract.key}: field_uniqueness"] = repeated
    return [f"{name} ({count} rows)" for name, count in sorted(counts.items())]


def _failure_counts(
    contract: TableContract, table: pa.Table, *, unique_key: bool = True
) -> dict[str, int]:
    import pandera.pandas as pa_schema

    frame = table.to_pandas(types_mapper=_pandas_type)
    try:
        pandera_schema(contract, table.schema, unique_key=unique_key).validate(frame, lazy=True)
    except pa_schema.errors.SchemaErrors as errors:
        grouped = errors.failure_cases.groupby(["column", "check"], dropna=False).size()
        return {f"{column}: {check}": int(count) for (column, check), count in grouped.items()}
    return {}


def _pandas_type(arrow_type: pa.DataType) -> object:
    import pandas as pd

    if pa.types.is_string(arrow_type):
        return pd.StringDtype()
    if pa.types.is_integer(arrow_type):
        return pd.Int64Dtype()
    if pa.types.is_boolean(arrow_type):
        return pd.BooleanDtype()
    return None


def row_violations(
    contract: TableContract, table: pa.Table, duplicates: pa.Array | None = None
) -> pa.Array:
    """Per row, the first contract rule it breaks (null where it conforms).

    ``duplicates`` marks rows whose key an earlier row has, when the caller sees the table in
    batches; without it, duplicates are found within ``table``. The reasons name a column and a
    rule, never a value, so they may cross into the quarantine.
    """
    import pyarrow.compute as pc

    reason = pa.nulls(table.num_rows, pa.string())

    def mark(failing: pa.Array, text: str) -> None:
        nonlocal reason
        failing = pc.and_(pc.is_null(reason), pc.fill_null(failing, False))
        reason = pc.if_else(failing, pa.scalar(text, pa.string()), reason)

    for name in (contract.key, *contract.required):
        mark(pc.is_null(table.column(name)), f"{name}: required value missing")
    for name, allowed in contract.allowed.items():
        values = table.column(name).cast(pa.string())
        mark(
            pc.and_(pc.is_valid(values), pc.invert(pc.is_in(values, pa.array(allowed)))),
            f"{name}: value not allowed",
        )
    for name, (low, high) in contract.ranges.items():
        values = table.column(name)
        mark(pc.or_(pc.less(values, low), pc.greater(values, high)), f"{name}: out of range")
    if duplicates is None:
        duplicates = later_duplicates(table.column(contract.key).combine_chunks())
    mark(duplicates, f"{contract.key}: duplicate key")
    return reason


def later_duplicates(keys: pa.Array) -> pa.Array:
    """True for every row whose key an earlier row already has (the first one may publish)."""
    import pyarrow.compute as pc

    positions = pa.array(range(len(keys)), pa.int64())
    first = (
        pa.table({"key": keys, "row": positions})
        .group_by("key", use_threads=False)
        .aggregate([("row", "min")])
        .column("row_min")
    )
    return pc.and_(pc.is_valid(keys), pc.invert(pc.is_in(positions, value_set=first)))
