"""The de-identification gate for one table: staged NDJSON in, de-identified Arrow table out.

Flattening (ViewDefinition) and de-identification (policy) happen here, in memory; only the
returned table, which holds de-identified columns and lineage, may be written to the lake.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from starvit_assets.deid.engine import DeidBackend, content_hash
from starvit_assets.views.runner import CompiledView

_BATCH_RESOURCES = 20_000


class GateError(Exception):
    """Input that cannot cross the gate; the message names the file and line, never content."""


@dataclass(frozen=True)
class GateResult:
    table: pa.Table
    resources_read: int
    resources_without_rows: int

    @property
    def rows(self) -> int:
        return self.table.num_rows


def lineage_schema() -> pa.Schema:
    return pa.schema(
        [
            ("_export_id", pa.string()),
            ("_source_file", pa.string()),
            ("_source_line", pa.int64()),
            ("_content_hash", pa.string()),
            ("_policy_version", pa.string()),
        ]
    )


def run_gate(
    *,
    table_name: str,
    view: CompiledView,
    files: Sequence[Path],
    backend: DeidBackend,
    key: bytes,
    export_id: str,
    policy_version: str,
) -> GateResult:
    view_schema = view.arrow_schema()
    batches: list[pa.Table] = []
    columns: dict[str, list[object]] = {name: [] for name in view.column_names}
    lineage: dict[str, list[object]] = {name: [] for name in lineage_schema().names}
    resources_read = 0
    resources_without_rows = 0

    def flush() -> None:
        if not lineage["_source_line"]:
            return
        flat = pa.table(columns, schema=view_schema)
        deidentified = backend.deidentify(table_name, flat)
        lineage_table = pa.table(lineage, schema=lineage_schema())
        for field in lineage_table.schema:
            deidentified = deidentified.append_column(field, lineage_table[field.name])
        batches.append(deidentified)
        for values in (*columns.values(), *lineage.values()):
            values.clear()

    for path in files:
        with path.open("rb") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                resources_read += 1
                try:
                    resource = json.loads(line)
                except json.JSONDecodeError:
                    raise GateError(f"{path.name} line {line_number}: not valid JSON") from None
                if resource.get("resourceType") != view.resource_type:
                    raise GateError(
                        f"{path.name} line {line_number}: expected {view.resource_type}, "
                        f"found another resource type"
                    )
                rows = view.rows(resource)
                if not rows:
                    resources_without_rows += 1
                    continue
                digest = content_hash(key, line.rstrip(b"\r\n"))
                for row in rows:
                    for name in view.column_names:
                        columns[name].append(row.get(name))
                    lineage["_export_id"].append(export_id)
                    lineage["_source_file"].append(path.name)
                    lineage["_source_line"].append(line_number)
                    lineage["_content_hash"].append(digest)
                    lineage["_policy_version"].append(policy_version)
                if len(lineage["_source_line"]) >= _BATCH_RESOURCES:
                    flush()
    flush()
    if batches:
        table = pa.concat_tables(batches)
    else:
        empty = backend.deidentify(table_name, view_schema.empty_table())
        for field in lineage_schema():
            empty = empty.append_column(field, pa.array([], field.type))
        table = empty
    return GateResult(
        table=table, resources_read=resources_read, resources_without_rows=resources_without_rows
    )
