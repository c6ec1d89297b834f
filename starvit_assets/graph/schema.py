"""The research graph's schema: one Python definition from which the GSQL schema, the GSQL
loading job, the CSV headers and the RESTPP upsert payloads are all derived.

``starvit_assets/graph/schema.gsql`` is this module's output, checked in for readers and for
``gsql``; a unit test fails when the two differ. Regenerate it with
``python -m starvit_assets.graph.schema > starvit_assets/graph/schema.gsql``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA_GSQL = Path(__file__).with_name("schema.gsql")
GRAPH_NAME = "starvit"
LOADING_JOB = "load_starvit"
# The DATETIME text form both the loading job and RESTPP parse (UTC, no offset).
DATETIME_FORMAT = "%Y-%m-%d %H:%M:%S"
# TigerGraph has no null: what an attribute holds when no value was given.
TYPE_DEFAULTS: dict[str, object] = {"STRING": "", "DATETIME": "1970-01-01 00:00:00", "DOUBLE": 0.0}


@dataclass(frozen=True)
class Attribute:
    name: str
    gsql_type: str = "STRING"


@dataclass(frozen=True)
class VertexType:
    name: str
    primary_id: Attribute
    attributes: tuple[Attribute, ...]

    @property
    def columns(self) -> tuple[str, ...]:
        """CSV header and row layout: the primary id, then the attributes."""
        return (self.primary_id.name, *(a.name for a in self.attributes))


@dataclass(frozen=True)
class EdgeType:
    name: str
    endpoints: tuple[tuple[str, str], ...]
    attributes: tuple[Attribute, ...]
    reverse_edge: str
    # The source row's id: it tells apart two edges between the same pair of vertices (two
    # prescriptions of one drug, one LOINC code measured at every visit), so that every source
    # row stays its own edge and a re-load updates it instead of adding one.
    discriminator: Attribute | None = None

    @property
    def edge_attributes(self) -> tuple[Attribute, ...]:
        return ((self.discriminator,) if self.discriminator else ()) + self.attributes

    def segments(self) -> tuple[EdgeSegment, ...]:
        return tuple(EdgeSegment(self, source, target) for source, target in self.endpoints)


@dataclass(frozen=True)
class EdgeSegment:
    """One (FROM, TO) pair of an edge type: one CSV file and one upsertEdges call per batch."""

    edge: EdgeType
    from_vertex: str
    to_vertex: str

    @property
    def name(self) -> str:
        if len(self.edge.endpoints) == 1:
            return self.edge.name
        return f"{self.edge.name}_from_{self.from_vertex}"

    @property
    def columns(self) -> tuple[str, ...]:
        """CSV header and row layout: source id, target id, then the edge's attributes."""
        source, target = VERTICES[self.from_vertex], VERTICES[self.to_vertex]
        return (
            source.primary_id.name,
            target.primary_id.name,
            *(a.name for a in self.edge.edge_attributes),
        )


def _id(name: str) -> Attribute:
    return Attribute(name, "STRING")


def _datetime(name: str) -> Attribute:
    return Attribute(name, "DATETIME")


VERTEX_TYPES = (
    VertexType(
        "Patient",
        _id("patient_id"),
        (Attribute("gender"), Attribute("age_bracket"), Attribute("weight_category")),
    ),
    VertexType(
        "Encounter",
        _id("encounter_id"),
        (
            Attribute("status"),
            Attribute("class_code"),
            Attribute("type_code_system"),
            Attribute("type_code"),
        ),
    ),
    VertexType("Condition", _id("snomed_code"), (Attribute("display"),)),
    VertexType("Medication", _id("rxnorm_code"), (Attribute("display"),)),
    VertexType("ObservationType", _id("loinc_code"), (Attribute("display"),)),
)
VERTICES = {vertex.name: vertex for vertex in VERTEX_TYPES}

EDGE_TYPES = (
    EdgeType(
        "has_encounter",
        (("Patient", "Encounter"),),
        (_datetime("period_start_at"), _datetime("period_end_at")),
        reverse_edge="encounter_of",
    ),
    EdgeType(
        "has_condition",
        (("Patient", "Condition"),),
        (_datetime("onset_at"), Attribute("clinical_status")),
        reverse_edge="condition_of",
        discriminator=_id("condition_id"),
    ),
    EdgeType(
        "prescribed",
        (("Patient", "Medication"),),
        (_datetime("authored_at"), Attribute("status")),
        reverse_edge="prescribed_to",
        discriminator=_id("medication_request_id"),
    ),
    EdgeType(
        "has_observation",
        # From the encounter the observation was made in, when that encounter was loaded;
        # from the patient otherwise. Either way one edge per observation.
        (("Encounter", "ObservationType"), ("Patient", "ObservationType")),
        (_datetime("effective_at"), Attribute("value", "DOUBLE"), Attribute("unit")),
        reverse_edge="observation_of",
        discriminator=_id("observation_id"),
    ),
)
EDGES = {edge.name: edge for edge in EDGE_TYPES}
EDGE_SEGMENTS = tuple(segment for edge in EDGE_TYPES for segment in edge.segments())
TYPE_NAMES = tuple(v.name for v in VERTEX_TYPES) + tuple(e.name for e in EDGE_TYPES)


Row = tuple[object, ...]


@dataclass
class GraphData:
    """Rows per vertex type and per edge segment, in the column order of the schema."""

    vertices: dict[str, list[Row]] = field(default_factory=dict)
    edges: dict[str, list[Row]] = field(default_factory=dict)
    # Source rows deliberately not loaded, per reason (e.g. a condition without SNOMED code).
    filtered: dict[str, int] = field(default_factory=dict)

    def vertex_rows(self, vertex: VertexType) -> list[Row]:
        return self.vertices.get(vertex.name, [])

    def segment_rows(self, segment: EdgeSegment) -> list[Row]:
        return self.edges.get(segment.name, [])

    def counts(self) -> dict[str, int]:
        """Rows per vertex and edge type (an edge type sums its segments)."""
        counts = {vertex.name: len(self.vertex_rows(vertex)) for vertex in VERTEX_TYPES}
        for edge in EDGE_TYPES:
            counts[edge.name] = sum(len(self.segment_rows(s)) for s in edge.segments())
        return counts

    def segment_counts(self) -> dict[str, int]:
        return {segment.name: len(self.segment_rows(segment)) for segment in EDGE_SEGMENTS}


def per_type(segment_counts: dict[str, int]) -> dict[str, int]:
    """Edge segment counts summed to their edge types."""
    totals: dict[str, int] = {}
    for segment in EDGE_SEGMENTS:
        totals[segment.edge.name] = totals.get(segment.edge.name, 0) + segment_counts.get(
            segment.name, 0
        )
    return totals


# --- GSQL --------------------------------------------------------------------------------


def schema_gsql(graph_name: str = GRAPH_NAME) -> str:
    lines = [
        "// Starvit research graph: de-identified only. Every id is a pseudonymous token or a code."
    ]
    lines.extend(_vertex_ddl(vertex) for vertex in VERTEX_TYPES)
    lines.extend(_edge_ddl(edge) for edge in EDGE_TYPES)
    members = ", ".join(TYPE_NAMES)
    lines.append(f"CREATE GRAPH {graph_name} ({members})")
    return "\n".join(lines) + "\n"


def _vertex_ddl(vertex: VertexType) -> str:
    attributes = "".join(f", {a.name} {a.gsql_type}" for a in vertex.attributes)
    return (
        f"CREATE VERTEX {vertex.name} (PRIMARY_ID {vertex.primary_id.name} "
        f'{vertex.primary_id.gsql_type}{attributes}) WITH primary_id_as_attribute="true"'
    )


def _edge_ddl(edge: EdgeType) -> str:
    pairs = " | ".join(f"FROM {source}, TO {target}" for source, target in edge.endpoints)
    parts = [pairs]
    if edge.discriminator:
        parts.append(f"DISCRIMINATOR({edge.discriminator.name} {edge.discriminator.gsql_type})")
    parts.extend(f"{a.name} {a.gsql_type}" for a in edge.attributes)
    return (
        f"CREATE DIRECTED EDGE {edge.name} ({', '.join(parts)}) "
        f'WITH REVERSE_EDGE="{edge.reverse_edge}"'
    )


def loading_job(graph_name: str = GRAPH_NAME) -> str:
    """The GSQL loading job: one file per vertex type and edge segment, header row first."""
    lines = [
        f"USE GRAPH {graph_name}",
        f"CREATE LOADING JOB {LOADING_JOB} FOR GRAPH {graph_name} {{",
    ]
    lines.extend(f'  DEFINE FILENAME f_{name} = "./{name}.csv";' for name in file_names())
    for vertex in VERTEX_TYPES:
        values = ", ".join(f'$"{column}"' for column in vertex.columns)
        lines.append(
            f"  LOAD f_{vertex.name} TO VERTEX {vertex.name} VALUES ({values}) "
            'USING header="true", separator=",", quote="double";'
        )
    for segment in EDGE_SEGMENTS:
        source, target, *attributes = segment.columns
        # An edge type with several (FROM, TO) pairs needs the vertex types named per load.
        typed = len(segment.edge.endpoints) > 1
        ids = [
            f'$"{source}"' + (f" {segment.from_vertex}" if typed else ""),
            f'$"{target}"' + (f" {segment.to_vertex}" if typed else ""),
        ]
        values = ", ".join(ids + [f'$"{column}"' for column in attributes])
        lines.append(
            f"  LOAD f_{segment.name} TO EDGE {segment.edge.name} VALUES ({values}) "
            'USING header="true", separator=",", quote="double", vertex_must_exist="true";'
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def run_loading_job(data_dir: Path, graph_name: str = GRAPH_NAME) -> str:
    """RUN LOADING JOB with every file at its path under ``data_dir`` (as seen by TigerGraph)."""
    files = ",\n  ".join(f'f_{name}="{data_dir / (name + ".csv")}"' for name in file_names())
    return f"USE GRAPH {graph_name}\nRUN LOADING JOB {LOADING_JOB} USING\n  {files}\n"


def file_names() -> Iterator[str]:
    yield from (vertex.name for vertex in VERTEX_TYPES)
    yield from (segment.name for segment in EDGE_SEGMENTS)


if __name__ == "__main__":
    sys.stdout.write(schema_gsql())
