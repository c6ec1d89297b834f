"""Data contracts of the raw tables as pandera schemas: types, nullability, keys, allowed values.

The columns and their types come from the schema a partition must have (the view's columns as
the de-identification backend publishes them, then lineage: ``lake.gate.published_schema``),
never from the file under check; the rules below add what a type cannot say. Failures are
reported by column and check only, never by cell value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from starvit_assets.lake.filters import HOLD_KINDS
from starvit_assets.lake.keys import SeenKeys

if TYPE_CHECKING:
    import pandera.pandas as pa_schema

LINEAGE_COLUMNS = ("_export_id", "_source_file", "_source_line", "_content_hash", "_policy_version")
# FHIR R4 required value sets (http://hl7.org/fhir/R4/valueset-*.html) of the coded columns the
# shipped views select; a code outside them is a source error, quarantined as "value not allowed".
GENDERS = ("male", "female", "other", "unknown")  # administrative-gender
OBSERVATION_STATUSES = (  # observation-status
    "registered",
    "preliminary",
    "final",
    "amended",
    "corrected",
    "cancelled",
    "entered-in-error",
    "unknown",
)
CONDITION_CLINICAL_STATUSES = (  # condition-clinical
    "active",
    "recurrence",
    "relapse",
    "inactive",
    "remission",
    "resolved",
)
CONDITION_VERIFICATION_STATUSES = (  # condition-ver-status
    "unconfirmed",
    "provisional",
    "differential",
    "confirmed",
    "refuted",
    "entered-in-error",
)
ENCOUNTER_STATUSES = (  # encounter-status
    "planned",
    "arrived",
    "triaged",
    "in-progress",
    "onleave",
    "finished",
    "cancelled",
    "entered-in-error",
    "unknown",
)
MEDICATION_REQUEST_STATUSES = (  # medicationrequest-status
    "active",
    "on-hold",
    "cancelled",
    "completed",
    "entered-in-error",
    "stopped",
    "draft",
    "unknown",
)
PROCEDURE_STATUSES = (  # event-status
    "preparation",
    "in-progress",
    "not-done",
    "on-hold",
    "stopped",
    "completed",
    "entered-in-error",
    "unknown",
)
IMMUNIZATION_STATUSES = ("completed", "entered-in-error", "not-done")  # immunization-status


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
        allowed={"status": ENCOUNTER_STATUSES},
        grain="one row per Encounter resource version in an export",
    ),
    "observation": TableContract(
        "observation",
        key="observation_id",
        required=("patient_id",),
        allowed={"status": OBSERVATION_STATUSES},
        grain="one row per Observation resource version in an export",
    ),
    "condition": TableContract(
        "condition",
        key="condition_id",
        required=("patient_id",),
        allowed={
            "clinical_status": CONDITION_CLINICAL_STATUSES,
            "verification_status": CONDITION_VERIFICATION_STATUSES,
        },
        grain="one row per Condition resource version in an export",
    ),
    "medication_request": TableContract(
        "medication_request",
        key="medication_request_id",
        required=("patient_id",),
        allowed={"status": MEDICATION_REQUEST_STATUSES},
        grain="one row per MedicationRequest resource version in an export",
    ),
    "procedure": TableContract(
        "procedure",
        key="procedure_id",
        required=("patient_id",),
        allowed={"status": PROCEDURE_STATUSES},
        grain="one row per Procedure resource version in an export",
    ),
    "immunization": TableContract(
        "immunization",
        key="immunization_id",
        required=("patient_id",),
        allowed={"status": IMMUNIZATION_STATUSES},
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


# Why a resource leaves the warehouse (lake/deletions.py): a deleted[] entry, or a retraction by
# the gate, named after the kind of the record filter's rule that held its new version back.
DELETED = "deleted"
DELETION_REASONS = (DELETED, *HOLD_KINDS)
DELETIONS_CONTRACT = TableContract(
    "deleted_resource",
    # Tokens of different types never collide (the type is hashed in), so the id alone is a key.
    key="resource_id",
    required=("resource_type", "reason", "export_transaction_time"),
    allowed={"reason": DELETION_REASONS},
    grain="one row per deleted or retracted resource in an export",
)


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


def validate_file(
    contract: TableContract, path: Path, expected: pa.Schema, batch_rows: int = 50_000
) -> list[str]:
    """Contract failures of a Parquet file against the ``expected`` schema, as
    'column: check (n rows)' strings, or 'column: check (schema)' for a column missing, extra or
    of another type; empty when it conforms. Read batch by batch: memory stays bounded by one
    batch (and the keys seen, about 16 bytes each: ``keys.SeenKeys``)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    # The file's schema alone (no rows) fails on what it declares: reported once, not per batch.
    schema_failures = set(
        _failure_counts(contract, parquet.schema_arrow.empty_table(), expected, unique_key=False)
    )
    counts: dict[str, int] = {}
    for record_batch in parquet.iter_batches(batch_rows):
        batch = pa.Table.from_batches([record_batch])
        for name, count in _failure_counts(contract, batch, expected, unique_key=False).items():
            if name not in schema_failures:
                counts[name] = counts.get(name, 0) + count
    if contract.key in parquet.schema_arrow.names:
        seen = SeenKeys()
        repeated = sum(
            int(pc.sum(seen.later_duplicates(keys.column(0))).as_py() or 0)
            for keys in parquet.iter_batches(batch_rows, columns=[contract.key])
        )
        if repeated:
            counts[f"{contract.key}: field_uniqueness"] = repeated
    return sorted(f"{name} (schema)" for name in schema_failures) + [
        f"{name} ({count} rows)" for name, count in sorted(counts.items())
    ]


def _failure_counts(
    contract: TableContract, table: pa.Table, expected: pa.Schema, *, unique_key: bool = True
) -> dict[str, int]:
    import pandera.pandas as pa_schema

    frame = table.to_pandas(types_mapper=_pandas_type)
    try:
        pandera_schema(contract, expected, unique_key=unique_key).validate(frame, lazy=True)
    except pa_schema.errors.SchemaErrors as errors:
        cases = errors.failure_cases
        # A column extra or missing is reported with no column and its name as the failure case
        # (a column name is no PHI, and says which one).
        about_a_column = cases["column"].isna() & cases["check"].isin(
            ["column_in_schema", "column_in_dataframe"]
        )
        cases.loc[about_a_column, "column"] = cases.loc[about_a_column, "failure_case"]
        grouped = cases.groupby(["column", "check"], dropna=False).size()
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
