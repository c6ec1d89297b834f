"""Linkage records from a patient table: the lake's de-identified rows, or (for evaluation on
synthetic data) raw FHIR Patients tokenised as the gate does, with their raw ids."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from starvit_assets.deid.policy import Policy, load_policy
from starvit_assets.linkage.match import LinkageRecord
from starvit_assets.linkage.tokens import token_columns
from starvit_assets.views.runner import compile_view, shipped_views

PATIENT_TABLE = "patient"
LINK_COLUMN = "link_patient_id"


def token_names(policy: Policy) -> tuple[str, ...]:
    spec = policy.table(PATIENT_TABLE).linkage_tokens
    return spec.tokens if spec else ()


def records_from_table(
    table: pa.Table, source: str, tokens: tuple[str, ...]
) -> list[LinkageRecord]:
    """One record per row; a patient id that repeats keeps its last row (the latest version)."""
    present = [name for name in tokens if name in table.column_names]
    ids = table.column("patient_id").to_pylist()
    links = (
        table.column(LINK_COLUMN).to_pylist()
        if LINK_COLUMN in table.column_names
        else [None] * table.num_rows
    )
    values = {name: table.column(name).to_pylist() for name in present}
    latest: dict[str, LinkageRecord] = {}
    for row, patient_id in enumerate(ids):
        if patient_id is None:
            continue
        latest[patient_id] = LinkageRecord(
            source=source,
            patient_id=patient_id,
            tokens={name: values[name][row] for name in present},
            linked_patient_ids=(links[row],) if links[row] else (),
        )
    return list(latest.values())


def _patients(folder: Path) -> Iterator[dict]:
    with (folder / "Patient.ndjson").open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)


def tokenised_source(folder: Path, key: bytes, policy: Policy | None = None) -> pa.Table:
    """The raw patient view of a folder of NDJSON plus its linkage tokens (PHI-zone only:
    the ids are raw; for evaluating the rules against a synthetic truth)."""
    policy = policy or load_policy()
    spec = policy.table(PATIENT_TABLE).linkage_tokens
    if spec is None:
        raise ValueError("the policy computes no linkage tokens for the patient table")
    view = compile_view(shipped_views()[PATIENT_TABLE])
    rows = [row for patient in _patients(folder) for row in view.rows(patient)]
    table = pa.Table.from_pylist(rows, schema=view.arrow_schema())
    for name, column in token_columns(key, spec, table).items():
        table = table.append_column(name, column)
    return table.select(["patient_id", LINK_COLUMN, *spec.tokens])
