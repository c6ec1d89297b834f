"""Code systems and the LOINC codes of the body measurements the derived metrics use.

Both tables reach dbt as generated seeds (``code_systems.csv``, ``body_measures.csv``), so the
SQL never spells a URI, a LOINC code or a plausibility limit of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from starvit_assets.clinical.units import CENTIMETRE, KILOGRAM, KILOGRAM_PER_SQUARE_METRE


@dataclass(frozen=True)
class CodeSystem:
    uri: str
    short_name: str


CODE_SYSTEMS: tuple[CodeSystem, ...] = (
    CodeSystem("http://loinc.org", "loinc"),
    CodeSystem("http://snomed.info/sct", "snomed"),
    CodeSystem("http://hl7.org/fhir/sid/icd-10-cm", "icd10cm"),
    CodeSystem("http://www.nlm.nih.gov/research/umls/rxnorm", "rxnorm"),
    CodeSystem("http://hl7.org/fhir/sid/cvx", "cvx"),
    CodeSystem("http://unitsofmeasure.org", "ucum"),
)

_SHORT_NAMES = {system.uri: system.short_name for system in CODE_SYSTEMS}


def code_system_short_name(uri: str | None) -> str | None:
    """The short name of a known code system URI; None for an unknown or missing one."""
    return _SHORT_NAMES.get(uri) if uri is not None else None


class Measure(StrEnum):
    BODY_HEIGHT = "body_height"
    BODY_WEIGHT = "body_weight"
    BMI = "bmi"


@dataclass(frozen=True)
class BodyMeasure:
    """A body measurement: how it is coded, its canonical unit and its plausible range.

    The range is closed (``plausible_min <= value <= plausible_max``); values outside are
    treated as entry errors and never used to compute a metric.
    """

    measure: Measure
    code_system: str
    code: str
    canonical_unit: str
    plausible_min: float
    plausible_max: float


BODY_MEASURES: tuple[BodyMeasure, ...] = (
    BodyMeasure(Measure.BODY_HEIGHT, "loinc", "8302-2", CENTIMETRE, 30.0, 260.0),
    BodyMeasure(Measure.BODY_WEIGHT, "loinc", "29463-7", KILOGRAM, 1.0, 400.0),
    BodyMeasure(Measure.BMI, "loinc", "39156-5", KILOGRAM_PER_SQUARE_METRE, 10.0, 80.0),
)

_MEASURES_BY_CODE = {(m.code_system, m.code): m for m in BODY_MEASURES}
_MEASURES_BY_NAME = {m.measure: m for m in BODY_MEASURES}


def body_measure_for_code(code_system: str | None, code: str | None) -> BodyMeasure | None:
    """The body measure coded by (short code system name, code), if any."""
    if code_system is None or code is None:
        return None
    return _MEASURES_BY_CODE.get((code_system, code))


def is_plausible(measure: Measure, value: float) -> bool:
    limits = _MEASURES_BY_NAME[measure]
    return limits.plausible_min <= value <= limits.plausible_max
