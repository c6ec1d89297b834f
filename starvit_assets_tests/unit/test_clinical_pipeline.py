"""End to end over mock FHIR-like records, without a database: validate -> normalise units ->
latest height and weight per patient -> BMI and WHO category; age brackets from patients."""

from __future__ import annotations

from datetime import date
from typing import Any

from starvit_assets.clinical.pipeline import (
    patient_age_brackets,
    patient_bmis,
    validate_observations,
)

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
HEIGHT = "8302-2"
WEIGHT = "29463-7"


def observation(
    observation_id: str,
    patient_id: str,
    code: str,
    value: float | None,
    unit: str | None,
    effective: str | None,
    *,
    status: str = "final",
    last_updated: str = "2024-05-01T10:00:00Z",
    export_id: str = "export-1",
    unit_system: str | None = UCUM,
    code_system: str = LOINC,
) -> dict[str, Any]:
    return {
        "observation_id": observation_id,
        "patient_id": patient_id,
        "status": status,
        "code_system": code_system,
        "code": code,
        "value_quantity": value,
        "value_unit_system": unit_system,
        "value_unit_code": unit,
        "effective_datetime": effective,
        "last_updated": last_updated,
        "_export_id": export_id,
        "_source_line": 1,
    }


MOCK_OBSERVATIONS = [
    # metric patient: the newer weight wins; a later entered-in-error weight is not used
    observation("a-h", "pat-a", HEIGHT, 165.0, "cm", "2023-01-10T09:10:00+01:00"),
    observation("a-w-old", "pat-a", WEIGHT, 70.0, "kg", "2022-01-10"),
    observation("a-w", "pat-a", WEIGHT, 68.0, "kg", "2023-01-10T09:10:00+01:00"),
    observation("a-w-err", "pat-a", WEIGHT, 95.0, "kg", "2023-06-01", status="entered-in-error"),
    # imperial patient: 70 in and 154 lb
    observation("b-h", "pat-b", HEIGHT, 70.0, "[in_i]", "2023-02-10"),
    observation("b-w", "pat-b", WEIGHT, 154.0, "[lb_av]", "2023-02-10"),
    # an implausible later weight (a typo) is rejected, the earlier one used
    observation("b-w-typo", "pat-b", WEIGHT, 1540.0, "[lb_av]", "2023-03-10"),
    # metres and grams; the weight was amended in a later export
    observation("c-h", "pat-c", HEIGHT, 1.2, "m", "2023-03-01T08:00:00Z"),
    observation("c-w", "pat-c", WEIGHT, 25000.0, "g", "2023-03-01T08:00:00Z"),
    observation(
        "c-w",
        "pat-c",
        WEIGHT,
        23000.0,
        "g",
        "2023-03-01T08:00:00Z",
        status="amended",
        last_updated="2024-06-01T00:00:00Z",
        export_id="export-2",
    ),
    # only a height: no BMI
    observation("d-h", "pat-d", HEIGHT, 150.0, "cm", "2023-01-01"),
    # broken records: rejected with a reason
    observation("e-h", "pat-e", HEIGHT, 180.0, "[ft_i]", "2023-01-01"),
    observation(
        "e-w", "pat-e", WEIGHT, 80.0, "kg", "2023-01-01", unit_system="http://example.org/units"
    ),
    observation("e-w2", "pat-e", WEIGHT, None, "kg", "2023-01-01"),
    observation("e-w3", "pat-e", WEIGHT, 80.0, "cm", "2023-01-01"),
    # not a body measurement: ignored
    observation("a-glucose", "pat-a", "2339-0", 95.0, "mg/dL", "2023-01-10"),
]


def test_bmi_end_to_end_over_mock_records() -> None:
    result = patient_bmis(MOCK_OBSERVATIONS)

    by_patient = {p.patient_id: p for p in result.patients}
    assert set(by_patient) == {"pat-a", "pat-b", "pat-c"}

    a = by_patient["pat-a"]
    assert (a.height_cm, a.weight_kg, a.bmi, a.weight_category) == (165.0, 68.0, 25.0, "overweight")
    assert a.weight_observation_id == "a-w"

    b = by_patient["pat-b"]
    assert b.height_cm == 177.8
    assert abs(b.weight_kg - 69.85322498) < 1e-9
    assert (b.bmi, b.weight_category, b.weight_observation_id) == (22.1, "normal", "b-w")

    c = by_patient["pat-c"]
    assert (c.height_cm, c.weight_kg, c.bmi, c.weight_category) == (
        120.0,
        23.0,
        16.0,
        "underweight",
    )


def test_rejections_name_position_and_reason_but_no_values() -> None:
    result = patient_bmis(MOCK_OBSERVATIONS)

    reasons = sorted(rejection.reason for rejection in result.rejected)
    assert len(reasons) == 5
    positions = {rejection.index for rejection in result.rejected}
    assert {MOCK_OBSERVATIONS[i]["observation_id"] for i in positions} == {
        "b-w-typo",
        "e-h",
        "e-w",
        "e-w2",
        "e-w3",
    }
    assert "implausible body_weight" in reasons
    assert any("unknown UCUM unit code '[ft_i]'" in reason for reason in reasons)
    assert "body_weight unit is not a UCUM code" in reasons
    assert "missing or non-finite value for body_weight" in reasons
    assert "unit 'cm' does not measure body_weight" in reasons
    assert not any("pat-" in reason or "1540" in reason for reason in reasons)


def test_validation_ignores_other_codes_and_unusable_statuses() -> None:
    result = validate_observations(MOCK_OBSERVATIONS)

    assert result.ignored == 2  # the glucose and the entered-in-error weight
    assert {o.observation_id for o in result.accepted} >= {
        "a-h",
        "a-w",
        "b-h",
        "b-w",
        "c-h",
        "c-w",
        "d-h",
    }


def test_age_brackets_from_mock_patient_records() -> None:
    patients = [
        {"patient_id": "child", "birth_year": 2007},
        {"patient_id": "young-adult", "birth_year": 2006},
        {"patient_id": "eighty-nine", "birth_year": 1935},
        {"patient_id": "pooled-ninety", "birth_year": 1934},
        {"patient_id": "unknown", "birth_year": None},
        {"patient_id": "not-born-yet", "birth_year": 2025},
    ]

    assert patient_age_brackets(patients, date(2024, 6, 30)) == {
        "child": "0-17",
        "young-adult": "18-29",
        "eighty-nine": "80-89",
        "pooled-ninety": "90+",
        "unknown": None,
        "not-born-yet": None,
    }
