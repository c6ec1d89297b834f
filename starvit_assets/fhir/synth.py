"""Deterministic synthetic FHIR R4 data, written patient by patient (memory flat in patients).

Same ``patients`` and ``seed`` give byte-identical files. About a third of the patients are
measured in inches and pounds; some conditions have partial-precision onsets; some
observations carry free-text notes holding the patient's name (to prove it never crosses).
"""

from __future__ import annotations

import datetime as dt
import json
import random
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

RESOURCE_TYPES = ("Patient", "Encounter", "Observation", "Condition", "MedicationRequest")
EXPORT_EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"

GIVEN_NAMES = (
    "Olivia",
    "Liam",
    "Amara",
    "Noah",
    "Sofia",
    "Mateo",
    "Hannah",
    "Elijah",
    "Priya",
    "Tomasz",
    "Ingrid",
    "Kwame",
    "Yuki",
    "Fatima",
    "Lucas",
    "Maeve",
)
FAMILY_NAMES = (
    "Okafor",
    "Lindqvist",
    "Castellanos",
    "Whitfield",
    "Nakamura",
    "Brennan",
    "Abernathy",
    "Kowalczyk",
    "Delacroix",
    "Haverford",
    "Montague",
    "Szabo",
    "Ramanathan",
    "Oyelaran",
)
CITIES = (
    ("Springfield", "MA", "011"),
    ("Riverton", "NY", "120"),
    ("Lakeside", "CA", "921"),
    ("Fairview", "TX", "750"),
    ("Hanover", "NH", "036"),
    ("Bristol", "CT", "059"),
)
STREETS = ("Maple Avenue", "Harbor Road", "Cedar Lane", "Mill Street", "Orchard Way", "Quarry Hill")
OFFSETS = ("Z", "+02:00", "-05:00", "+05:30", "-08:00", "+01:00")

CONDITIONS = (
    ("38341003", "Hypertensive disorder", "I10", "Essential (primary) hypertension"),
    (
        "44054006",
        "Diabetes mellitus type 2",
        "E11.9",
        "Type 2 diabetes mellitus without complications",
    ),
    ("195967001", "Asthma", "J45.909", "Unspecified asthma, uncomplicated"),
    ("414916001", "Obesity", "E66.9", "Obesity, unspecified"),
    ("55822004", "Hyperlipidemia", "E78.5", "Hyperlipidemia, unspecified"),
    (
        "35489007",
        "Depressive disorder",
        "F32.9",
        "Major depressive disorder, single episode, unspecified",
    ),
    ("279039007", "Low back pain", "M54.50", "Low back pain, unspecified"),
    (
        "235595009",
        "Gastroesophageal reflux disease",
        "K21.9",
        "Gastro-esophageal reflux disease without esophagitis",
    ),
    ("61582004", "Allergic rhinitis", "J30.9", "Allergic rhinitis, unspecified"),
    (
        "68566005",
        "Urinary tract infectious disease",
        "N39.0",
        "Urinary tract infection, site not specified",
    ),
)
MEDICATIONS = (
    ("197361", "amlodipine 5 MG Oral Tablet"),
    ("860975", "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet"),
    ("314076", "lisinopril 10 MG Oral Tablet"),
    ("617312", "atorvastatin 10 MG Oral Tablet"),
    ("745679", "200 ACTUAT albuterol 0.09 MG/ACTUAT Metered Dose Inhaler"),
    ("310798", "hydrochlorothiazide 25 MG Oral Tablet"),
    ("312961", "simvastatin 20 MG Oral Tablet"),
    ("198211", "simvastatin 40 MG Oral Tablet"),
)


def _id(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _instant(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _date_time(moment: dt.datetime, offset: str) -> str:
    if offset == "Z":
        return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    sign = 1 if offset[0] == "+" else -1
    delta = dt.timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6])) * sign
    return moment.astimezone(dt.timezone(delta)).isoformat(timespec="seconds")


def _meta(rng: random.Random) -> dict[str, str]:
    updated = EXPORT_EPOCH - dt.timedelta(days=rng.randint(1, 300), seconds=rng.randint(0, 86_399))
    return {"versionId": "1", "lastUpdated": _instant(updated)}


def _patient(rng: random.Random, index: int) -> tuple[dict[str, Any], str, float]:
    given = rng.choice(GIVEN_NAMES)
    family = rng.choice(FAMILY_NAMES)
    city, state, zip3 = rng.choice(CITIES)
    roll = rng.random()
    if roll < 0.05:
        age = rng.randint(90, 101)
    elif roll < 0.1:
        age = rng.randint(3, 17)
    else:
        age = rng.randint(18, 89)
    birth = EXPORT_EPOCH.date() - dt.timedelta(days=age * 365 + rng.randint(0, 364))
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "id": _id(rng),
        "meta": _meta(rng),
        "text": {
            "status": "generated",
            "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{given} {family}</div>',
        },
        "identifier": [
            {
                "system": "urn:oid:1.2.36.146.595.217.0.1",
                "value": f"MRN{rng.randint(10**7, 10**8 - 1)}",
            },
            {
                "system": "http://hl7.org/fhir/sid/us-ssn",
                "value": f"{rng.randint(100, 899)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}",
            },
        ],
        "name": [{"use": "official", "family": family, "given": [given]}],
        "telecom": [
            {
                "system": "phone",
                "value": f"555-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}",
                "use": "home",
            },
            {"system": "email", "value": f"{given.lower()}.{family.lower()}{index}@example.org"},
        ],
        "gender": rng.choices(("female", "male", "other", "unknown"), weights=(48, 48, 2, 2))[0],
        "birthDate": birth.isoformat(),
        "address": [
            {
                "use": "home",
                "line": [f"{rng.randint(1, 999)} {rng.choice(STREETS)}"],
                "city": city,
                "state": state,
                "postalCode": f"{zip3}{rng.randint(0, 99):02d}",
            }
        ],
    }
    if age >= 90 and rng.random() < 0.3:
        patient["deceasedBoolean"] = True
    return patient, f"{given} {family}", float(age)


def _reference(resource_type: str, resource_id: str) -> dict[str, str]:
    return {"reference": f"{resource_type}/{resource_id}"}


def _quantity(value: float, unit: str, code: str) -> dict[str, Any]:
    return {"value": round(value, 1), "unit": unit, "system": UCUM, "code": code}


def _vital(
    rng: random.Random,
    patient_id: str,
    encounter_id: str,
    moment: str,
    loinc: str,
    display: str,
    quantity: dict[str, Any],
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": _id(rng),
        "meta": _meta(rng),
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "vital-signs",
                        "display": "Vital Signs",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": LOINC, "code": loinc, "display": display}], "text": display},
        "subject": _reference("Patient", patient_id),
        "encounter": _reference("Encounter", encounter_id),
        "effectiveDateTime": moment,
        "valueQuantity": quantity,
    }


def _patient_bundle(rng: random.Random, index: int) -> dict[str, list[dict[str, Any]]]:
    patient, full_name, age = _patient(rng, index)
    patient_id = patient["id"]
    resources: dict[str, list[dict[str, Any]]] = {name: [] for name in RESOURCE_TYPES}
    resources["Patient"].append(patient)
    imperial = rng.random() < 0.35
    height_cm = rng.gauss(170, 9) if age >= 18 else rng.uniform(95, 165)
    # Weight follows from a drawn BMI: height and weight drawn apart gave BMIs no body has.
    body_mass_index = min(48.0, max(16.5, rng.gauss(26, 4.5))) if age >= 18 else rng.uniform(14, 23)
    weight_kg = body_mass_index * (height_cm / 100) ** 2
    offset = rng.choice(OFFSETS)
    visit = EXPORT_EPOCH - dt.timedelta(days=rng.randint(400, 1500))
    encounter_ids = []
    for _ in range(rng.randint(1, 4)):
        visit += dt.timedelta(
            days=rng.randint(20, 300), hours=rng.randint(7, 17), minutes=rng.randint(0, 59)
        )
        end = visit + dt.timedelta(minutes=rng.randint(15, 90))
        encounter_id = _id(rng)
        encounter: dict[str, Any] = {
            "resourceType": "Encounter",
            "id": encounter_id,
            "meta": _meta(rng),
            "status": "finished",
            "class": {
                "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                "code": rng.choice(("AMB", "AMB", "IMP")),
            },
            "type": [
                {
                    "coding": [
                        {"system": SNOMED, "code": "185349003", "display": "Encounter for check up"}
                    ]
                }
            ],
            "subject": _reference("Patient", patient_id),
            "period": {"start": _date_time(visit, offset), "end": _date_time(end, offset)},
        }
        resources["Encounter"].append(encounter)
        encounter_ids.append(encounter_id)
        moment = _date_time(visit + dt.timedelta(minutes=5), offset)
        weight_kg = max(15.0, weight_kg + rng.gauss(0, 1.5))
        if imperial:
            height = _quantity(height_cm / 2.54, "in", "[in_i]")
            weight = _quantity(weight_kg / 0.45359237, "lb", "[lb_av]")
        else:
            height = _quantity(height_cm, "cm", "cm")
            weight = _quantity(weight_kg, "kg", "kg")
        observations = [
            _vital(rng, patient_id, encounter_id, moment, "8302-2", "Body height", height),
            _vital(rng, patient_id, encounter_id, moment, "29463-7", "Body weight", weight),
            _vital(
                rng,
                patient_id,
                encounter_id,
                moment,
                "39156-5",
                "Body mass index (BMI) [Ratio]",
                _quantity(weight_kg / (height_cm / 100) ** 2, "kg/m2", "kg/m2"),
            ),
        ]
        if rng.random() < 0.1:
            observations[1]["note"] = [{"text": f"{full_name} reports feeling well."}]
        resources["Observation"].extend(observations)
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        snomed, snomed_display, icd10, icd10_display = rng.choice(CONDITIONS)
        roll = rng.random()
        onset_year = EXPORT_EPOCH.year - rng.randint(1, 15)
        if roll < 0.15:
            onset = str(onset_year)
        elif roll < 0.3:
            onset = f"{onset_year}-{rng.randint(1, 12):02d}"
        else:
            onset = _date_time(EXPORT_EPOCH - dt.timedelta(days=rng.randint(30, 5000)), offset)
        resources["Condition"].append(
            {
                "resourceType": "Condition",
                "id": _id(rng),
                "meta": _meta(rng),
                "clinicalStatus": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                            "code": "active",
                        }
                    ]
                },
                "verificationStatus": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                            "code": "confirmed",
                        }
                    ]
                },
                "code": {
                    "coding": [
                        {"system": SNOMED, "code": snomed, "display": snomed_display},
                        {"system": ICD10CM, "code": icd10, "display": icd10_display},
                    ],
                    "text": snomed_display,
                },
                "subject": _reference("Patient", patient_id),
                "encounter": _reference("Encounter", rng.choice(encounter_ids)),
                "onsetDateTime": onset,
                "recordedDate": _date_time(visit, offset),
            }
        )
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        code, display = rng.choice(MEDICATIONS)
        resources["MedicationRequest"].append(
            {
                "resourceType": "MedicationRequest",
                "id": _id(rng),
                "meta": _meta(rng),
                "status": "active",
                "intent": "order",
                "medicationCodeableConcept": {
                    "coding": [{"system": RXNORM, "code": code, "display": display}],
                    "text": display,
                },
                "subject": _reference("Patient", patient_id),
                "encounter": _reference("Encounter", rng.choice(encounter_ids)),
                "authoredOn": _date_time(visit, offset),
            }
        )
    return resources


def generate(out_dir: Path, patients: int, seed: int) -> dict[str, int]:
    """Write ``<ResourceType>.ndjson`` for ``patients`` synthetic patients; counts per type."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(RESOURCE_TYPES, 0)
    with ExitStack() as stack:
        handles = {
            name: stack.enter_context(
                (out_dir / f"{name}.ndjson").open("w", encoding="utf-8", newline="\n")
            )
            for name in RESOURCE_TYPES
        }
        for index in range(patients):
            rng = random.Random(f"{seed}/{index}")
            for resource_type, resources in _patient_bundle(rng, index).items():
                for resource in resources:
                    handles[resource_type].write(json.dumps(resource, separators=(",", ":")) + "\n")
                counts[resource_type] += len(resources)
    return counts
