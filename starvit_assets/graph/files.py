"""TigerGraph loading files: the embedded default when no TigerGraph is configured.

Writes one CSV per vertex type and edge segment, the GSQL schema, the loading job that reads
the CSVs and a RUN LOADING JOB statement, into a fresh folder that replaces the previous load
atomically.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Sequence
from pathlib import Path

from starvit_assets.graph.schema import (
    EDGE_SEGMENTS,
    EDGE_TYPES,
    GRAPH_NAME,
    VERTEX_TYPES,
    GraphData,
    Row,
    file_names,
    loading_job,
    run_loading_job,
    schema_gsql,
)

__all__ = [
    "EDGE_TYPES",
    "VERTEX_TYPES",
    "GraphData",
    "count_csv_rows",
    "loading_job",
    "write_loading_files",
]


def write_loading_files(
    graph: GraphData, out_dir: Path, graph_name: str = GRAPH_NAME
) -> dict[str, int]:
    """Write the CSVs, the schema and the loading job; returns rows written per file."""
    staging = out_dir.with_name(out_dir.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    written: dict[str, int] = {}
    for vertex in VERTEX_TYPES:
        written[vertex.name] = _write_csv(
            staging / f"{vertex.name}.csv", vertex.columns, graph.vertex_rows(vertex)
        )
    for segment in EDGE_SEGMENTS:
        written[segment.name] = _write_csv(
            staging / f"{segment.name}.csv", segment.columns, graph.segment_rows(segment)
        )
    (staging / "schema.gsql").write_text(schema_gsql(graph_name))
    (staging / "loading_job.gsql").write_text(loading_job(graph_name))
    (staging / "run_loading_job.gsql").write_text(run_loading_job(out_dir.resolve(), graph_name))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return written


def count_csv_rows(out_dir: Path) -> dict[str, int]:
    """Data rows per vertex and edge-segment file, read back from disk for reconciliation."""
    counts = {}
    for name in file_names():
        with (out_dir / f"{name}.csv").open(newline="") as handle:
            counts[name] = sum(1 for _ in csv.reader(handle)) - 1
    return counts


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Row]) -> int:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return len(rows)
