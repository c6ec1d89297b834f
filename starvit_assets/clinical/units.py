"""UCUM unit conversions for body measurements.

The table below is the single source of the conversion factors: Python uses it directly and
dbt reads it from the generated seed ``ucum_conversions.csv`` (see ``seeds.py``).
Normalising multiplies by the factor and never rounds, in Python and in SQL alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from starvit_assets.clinical.errors import UnitError

UCUM_SYSTEM = "http://unitsofmeasure.org"


class Dimension(StrEnum):
    MASS = "mass"
    LENGTH = "length"
    BODY_MASS_INDEX = "body_mass_index"


@dataclass(frozen=True)
class UnitConversion:
    """``value_in_canonical_unit = value * factor`` for one UCUM unit code."""

    unit_code: str
    dimension: Dimension
    canonical_unit: str
    factor: float


KILOGRAM = "kg"
CENTIMETRE = "cm"
KILOGRAM_PER_SQUARE_METRE = "kg/m2"

UCUM_CONVERSIONS: tuple[UnitConversion, ...] = (
    UnitConversion("kg", Dimension.MASS, KILOGRAM, 1.0),
    UnitConversion("g", Dimension.MASS, KILOGRAM, 0.001),
    UnitConversion("[lb_av]", Dimension.MASS, KILOGRAM, 0.45359237),
    UnitConversion("cm", Dimension.LENGTH, CENTIMETRE, 1.0),
    UnitConversion("m", Dimension.LENGTH, CENTIMETRE, 100.0),
    UnitConversion("[in_i]", Dimension.LENGTH, CENTIMETRE, 2.54),
    UnitConversion("kg/m2", Dimension.BODY_MASS_INDEX, KILOGRAM_PER_SQUARE_METRE, 1.0),
)

_CONVERSIONS_BY_CODE = {conversion.unit_code: conversion for conversion in UCUM_CONVERSIONS}


def conversion_for(unit_code: str) -> UnitConversion:
    try:
        return _CONVERSIONS_BY_CODE[unit_code]
    except KeyError:
        known = ", ".join(sorted(_CONVERSIONS_BY_CODE))
        raise UnitError(f"unknown UCUM unit code {unit_code!r}; known codes: {known}") from None


def normalise(value: float, unit_code: str) -> tuple[float, str]:
    """The value in the canonical unit of its dimension, and that unit."""
    conversion = conversion_for(unit_code)
    return value * conversion.factor, conversion.canonical_unit


def convert(value: float, unit_code: str, dimension: Dimension) -> float:
    conversion = conversion_for(unit_code)
    if conversion.dimension is not dimension:
        raise UnitError(
            f"unit {unit_code!r} measures {conversion.dimension.value}, not {dimension.value}"
        )
    return value * conversion.factor


def to_kilograms(value: float, unit_code: str) -> float:
    return convert(value, unit_code, Dimension.MASS)


def to_centimetres(value: float, unit_code: str) -> float:
    return convert(value, unit_code, Dimension.LENGTH)
