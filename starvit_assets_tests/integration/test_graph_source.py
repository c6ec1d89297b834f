"""The warehouse queries of the graph on a real PostgreSQL, loaded by both loaders."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from starvit_assets.graph.loader import (
    FileGraphLoader,
    RestppGraphLoader,
    TigerGraphConfig,
    reconcile,
)
from starvit_assets.graph.schema import GraphData, schema_gsql
from starvit_assets.graph.source import read_graph_data
from starvit_assets_tests.fakes.tigergraph_endpoint import FakeTigerGraphEndpoint

pytestmark = pytest.mark.integration

REFINED, DERIVED = "sv_graphtest_refined", "sv_graphtest_derived"

_DDL = f"""
create schema {DERIVED};
create schema {REFINED};
create table {DERIVED}.patient_features (
    patient_id text, gender text, age_bracket text, weight_category text);
create table {REFINED}.encounter (
    encounter_id text, patient_id text, status text, class_code text, type_code_system text,
    type_code text, period_start_at timestamptz, period_end_at timestamptz);
create table {REFINED}.condition (
    condition_id text, patient_id text, snomed_code text, snomed_display text,
    onset_at timestamptz, clinical_status text);
create table {REFINED}.medication_request (
    medication_request_id text, patient_id text, rxnorm_code text, medication_display text,
    authored_at timestamptz, status text);
create table {REFINED}.observation (
    observation_id text, patient_id text, encounter_id text, code_system text, code text,
    code_display text, effective_at timestamptz, value_quantity double precision,
    value_unit text, value_unit_code text);
insert into {DERIVED}.patient_features values
    ('p1', 'female', '30-39', 'normal'), ('p2', 'male', '90+', null);
insert into {REFINED}.encounter values
    ('e1', 'p1', 'finished', 'AMB', 'snomed', '185349003',
     '2020-01-01 10:00:00+01', '2020-01-01 10:30:00+01');
insert into {REFINED}.condition values
    ('c1', 'p1', '38341003', 'Hypertension', '2019-05-01 00:00:00+00', 'active'),
    ('c2', 'p1', '38341003', 'Hypertension', '2021-05-01 00:00:00+00', 'recurrence'),
    ('c3', 'p2', null, null, null, 'active');
insert into {REFINED}.medication_request values
    ('m1', 'p2', '314076', 'lisinopril 10 MG', '2021-02-03 04:05:06+00', 'active');
insert into {REFINED}.observation values
    ('o1', 'p1', 'e1', 'loinc', '29463-7', 'Body weight', '2020-01-01 10:10:00+01', 70.5,
     'kg', 'kg'),
    ('o2', 'p1', 'e-not-exported', 'loinc', '29463-7', 'Body weight',
     '2020-02-01 00:00:00+00', 71, 'kilogram', null),
    ('o3', 'p2', null, 'loinc', '8302-2', 'Body height', null, null, null, null),
    ('o4', 'p2', null, null, 'local-1', 'Local code', null, 1, null, null),
    ('o5', 'p2', 'e1', 'snomed', '123', 'Not LOINC', null, null, null, null);
"""


@pytest.fixture(scope="module")
def graph(warehouse_dsn: str) -> Iterator[GraphData]:
    with psycopg.connect(warehouse_dsn, autocommit=True) as connection:
        connection.execute(f"drop schema if exists {REFINED} cascade")
        connection.execute(f"drop schema if exists {DERIVED} cascade")
        connection.execute(_DDL)
        try:
            yield read_graph_data(connection, REFINED, DERIVED)
        finally:
            connection.execute(f"drop schema {REFINED} cascade")
            connection.execute(f"drop schema {DERIVED} cascade")


def test_rows_follow_the_schema_with_utc_dates(graph: GraphData) -> None:
    assert graph.vertices["Patient"] == [
        ("p1", "female", "30-39", "normal"),
        ("p2", "male", "90+", None),
    ]
    assert graph.vertices["Condition"] == [("38341003", "Hypertension")]
    assert graph.vertices["ObservationType"] == [
        ("29463-7", "Body weight"),
        ("8302-2", "Body height"),
    ]
    assert graph.edges["has_encounter"] == [
        ("p1", "e1", "2020-01-01 09:00:00", "2020-01-01 09:30:00")
    ]
    assert [row[2] for row in graph.edges["has_condition"]] == ["c1", "c2"]
    assert graph.edges["prescribed"] == [("p2", "314076", "m1", "2021-02-03 04:05:06", "active")]


def test_observations_hang_off_a_loaded_encounter_or_else_the_patient(graph: GraphData) -> None:
    assert graph.edges["has_observation_from_Encounter"] == [
        ("e1", "29463-7", "o1", "2020-01-01 09:10:00", 70.5, "kg")
    ]
    assert graph.edges["has_observation_from_Patient"] == [
        ("p1", "29463-7", "o2", "2020-02-01 00:00:00", 71.0, "kilogram"),
        ("p2", "8302-2", "o3", None, None, None),
    ]


def test_rows_not_loaded_are_counted_per_reason(graph: GraphData) -> None:
    assert graph.filtered == {
        "condition without SNOMED CT code": 1,
        "medication request without RxNorm code": 0,
        "observation without LOINC code": 2,
    }
    # Every source row is an edge or a filter count.
    assert graph.counts()["has_condition"] + 1 == 3
    assert graph.counts()["has_observation"] + 2 == 5


def test_both_loaders_reconcile_with_the_source(graph: GraphData, tmp_path: Path) -> None:
    files = FileGraphLoader(tmp_path / "load").load(graph)
    with FakeTigerGraphEndpoint(schema_gsql(), secret="s") as endpoint:
        restpp = RestppGraphLoader(
            TigerGraphConfig(host=endpoint.url, secret="s", retry_wait_seconds=0.0)
        ).load(graph)

    assert reconcile(graph.counts(), files) == []
    assert reconcile(graph.counts(), restpp) == []
    assert files.in_target == restpp.in_target
    assert files.segments == restpp.segments
