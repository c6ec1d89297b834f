"""TigerGraph loading files: the embedded default when no TigerGraph is configured.

Writes one CSV per vertex and edge type plus a GSQL loading job that reads them, into a
fresh folder that replaces the previous load atomically.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA_GSQL = Path(__file__).with_name("schema.gsql")
GRAPH_NAME = "starvit"


@dataclass(frozen=True)
class VertexType:
    name: str
    attributes: tuple[str, ...]


@dataclass(frozen=True)
class EdgeType:
    name: str
    from_vertex: str
    to_vertex: str
    attributes: tuple[str, ...]


VERTEX_TYPES = (
    VertexType("Patient", ("patient_id", "gender", "age_bracket", "weight_category")),
    VertexType("Condition", ("snomed_code", "display")),
    VertexType("Medication", ("rxnorm_code", "display")),
)
EDGE_TYPES = (
    EdgeType("has_condition", "Patient", "Condition", ("patient_id", "snomed_code", "onset_at")),
    EdgeType("prescribed", "Patient", "Medication", ("patient_id", "rxnorm_code", "authored_at")),
)


@dataclass
class GraphData:
    vertices: dict[str, list[tuple[object, ...]]] = field(default_factory=dict)
    edges: dict[str, list[tuple[object, ...]]] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {name: len(rows) for name, rows in {**self.vertices, **self.edges}.items()}


def write_loading_files(graph: GraphData, out_dir: Path) -> dict[str, int]:
    """Write the CSVs, the schema and the loading job; returns rows written per file."""
    staging = out_dir.with_name(out_dir.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    written: dict[str, int] = {}
    for vertex in VERTEX_TYPES:
        written[vertex.name] = _write_csv(
            staging / f"{vertex.name}.csv", vertex.attributes, graph.vertices.get(vertex.name, [])
        )
    for edge in EDGE_TYPES:
        written[edge.name] = _write_csv(
            staging / f"{edge.name}.csv", edge.attributes, graph.edges.get(edge.name, [])
        )
    shutil.copyfile(SCHEMA_GSQL, staging / "schema.gsql")
    (staging / "loading_job.gsql").write_text(loading_job())
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return written


def count_csv_rows(out_dir: Path) -> dict[str, int]:
    """Data rows per vertex and edge file, read back from disk for reconciliation."""
    counts = {}
    for name in [v.name for v in VERTEX_TYPES] + [e.name for e in EDGE_TYPES]:
        with (out_dir / f"{name}.csv").open(newline="") as handle:
            counts[name] = sum(1 for _ in csv.reader(handle)) - 1
    return counts


def loading_job() -> str:
    lines = [
        f"USE GRAPH {GRAPH_NAME}",
        f"CREATE LOADING JOB load_starvit FOR GRAPH {GRAPH_NAME} {{",
    ]
    for vertex in VERTEX_TYPES:
        lines.append(f'  DEFINE FILENAME f_{vertex.name} = "./{vertex.name}.csv";')
    for edge in EDGE_TYPES:
        lines.append(f'  DEFINE FILENAME f_{edge.name} = "./{edge.name}.csv";')
    for vertex in VERTEX_TYPES:
        values = ", ".join(f'$"{attr}"' for attr in vertex.attributes)
        lines.append(
            f"  LOAD f_{vertex.name} TO VERTEX {vertex.name} VALUES ({values}) "
            'USING header="true", separator=",";'
        )
    for edge in EDGE_TYPES:
        values = ", ".join(f'$"{attr}"' for attr in edge.attributes)
        lines.append(
            f"  LOAD f_{edge.name} TO EDGE {edge.name} VALUES ({values}) "
            'USING header="true", separator=",";'
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[tuple[object, ...]]) -> int:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return len(rows)
