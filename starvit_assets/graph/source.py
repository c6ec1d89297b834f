"""Reads the de-identified graph source rows from the warehouse's refined and derived models."""

from __future__ import annotations

import psycopg
from psycopg import sql

from starvit_assets.graph.files import GraphData

GRAPH_SOURCE_MODELS = (
    ("derived", "patient_features"),
    ("refined", "condition"),
    ("refined", "medication_request"),
)


def read_graph_data(connection: psycopg.Connection, refined: str, derived: str) -> GraphData:
    def rows(query: sql.Composed) -> list[tuple[object, ...]]:
        return [tuple(row) for row in connection.execute(query).fetchall()]

    patients = rows(
        sql.SQL(
            "select patient_id, gender, age_bracket, weight_category from {} order by patient_id"
        ).format(sql.Identifier(derived, "patient_features"))
    )
    conditions = rows(
        sql.SQL(
            "select snomed_code, min(snomed_display) from {} where snomed_code is not null "
            "group by snomed_code order by snomed_code"
        ).format(sql.Identifier(refined, "condition"))
    )
    medications = rows(
        sql.SQL(
            "select rxnorm_code, min(medication_display) from {} where rxnorm_code is not null "
            "group by rxnorm_code order by rxnorm_code"
        ).format(sql.Identifier(refined, "medication_request"))
    )
    has_condition = rows(
        sql.SQL(
            "select patient_id, snomed_code, onset_at from {} where snomed_code is not null "
            "order by patient_id, snomed_code, onset_at"
        ).format(sql.Identifier(refined, "condition"))
    )
    prescribed = rows(
        sql.SQL(
            "select patient_id, rxnorm_code, authored_at from {} where rxnorm_code is not null "
            "order by patient_id, rxnorm_code, authored_at"
        ).format(sql.Identifier(refined, "medication_request"))
    )
    return GraphData(
        vertices={"Patient": patients, "Condition": conditions, "Medication": medications},
        edges={"has_condition": has_condition, "prescribed": prescribed},
    )
