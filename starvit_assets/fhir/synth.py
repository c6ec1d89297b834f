"""Deterministic synthetic FHIR R4 data at about a hundred resources per patient, streamed.

Every patient has its own ``random.Random`` derived from (seed, index), and its resources go
straight to the per-type NDJSON files: the same seed gives byte-identical files, patient ``i`` is
the same whatever the number of patients, and memory stays flat however many are asked for.

About a third of the patients are measured in inches and pounds; some conditions have
partial-precision onsets; some weight observations carry free-text notes holding the patient's
name (to prove it never crosses the de-identification gate).

Data-quality faults are planted on purpose at ``fault_rate`` (see ``FAULT_KINDS``), drawn from
a second per-patient generator so that the clean data does not change with the rate; every
fault is listed in ``truth.json`` next to the NDJSON, and so is every height and weight
Observation recorded in inches or pounds (``IMPERIAL_UNITS``, not a fault). Body height, weight and BMI observations
only ever get exact duplicates: downstream BMI must stay hand-checkable from the source.

Research Consent resources (``Consent.ndjson``) come from a third per-patient generator, so
adding them changed no other resource: most patients permit research use, a few deny it, and
a few have a deny that no longer holds (expired, superseded by a later permit, or withdrawn),
the edge cases of the gate's consent rule (starvit_assets/lake/consent.py). Every patient's
case is listed in ``consents.json``.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

RESOURCE_TYPES = (
    "Patient",
    "Encounter",
    "Observation",
    "Condition",
    "MedicationRequest",
    "Procedure",
    "Immunization",
    "AllergyIntolerance",
    "Consent",
)
FAULT_KINDS = (
    "unknown_code",
    "unknown_code_system",
    "missing_unit",
    "non_ucum_unit",
    "duplicate_resource",
    "duplicate_person",
    "malformed_date",
)
# Not a fault: every height and weight Observation recorded in inches or pounds, listed in
# truth.json next to the faults so that tests find the imperial measurements without guessing.
IMPERIAL_UNITS = "imperial_units"
IMPERIAL_CODES = frozenset({"[in_i]", "[lb_av]"})
TRUTH_KINDS = (*FAULT_KINDS, IMPERIAL_UNITS)
TRUTH_FILE = "truth.json"
# The true person of every Patient record (``persons.json``): what record linkage must find.
PERSONS_FILE = "persons.json"
# Every patient's research consent case (``consents.json``): what the gate's filter must do.
CONSENTS_FILE = "consents.json"
# (case, weight): only "deny" opts the patient out on the export date; "none" has no Consent.
CONSENT_CASES = (
    ("permit", 78),
    ("deny", 8),
    ("expired_deny", 4),
    ("superseded_deny", 4),
    ("withdrawn_deny", 2),
    ("none", 4),
)
OPTED_OUT_CASE = "deny"
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
CONSENT_CATEGORY = "http://loinc.org"
CONSENT_POLICY = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
DEFAULT_SOURCE = "A"
# Ways a second, unlinked record of the same person differs from the first (see _vary).
VARIATIONS = (
    "typo",
    "nickname",
    "case",
    "diacritics",
    "swapped_names",
    "moved_zip",
    "missing_sex",
    "birth_date_typo",
)
# How a source other than DEFAULT_SOURCE records a person it shares with it: as is, or varied.
CROSS_SOURCE_VARIATION_RATE = 0.5
# No fault unless asked: the demo and the e2e plant only the kinds of demo.DEMO_FAULT_RATES
# (through fault_rates), whose effect on the counts the e2e knows from the truth files.
DEFAULT_FAULT_RATE = 0.0
EXPORT_EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
_EPOCH_SECONDS = int(EXPORT_EPOCH.timestamp())

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
CVX = "http://hl7.org/fhir/sid/cvx"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"

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
    ("38341003", "High blood pressure", "I10", "Essential (primary) hypertension"),
    (
        "44054006",
        "Type 2 diabetes (long-term high blood sugar)",
        "E11.9",
        "Type 2 diabetes mellitus without complications",
    ),
    (
        "195967001",
        "Asthma (recurring narrowing of the airways)",
        "J45.909",
        "Unspecified asthma, uncomplicated",
    ),
    ("414916001", "Body weight far above the healthy range", "E66.9", "Obesity, unspecified"),
    ("55822004", "Raised blood fats", "E78.5", "Hyperlipidemia, unspecified"),
    (
        "35489007",
        "Depression (lasting low mood)",
        "F32.9",
        "Major depressive disorder, single episode, unspecified",
    ),
    ("279039007", "Pain in the lower back", "M54.50", "Low back pain, unspecified"),
    (
        "235595009",
        "Stomach acid rising into the gullet",
        "K21.9",
        "Gastro-esophageal reflux disease without esophagitis",
    ),
    (
        "61582004",
        "Hay fever (sneezing and runny nose from allergy)",
        "J30.9",
        "Allergic rhinitis, unspecified",
    ),
    (
        "68566005",
        "Infection of the bladder or kidneys",
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


PROCEDURES = (
    ("430193006", "Review of the medicines a patient takes"),
    ("171207006", "Questions to look for depression"),
    ("710824005", "Review of health and care support needs"),
    ("162673000", "General physical check by a clinician"),
    ("29303009", "Heart tracing (ECG)"),
    ("399208008", "X-ray picture of the chest"),
    ("117015009", "Throat swab sent to the lab to grow germs"),
    ("73761001", "Camera look inside the large bowel"),
)
VACCINES = (
    ("140", "Influenza, seasonal, injectable, preservative free"),
    ("208", "COVID-19, mRNA, LNP-S, PF, 30 mcg/0.3 mL dose"),
    ("115", "Tdap"),
    ("133", "Pneumococcal conjugate PCV 13"),
    ("33", "pneumococcal polysaccharide PPV23"),
    ("08", "Hep B, adolescent or pediatric"),
    ("62", "HPV, quadrivalent"),
    ("21", "varicella"),
    ("03", "MMR"),
)
ALLERGIES = (
    ("91936005", "Allergic to penicillin antibiotics", "medication", "high"),
    ("300916003", "Allergic to latex rubber", "environment", "low"),
    ("91935009", "Allergic to peanuts", "food", "high"),
    ("300913006", "Allergic to shellfish", "food", "high"),
    ("418689008", "Allergic to grass pollen", "environment", "low"),
    ("232350006", "Allergic to house dust mites", "environment", "low"),
    ("232347008", "Allergic to pet hair and skin flakes", "environment", "low"),
    ("91930004", "Allergic to eggs", "food", "low"),
)
REACTIONS = (
    ("271807003", "Skin rash"),
    ("247472004", "Raised itchy bump on the skin"),
    ("49727002", "Coughing"),
    ("267036007", "Short of breath"),
    ("39579001", "Severe whole-body allergic reaction"),
)
ENCOUNTER_TYPES = (
    ("185349003", "Routine check-up visit", "AMB"),
    ("185349003", "Routine check-up visit", "AMB"),
    ("390906007", "Follow-up visit", "AMB"),
    ("50849002", "Visit to the emergency department", "EMER"),
    ("32485007", "Admitted to hospital", "IMP"),
)

# (LOINC, display, UCUM code, human unit, category): the body measures first; downstream knows
# only those three, and they never get a fault that would change the BMI it computes.
BODY_MEASURES = frozenset({"8302-2", "29463-7", "39156-5"})
OBSERVATION_CODES = {
    "8302-2": ("Body height", "vital-signs"),
    "29463-7": ("Body weight", "vital-signs"),
    "39156-5": ("Body mass index (BMI) [Ratio]", "vital-signs"),
    "8867-4": ("Heart rate", "vital-signs"),
    "8480-6": ("Systolic blood pressure", "vital-signs"),
    "8462-4": ("Diastolic blood pressure", "vital-signs"),
    "8310-5": ("Body temperature", "vital-signs"),
    "9279-1": ("Respiratory rate", "vital-signs"),
    "59408-5": ("Oxygen saturation in Arterial blood by Pulse oximetry", "vital-signs"),
    "2339-0": ("Glucose [Mass/volume] in Blood", "laboratory"),
    "4548-4": ("Hemoglobin A1c/Hemoglobin.total in Blood", "laboratory"),
    "2093-3": ("Cholesterol [Mass/volume] in Serum or Plasma", "laboratory"),
    "2571-8": ("Triglyceride [Mass/volume] in Serum or Plasma", "laboratory"),
    "2085-9": ("Cholesterol in HDL [Mass/volume] in Serum or Plasma", "laboratory"),
    "2160-0": ("Creatinine [Mass/volume] in Serum or Plasma", "laboratory"),
    "718-7": ("Hemoglobin [Mass/volume] in Blood", "laboratory"),
}
UCUM_UNITS = {
    "cm": "cm",
    "kg": "kg",
    "[in_i]": "in",
    "[lb_av]": "lb",
    "kg/m2": "kg/m2",
    "/min": "/min",
    "mm[Hg]": "mmHg",
    "Cel": "°C",
    "%": "%",
    "mg/dL": "mg/dL",
    "g/dL": "g/dL",
}
_UNIT_JSON = {code: json.dumps(unit) for code, unit in UCUM_UNITS.items()}
# Spellings seen in real feeds that are not UCUM (UCUM is case-sensitive and has no "bpm").
NON_UCUM = {
    "/min": "bpm",
    "mm[Hg]": "mmHg",
    "Cel": "C",
    "%": "percent",
    "mg/dL": "mg per dL",
    "g/dL": "gm/dL",
}
# LOINC-shaped codes that are in no table downstream (and, as far as LOINC goes, unassigned).
UNKNOWN_LOINC = ("99999-9", "99998-1", "99997-3")
UNKNOWN_SYSTEMS = (
    "http://example.org/fhir/CodeSystem/local-codes",
    "urn:oid:2.16.840.1.113883.19.5.99",
    # A trailing slash is the commonest way a real feed gets a known system wrong.
    "http://loinc.org/",
)
MALFORMED_DATES = (
    "2023-02-30",
    "2022-13-07",
    "07/11/2021",
    "2021-06-15T25:61:00Z",
    "2020-00-10T08:00:00Z",
    "yesterday",
)
# How likely each kind is once a resource is picked for a fault; malformed dates stay "a few".
_FAULT_WEIGHTS = {
    "unknown_code": 3,
    "unknown_code_system": 2,
    "missing_unit": 3,
    "non_ucum_unit": 3,
    "duplicate_resource": 3,
    "malformed_date": 1,
}
_NONE: tuple[str, ...] = ()
_DUPLICATE_ONLY = ("duplicate_resource",)
_DATED = ("duplicate_resource", "malformed_date")
_CODED = ("duplicate_resource", "malformed_date", "unknown_code_system")
_MEASURED = (
    "duplicate_resource",
    "malformed_date",
    "unknown_code",
    "unknown_code_system",
    "missing_unit",
    "non_ucum_unit",
)
_DATE_FIELD = {
    "Encounter": "period.start",
    "Observation": "effectiveDateTime",
    "Condition": "onsetDateTime",
    "MedicationRequest": "authoredOn",
    "Procedure": "performedDateTime",
    "Immunization": "occurrenceDateTime",
    "AllergyIntolerance": "recordedDate",
}
_CODE_FIELD = {
    "Observation": "code",
    "Condition": "code",
    "MedicationRequest": "medicationCodeableConcept",
    "Procedure": "code",
    "Immunization": "vaccineCode",
    "AllergyIntolerance": "code",
}

Emitted = tuple[str, dict[str, Any], tuple[str, ...]]


def _id(rng: random.Random) -> str:
    # The same bits uuid.UUID(int=..., version=4) sets, without building a UUID per resource.
    bits = rng.getrandbits(128)
    bits = (bits & ~(0xF000 << 64)) | (0x4000 << 64)
    bits = (bits & ~(0xC000 << 48)) | (0x8000 << 48)
    h = f"{bits:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# lastUpdated falls 1 to 300 days before the export: the day part is formatted once, here.
_UPDATE_DAYS = tuple(
    time.strftime("%Y-%m-%d", time.gmtime(_EPOCH_SECONDS - days * 86_400)) for days in range(1, 301)
)


def _date_time(moment: dt.datetime, offset: str) -> str:
    if offset == "Z":
        return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    sign = 1 if offset[0] == "+" else -1
    delta = dt.timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6])) * sign
    return moment.astimezone(dt.timezone(delta)).isoformat(timespec="seconds")


def _meta(rng: random.Random) -> dict[str, str]:
    # One draw and table look-ups: this runs for every resource, so strftime would dominate.
    draw = int(rng.random() * 300 * 86_400)
    day, second = divmod(draw, 86_400)
    hours, rest = divmod(second, 3600)
    minutes, seconds = divmod(rest, 60)
    stamp = f"{_UPDATE_DAYS[day]}T{hours:02d}:{minutes:02d}:{seconds:02d}.000Z"
    return {"versionId": "1", "lastUpdated": stamp}


def _reference(resource_type: str, resource_id: str) -> dict[str, str]:
    return {"reference": f"{resource_type}/{resource_id}"}


def _concept(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _status(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


# Shared, never mutated: the faults replace a sub-object instead of editing it in place.
_OBSERVATION_CONCEPTS = {
    code: _concept(LOINC, code, display) for code, (display, _) in OBSERVATION_CODES.items()
}
_CATEGORIES = {
    name: [{"coding": [{"system": OBSERVATION_CATEGORY, "code": name, "display": display}]}]
    for name, display in (("vital-signs", "Vital Signs"), ("laboratory", "Laboratory"))
}
_CONDITION_CLINICAL = _status("http://terminology.hl7.org/CodeSystem/condition-clinical", "active")
_CONDITION_VERIFIED = _status(
    "http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed"
)
_ALLERGY_CLINICAL = _status(
    "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "active"
)
_ALLERGY_VERIFIED = _status(
    "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "confirmed"
)


_ENCODE: Callable[[Any], str] = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode
# Observations are four fifths of the output: their constant parts are encoded once. The lines
# equal what the JSON encoder writes for the same dict (the unit tests re-encode and compare).
_OBSERVATION_PARTS = {
    code: (
        ',"status":"final","category":'
        + _ENCODE(_CATEGORIES[category])
        + ',"code":'
        + _ENCODE(_OBSERVATION_CONCEPTS[code])
    )
    for code, (_, category) in OBSERVATION_CODES.items()
}


def _observation_line(resource: dict[str, Any]) -> str:
    quantity = resource["valueQuantity"]
    return (
        f'{{"resourceType":"Observation","id":"{resource["id"]}",'
        f'"meta":{{"versionId":"1","lastUpdated":"{resource["meta"]["lastUpdated"]}"}}'
        f"{_OBSERVATION_PARTS[resource['code']['coding'][0]['code']]}"
        f',"subject":{{"reference":"{resource["subject"]["reference"]}"}}'
        f',"encounter":{{"reference":"{resource["encounter"]["reference"]}"}}'
        f',"effectiveDateTime":"{resource["effectiveDateTime"]}"'
        f',"valueQuantity":{{"value":{quantity["value"]!r},"unit":{_UNIT_JSON[quantity["code"]]}'
        f',"system":"{UCUM}","code":"{quantity["code"]}"}}}}\n'
    )


def _quantity(value: float, code: str, decimals: int = 1) -> dict[str, Any]:
    rounded: float = round(value, decimals) if decimals else round(value)
    return {"value": rounded, "unit": UCUM_UNITS[code], "system": UCUM, "code": code}


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


def _consent(
    rng: random.Random, patient_id: str, kind: str, signed: dt.date, **provision: Any
) -> dict[str, Any]:
    """A research-scope Consent of ``patient_id``; ``provision`` adds to the base provision."""
    return {
        "resourceType": "Consent",
        "id": _id(rng),
        "meta": _meta(rng),
        "status": provision.pop("status", "active"),
        "scope": _concept(CONSENT_SCOPE, "research", "Research"),
        "category": [
            _concept(CONSENT_CATEGORY, "57016-8", "Privacy policy acknowledgment Document")
        ],
        "patient": _reference("Patient", patient_id),
        "dateTime": signed.isoformat(),
        "policyRule": _status(CONSENT_POLICY, "OPTOUT" if kind == "deny" else "OPTIN"),
        "provision": {"type": kind, **provision},
    }


def _consents(rng: random.Random, patient_id: str) -> tuple[str, list[dict[str, Any]]]:
    """A patient's consent case and its Consent resources, all signed before the export."""
    cases, weights = zip(*CONSENT_CASES, strict=True)
    case = rng.choices(cases, weights)[0]
    signed = EXPORT_EPOCH.date() - dt.timedelta(days=rng.randint(400, 3000))
    later = signed + dt.timedelta(days=rng.randint(30, 360))
    if case == "permit":
        consents = [_consent(rng, patient_id, "permit", signed)]
    elif case == "deny":
        consents = [_consent(rng, patient_id, "deny", signed, period={"start": str(signed)})]
    elif case == "expired_deny":
        period = {"start": signed.isoformat(), "end": later.isoformat()}
        consents = [_consent(rng, patient_id, "deny", signed, period=period)]
    elif case == "superseded_deny":
        consents = [
            _consent(rng, patient_id, "deny", signed),
            _consent(rng, patient_id, "permit", later),
        ]
    elif case == "withdrawn_deny":
        consents = [_consent(rng, patient_id, "deny", signed, status="inactive")]
    else:
        consents = []
    return case, consents


class _Observations:
    """Builds the observations of one patient; the shared parts are made once per encounter."""

    def __init__(self, rng: random.Random, patient_id: str) -> None:
        self.rng = rng
        self.subject = _reference("Patient", patient_id)

    def make(
        self, encounter: dict[str, str], moment: str, loinc: str, quantity: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "resourceType": "Observation",
            "id": _id(self.rng),
            "meta": _meta(self.rng),
            "status": "final",
            "category": _CATEGORIES[OBSERVATION_CODES[loinc][1]],
            "code": _OBSERVATION_CONCEPTS[loinc],
            "subject": self.subject,
            "encounter": encounter,
            "effectiveDateTime": moment,
            "valueQuantity": quantity,
        }


def _patient_resources(
    rng: random.Random, patient: dict[str, Any], full_name: str, age: float
) -> Iterator[Emitted]:
    """The clinical resources of one patient, in the order they are written."""
    patient_id = patient["id"]
    subject = _reference("Patient", patient_id)
    adult = age >= 18
    imperial = rng.random() < 0.35
    height_cm = rng.gauss(170, 9) if adult else rng.uniform(95, 165)
    # Weight follows from a drawn BMI: height and weight drawn apart gave BMIs no body has.
    body_mass_index = min(48.0, max(16.5, rng.gauss(26, 4.5))) if adult else rng.uniform(14, 23)
    weight_kg = body_mass_index * (height_cm / 100) ** 2
    offset = rng.choice(OFFSETS)
    conditions = rng.sample(CONDITIONS, rng.choice((0, 1, 1, 2, 3, 4)))
    diabetic = any(condition[0] == "44054006" for condition in conditions)
    hypertensive = any(condition[0] == "38341003" for condition in conditions)
    resting_rate = rng.gauss(74, 8)
    systolic_base = rng.gauss(138 if hypertensive else 121, 9)

    visits = rng.randint(3, 11)
    span_days = rng.randint(3 * 365, 8 * 365)
    gap = span_days / (visits + 1)
    start = EXPORT_EPOCH - dt.timedelta(days=span_days)
    observations = _Observations(rng, patient_id)
    encounters: list[tuple[dict[str, str], dt.datetime]] = []
    for visit_number in range(visits):
        # Visits spread over the span, jittered within their slot, so they stay in order and
        # the last one still falls before the export.
        day = gap * (visit_number + 1) + rng.uniform(-gap / 3, gap / 3)
        visit = (start + dt.timedelta(days=int(day))).replace(
            hour=rng.randint(7, 17), minute=rng.randint(0, 59)
        )
        type_code, type_display, class_code = rng.choice(ENCOUNTER_TYPES)
        minutes = rng.randint(15, 90) if class_code == "AMB" else rng.randint(120, 4320)
        encounter_id = _id(rng)
        yield (
            "Encounter",
            {
                "resourceType": "Encounter",
                "id": encounter_id,
                "meta": _meta(rng),
                "status": "finished",
                "class": {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                    "code": class_code,
                },
                "type": [_concept(SNOMED, type_code, type_display)],
                "subject": subject,
                "period": {
                    "start": _date_time(visit, offset),
                    "end": _date_time(visit + dt.timedelta(minutes=minutes), offset),
                },
            },
            _DATED,
        )
        encounter = _reference("Encounter", encounter_id)
        encounters.append((encounter, visit))
        moment = _date_time(visit + dt.timedelta(minutes=5), offset)
        if not adult:
            height_cm = min(190.0, height_cm + rng.uniform(0, 3))
        # The walk stays within BMIs a body can have (12 to 60 at today's height): left
        # free it drifted out of the plausible range of the dbt tests at a few thousand patients.
        square_m = (height_cm / 100) ** 2
        weight_kg = min(60 * square_m, max(15.0, 12 * square_m, weight_kg + rng.gauss(0, 1.5)))
        if imperial:
            height = _quantity(height_cm / 2.54, "[in_i]")
            weight = _quantity(weight_kg / 0.45359237, "[lb_av]")
        else:
            height = _quantity(height_cm, "cm")
            weight = _quantity(weight_kg, "kg")
        yield "Observation", observations.make(encounter, moment, "8302-2", height), _DUPLICATE_ONLY
        weighed = observations.make(encounter, moment, "29463-7", weight)
        if rng.random() < 0.1:
            weighed["note"] = [{"text": f"{full_name} reports feeling well."}]
        yield "Observation", weighed, _DUPLICATE_ONLY
        bmi = _quantity(weight_kg / (height_cm / 100) ** 2, "kg/m2")
        yield "Observation", observations.make(encounter, moment, "39156-5", bmi), _DUPLICATE_ONLY

        systolic = systolic_base + rng.gauss(0, 8)
        vitals = (
            ("8867-4", _quantity(resting_rate + rng.gauss(0, 6), "/min", 0)),
            ("8480-6", _quantity(systolic, "mm[Hg]", 0)),
            ("8462-4", _quantity(systolic * 0.64 + rng.gauss(0, 5), "mm[Hg]", 0)),
            ("8310-5", _quantity(rng.gauss(36.8, 0.3), "Cel")),
            ("9279-1", _quantity(rng.randint(12, 20), "/min", 0)),
            ("59408-5", _quantity(min(100.0, rng.gauss(97.5, 1.2)), "%", 0)),
        )
        for loinc, quantity in vitals:
            yield "Observation", observations.make(encounter, moment, loinc, quantity), _MEASURED
        if rng.random() < (0.45 if adult else 0.1):
            drawn = _date_time(visit + dt.timedelta(minutes=20), offset)
            labs = (
                ("2339-0", _quantity(rng.gauss(150 if diabetic else 92, 15), "mg/dL", 0)),
                ("4548-4", _quantity(rng.gauss(7.6 if diabetic else 5.3, 0.4), "%")),
                ("2093-3", _quantity(rng.gauss(195, 30), "mg/dL", 0)),
                ("2571-8", _quantity(max(40.0, rng.gauss(140, 45)), "mg/dL", 0)),
                ("2085-9", _quantity(rng.gauss(52, 12), "mg/dL", 0)),
                ("2160-0", _quantity(max(0.4, rng.gauss(0.95, 0.2)), "mg/dL", 2)),
                ("718-7", _quantity(rng.gauss(14, 1.3), "g/dL")),
            )
            for loinc, quantity in labs:
                yield "Observation", observations.make(encounter, drawn, loinc, quantity), _MEASURED
        if rng.random() < 0.4:
            code, display = rng.choice(PROCEDURES)
            yield (
                "Procedure",
                {
                    "resourceType": "Procedure",
                    "id": _id(rng),
                    "meta": _meta(rng),
                    "status": "completed",
                    "code": _concept(SNOMED, code, display),
                    "subject": subject,
                    "encounter": encounter,
                    "performedDateTime": _date_time(visit + dt.timedelta(minutes=10), offset),
                },
                _CODED,
            )
        if rng.random() < 0.4:
            code, display = rng.choice(VACCINES)
            yield (
                "Immunization",
                {
                    "resourceType": "Immunization",
                    "id": _id(rng),
                    "meta": _meta(rng),
                    "status": "completed",
                    "vaccineCode": _concept(CVX, code, display),
                    "patient": subject,
                    "encounter": encounter,
                    "occurrenceDateTime": _date_time(visit + dt.timedelta(minutes=15), offset),
                    "primarySource": True,
                },
                _CODED,
            )

    for snomed, snomed_display, icd10, icd10_display in conditions:
        roll = rng.random()
        onset_year = EXPORT_EPOCH.year - rng.randint(1, 15)
        if roll < 0.15:
            onset = str(onset_year)
        elif roll < 0.3:
            onset = f"{onset_year}-{rng.randint(1, 12):02d}"
        else:
            onset = _date_time(EXPORT_EPOCH - dt.timedelta(days=rng.randint(30, 5000)), offset)
        encounter, visit = rng.choice(encounters)
        yield (
            "Condition",
            {
                "resourceType": "Condition",
                "id": _id(rng),
                "meta": _meta(rng),
                "clinicalStatus": _CONDITION_CLINICAL,
                "verificationStatus": _CONDITION_VERIFIED,
                "code": {
                    "coding": [
                        {"system": SNOMED, "code": snomed, "display": snomed_display},
                        {"system": ICD10CM, "code": icd10, "display": icd10_display},
                    ],
                    "text": snomed_display,
                },
                "subject": subject,
                "encounter": encounter,
                "onsetDateTime": onset,
                "recordedDate": _date_time(visit, offset),
            },
            _CODED,
        )
    for _ in range(rng.choice((0, 1, 1, 2, 3, 4))):
        code, display = rng.choice(MEDICATIONS)
        encounter, visit = rng.choice(encounters)
        yield (
            "MedicationRequest",
            {
                "resourceType": "MedicationRequest",
                "id": _id(rng),
                "meta": _meta(rng),
                "status": "active",
                "intent": "order",
                "medicationCodeableConcept": _concept(RXNORM, code, display),
                "subject": subject,
                "encounter": encounter,
                "authoredOn": _date_time(visit + dt.timedelta(minutes=30), offset),
            },
            _CODED,
        )
    for code, display, category, criticality in rng.sample(ALLERGIES, rng.choice((0, 0, 1, 1, 2))):
        encounter, visit = encounters[0]
        reaction_code, reaction_display = rng.choice(REACTIONS)
        yield (
            "AllergyIntolerance",
            {
                "resourceType": "AllergyIntolerance",
                "id": _id(rng),
                "meta": _meta(rng),
                "clinicalStatus": _ALLERGY_CLINICAL,
                "verificationStatus": _ALLERGY_VERIFIED,
                "type": "allergy",
                "category": [category],
                "criticality": criticality,
                "code": _concept(SNOMED, code, display),
                "patient": subject,
                "encounter": encounter,
                "recordedDate": _date_time(visit, offset),
                "reaction": [
                    {"manifestation": [_concept(SNOMED, reaction_code, reaction_display)]}
                ],
            },
            _CODED,
        )


def _duplicate_person(
    faults: random.Random, patient: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A second record for the same person, linked to the first: (duplicate, truth detail).

    The original gets the reciprocal link, as an MPI that found the pair would record it.
    """
    link_type = faults.choice(("replaced-by", "seealso"))
    duplicate = dict(patient)
    duplicate["id"] = _id(faults)
    duplicate["meta"] = _meta(faults)
    duplicate["identifier"] = [
        {
            "system": "urn:oid:1.2.36.146.595.217.0.1",
            "value": f"MRN{faults.randint(10**7, 10**8 - 1)}",
        }
    ]
    duplicate["link"] = [{"other": _reference("Patient", patient["id"]), "type": link_type}]
    if link_type == "replaced-by":
        # The record that is replaced is no longer in use; the surviving one says it replaces it.
        duplicate["active"] = False
        back = "replaces"
    else:
        back = "seealso"
    patient["link"] = [{"other": _reference("Patient", duplicate["id"]), "type": back}]
    detail = {"field": "link", "value": f"Patient/{patient['id']}", "link_type": link_type}
    return duplicate, detail


def _first_coding(resource: dict[str, Any], field: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A copy of ``resource[field]`` with a copied first coding, ready to be changed."""
    concept = dict(resource[field])
    concept["coding"] = [dict(concept["coding"][0]), *concept["coding"][1:]]
    resource[field] = concept
    coding: dict[str, Any] = concept["coding"][0]
    return concept, coding


def _apply_fault(
    kind: str, resource_type: str, resource: dict[str, Any], faults: random.Random
) -> dict[str, Any]:
    """Change ``resource`` as ``kind`` says (sub-objects replaced, never edited); the detail."""
    if kind == "duplicate_resource":
        return {"field": "id", "value": resource["id"], "copies": 2}
    if kind == "malformed_date":
        value = faults.choice(MALFORMED_DATES)
        field = _DATE_FIELD[resource_type]
        if field == "period.start":
            resource["period"] = {**resource["period"], "start": value}
        else:
            resource[field] = value
        return {"field": field, "value": value}
    if kind == "unknown_code":
        _, coding = _first_coding(resource, "code")
        value = faults.choice(UNKNOWN_LOINC)
        original = coding["code"]
        coding["code"] = value
        coding.pop("display", None)
        return {"field": "code.coding[0].code", "value": value, "system": LOINC, "was": original}
    if kind == "unknown_code_system":
        field = _CODE_FIELD[resource_type]
        _, coding = _first_coding(resource, field)
        value = faults.choice(UNKNOWN_SYSTEMS)
        original = coding["system"]
        coding["system"] = value
        return {"field": f"{field}.coding[0].system", "value": value, "was": original}
    quantity = resource["valueQuantity"]
    if kind == "missing_unit":
        resource["valueQuantity"] = {"value": quantity["value"]}
        return {"field": "valueQuantity.code", "value": None, "was": quantity["code"]}
    if kind == "non_ucum_unit":
        value = NON_UCUM.get(quantity["code"], f"{quantity['code']} (local)")
        # The unit claims no system: read as UCUM by default, it is not a valid UCUM code.
        resource["valueQuantity"] = {"value": quantity["value"], "unit": value, "code": value}
        return {"field": "valueQuantity.code", "value": value, "was": quantity["code"]}
    raise ValueError(f"unknown fault kind {kind!r}")


NICKNAMES = {
    "Olivia": "Liv",
    "Elijah": "Eli",
    "Sofia": "Sophie",
    "Tomasz": "Tom",
    "Lucas": "Luke",
    "Hannah": "Hanna",
    "Mateo": "Matty",
    "Ingrid": "Inga",
}
_ACCENTED = {"a": "á", "e": "é", "i": "í", "o": "ö", "u": "ü", "c": "ç", "n": "ñ", "s": "š"}


def _typo(faults: random.Random, name: str) -> str:
    """One keying error inside the name: two letters swapped, or one doubled or dropped."""
    position = faults.randrange(1, len(name) - 1)
    kind = faults.choice(("swap", "double", "drop"))
    if kind == "swap":
        return name[:position] + name[position + 1] + name[position] + name[position + 2 :]
    if kind == "double":
        return name[: position + 1] + name[position] + name[position + 1 :]
    return name[:position] + name[position + 1 :]


def _accented(faults: random.Random, name: str) -> str:
    positions = [i for i, letter in enumerate(name) if letter.lower() in _ACCENTED]
    if not positions:
        return name.upper()
    i = faults.choice(positions)
    accent = _ACCENTED[name[i].lower()]
    return name[:i] + (accent.upper() if name[i].isupper() else accent) + name[i + 1 :]


def _vary(faults: random.Random, patient: dict[str, Any], variations: list[str]) -> None:
    """Change the demographics of ``patient`` (a copy with copied sub-objects) as named."""
    name = dict(patient["name"][0])
    name["given"] = list(name["given"])
    for variation in variations:
        if variation == "typo":
            name["family"] = _typo(faults, name["family"])
        elif variation == "nickname":
            name["given"][0] = NICKNAMES.get(name["given"][0], name["given"][0].lower())
        elif variation == "case":
            name["family"] = name["family"].upper()
            name["given"][0] = name["given"][0].lower()
        elif variation == "diacritics":
            name["family"] = _accented(faults, name["family"])
        elif variation == "swapped_names":
            name["family"], name["given"][0] = name["given"][0], name["family"]
        elif variation == "moved_zip":
            city, state, zip3 = faults.choice(CITIES)
            patient["address"] = [
                {
                    "use": "home",
                    "line": [f"{faults.randint(1, 999)} {faults.choice(STREETS)}"],
                    "city": city,
                    "state": state,
                    "postalCode": f"{zip3}{faults.randint(0, 99):02d}",
                }
            ]
        elif variation == "missing_sex":
            patient.pop("gender", None)
        elif variation == "birth_date_typo":
            born = dt.date.fromisoformat(patient["birthDate"])
            # Day and month keyed the wrong way round, or the day off by one.
            if born.day <= 12 and born.day != born.month:
                born = born.replace(month=born.day, day=born.month)
            else:
                born += dt.timedelta(days=1 if born.day < 28 else -1)
            patient["birthDate"] = born.isoformat()
        else:
            raise ValueError(f"unknown variation {variation!r}")
    patient["name"] = [name]
    patient["text"] = {
        "status": "generated",
        "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{name["given"][0]} {name["family"]}</div>',
    }


def _draw_variations(faults: random.Random) -> list[str]:
    """One variation, or two a quarter of the time (a record can differ in several ways)."""
    return faults.sample(VARIATIONS, 2 if faults.random() < 0.25 else 1)


def _unlinked_duplicate(
    faults: random.Random, patient: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """A second record of the same person that nobody linked, with realistic differences."""
    duplicate = {key: value for key, value in patient.items() if key not in ("link", "active")}
    duplicate["id"] = _id(faults)
    duplicate["meta"] = _meta(faults)
    duplicate["identifier"] = [
        {
            "system": "urn:oid:1.2.36.146.595.217.0.1",
            "value": f"MRN{faults.randint(10**7, 10**8 - 1)}",
        }
    ]
    variations = _draw_variations(faults)
    _vary(faults, duplicate, variations)
    return duplicate, variations


def _from_other_source(
    rng: random.Random,
    faults: random.Random,
    shared: dict[str, Any],
    own: dict[str, Any],
) -> tuple[dict[str, Any], list[str]]:
    """The person of ``shared`` (default source) as another source records them: that
    source's own id, MRN and metadata, the person's demographics, sometimes varied."""
    patient = dict(shared)
    patient["id"] = own["id"]
    patient["meta"] = own["meta"]
    patient["identifier"] = [own["identifier"][0], *shared["identifier"][1:]]
    variations = _draw_variations(faults) if rng.random() < CROSS_SOURCE_VARIATION_RATE else []
    _vary(faults, patient, variations)
    return patient, variations


def person_id(seed: int, index: int, source: str = DEFAULT_SOURCE) -> str:
    """The true person behind patient ``index``; the default source's persons are shared."""
    return (
        f"person/{seed}/{index}" if source == DEFAULT_SOURCE else f"person/{seed}/{source}/{index}"
    )


class _Writer:
    """Streams resources to ``<Type>.ndjson`` and faults to per-kind spill files."""

    def __init__(
        self,
        stack: ExitStack,
        out_dir: Path,
        fault_rate: float,
        fault_rates: Mapping[str, float] | None = None,
    ) -> None:
        self.fault_rate = fault_rate
        self.fault_rates = fault_rates
        self.counts = dict.fromkeys(RESOURCE_TYPES, 0)
        self.handles = {
            name: stack.enter_context(
                (out_dir / f"{name}.ndjson").open("w", encoding="utf-8", newline="\n")
            )
            for name in RESOURCE_TYPES
        }
        # Truth entries spill to temporary files so the truth file costs no memory at any scale.
        self.spills: dict[str, IO[str]] = {
            kind: stack.enter_context(tempfile.TemporaryFile("w+", encoding="utf-8"))  # noqa: SIM115
            for kind in TRUTH_KINDS
        }
        self.spilled = dict.fromkeys(TRUTH_KINDS, 0)
        self.persons = stack.enter_context(tempfile.TemporaryFile("w+", encoding="utf-8"))  # noqa: SIM115
        self.persons_written = 0
        self.consents = stack.enter_context(tempfile.TemporaryFile("w+", encoding="utf-8"))  # noqa: SIM115
        self.consents_written = 0
        self.encode = _ENCODE
        self.weights: dict[tuple[str, ...], list[int]] = {
            kinds: [_FAULT_WEIGHTS[kind] for kind in kinds]
            for kinds in (_DUPLICATE_ONLY, _DATED, _CODED, _MEASURED)
        }

    def fault(self, kind: str, resource_type: str, resource_id: str, detail: Any) -> None:
        """One entry of ``truth.json`` under ``kind`` (a fault, or ``IMPERIAL_UNITS``)."""
        entry = {"resource_type": resource_type, "id": resource_id, "detail": detail}
        self.spills[kind].write(self.encode(entry) + "\n")
        self.spilled[kind] += 1

    def write(
        self,
        resource_type: str,
        resource: dict[str, Any],
        kinds: tuple[str, ...],
        faults: random.Random,
    ) -> None:
        copies = 1
        fast = resource_type == "Observation" and "note" not in resource
        # One draw per resource whatever the rate: which resources get a fault is stable.
        draw = faults.random()
        kind: str | None = None
        if self.fault_rates is not None:
            kind = _kind_by_rate(draw, kinds, self.fault_rates)
        elif draw < self.fault_rate and kinds:
            kind = faults.choices(kinds, self.weights[kinds])[0]
        if kind is not None:
            detail = _apply_fault(kind, resource_type, resource, faults)
            self.fault(kind, resource_type, resource["id"], detail)
            if kind == "duplicate_resource":
                copies = 2
            else:
                fast = False
        line = _observation_line(resource) if fast else self.encode(resource) + "\n"
        self.handles[resource_type].write(line * copies)
        self.counts[resource_type] += copies

    def person(self, person: str, records: list[dict[str, Any]]) -> None:
        self.persons.write(self.encode({"person": person, "records": records}) + "\n")
        self.persons_written += 1

    def consent_case(self, patient: str, case: str, consents: list[dict[str, Any]]) -> None:
        entry = {"patient": patient, "case": case, "consents": [c["id"] for c in consents]}
        self.consents.write(self.encode(entry) + "\n")
        self.consents_written += 1

    def write_persons(self, path: Path, source: str, seed: int) -> None:
        _write_listing(path, source, seed, "persons", self.persons, self.persons_written)

    def write_consents(self, path: Path, source: str, seed: int) -> None:
        _write_listing(path, source, seed, "patients", self.consents, self.consents_written)

    def write_truth(self, path: Path) -> None:
        with path.open("w", encoding="utf-8", newline="\n") as truth:
            truth.write("{")
            for position, kind in enumerate(TRUTH_KINDS):
                truth.write(("," if position else "") + f"\n{json.dumps(kind)}: [")
                spill = self.spills[kind]
                spill.seek(0)
                for number, line in enumerate(spill):
                    truth.write(("," if number else "") + "\n  " + line.rstrip("\n"))
                truth.write("\n]" if self.spilled[kind] else "]")
            truth.write("\n}\n")


def _kind_by_rate(draw: float, kinds: tuple[str, ...], rates: Mapping[str, float]) -> str | None:
    """The kind ``draw`` falls on when each kind that fits takes its own share of [0, 1)."""
    threshold = 0.0
    for kind in kinds:
        threshold += rates.get(kind, 0.0)
        if draw < threshold:
            return kind
    return None


def _write_listing(
    path: Path, source: str, seed: int, key: str, spill: IO[str], written: int
) -> None:
    """``{"source", "seed", key: [...]}`` from a spill file of one JSON entry a line."""
    with path.open("w", encoding="utf-8", newline="\n") as out:
        out.write(f'{{"source": {json.dumps(source)}, "seed": {seed}, {json.dumps(key)}: [')
        spill.seek(0)
        for number, line in enumerate(spill):
            out.write(("," if number else "") + "\n  " + line.rstrip("\n"))
        out.write("\n]}\n" if written else "]}\n")


def generate(
    out_dir: Path,
    patients: int,
    seed: int,
    fault_rate: float = DEFAULT_FAULT_RATE,
    *,
    fault_rates: Mapping[str, float] | None = None,
    duplicate_rate: float = 0.0,
    source: str = DEFAULT_SOURCE,
    overlap: float = 0.0,
) -> dict[str, int]:
    """Write ``<ResourceType>.ndjson``, ``truth.json`` and ``persons.json`` for ``patients``
    synthetic persons.

    Returns the lines written per resource type (a duplicated resource counts twice). With
    ``fault_rate`` and ``duplicate_rate`` 0 the data has no planted faults and exactly
    ``patients`` Patient records. ``duplicate_rate`` gives that share of persons a second,
    unlinked Patient record with realistic differences (``VARIATIONS``). A ``source`` other
    than ``DEFAULT_SOURCE`` is another data holder: with probability ``overlap`` its person
    ``i`` is the default source's person ``i`` (same seed) under its own ids and MRN. The
    true person of every record is in ``persons.json``.

    ``fault_rates`` plants only the kinds it names, each at its own rate, instead of
    ``fault_rate`` over every kind: e.g. ``{"duplicate_person": 0.1, "unknown_code": 0.002}``
    gives linked duplicate persons and a few unknown codes, and no other fault.
    """
    for name, rate in (("fault_rate", fault_rate), ("duplicate_rate", duplicate_rate)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1")
    if fault_rates is not None:
        _check_fault_rates(fault_rates, fault_rate)
    if not 0.0 <= overlap <= 1.0:
        raise ValueError("overlap must be between 0 and 1")
    if source == DEFAULT_SOURCE and overlap:
        raise ValueError(f"overlap needs a source other than {DEFAULT_SOURCE!r}")
    own_source = source != DEFAULT_SOURCE
    out_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        writer = _Writer(stack, out_dir, fault_rate, fault_rates)
        person_fault_rate = (
            fault_rate if fault_rates is None else fault_rates.get("duplicate_person", 0.0)
        )
        for index in range(patients):
            # The default source keeps its streams as they always were; another source draws
            # its own, so that its data differs from the default source's but for the overlap.
            prefix = f"{seed}/{source}/{index}" if own_source else f"{seed}/{index}"
            rng = random.Random(prefix)
            faults = random.Random(f"{prefix}/faults")
            persons = random.Random(f"{prefix}/persons")
            patient, full_name, age = _patient(rng, index)
            person = person_id(seed, index, source)
            records: list[dict[str, Any]] = []
            if own_source and persons.random() < overlap:
                shared, _, shared_age = _patient(random.Random(f"{seed}/{index}"), index)
                patient, variations = _from_other_source(persons, persons, shared, patient)
                given, family = patient["name"][0]["given"][0], patient["name"][0]["family"]
                full_name, age, person = f"{given} {family}", shared_age, person_id(seed, index)
                records.append(_record(source, patient, "other_source", variations))
            else:
                records.append(_record(source, patient, "original", []))
            duplicate = None
            if faults.random() < person_fault_rate:
                duplicate, detail = _duplicate_person(faults, patient)
                writer.fault("duplicate_person", "Patient", duplicate["id"], detail)
                records.append(_record(source, duplicate, "linked_duplicate", []))
            unlinked = None
            if duplicate_rate and persons.random() < duplicate_rate:
                unlinked, variations = _unlinked_duplicate(persons, patient)
                records.append(_record(source, unlinked, "unlinked_duplicate", variations))
            writer.write("Patient", patient, _DUPLICATE_ONLY, faults)
            for extra in (duplicate, unlinked):
                if extra is not None:
                    writer.write("Patient", extra, _NONE, faults)
            writer.person(person, records)
            for resource_type, resource, kinds in _patient_resources(rng, patient, full_name, age):
                if resource_type == "Observation":
                    unit = resource["valueQuantity"].get("code")
                    if unit in IMPERIAL_CODES:
                        # Recorded before write(): the unit as generated, which faults never
                        # change on height and weight.
                        detail = {"field": "valueQuantity.code", "value": unit}
                        writer.fault(IMPERIAL_UNITS, "Observation", resource["id"], detail)
                writer.write(resource_type, resource, kinds, faults)
            consent_rng = random.Random(f"{prefix}/consent")
            case, consents = _consents(consent_rng, patient["id"])
            for consent in consents:
                # Never faulted, and drawing from its own stream: every planted fault stays.
                writer.write("Consent", consent, _NONE, consent_rng)
            writer.consent_case(patient["id"], case, consents)
        for handle in writer.handles.values():
            handle.flush()
        writer.write_truth(out_dir / TRUTH_FILE)
        writer.write_persons(out_dir / PERSONS_FILE, source, seed)
        writer.write_consents(out_dir / CONSENTS_FILE, source, seed)
    return writer.counts


def _check_fault_rates(fault_rates: Mapping[str, float], fault_rate: float) -> None:
    if fault_rate:
        raise ValueError("give fault_rate or fault_rates, not both")
    unknown = sorted(set(fault_rates) - set(FAULT_KINDS))
    if unknown:
        raise ValueError(
            f"unknown fault kinds {', '.join(unknown)}: choose from {', '.join(FAULT_KINDS)}"
        )
    if any(not 0.0 <= rate <= 1.0 for rate in fault_rates.values()):
        raise ValueError("every rate of fault_rates must be between 0 and 1")
    # One draw decides a resource's fault: the kinds that fit one resource share it.
    if sum(rate for kind, rate in fault_rates.items() if kind != "duplicate_person") > 1.0:
        raise ValueError("the rates of fault_rates other than duplicate_person exceed 1 in total")


def _record(
    source: str, patient: dict[str, Any], kind: str, variations: list[str]
) -> dict[str, Any]:
    return {"source": source, "id": patient["id"], "kind": kind, "variations": variations}


def load_consent_cases(*folders: Path) -> dict[str, str]:
    """Patient id -> consent case (``CONSENT_CASES``), over the ``consents.json`` of one or
    more generated sources."""
    cases: dict[str, str] = {}
    for folder in folders:
        truth = json.loads((folder / CONSENTS_FILE).read_text())
        cases.update((entry["patient"], entry["case"]) for entry in truth["patients"])
    return cases


def load_person_clusters(*folders: Path) -> dict[str, set[tuple[str, str]]]:
    """True person -> its (source, Patient id) records, over the ``persons.json`` of one or
    more generated sources."""
    clusters: dict[str, set[tuple[str, str]]] = {}
    for folder in folders:
        truth = json.loads((folder / PERSONS_FILE).read_text())
        for person in truth["persons"]:
            members = clusters.setdefault(person["person"], set())
            members.update((record["source"], record["id"]) for record in person["records"])
    return clusters
