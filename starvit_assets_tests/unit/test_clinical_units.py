from __future__ import annotations

import pytest

from starvit_assets.clinical.errors import ClinicalValueError
from starvit_assets.clinical.units import (
    UCUM_CONVERSIONS,
    Dimension,
    UnitError,
    convert,
    normalise,
    to_centimetres,
    to_kilograms,
)


@pytest.mark.parametrize(
    ("value", "unit", "kilograms"),
    [
        (154.0, "[lb_av]", 69.85322498),
        (72.5, "kg", 72.5),
        (3400.0, "g", 3.4),
        (1.0, "[lb_av]", 0.45359237),
    ],
)
def test_to_kilograms(value: float, unit: str, kilograms: float) -> None:
    assert to_kilograms(value, unit) == pytest.approx(kilograms, abs=1e-9)


@pytest.mark.parametrize(
    ("value", "unit", "centimetres"),
    [(70.0, "[in_i]", 177.8), (1.75, "m", 175.0), (165.0, "cm", 165.0), (1.0, "[in_i]", 2.54)],
)
def test_to_centimetres(value: float, unit: str, centimetres: float) -> None:
    assert to_centimetres(value, unit) == pytest.approx(centimetres, abs=1e-9)


def test_unknown_unit_is_a_unit_error_naming_the_code() -> None:
    with pytest.raises(UnitError, match=r"unknown UCUM unit code '\[stone_av\]'"):
        to_kilograms(12.0, "[stone_av]")


def test_unit_of_the_wrong_dimension_is_refused() -> None:
    with pytest.raises(UnitError, match="measures length, not mass"):
        to_kilograms(180.0, "cm")
    assert issubclass(UnitError, ClinicalValueError)


def test_normalise_returns_the_canonical_unit_and_never_rounds() -> None:
    assert normalise(154.0, "[lb_av]") == (154.0 * 0.45359237, "kg")
    assert normalise(24.2, "kg/m2") == (24.2, "kg/m2")


def test_every_dimension_has_an_identity_conversion_to_its_canonical_unit() -> None:
    for dimension in Dimension:
        canonical = {c.canonical_unit for c in UCUM_CONVERSIONS if c.dimension is dimension}
        assert len(canonical) == 1
        (unit,) = canonical
        assert convert(5.0, unit, dimension) == 5.0
