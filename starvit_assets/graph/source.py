"""Reads the de-identified graph rows from the warehouse's refined and derived models.

Rows come out in the column order of the schema (starvit_assets.graph.schema), dates as UTC
text in the DATETIME form TigerGraph parses. Source rows that cannot become an edge (no code
in the code system the graph uses) are counted, per reason, in ``GraphData.filtered``.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from starvit_assets.graph.schema import GraphData, Row

GRAPH_SOURCE_MODELS = (
    ("derived", "patient_features"),
    ("refined", "encounter"),
    ("refined", "condition"),
    ("refined", "medication_request"),
    ("refined", "observation"),
)

# schema.DATETIME_FORMAT in PostgreSQL's to_char notation.
_UTC = "to_char({column} at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS')"
_LOINC = "o.code_system = 'loinc' and o.code is not null"
_KNOWN_ENCOUNTER = "o.encounter_id in (select encounter_id from {encounter})"


def _utc(column: str) -> str:
    return _UTC.format(column=column)


_VERTEX_QUERIES = {
    "Patient": (
        "select patient_id, gender, age_bracket, weight_category from {patient_features} "
        "order by patient_id"
    ),
    "Encounter": (
        "select encounter_id, status, class_code, type_code_system, type_code from {encounter} "
        "order by encounter_id"
    ),
    "Condition": (
        "select snomed_code, min(snomed_display) from {condition} where snomed_code is not null "
        "group by snomed_code order by snomed_code"
    ),
    "Medication": (
        "select rxnorm_code, min(medication_display) from {medication_request} "
        "where rxnorm_code is not null group by rxnorm_code order by rxnorm_code"
    ),
    "ObservationType": (
        f"select o.code, min(o.code_display) from {{observation}} o where {_LOINC} "
        "group by o.code order by o.code"
    ),
}


def _observation_edge(source: str, where: str) -> str:
    return (
        f"select {source}, o.code, o.observation_id, {_utc('o.effective_at')}, "
        "o.value_quantity, coalesce(o.value_unit_code, o.value_unit) from {observation} o "
        f"where {_LOINC} and ({where}) order by 1, 2, 3"
    )


_EDGE_QUERIES = {
    "has_encounter": (
        f"select patient_id, encounter_id, {_utc('period_start_at')}, {_utc('period_end_at')} "
        "from {encounter} order by patient_id, encounter_id"
    ),
    "has_condition": (
        f"select patient_id, snomed_code, condition_id, {_utc('onset_at')}, clinical_status "
        "from {condition} where snomed_code is not null order by 1, 2, 3"
    ),
    "prescribed": (
        f"select patient_id, rxnorm_code, medication_request_id, {_utc('authored_at')}, status "
        "from {medication_request} where rxnorm_code is not null order by 1, 2, 3"
    ),
    # An observation hangs off its encounter when that encounter is a vertex; otherwise (no
    # encounter, or one that was not exported) off its patient.
    "has_observation_from_Encounter": _observation_edge("o.encounter_id", _KNOWN_ENCOUNTER),
    "has_observation_from_Patient": _observation_edge(
        "o.patient_id", f"o.encounter_id is null or not {_KNOWN_ENCOUNTER}"
    ),
}
_FILTERED = {
    "condition without SNOMED CT code": (
        "select count(*) from {condition} where snomed_code is null"
    ),
    "medication request without RxNorm code": (
        "select count(*) from {medication_request} where rxnorm_code is null"
    ),
    "observation without LOINC code": (
        f"select count(*) from {{observation}} o where not coalesce({_LOINC}, false)"
    ),
}


def read_graph_data(connection: psycopg.Connection, refined: str, derived: str) -> GraphData:
    schemas = {"refined": refined, "derived": derived}
    tables = {name: sql.Identifier(schemas[layer], name) for layer, name in GRAPH_SOURCE_MODELS}

    def rows(template: str) -> list[Row]:
        query = sql.SQL(template).format(**tables)
        return [tuple(row) for row in connection.execute(query).fetchall()]

    def count(template: str) -> int:
        ((value,),) = rows(template)
        return int(value)  # type: ignore[call-overload]

    return GraphData(
        vertices={name: rows(query) for name, query in _VERTEX_QUERIES.items()},
        edges={name: rows(query) for name, query in _EDGE_QUERIES.items()},
        filtered={reason: count(query) for reason, query in _FILTERED.items()},
    )
