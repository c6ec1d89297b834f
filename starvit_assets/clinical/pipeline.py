"""The BMI path of the warehouse as one pure function over FHIR-like observation records.

Mirrors the dbt models step by step so the clinical logic can be tested without a database:
latest version per observation (refined ``observation``), validation and unit normalisation
(refined ``observation`` + the ``bmi_latest`` filters), latest height and weight per patient
and the BMI with its WHO category (``bmi_latest``, ``patient_weight_category``).

Records are mappings with the column names of the raw ``observation`` and ``patient`` tables
(docs/raw-tables.md). Rejections name the record's position and the reason, never its values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from starvit_assets.clinical.bmi import age_bracket, age_in_reference_year, bmi, who_weight_category
from starvit_assets.clinical.dates import fhir_datetime_start
from starvit_assets.clinical.errors import ClinicalValueError
from starvit_assets.clinical.terminology import (
    BodyMeasure,
    Measure,
    body_measure_for_code,
    code_system_short_name,
    is_plausible,
)
from starvit_assets.clinical.units import UCUM_SYSTEM, UnitError, normalise

# Observation statuses whose values may feed a metric; the dbt var `metric_observation_statuses`
# must list the same (checked by the integration tests).
METRIC_OBSERVATION_STATUSES: tuple[str, ...] = ("final", "amended", "corrected")


@dataclass(frozen=True)
class BodyObservation:
    """A validated body measurement in its canonical unit."""

    observation_id: str
    patient_id: str
    measure: Measure
    value: float
    unit: str
    effective_at: datetime | None
    last_updated_at: datetime | None


@dataclass(frozen=True)
class Rejection:
    """A record that looked like a body measurement but cannot be used: its position, and why."""

    index: int
    reason: str


@dataclass(frozen=True)
class ValidationResult:
    accepted: list[BodyObservation]
    rejected: list[Rejection]
    ignored: int


@dataclass(frozen=True)
class PatientBmi:
    patient_id: str
    height_cm: float
    weight_kg: float
    bmi: float
    weight_category: str
    height_observation_id: str
    weight_observation_id: str


@dataclass(frozen=True)
class BmiPipelineResult:
    patients: list[PatientBmi]
    rejected: list[Rejection]


def latest_version_positions(records: Sequence[Mapping[str, Any]]) -> list[int]:
    """Positions of the latest record per ``observation_id``: by last_updated, export, line."""

    def version_key(record: Mapping[str, Any]) -> tuple[Any, ...]:
        updated = record.get("last_updated")
        return (
            *_nulls_last(fhir_datetime_start(updated) if updated is not None else None),
            *_nulls_last(record.get("_export_id")),
            *_nulls_last(record.get("_source_line")),
        )

    latest: dict[str, int] = {}
    for position, record in enumerate(records):
        key = record["observation_id"]
        current = latest.get(key)
        if current is None or version_key(record) > version_key(records[current]):
            latest[key] = position
    return sorted(latest.values())


def validate_observations(records: Sequence[Mapping[str, Any]]) -> ValidationResult:
    """Keep usable body measurements, normalised; reject broken ones; ignore other codes."""
    accepted: list[BodyObservation] = []
    rejected: list[Rejection] = []
    ignored = 0
    for index, record in enumerate(records):
        measure = body_measure_for_code(
            code_system_short_name(record.get("code_system")), record.get("code")
        )
        if measure is None or record.get("status") not in METRIC_OBSERVATION_STATUSES:
            ignored += 1
            continue
        try:
            accepted.append(_body_observation(record, measure))
        except ClinicalValueError as error:
            rejected.append(Rejection(index=index, reason=str(error)))
    return ValidationResult(accepted=accepted, rejected=rejected, ignored=ignored)


def latest_per_patient(
    observations: Iterable[BodyObservation],
) -> dict[tuple[str, Measure], BodyObservation]:
    """The latest observation per (patient, measure): by effective time, then last update, then id."""

    def recency(observation: BodyObservation) -> tuple[Any, ...]:
        return (
            *_nulls_last(observation.effective_at),
            *_nulls_last(observation.last_updated_at),
            observation.observation_id,
        )

    latest: dict[tuple[str, Measure], BodyObservation] = {}
    for observation in observations:
        key = (observation.patient_id, observation.measure)
        current = latest.get(key)
        if current is None or recency(observation) > recency(current):
            latest[key] = observation
    return latest


def patient_bmis(records: Sequence[Mapping[str, Any]]) -> BmiPipelineResult:
    """latest version -> validate and normalise units -> latest height and weight per patient
    -> BMI and category. Rejection positions refer to ``records``."""
    positions = latest_version_positions(records)
    validation = validate_observations([records[position] for position in positions])
    rejected = [
        Rejection(index=positions[rejection.index], reason=rejection.reason)
        for rejection in validation.rejected
    ]
    latest = latest_per_patient(validation.accepted)
    patients: list[PatientBmi] = []
    for patient_id in sorted({patient for patient, _ in latest}):
        height = latest.get((patient_id, Measure.BODY_HEIGHT))
        weight = latest.get((patient_id, Measure.BODY_WEIGHT))
        if height is None or weight is None:
            continue
        value = bmi(weight.value, height.value)
        patients.append(
            PatientBmi(
                patient_id=patient_id,
                height_cm=height.value,
                weight_kg=weight.value,
                bmi=value,
                weight_category=who_weight_category(value),
                height_observation_id=height.observation_id,
                weight_observation_id=weight.observation_id,
            )
        )
    return BmiPipelineResult(patients=patients, rejected=rejected)


def patient_age_brackets(
    patients: Iterable[Mapping[str, Any]], reference_date: date
) -> dict[str, str | None]:
    """Age bracket per patient from ``birth_year``; None when unknown or after the reference."""

    def bracket(birth_year: int | None) -> str | None:
        if birth_year is None:
            return None
        try:
            return age_bracket(age_in_reference_year(int(birth_year), reference_date))
        except ClinicalValueError:
            return None

    return {patient["patient_id"]: bracket(patient.get("birth_year")) for patient in patients}


def _body_observation(record: Mapping[str, Any], measure: BodyMeasure) -> BodyObservation:
    patient_id = record.get("patient_id")
    if not patient_id:
        raise ClinicalValueError("missing patient_id")
    quantity = record.get("value_quantity")
    if quantity is None or not math.isfinite(float(quantity)):
        raise ClinicalValueError(f"missing or non-finite value for {measure.measure.value}")
    unit_system = record.get("value_unit_system")
    if unit_system is not None and unit_system != UCUM_SYSTEM:
        raise UnitError(f"{measure.measure.value} unit is not a UCUM code")
    unit_code = record.get("value_unit_code")
    if unit_code is None:
        raise UnitError(f"{measure.measure.value} has no unit code")
    value, unit = normalise(float(quantity), unit_code)
    if unit != measure.canonical_unit:
        raise UnitError(f"unit {unit_code!r} does not measure {measure.measure.value}")
    if not is_plausible(measure.measure, value):
        raise ClinicalValueError(f"implausible {measure.measure.value}")
    effective = record.get("effective_datetime")
    updated = record.get("last_updated")
    return BodyObservation(
        observation_id=record["observation_id"],
        patient_id=patient_id,
        measure=measure.measure,
        value=value,
        unit=unit,
        effective_at=fhir_datetime_start(effective) if effective is not None else None,
        last_updated_at=fhir_datetime_start(updated) if updated is not None else None,
    )


def _nulls_last(value: Any) -> tuple[bool, Any]:
    """A sort key part under which a missing value loses, as SQL ``order by ... desc nulls last``.

    The presence flag decides first, so a missing value is never compared with a present one.
    """
    return (value is not None, value)
