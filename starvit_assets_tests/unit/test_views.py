"""The ViewDefinition runner on small hand-written resources: shipped views, the functions the
SQL on FHIR specification adds, select nesting, and the errors an invalid view raises."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from starvit_assets.views.runner import (
    ViewDefinitionError,
    compile_view,
    run_view,
    shipped_views,
)

LAST_UPDATED = "2024-05-01T10:00:00Z"
META = {"versionId": "3", "lastUpdated": LAST_UPDATED}
SUBJECT = {"reference": "Patient/p1"}
ENCOUNTER_REF = {"reference": "Encounter/e1"}

PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "p1",
    "meta": META,
    "gender": "female",
    "birthDate": "1980-02-29",
    "address": [{"postalCode": "02139"}, {"postalCode": "10001"}],
    "deceasedBoolean": False,
    "name": [{"family": "Brennan", "given": ["Maeve", "Anne"]}],
    "link": [{"other": {"reference": "Patient/p0"}, "type": "replaces"}],
}
ENCOUNTER: dict[str, Any] = {
    "resourceType": "Encounter",
    "id": "e1",
    "meta": META,
    "status": "finished",
    "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
    "type": [{"coding": [{"system": "http://snomed.info/sct", "code": "185349003"}]}],
    "subject": SUBJECT,
    "period": {"start": "2024-05-01T09:00:00+02:00", "end": "2024-05-01T09:30:00+02:00"},
}
OBSERVATION: dict[str, Any] = {
    "resourceType": "Observation",
    "id": "o1",
    "meta": META,
    "status": "final",
    "category": [{"coding": [{"code": "vital-signs"}]}],
    "code": {
        "coding": [{"system": "http://loinc.org", "code": "29463-7", "display": "Body weight"}]
    },
    "subject": SUBJECT,
    "encounter": ENCOUNTER_REF,
    "effectiveDateTime": "2024-05-01",
    "valueQuantity": {
        "value": 72.5,
        "unit": "kg",
        "system": "http://unitsofmeasure.org",
        "code": "kg",
    },
}
CONDITION: dict[str, Any] = {
    "resourceType": "Condition",
    "id": "c1",
    "meta": META,
    "clinicalStatus": {"coding": [{"code": "active"}]},
    "verificationStatus": {"coding": [{"code": "confirmed"}]},
    "code": {
        "coding": [
            {"system": "http://snomed.info/sct", "code": "44054006", "display": "Diabetes"},
            {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "E11.9", "display": "T2DM"},
        ]
    },
    "subject": SUBJECT,
    "encounter": ENCOUNTER_REF,
    "onsetDateTime": "2015-03",
    "recordedDate": "2015-03-04",
}
MEDICATION_REQUEST: dict[str, Any] = {
    "resourceType": "MedicationRequest",
    "id": "m1",
    "meta": META,
    "status": "active",
    "intent": "order",
    "medicationCodeableConcept": {
        "coding": [
            {
                "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                "code": "860975",
                "display": "metformin 500 MG",
            }
        ]
    },
    "subject": SUBJECT,
    "encounter": ENCOUNTER_REF,
    "authoredOn": "2024-05-01",
}
PROCEDURE: dict[str, Any] = {
    "resourceType": "Procedure",
    "id": "pr1",
    "meta": META,
    "status": "completed",
    "code": {
        "coding": [
            {"system": "http://example.org/local", "code": "X1"},
            {"system": "http://snomed.info/sct", "code": "73761001", "display": "Colonoscopy"},
        ]
    },
    "subject": SUBJECT,
    "encounter": ENCOUNTER_REF,
    "performedDateTime": "2024-05-01T09:10:00+02:00",
}
IMMUNIZATION: dict[str, Any] = {
    "resourceType": "Immunization",
    "id": "i1",
    "meta": META,
    "status": "completed",
    "vaccineCode": {
        "coding": [{"system": "http://hl7.org/fhir/sid/cvx", "code": "140", "display": "Influenza"}]
    },
    "patient": SUBJECT,
    "encounter": ENCOUNTER_REF,
    "occurrenceDateTime": "2024-05",
    "primarySource": False,
}
ALLERGY_INTOLERANCE: dict[str, Any] = {
    "resourceType": "AllergyIntolerance",
    "id": "a1",
    "meta": META,
    "clinicalStatus": {"coding": [{"code": "active"}]},
    "verificationStatus": {"coding": [{"code": "confirmed"}]},
    "type": "allergy",
    "category": ["food", "medication"],
    "criticality": "high",
    "code": {
        "coding": [
            {"system": "http://example.org/local", "code": "PEN"},
            {"system": "http://snomed.info/sct", "code": "91936005", "display": "Penicillin"},
        ],
        "text": "Penicillin, told by Maeve Brennan",
    },
    "patient": SUBJECT,
    "encounter": ENCOUNTER_REF,
    "onsetDateTime": "2010-09",
    "recordedDate": "2024-05-01T09:00:00+02:00",
    "note": [{"text": "Maeve Brennan's mother reports it"}],
    "reaction": [
        {
            "manifestation": [{"text": "hives on the arm"}],
            "description": "Maeve Brennan broke out in hives",
        },
        {
            "manifestation": [
                {
                    "coding": [
                        {"system": "http://snomed.info/sct", "code": "39579001", "display": "Ana"}
                    ]
                }
            ],
            "severity": "severe",
            "note": [{"text": "called 911 from 555-0100"}],
        },
    ],
}

# view -> (resource, expected row in column order, Arrow types that are not string)
SHIPPED: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, pa.DataType]]] = {
    "patient": (
        PATIENT,
        {
            "patient_id": "p1",
            "version_id": "3",
            "last_updated": LAST_UPDATED,
            "gender": "female",
            "birth_year": "1980-02-29",
            "postal_code_3": "02139",
            "deceased": False,
            "link_patient_id": "p0",
            "link_type": "replaces",
            "linkage_family": "Brennan",
            "linkage_given": "Maeve",
        },
        {"deceased": pa.bool_()},
    ),
    "encounter": (
        ENCOUNTER,
        {
            "encounter_id": "e1",
            "patient_id": "p1",
            "version_id": "3",
            "last_updated": LAST_UPDATED,
            "status": "finished",
            "class_code": "AMB",
            "type_system": "http://snomed.info/sct",
            "type_code": "185349003",
            "period_start": "2024-05-01T09:00:00+02:00",
            "period_end": "2024-05-01T09:30:00+02:00",
        },
        {},
    ),
    "observation": (
        OBSERVATION,
        {
            "observation_id": "o1",
            "patient_id": "p1",
            "encounter_id": "e1",
            "version_id": "3",
            "last_updated": LAST_UPDATED,
            "status": "final",
            "category_code": "vital-signs",
            "code_system": "http://loinc.org",
            "code": "29463-7",
            "code_display": "Body weight",
            "value_quantity": 72.5,
            "value_unit": "kg",
            "value_unit_system": "http://unitsofmeasure.org",
            "value_unit_code": "kg",
            "effective_datetime": "2024-05-01",
        },
        {"value_quantity": pa.float64()},
    ),
    "condition": (
        CONDITION,
        {
            "condition_id": "c1",
            "patient_id": "p1",
            "encounter_id": "e1",
            "version_id": "3",
            "last_updated": LAST_UPDATED,
            "clinical_status": "active",
            "verification_status": "confirmed",
            "snomed_code": "44054006",
            "snomed_display": "Diabetes",
            "icd10_code": "E11.9",
            "icd10_display": "T2DM",
            "onset_datetime": "2015-03",
            "recorded_date": "2015-03-04",
        },
        {},
    ),
    "medication_request": (
        MEDICATION_REQUEST,
        {
            "medication_request_id": "m1",
            "patient_id": "p1",
            "encounter_id": "e1",
            "version_id": "3",
            "last_updated": LAST_UPDATED,
            "status": "active",
            "intent": "order",
            "rxnorm_code": "860975",
            "medication_display": "metformin 500 MG",
            "authored_on": "2024-05-01",
        },
        {},
    ),
    "procedure": (
        PROCEDURE,
        {
            "procedure_id": "pr1",
            "patient_id": "p1",
            "encounter_id": "e1",
            "version_id": "3",
            "last_updated": LAST_UPDATED,
            "status": "completed",
            "snomed_code": "73761001",
            "snomed_display": "Colonoscopy",
            "performed_datetime": "2024-05-01T09:10:00+02:00",
        },
        {},
    ),
    "immunization": (
        IMMUNIZATION,
        {
            "immunization_id": "i1",
            "patient_id": "p1",
            "encounter_id": "e1",
            "version_id": "3",
            "last_updated": LAST_UPDATED,
            "status": "completed",
            "cvx_code": "140",
            "cvx_display": "Influenza",
            "occurrence_datetime": "2024-05",
            "primary_source": False,
        },
        {"primary_source": pa.bool_()},
    ),
    "allergy_intolerance": (
        ALLERGY_INTOLERANCE,
        {
            "allergy_intolerance_id": "a1",
            "patient_id": "p1",
            "encounter_id": "e1",
            "version_id": "3",
            "last_updated": LAST_UPDATED,
            "clinical_status": "active",
            "verification_status": "confirmed",
            "type": "allergy",
            "categories": "food medication",
            "criticality": "high",
            "snomed_code": "91936005",
            "snomed_display": "Penicillin",
            "reaction_snomed_code": "39579001",
            "reaction_snomed_display": "Ana",
            "reaction_severity": "severe",
            "onset_datetime": "2010-09",
            "recorded_date": "2024-05-01T09:00:00+02:00",
        },
        {},
    ),
}
ALL_RESOURCES = [
    PATIENT,
    ENCOUNTER,
    OBSERVATION,
    CONDITION,
    MEDICATION_REQUEST,
    PROCEDURE,
    IMMUNIZATION,
    ALLERGY_INTOLERANCE,
]


def patient_view(*columns: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"resource": "Patient", "select": [{"column": list(columns)}], **extra}


def column(name: str, path: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "path": path, **extra}


# --- shipped views -----------------------------------------------------------------------------
def test_every_shipped_view_is_covered() -> None:
    assert set(shipped_views()) == set(SHIPPED)


@pytest.mark.parametrize("table", sorted(SHIPPED))
def test_shipped_view_columns_schema_and_row(table: str) -> None:
    resource, expected, typed = SHIPPED[table]
    # Every view reads the security labels for the record filter; join() of none is "".
    expected = {**expected, "security_labels": ""}
    view = compile_view(shipped_views()[table])

    assert view.column_names == list(expected)
    assert view.arrow_schema() == pa.schema(
        [pa.field(name, typed.get(name, pa.string())) for name in expected]
    )
    assert view.rows(resource) == [expected]
    assert list(view.rows(resource)[0]) == list(expected)
    # Resources of other types yield no rows.
    assert [row for candidate in ALL_RESOURCES for row in view.rows(candidate)] == [expected]


def test_shipped_view_leaves_absent_elements_null() -> None:
    sparse = {"resourceType": "Observation", "id": "o2", "valueString": "positive"}

    (row,) = run_view(shipped_views()["observation"], [sparse])

    assert row["observation_id"] == "o2"
    assert row["security_labels"] == ""
    assert {name for name, value in row.items() if value is not None} == {
        "observation_id",
        "security_labels",
    }


def test_shipped_views_read_every_security_label() -> None:
    labelled = {
        "resourceType": "Observation",
        "id": "o3",
        "meta": {"security": [{"code": "R"}, {"code": "ETH"}]},
    }
    (row,) = run_view(shipped_views()["observation"], [labelled])
    assert row["security_labels"] == "R ETH"


def test_allergy_intolerance_view_selects_no_free_text() -> None:
    """Notes, the reaction description and the text of a concept may name people: the view
    never selects them, so no cell holds any of their words."""
    (row,) = run_view(shipped_views()["allergy_intolerance"], [ALLERGY_INTOLERANCE])

    cells = " ".join(str(value) for value in row.values() if value is not None)
    for word in ("Maeve", "Brennan", "hives", "mother", "911", "555-0100", "arm"):
        assert word not in cells


# --- functions the specification adds ----------------------------------------------------------
def test_get_reference_key_with_and_without_a_type() -> None:
    view = {
        "resource": "Observation",
        "select": [
            {
                "column": [
                    column("any", "subject.getReferenceKey()"),
                    column("patient", "subject.getReferenceKey(Patient)"),
                    column("group", "subject.getReferenceKey(Group)"),
                ]
            }
        ],
    }
    resources = [
        {"resourceType": "Observation", "subject": {"reference": "Patient/p1"}},
        {"resourceType": "Observation", "subject": {"reference": "https://x.org/fhir/Patient/p2"}},
        {"resourceType": "Observation", "subject": {"reference": "Patient/p3/_history/7"}},
        {"resourceType": "Observation", "subject": {"reference": "Group/g1"}},
        {"resourceType": "Observation", "subject": {"identifier": {"value": "x"}}},
    ]

    assert run_view(view, resources) == [
        {"any": "p1", "patient": "p1", "group": None},
        {"any": "p2", "patient": "p2", "group": None},
        {"any": "p3", "patient": "p3", "group": None},
        {"any": "g1", "patient": None, "group": "g1"},
        {"any": None, "patient": None, "group": None},
    ]


def test_get_resource_key_is_the_resource_id() -> None:
    view = patient_view(column("key", "getResourceKey()"))

    assert run_view(view, [PATIENT]) == [{"key": "p1"}]


@pytest.mark.parametrize(
    ("birth_date", "low", "high"),
    [
        ("2010", "2010-01-01", "2010-12-31"),
        ("2010-09", "2010-09-01", "2010-09-30"),
        ("2012-02", "2012-02-01", "2012-02-29"),
        ("2010-09-14", "2010-09-14", "2010-09-14"),
    ],
)
def test_boundaries_of_a_partial_date(birth_date: str, low: str, high: str) -> None:
    view = patient_view(
        column("low", "birthDate.lowBoundary()", type="date"),
        column("high", "birthDate.highBoundary()", type="date"),
    )
    patient = {"resourceType": "Patient", "birthDate": birth_date}

    assert run_view(view, [patient]) == [{"low": low, "high": high}]


def test_boundaries_of_a_partial_date_time_use_the_extreme_offsets() -> None:
    view = {
        "resource": "Observation",
        "select": [
            {
                "column": [
                    column("low", "effective.ofType(dateTime).lowBoundary()"),
                    column("high", "effective.ofType(dateTime).highBoundary()"),
                    column("month", "effective.ofType(dateTime).highBoundary(6)"),
                ]
            }
        ],
    }
    partial = {"resourceType": "Observation", "effectiveDateTime": "2010-09"}
    zoned = {"resourceType": "Observation", "effectiveDateTime": "2010-09-14T08:30+02:00"}

    assert run_view(view, [partial, zoned]) == [
        {
            "low": "2010-09-01T00:00:00.000+14:00",
            "high": "2010-09-30T23:59:59.999-12:00",
            "month": "2010-09",
        },
        {
            "low": "2010-09-14T08:30:00.000+02:00",
            "high": "2010-09-14T08:30:59.999+02:00",
            "month": "2010-09",
        },
    ]


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1.50.lowBoundary()", 1.495),
        ("1.50.highBoundary()", 1.505),
        ("1.587.lowBoundary()", 1.5865),
        ("1.587.highBoundary(2)", 1.59),
        ("(-1.587).lowBoundary()", -1.5875),
        ("@T12:34.lowBoundary()", "12:34:00.000"),
        ("@T12:34.highBoundary()", "12:34:59.999"),
        ("@2010.lowBoundary(5)", None),
        ("'2010'.lowBoundary()", None),
    ],
)
def test_boundaries_of_decimals_times_and_invalid_input(expression: str, expected: Any) -> None:
    view = patient_view(column("value", expression))

    assert run_view(view, [PATIENT]) == [{"value": expected}]


def test_boundaries_of_a_decimal_element_follow_its_written_precision() -> None:
    view = {
        "resource": "Observation",
        "select": [
            {
                "column": [
                    column("low", "value.ofType(Quantity).value.lowBoundary()"),
                    column("high", "value.ofType(Quantity).value.highBoundary()"),
                ]
            }
        ],
    }
    observation = {"resourceType": "Observation", "valueQuantity": {"value": 1.0}}

    assert run_view(view, [observation]) == [{"low": 0.95, "high": 1.05}]


def test_boundary_result_is_still_a_date() -> None:
    view = patient_view(column("before", "birthDate.highBoundary() < @2010-10-01"))

    assert run_view(view, [{"resourceType": "Patient", "birthDate": "2010-09"}]) == [
        {"before": True}
    ]


def test_join_of_nothing_is_an_empty_string() -> None:
    view = patient_view(column("given", "name.given.join(', ')"))
    named = {"resourceType": "Patient", "name": [{"given": ["A", "B"]}, {"given": ["C"]}]}

    assert run_view(view, [named, {"resourceType": "Patient"}]) == [
        {"given": "A, B, C"},
        {"given": ""},
    ]


# --- select nesting ------------------------------------------------------------------------------
def test_for_each_or_null_emits_a_null_row() -> None:
    view = {
        "resource": "Patient",
        "select": [
            {"column": [column("id", "id")]},
            {"forEachOrNull": "name", "column": [column("family", "family")]},
        ],
    }
    resources: list[dict[str, Any]] = [
        {"resourceType": "Patient", "id": "a", "name": [{"family": "X"}, {"family": "Y"}]},
        {"resourceType": "Patient", "id": "b"},
    ]

    assert run_view(view, resources) == [
        {"id": "a", "family": "X"},
        {"id": "a", "family": "Y"},
        {"id": "b", "family": None},
    ]


def test_for_each_drops_a_resource_with_nothing_to_iterate() -> None:
    view = {
        "resource": "Patient",
        "select": [
            {"column": [column("id", "id")]},
            {"forEach": "name", "column": [column("family", "family")]},
        ],
    }

    assert run_view(view, [{"resourceType": "Patient", "id": "b"}]) == []


def test_nested_for_each_and_union_all_with_this() -> None:
    view = {
        "resource": "Patient",
        "select": [
            {"column": [column("id", "id")]},
            {
                "forEach": "contact",
                "column": [column("system", "telecom.system")],
                "unionAll": [
                    {"column": [column("name", "name.family")]},
                    {"forEach": "name.given", "column": [column("name", "$this")]},
                ],
            },
        ],
    }
    patient = {
        "resourceType": "Patient",
        "id": "a",
        "contact": [
            {"telecom": [{"system": "phone"}], "name": {"family": "F", "given": ["G1", "G2"]}},
            {"telecom": [{"system": "email"}], "name": {"family": "H"}},
        ],
    }

    rows = run_view(view, [patient])

    assert rows == [
        {"id": "a", "system": "phone", "name": "F"},
        {"id": "a", "system": "phone", "name": "G1"},
        {"id": "a", "system": "phone", "name": "G2"},
        {"id": "a", "system": "email", "name": "H"},
    ]
    assert compile_view(view).column_names == ["id", "system", "name"]


def test_selects_on_one_level_form_a_cartesian_product() -> None:
    view = {
        "resource": "Patient",
        "select": [
            {"forEach": "name", "column": [column("family", "family")]},
            {"forEach": "telecom", "column": [column("value", "value")]},
        ],
    }
    patient = {
        "resourceType": "Patient",
        "name": [{"family": "X"}, {"family": "Y"}],
        "telecom": [{"value": "1"}, {"value": "2"}],
    }

    assert len(run_view(view, [patient])) == 4


def test_collection_column_and_the_single_value_rule() -> None:
    names = {"resourceType": "Patient", "name": [{"family": "X"}, {"family": "Y"}]}

    assert run_view(patient_view(column("f", "name.family", collection=True)), [names]) == [
        {"f": ["X", "Y"]}
    ]
    with pytest.raises(ViewDefinitionError, match="column f returned 2 values"):
        run_view(patient_view(column("f", "name.family")), [names])


def test_where_keeps_only_matching_resources() -> None:
    view = patient_view(column("id", "id"), where=[{"path": "gender = 'female'"}])

    assert run_view(view, [PATIENT, {**PATIENT, "id": "p2", "gender": "male"}]) == [{"id": "p1"}]


def test_constants_are_fhirpath_variables() -> None:
    view = patient_view(
        column("is_female", "gender = %wanted"),
        constant=[{"name": "wanted", "valueCode": "female"}],
    )

    assert run_view(view, [PATIENT]) == [{"is_female": True}]


# --- environment variables, types, boundaries of quantities ---------------------------------------
ITEMS = {
    "resourceType": "QuestionnaireResponse",
    "id": "q",
    "item": [
        {"linkId": "1", "item": [{"linkId": "1.1", "item": [{"linkId": "1.1.1"}]}]},
        {"linkId": "2", "answer": [{"item": [{"linkId": "2.1"}]}]},
    ],
}


def test_row_index_counts_each_iteration_from_zero() -> None:
    view = {
        "resource": "Patient",
        "select": [
            {"column": [column("top", "%rowIndex")]},
            {
                "forEach": "contact",
                "column": [column("contact", "%rowIndex")],
                "select": [
                    {"forEach": "telecom", "column": [column("telecom", "%rowIndex")]},
                    {"column": [column("inherited", "%rowIndex")]},
                ],
            },
        ],
    }
    patient = {
        "resourceType": "Patient",
        "contact": [{"telecom": [{}, {}]}, {"telecom": [{}]}],
    }

    assert run_view(view, [patient]) == [
        {"top": 0, "contact": 0, "telecom": 0, "inherited": 0},
        {"top": 0, "contact": 0, "telecom": 1, "inherited": 0},
        {"top": 0, "contact": 1, "telecom": 0, "inherited": 1},
    ]


def test_repeat_goes_depth_first_and_row_index_follows_it() -> None:
    view = {
        "resource": "QuestionnaireResponse",
        "select": [
            {
                "repeat": ["item", "answer.item"],
                "column": [column("link", "linkId"), column("position", "%rowIndex")],
            }
        ],
    }

    assert run_view(view, [ITEMS]) == [
        {"link": "1", "position": 0},
        {"link": "1.1", "position": 1},
        {"link": "1.1.1", "position": 2},
        {"link": "2", "position": 3},
        {"link": "2.1", "position": 4},
    ]


def test_the_null_row_of_for_each_or_null_is_the_select_on_no_element() -> None:
    view = {
        "resource": "Patient",
        "select": [
            {
                "forEachOrNull": "name",
                "column": [
                    column("position", "%rowIndex"),
                    column("family", "family"),
                    column("given", "given", collection=True),
                    column("has_family", "family.exists()"),
                    column("source", "'name'"),
                ],
            }
        ],
    }

    assert run_view(view, [{"resourceType": "Patient", "name": [{"family": "X"}]}]) == [
        {"position": 0, "family": "X", "given": [], "has_family": True, "source": "name"}
    ]
    assert run_view(view, [{"resourceType": "Patient"}]) == [
        {"position": 0, "family": None, "given": [], "has_family": False, "source": "name"}
    ]


def test_resource_and_root_resource_reach_the_resource_below_a_for_each() -> None:
    view = {
        "resource": "Patient",
        "select": [
            {
                "forEach": "name",
                "column": [
                    column("family", "family"),
                    column("gender", "%resource.gender"),
                    column("root", "%rootResource.id"),
                ],
            }
        ],
    }

    assert run_view(view, [PATIENT]) == [{"family": "Brennan", "gender": "female", "root": "p1"}]


def test_a_constant_may_not_take_an_environment_variable_name() -> None:
    view = patient_view(
        column("i", "%rowIndex"), constant=[{"name": "rowIndex", "valueInteger": 3}]
    )

    with pytest.raises(ViewDefinitionError, match="rowIndex is reserved"):
        compile_view(view)


@pytest.mark.parametrize(
    ("resource", "path", "expected"),
    [
        # FHIRPath System types select the FHIR primitives whose values they are.
        ({"valueTime": "18:12:00"}, "value.ofType(Time)", "18:12:00"),
        ({"valueTime": "18:12:00"}, "value.ofType(System.Time)", "18:12:00"),
        ({"valueString": "s"}, "value.ofType(String)", "s"),
        ({"valueBoolean": False}, "value.ofType(Boolean)", False),
        ({"valueInteger": 7}, "value.ofType(Integer)", 7),
        ({"valueDateTime": "2020-01"}, "value.ofType(DateTime)", "2020-01"),
        ({"effectiveInstant": "2015-02-07T13:28:17.239+02:00"}, "effective.ofType(DateTime)",
         "2015-02-07T13:28:17.239+02:00"),
        # ... and a capitalised FHIR primitive, as the SQL on FHIR tests write it.
        ({"effectiveInstant": "2015-02-07T13:28:17.239+02:00"}, "effective.ofType(Instant)",
         "2015-02-07T13:28:17.239+02:00"),
        ({"effectiveInstant": "2015-02-07T13:28:17.239+02:00"}, "effective.ofType(dateTime)", None),
        ({"valueTime": "18:12:00"}, "value.ofType(Date)", None),
        ({"valueString": "s"}, "value.ofType(Integer)", None),
        ({"valueTime": "18:12:00"}, "value is Time", True),
        ({"valueTime": "18:12:00"}, "value.is(String)", False),
        ({"valueTime": "18:12:00"}, "(value as Time).exists()", True),
    ],
)  # fmt: skip
def test_of_type_knows_system_types(resource: dict[str, Any], path: str, expected: Any) -> None:
    view = {"resource": "Observation", "select": [{"column": [column("v", path)]}]}

    assert run_view(view, [{"resourceType": "Observation", **resource}]) == [{"v": expected}]


def test_of_type_keeps_subtypes_in_the_fhir_model() -> None:
    view = patient_view(column("ages", "extension.value.ofType(Quantity).value", collection=True))
    patient = {
        "resourceType": "Patient",
        "extension": [
            {"url": "a", "valueAge": {"value": 3}},
            {"url": "b", "valueQuantity": {"value": 4}},
            {"url": "c", "valueString": "5"},
        ],
    }

    assert run_view(view, [patient]) == [{"ages": [3, 4]}]


def test_boundaries_of_a_quantity_keep_its_unit() -> None:
    view = {
        "resource": "Observation",
        "select": [
            {
                "column": [
                    column("low", "value.ofType(Quantity).lowBoundary().value", type="decimal"),
                    column("high", "value.ofType(Quantity).highBoundary().value", type="decimal"),
                    column("unit", "value.ofType(Quantity).highBoundary().unit"),
                ]
            }
        ],
    }
    observation = {"resourceType": "Observation", "valueQuantity": {"value": 1.5, "unit": "mg"}}

    assert run_view(view, [observation]) == [{"low": 1.45, "high": 1.55, "unit": "mg"}]


def test_boundaries_of_a_period_are_those_of_its_start_and_end() -> None:
    view = {
        "resource": "Encounter",
        "select": [
            {
                "column": [
                    column("low", "period.lowBoundary()"),
                    column("high", "period.highBoundary()"),
                    column("high_day", "period.highBoundary(8)"),
                ]
            }
        ],
    }
    closed = {"resourceType": "Encounter", "period": {"start": "2020-01", "end": "2020-02-03"}}
    open_ended = {"resourceType": "Encounter", "period": {"start": "2020-01-05T10:00:00Z"}}

    assert run_view(view, [closed, open_ended]) == [
        {
            "low": "2020-01-01T00:00:00.000+14:00",
            "high": "2020-02-03T23:59:59.999-12:00",
            "high_day": "2020-02-03",
        },
        {"low": "2020-01-05T10:00:00.000Z", "high": None, "high_day": None},
    ]


# --- invalid views -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("view", "message"),
    [
        (patient_view(column("1bad", "id")), r"invalid column name '1bad'"),
        (patient_view(column("bad-name", "id")), r"invalid column name 'bad-name'"),
        (patient_view({"name": "id"}), r"column id has no path"),
        (patient_view(column("id", "id"), column("id", "gender")), r"duplicate column names: id"),
        (patient_view(column("id", "name.where(")), r"invalid FHIRPath 'name.where\('"),
        ({"select": [{"column": [column("id", "id")]}]}, r"needs a resource type"),
        ({"resource": "Patient", "select": []}, r"needs at least one select"),
        (
            {"resource": "Patient", "select": [{"forEach": 1}]},
            r"forEach needs a FHIRPath string, got 1",
        ),
        (
            {"resource": "Patient", "select": [{"forEach": "name", "forEachOrNull": "name"}]},
            r"only one of forEach, forEachOrNull and repeat",
        ),
        (
            {
                "resource": "Patient",
                "select": [
                    {
                        "unionAll": [
                            {"column": [column("a", "id")]},
                            {"column": [column("b", "id")]},
                        ]
                    }
                ],
            },
            r"unionAll branches must have the same columns",
        ),
    ],
)
def test_invalid_view_is_rejected_with_a_clear_message(view: dict[str, Any], message: str) -> None:
    with pytest.raises(ViewDefinitionError, match=message):
        compile_view(view)


def test_where_that_is_not_boolean_is_an_error() -> None:
    view = patient_view(column("id", "id"), where=[{"path": "gender"}])

    with pytest.raises(ViewDefinitionError, match="must return a single boolean"):
        run_view(view, [PATIENT])


def test_undefined_constant_is_an_error() -> None:
    with pytest.raises(ViewDefinitionError, match="column g: evaluation failed"):
        run_view(patient_view(column("g", "%missing")), [PATIENT])
