"""Body mass index, WHO adult weight categories and age brackets.

These functions define the clinical semantics; the dbt models compute the same values in SQL
from seeds generated out of the tables below, so both must stay identical:

* ``bmi = weight_kg / (height_m * height_m)`` rounded half away from zero to one decimal,
  after first rounding to 9 decimal places (BigQuery's NUMERIC scale, so that Python,
  PostgreSQL and BigQuery agree; see the ``round_half_up`` macro).
* Both tables are contiguous intervals given by their starts: an interval runs from its own
  start (inclusive) to the next one's start (exclusive), the last one is open. The seeds and
  the SQL use the same encoding (``lead()`` over the starts), so no bound is ever null.
* WHO categories over the rounded BMI: underweight ``[0, 18.5)``, normal ``[18.5, 25)``,
  overweight ``[25, 30)``, obese ``[30, +inf)``. With one decimal, ``[18.5, 25)`` is the
  familiar "18.5-24.9".
* Age brackets over whole years: ``[0, 18)`` = "0-17", ..., ``[80, 90)`` = "80-89", and
  ``[90, +inf)`` = "90+", matching the de-identification policy that pools everyone over 89.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_UP, Decimal

from starvit_assets.clinical.errors import ClinicalValueError

BMI_DECIMALS = 1
# Every engine first fixes the quotient to 9 decimals: BigQuery casts FLOAT64 to NUMERIC
# with scale 9, PostgreSQL casts float8 to numeric with 15 significant digits.
INTERMEDIATE_DECIMALS = 9
_POSTGRES_FLOAT_DIGITS = 15


@dataclass(frozen=True)
class WeightCategory:
    """Starts at ``lower_bound`` (inclusive) and ends where the next category starts."""

    name: str
    lower_bound: float


# BMI is positive, so the first category starts at 0.
WHO_BMI_CATEGORIES: tuple[WeightCategory, ...] = (
    WeightCategory("underweight", 0.0),
    WeightCategory("normal", 18.5),
    WeightCategory("overweight", 25.0),
    WeightCategory("obese", 30.0),
)


@dataclass(frozen=True)
class AgeBracket:
    """Starts at ``min_age`` whole years and ends before the next bracket's ``min_age``."""

    label: str
    min_age: int


AGE_BRACKETS: tuple[AgeBracket, ...] = (
    AgeBracket("0-17", 0),
    AgeBracket("18-29", 18),
    AgeBracket("30-39", 30),
    AgeBracket("40-49", 40),
    AgeBracket("50-59", 50),
    AgeBracket("60-69", 60),
    AgeBracket("70-79", 70),
    AgeBracket("80-89", 80),
    AgeBracket("90+", 90),
)


def round_half_up(value: float, decimals: int) -> float:
    """Round as the SQL ``round_half_up`` macro does (half away from zero, via 9 decimals)."""
    fixed = Decimal(f"{value:.{_POSTGRES_FLOAT_DIGITS}g}").quantize(
        Decimal(1).scaleb(-INTERMEDIATE_DECIMALS), rounding=ROUND_HALF_UP
    )
    return float(fixed.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP))


def bmi(weight_kg: float, height_cm: float) -> float:
    """Body mass index in kg/m2, rounded to one decimal."""
    for name, value in (("weight_kg", weight_kg), ("height_cm", height_cm)):
        if not math.isfinite(value) or value <= 0:
            raise ClinicalValueError(f"bmi: {name} must be a positive number")
    height_m = height_cm / 100.0
    return round_half_up(weight_kg / (height_m * height_m), BMI_DECIMALS)


def who_weight_category(bmi_value: float) -> str:
    """The WHO adult weight category of a (rounded) BMI."""
    if not math.isfinite(bmi_value) or bmi_value < WHO_BMI_CATEGORIES[0].lower_bound:
        raise ClinicalValueError("who_weight_category: bmi must be a non-negative finite number")
    return _last_starting_at_or_below(
        bmi_value, [(category.lower_bound, category.name) for category in WHO_BMI_CATEGORIES]
    )


def age_bracket(age: int) -> str:
    if age < AGE_BRACKETS[0].min_age:
        raise ClinicalValueError("age_bracket: age must not be negative")
    return _last_starting_at_or_below(
        age, [(bracket.min_age, bracket.label) for bracket in AGE_BRACKETS]
    )


def age_in_reference_year(birth_year: int, reference_date: date) -> int:
    """The age attained during the reference year: only the birth year crosses the de-id gate."""
    age = reference_date.year - birth_year
    if age < 0:
        raise ClinicalValueError("age_in_reference_year: birth year is after the reference date")
    return age


def _last_starting_at_or_below(value: float, starts: list[tuple[float, str]]) -> str:
    """The name of the interval containing ``value`` among contiguous intervals given by starts."""
    return max((start, name) for start, name in starts if start <= value)[1]
