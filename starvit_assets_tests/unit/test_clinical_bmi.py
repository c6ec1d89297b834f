from __future__ import annotations

import math
from datetime import date

import pytest

from starvit_assets.clinical.bmi import (
    AGE_BRACKETS,
    WHO_BMI_CATEGORIES,
    age_bracket,
    age_in_reference_year,
    bmi,
    round_half_up,
    who_weight_category,
)
from starvit_assets.clinical.errors import ClinicalValueError
from starvit_assets.clinical.units import to_centimetres, to_kilograms


@pytest.mark.parametrize(
    ("weight_kg", "height_cm", "expected"),
    [
        (68.0, 165.0, 25.0),  # 68 / 1.65^2 = 24.977...
        (72.0, 165.0, 26.4),  # 26.446...
        (23.0, 120.0, 16.0),  # 15.972...
        (48.0, 160.0, 18.8),  # 18.75 exactly: half away from zero, where round() gives 18.7
        (100.0, 200.0, 25.0),
    ],
)
def test_bmi_hand_computed(weight_kg: float, height_cm: float, expected: float) -> None:
    assert bmi(weight_kg, height_cm) == expected


def test_bmi_of_a_patient_measured_in_inches_and_pounds() -> None:
    # 70 in = 177.8 cm, 154 lb = 69.853 kg; 69.85322498 / 1.778^2 = 22.0964... -> 22.1
    assert bmi(to_kilograms(154.0, "[lb_av]"), to_centimetres(70.0, "[in_i]")) == 22.1


def test_round_half_up_rounds_halves_away_from_zero() -> None:
    assert round_half_up(18.75, 1) == 18.8
    assert round_half_up(24.95, 1) == 25.0  # the float is 24.9499999..., fixed to 9 decimals first
    assert round_half_up(24.94, 1) == 24.9


@pytest.mark.parametrize(
    ("weight_kg", "height_cm"), [(0.0, 170.0), (70.0, 0.0), (-1.0, 170.0), (math.nan, 170.0)]
)
def test_bmi_refuses_non_positive_or_missing_inputs(weight_kg: float, height_cm: float) -> None:
    with pytest.raises(ClinicalValueError, match="must be a positive number"):
        bmi(weight_kg, height_cm)


@pytest.mark.parametrize(
    ("bmi_value", "category"),
    [
        (0.0, "underweight"),
        (18.4, "underweight"),
        (18.5, "normal"),
        (24.9, "normal"),
        (25.0, "overweight"),
        (29.9, "overweight"),
        (30.0, "obese"),
        (80.0, "obese"),
    ],
)
def test_who_weight_category_at_its_boundaries(bmi_value: float, category: str) -> None:
    assert who_weight_category(bmi_value) == category


@pytest.mark.parametrize("bmi_value", [-0.1, math.inf, math.nan])
def test_who_weight_category_refuses_impossible_bmi(bmi_value: float) -> None:
    with pytest.raises(ClinicalValueError):
        who_weight_category(bmi_value)


@pytest.mark.parametrize(
    ("age", "bracket"),
    [
        (0, "0-17"),
        (17, "0-17"),
        (18, "18-29"),
        (29, "18-29"),
        (30, "30-39"),
        (49, "40-49"),
        (50, "50-59"),
        (69, "60-69"),
        (70, "70-79"),
        (89, "80-89"),
        (90, "90+"),
        (117, "90+"),
    ],
)
def test_age_bracket_at_its_boundaries(age: int, bracket: str) -> None:
    assert age_bracket(age) == bracket


def test_age_bracket_refuses_negative_age() -> None:
    with pytest.raises(ClinicalValueError, match="must not be negative"):
        age_bracket(-1)


def test_age_in_reference_year_uses_only_the_year() -> None:
    assert age_in_reference_year(1980, date(2024, 1, 1)) == 44
    assert age_in_reference_year(1980, date(2024, 12, 31)) == 44
    with pytest.raises(ClinicalValueError, match="after the reference date"):
        age_in_reference_year(2025, date(2024, 6, 30))


def test_tables_are_ordered_by_their_starts() -> None:
    assert [c.lower_bound for c in WHO_BMI_CATEGORIES] == sorted(
        c.lower_bound for c in WHO_BMI_CATEGORIES
    )
    assert [b.min_age for b in AGE_BRACKETS] == sorted(b.min_age for b in AGE_BRACKETS)
