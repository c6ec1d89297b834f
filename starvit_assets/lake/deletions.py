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

Retractions travel the same way. The gate holds back, in the PHI zone, records that may not
cross (lake/filters.yaml): a version now ``entered-in-error`` or labelled restricted, and every
record of a patient who opted out of research. Such a version never crosses, but an earlier
version of the same resource, published by an earlier export, would stay current downstream.
So the gate writes, beside the staged export, ``_retracted.<name>.ndjson`` side files (PHI
zone: plain type and id, never content; ``write_retractions``) listing the records it held back
(``reason``: ``status``, ``security_label``, ``date_range``, ``missing_element``) and every
patient opted out as of the export (``research_opt_out``, listed in every export, so an
opt-out with nothing new to export still retracts what was published before). Here they become
rows of the same table as the deletions, with ``reason`` saying which (``deleted`` for a
deleted[] entry), pseudonymised by the same code path, so ``exclude_deleted`` applies them
unchanged. A retraction crosses only when a published partition of the export or an earlier
one holds the resource (``published_ids``): one of a record or patient that never crossed
would take nothing back, and would only leave its pseudonym in the research zone.

A line that is no Bundle with a DELETE entry (or no retraction), and an entry whose type is no
FHIR type name, whose id is empty or whose reason is unknown, is counted by reason and never
written; the same resource listed twice in one export is one row (counted as a duplicate; a
deletion wins over a retraction, being read first).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from starvit_assets.deid.engine import DeidBackend, content_hash
from starvit_assets.deid.policy import ColumnRule, Policy, TablePolicy
from starvit_assets.fhir.client import deleted_references_in_line
from starvit_assets.lake.contracts import CONTRACTS, DELETED
from starvit_assets.lake.contracts import DELETION_REASONS as REASONS
from starvit_assets.lake.partitions import RawLake
from starvit_assets.views.runner import shipped_views

DELETIONS_TABLE = "deleted_resource"
RESOURCE_ID = "resource_id"
REASON = "reason"
_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{0,63}$")
_RESOURCE_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")

DELETIONS_SCHEMA = pa.schema(
    [
        ("resource_type", pa.string()),
        (RESOURCE_ID, pa.string()),
        (REASON, pa.string()),
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
    rows_by_reason: dict[str, int] = field(default_factory=dict)
    # Retractions of resources no partition published up to the export: nothing to take back,
    # so nothing crosses (an opted-out patient who never crossed leaves no trace).
    nothing_to_retract: int = 0

    @property
    def retracted_by_reason(self) -> dict[str, int]:
        """Rows other than deleted[] entries: what the gate retracted, by coarse reason."""
        return {reason: n for reason, n in self.rows_by_reason.items() if reason != DELETED}

    @property
    def reconciles(self) -> bool:
        return self.entries == (
            self.rows + self.duplicates + sum(self.refused.values()) + self.nothing_to_retract
        )


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


def write_retractions(path: Path, keys: Iterable[tuple[str, str, str]]) -> int:
    """Write the (resource type, id, reason) ``keys`` a gate retracts to ``path``, one JSON object
    a line (PHI zone: ids in the clear, nothing else of the record). A temporary file of this
    process, then a rename: several gates may write the same opt-out list at once, and a crash
    leaves the previous file. Returns the keys written."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    written = 0
    with temporary.open("w", encoding="utf-8", newline="\n") as out:
        for resource_type, resource_id, reason in keys:
            line = {"resourceType": resource_type, "id": resource_id, REASON: reason}
            out.write(json.dumps(line, separators=(",", ":")) + "\n")
            written += 1
    os.replace(temporary, path)
    return written


def _retraction_in_line(line: bytes) -> list[tuple[str, str]]:
    """(``Type/id``, reason) of one side-file line (none if it is no retraction)."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return []
    if not isinstance(entry, dict) or not isinstance(entry.get(REASON), str):
        return []
    return [(f"{entry.get('resourceType', '')}/{entry.get('id', '')}", entry[REASON])]


def _deletion_in_line(line: bytes) -> list[tuple[str, str]]:
    return [(reference, DELETED) for reference in deleted_references_in_line(line)]


def deletions_table(
    paths: Sequence[Path],
    *,
    policy: Policy,
    backend_for: Callable[[Policy], DeidBackend],
    key: bytes,
    export_id: str,
    transaction_time: str,
    retraction_paths: Sequence[Path] = (),
    published: Callable[[str, set[str]], set[str]] = lambda _type, _tokens: set(),
) -> tuple[pa.Table, DeletionCounts]:
    """The de-identified deletions (deleted[] lists, ``paths``) and retractions (the gate's side
    files, ``retraction_paths``) of one export; an empty table when it reported none.

    ``published(type, tokens)``: which of these pseudonymised ids of ``type`` an earlier
    partition published (``published_ids``); only their retractions are kept. A deletion is
    kept whatever was published, as it always was."""
    counts = DeletionCounts()
    seen: set[tuple[str, str]] = set()
    rows: list[tuple[str, str, str, str, int, str]] = []  # type, id, reason, file, line, hash
    sources = [(path, _deletion_in_line) for path in paths]
    sources += [(path, _retraction_in_line) for path in retraction_paths]
    for path, entries_in_line in sources:
        with path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                counts.lines_read += 1
                entries = entries_in_line(line)
                if not entries:
                    counts.lines_without_deletions += 1
                    continue
                line_hash = content_hash(key, line.rstrip(b"\r\n"))
                for reference, reason in entries:
                    counts.entries += 1
                    resource_type, _, resource_id = reference.partition("/")
                    if not _RESOURCE_TYPE.match(resource_type):
                        _refuse(counts, "resource type is not a FHIR type name")
                    elif not _RESOURCE_ID.match(resource_id):
                        _refuse(counts, "resource id is not a FHIR id")
                    elif reason not in REASONS:
                        _refuse(counts, "retraction reason is unknown")
                    elif (resource_type, resource_id) in seen:
                        counts.duplicates += 1
                    else:
                        seen.add((resource_type, resource_id))
                        rows.append(
                            (resource_type, resource_id, reason, path.name, number, line_hash)
                        )
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
        # Only a retraction of something published crosses: ask per type, for its tokens.
        retracted: dict[str, set[str]] = {}
        for resource_type, plain, reason, *_ in rows:
            if reason != DELETED:
                retracted.setdefault(resource_type, set()).add(pseudonyms[(resource_type, plain)])
        kept = {kind: published(kind, tokens) for kind, tokens in retracted.items()}
        before = len(rows)
        rows = [
            row
            for row in rows
            if row[2] == DELETED or pseudonyms[(row[0], row[1])] in kept.get(row[0], set())
        ]
        counts.nothing_to_retract = before - len(rows)
    counts.rows = len(rows)
    for row in rows:
        counts.rows_by_reason[row[2]] = counts.rows_by_reason.get(row[2], 0) + 1
    data = pa.table(
        {
            "resource_type": [row[0] for row in rows],
            RESOURCE_ID: [pseudonyms[(row[0], row[1])] for row in rows],
            REASON: [row[2] for row in rows],
            "export_transaction_time": [transaction_time] * len(rows),
            "_export_id": [export_id] * len(rows),
            "_source_file": [row[3] for row in rows],
            "_source_line": [row[4] for row in rows],
            "_content_hash": [row[5] for row in rows],
            "_policy_version": [policy.version] * len(rows),
        },
        schema=DELETIONS_SCHEMA,
    )
    return data, counts


def retraction_targets(resource_type: str) -> list[tuple[str, str]]:
    """(table, column) where the published rows of a ``resource_type`` id are: the key of the
    tables flattened from that type, and for a Patient also every table's ``patient_id`` (the
    rows a retracted Patient takes along)."""
    targets = [
        (table, CONTRACTS[table].key)
        for table, view in sorted(shipped_views().items())
        if view["resource"] == resource_type
    ]
    if resource_type == "Patient":
        targets += [
            (table, "patient_id")
            for table in sorted(shipped_views())
            if (table, "patient_id") not in targets
        ]
    return targets


def published_ids(lake: RawLake, resource_type: str, tokens: set[str], up_to: str) -> set[str]:
    """Which pseudonymised ``tokens`` of ``resource_type`` a published partition of an export
    up to ``up_to`` holds (the versions ``exclude_deleted`` would take out). Reads one column a
    partition, so its cost grows with the lake."""
    found: set[str] = set()
    wanted = pa.array(sorted(tokens), pa.string())
    for table, column in retraction_targets(resource_type):
        for export_id, path in lake.partitions(table):
            if export_id > up_to or column not in pq.read_schema(path).names:
                continue
            values = pq.read_table(path, columns=[column]).column(column)
            found.update(pc.filter(values, pc.is_in(values, value_set=wanted)).to_pylist())
            if len(found) == len(tokens):
                return found
    return found


def _refuse(counts: DeletionCounts, reason: str) -> None:
    counts.refused[reason] = counts.refused.get(reason, 0) + 1
