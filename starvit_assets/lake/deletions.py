"""Deletions an export reported, carried across the de-identification gate.

A Bulk Data export with ``_since`` lists the resources deleted since then in its manifest's
``deleted[]``: NDJSON files of transaction Bundles whose entries have ``request.method`` DELETE
and ``request.url`` ``[base]/Type/id``. The client keeps them in the staged export as
``_deleted.<n>.ndjson``. Here they become one row per deleted resource:

* ``resource_type``: kept (a FHIR type name, not PHI);
* ``resource_id``: pseudonymised by the configured backend exactly as the gate pseudonymises
  that type's id (the policy rule ``pseudonymise(<Type>)``), so it equals the refined table's id;
* ``export_transaction_time``: the manifest's transactionTime. The deletion's own time
  (``Bundle.meta.lastUpdated``, when a server sends one) is not carried: a per-resource time
  could only be date-shifted with the patient as context, which a deletion does not name, and
  the export's time is already public in every row's ``_export_id``;
* the lineage columns of every raw table (``_content_hash`` is the keyed hash of the Bundle line).

A line that is no Bundle with a DELETE entry, and an entry whose type is no FHIR type name or
whose id is empty, is counted by reason and never written; the same resource listed twice in
one export is one row (counted as a duplicate).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from starvit_assets.deid.engine import DeidBackend, content_hash
from starvit_assets.deid.policy import ColumnRule, Policy, TablePolicy
from starvit_assets.fhir.client import deleted_references_in_line

DELETIONS_TABLE = "deleted_resource"
RESOURCE_ID = "resource_id"
_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{0,63}$")
_RESOURCE_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")

DELETIONS_SCHEMA = pa.schema(
    [
        ("resource_type", pa.string()),
        (RESOURCE_ID, pa.string()),
        ("export_transaction_time", pa.string()),
        ("_export_id", pa.string()),
        ("_source_file", pa.string()),
        ("_source_line", pa.int64()),
        ("_content_hash", pa.string()),
        ("_policy_version", pa.string()),
    ]
)


@dataclass
class DeletionCounts:
    """Every line and entry read ends as a row or under a counted reason."""

    lines_read: int = 0
    lines_without_deletions: int = 0
    entries: int = 0
    rows: int = 0
    duplicates: int = 0
    refused: dict[str, int] = field(default_factory=dict)

    @property
    def reconciles(self) -> bool:
        return self.entries == self.rows + self.duplicates + sum(self.refused.values())


def deletion_table_name(resource_type: str) -> str:
    """The policy table through which one type's deleted ids are pseudonymised."""
    return f"{DELETIONS_TABLE}__{resource_type}"


def deletion_policy(policy: Policy, resource_types: Sequence[str]) -> Policy:
    """The gate's policy narrowed to one rule per type: ``resource_id`` pseudonymised with that
    type, as the view tables pseudonymise their own ids. Same version and key."""
    tables = {
        deletion_table_name(resource_type): TablePolicy(
            date_shift_context=RESOURCE_ID,
            columns={RESOURCE_ID: ColumnRule(method="pseudonymise", resource_type=resource_type)},
        )
        for resource_type in resource_types
    }
    return Policy(
        version=policy.version, date_shift_max_days=policy.date_shift_max_days, tables=tables
    )


def deletions_table(
    paths: Sequence[Path],
    *,
    policy: Policy,
    backend_for: Callable[[Policy], DeidBackend],
    key: bytes,
    export_id: str,
    transaction_time: str,
) -> tuple[pa.Table, DeletionCounts]:
    """The de-identified deletions of one export (an empty table when it reported none)."""
    counts = DeletionCounts()
    seen: set[tuple[str, str]] = set()
    rows: list[tuple[str, str, str, int, str]] = []  # type, id, file, line, content hash
    for path in paths:
        with path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                counts.lines_read += 1
                references = deleted_references_in_line(line)
                if not references:
                    counts.lines_without_deletions += 1
                    continue
                line_hash = content_hash(key, line.rstrip(b"\r\n"))
                for reference in references:
                    counts.entries += 1
                    resource_type, _, resource_id = reference.partition("/")
                    if not _RESOURCE_TYPE.match(resource_type):
                        _refuse(counts, "resource type is not a FHIR type name")
                    elif not _RESOURCE_ID.match(resource_id):
                        _refuse(counts, "resource id is not a FHIR id")
                    elif (resource_type, resource_id) in seen:
                        counts.duplicates += 1
                    else:
                        seen.add((resource_type, resource_id))
                        rows.append((resource_type, resource_id, path.name, number, line_hash))
    counts.rows = len(rows)
    types = sorted({row[0] for row in rows})
    pseudonyms: dict[tuple[str, str], str] = {}
    if rows:
        backend = backend_for(deletion_policy(policy, types))
        for resource_type in types:
            ids = [row[1] for row in rows if row[0] == resource_type]
            table = backend.deidentify(
                deletion_table_name(resource_type),
                pa.table({RESOURCE_ID: pa.array(ids, pa.string())}),
            )
            tokens = table.column(RESOURCE_ID).to_pylist()
            pseudonyms.update(
                ((resource_type, plain), token) for plain, token in zip(ids, tokens, strict=True)
            )
    data = pa.table(
        {
            "resource_type": [row[0] for row in rows],
            RESOURCE_ID: [pseudonyms[(row[0], row[1])] for row in rows],
            "export_transaction_time": [transaction_time] * len(rows),
            "_export_id": [export_id] * len(rows),
            "_source_file": [row[2] for row in rows],
            "_source_line": [row[3] for row in rows],
            "_content_hash": [row[4] for row in rows],
            "_policy_version": [policy.version] * len(rows),
        },
        schema=DELETIONS_SCHEMA,
    )
    return data, counts


def _refuse(counts: DeletionCounts, reason: str) -> None:
    counts.refused[reason] = counts.refused.get(reason, 0) + 1
