from __future__ import annotations

import csv
from pathlib import Path

from starvit_assets.graph.files import count_csv_rows, write_loading_files
from starvit_assets.graph.loader import FileGraphLoader, LoadReport, reconcile
from starvit_assets.graph.schema import (
    EDGE_SEGMENTS,
    EDGE_TYPES,
    SCHEMA_GSQL,
    TYPE_DEFAULTS,
    VERTEX_TYPES,
    GraphData,
    file_names,
    loading_job,
    schema_gsql,
)
from starvit_assets_tests.fakes.tigergraph_endpoint import parse_schema


def sample_graph() -> GraphData:
    return GraphData(
        vertices={
            "Patient": [("p1", "female", "30-39", "normal"), ("p2", "male", "90+", None)],
            "Encounter": [("e1", "finished", "AMB", "snomed", "185349003")],
            "Condition": [("38341003", "Hypertension, with a comma")],
            "Medication": [],
            "ObservationType": [("29463-7", "Body weight")],
        },
        edges={
            "has_encounter": [("p1", "e1", "2020-01-01 09:00:00", "2020-01-01 09:30:00")],
            "has_condition": [
                ("p1", "38341003", "c1", "2020-01-01 00:00:00", "active"),
                ("p1", "38341003", "c2", "2021-01-01 00:00:00", "resolved"),
            ],
            "prescribed": [],
            "has_observation_from_Encounter": [
                ("e1", "29463-7", "o1", "2020-01-01 09:10:00", 70.5, "kg")
            ],
            "has_observation_from_Patient": [("p2", "29463-7", "o2", None, None, None)],
        },
    )


def test_checked_in_schema_is_the_generated_one() -> None:
    # Regenerate with: python -m starvit_assets.graph.schema > starvit_assets/graph/schema.gsql
    assert SCHEMA_GSQL.read_text() == schema_gsql()


def test_generated_gsql_declares_every_python_type_with_its_attributes() -> None:
    parsed = parse_schema(schema_gsql())
    assert list(parsed.vertices) == [v.name for v in VERTEX_TYPES]
    for vertex in VERTEX_TYPES:
        declared = parsed.vertices[vertex.name]
        assert declared.primary_id == vertex.primary_id.name
        assert declared.attributes == {a.name: a.gsql_type for a in vertex.attributes}
    assert list(parsed.edges) == [e.name for e in EDGE_TYPES]
    for edge in EDGE_TYPES:
        declared_edge = parsed.edges[edge.name]
        assert declared_edge.pairs == edge.endpoints
        assert declared_edge.attributes == {a.name: a.gsql_type for a in edge.edge_attributes}
        assert declared_edge.discriminator == (
            (edge.discriminator.name,) if edge.discriminator else ()
        )
    used = {a.gsql_type for v in VERTEX_TYPES for a in v.attributes} | {
        a.gsql_type for e in EDGE_TYPES for a in e.edge_attributes
    }
    assert used <= set(TYPE_DEFAULTS)  # every type has the default a missing value loads as
    assert parsed.edges["has_observation"].pairs == (
        ("Encounter", "ObservationType"),
        ("Patient", "ObservationType"),
    )


def test_loading_job_loads_every_file_with_the_csv_header_columns() -> None:
    job = loading_job()
    for name in file_names():
        assert f'DEFINE FILENAME f_{name} = "./{name}.csv";' in job
    for vertex in VERTEX_TYPES:
        values = ", ".join(f'$"{c}"' for c in vertex.columns)
        assert f"LOAD f_{vertex.name} TO VERTEX {vertex.name} VALUES ({values})" in job
    for segment in EDGE_SEGMENTS:
        assert f"LOAD f_{segment.name} TO EDGE {segment.edge.name} VALUES (" in job
    # Several (FROM, TO) pairs: the vertex types are named in the VALUES list.
    assert '($"encounter_id" Encounter, $"loinc_code" ObservationType, $"observation_id"' in job
    assert '($"patient_id" Patient, $"loinc_code" ObservationType, $"observation_id"' in job


def test_loading_files_round_trip_counts_and_replace_previous_load(tmp_path: Path) -> None:
    graph = sample_graph()
    out = tmp_path / "load"
    out.mkdir()
    (out / "stale.csv").write_text("old")

    written = write_loading_files(graph, out)

    assert (
        written
        == {**{v.name: len(graph.vertex_rows(v)) for v in VERTEX_TYPES}, **graph.segment_counts()}
        == count_csv_rows(out)
    )
    assert not (out / "stale.csv").exists()
    assert not out.with_name("load.tmp").exists()
    assert (out / "schema.gsql").read_text() == schema_gsql()
    assert (out / "loading_job.gsql").read_text() == loading_job()
    assert (
        f'f_Patient="{out.resolve() / "Patient.csv"}"' in (out / "run_loading_job.gsql").read_text()
    )
    with (out / "Condition.csv").open(newline="") as handle:
        assert list(csv.reader(handle)) == [
            ["snomed_code", "display"],
            ["38341003", "Hypertension, with a comma"],
        ]
    with (out / "has_observation_from_Patient.csv").open(newline="") as handle:
        assert list(csv.reader(handle))[1] == ["p2", "29463-7", "o2", "", "", ""]


def test_file_loader_reports_per_type_counts_that_reconcile(tmp_path: Path) -> None:
    graph = sample_graph()
    report = FileGraphLoader(tmp_path / "load").load(graph)

    assert report.loaded == report.in_target == graph.counts()
    assert graph.counts()["has_observation"] == 2
    assert graph.counts()["has_condition"] == 2
    assert reconcile(graph.counts(), report) == []


def test_reconcile_names_every_difference() -> None:
    report = LoadReport(
        target="tigergraph",
        location="x",
        loaded={"Patient": 2, "has_condition": 1},
        in_target={"Patient": 3, "has_condition": 1},
    )
    assert reconcile({"Patient": 2, "has_condition": 2}, report) == [
        "Patient: 2 source rows, 3 in the tigergraph target",
        "has_condition: 2 source rows, 1 loaded",
        "has_condition: 2 source rows, 1 in the tigergraph target",
    ]
