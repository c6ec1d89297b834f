from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from starvit_assets.fhir import synth
from starvit_assets.fhir.synth import (
    BODY_MEASURES,
    FAULT_KINDS,
    GIVEN_NAMES,
    IMPERIAL_CODES,
    IMPERIAL_UNITS,
    LOINC,
    OBSERVATION_CODES,
    RESOURCE_TYPES,
    TRUTH_FILE,
    TRUTH_KINDS,
    UCUM,
    UCUM_UNITS,
    UNKNOWN_LOINC,
    UNKNOWN_SYSTEMS,
    generate,
)

SOURCE = synth.__file__

Resources = dict[str, list[dict[str, Any]]]
KNOWN_SYSTEMS = {
    "http://loinc.org",
    "http://snomed.info/sct",
    "http://hl7.org/fhir/sid/icd-10-cm",
    "http://www.nlm.nih.gov/research/umls/rxnorm",
    "http://hl7.org/fhir/sid/cvx",
}
CODE_FIELD = {
    "Observation": "code",
    "Condition": "code",
    "MedicationRequest": "medicationCodeableConcept",
    "Procedure": "code",
    "Immunization": "vaccineCode",
    "AllergyIntolerance": "code",
}


def _load(folder: Path) -> Resources:
    return {
        resource_type: [
            json.loads(line)
            for line in (folder / f"{resource_type}.ndjson").read_text().splitlines()
        ]
        for resource_type in RESOURCE_TYPES
    }


def _truth(folder: Path) -> dict[str, list[dict[str, Any]]]:
    truth: dict[str, list[dict[str, Any]]] = json.loads((folder / TRUTH_FILE).read_text())
    return truth


def _faulted(truth: dict[str, list[dict[str, Any]]], *kinds: str) -> set[str]:
    return {entry["id"] for kind in kinds for entry in truth[kind]}


def _parses(value: str) -> bool:
    try:
        dt.datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    folder = tmp_path_factory.mktemp("clean")
    return folder, generate(folder, patients=80, seed=2, fault_rate=0.0)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("faulty")
    # Same seed as ``clean``: the faults are an overlay on the same data.
    generate(folder, patients=80, seed=2, fault_rate=0.06)
    return folder


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(first, patients=25, seed=5)
    generate(second, patients=25, seed=5)
    generate(other, patients=25, seed=6)
    for name in [f"{t}.ndjson" for t in RESOURCE_TYPES] + [TRUTH_FILE]:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "Patient.ndjson").read_bytes() != (other / "Patient.ndjson").read_bytes()


def test_patient_i_is_the_same_whatever_the_number_of_patients(tmp_path: Path) -> None:
    generate(tmp_path / "five", patients=5, seed=9, fault_rate=0.2)
    generate(tmp_path / "ten", patients=10, seed=9, fault_rate=0.2)
    for resource_type in RESOURCE_TYPES:
        five = (tmp_path / "five" / f"{resource_type}.ndjson").read_bytes()
        ten = (tmp_path / "ten" / f"{resource_type}.ndjson").read_bytes()
        assert ten.startswith(five) and len(ten) > len(five), resource_type
    five_truth, ten_truth = _truth(tmp_path / "five"), _truth(tmp_path / "ten")
    for kind in TRUTH_KINDS:
        assert ten_truth[kind][: len(five_truth[kind])] == five_truth[kind]


def test_counts_match_the_files_and_average_about_a_hundred_per_patient(
    clean: tuple[Path, dict[str, int]],
) -> None:
    folder, counts = clean
    resources = _load(folder)
    assert counts == {t: len(items) for t, items in resources.items()}
    per_patient = {t: count / 80 for t, count in counts.items()}
    assert counts["Patient"] == 80
    assert 80 <= sum(counts.values()) / 80 <= 125
    assert 5 <= per_patient["Encounter"] <= 9
    assert 60 <= per_patient["Observation"] <= 100
    for resource_type in ("Condition", "MedicationRequest", "Procedure", "Immunization"):
        assert 0.8 <= per_patient[resource_type] <= 5, resource_type
    assert 0.2 <= per_patient["AllergyIntolerance"] <= 1.5
    assert not any(_truth(folder)[kind] for kind in FAULT_KINDS)


def test_every_reference_resolves_and_agrees_on_the_patient(
    clean: tuple[Path, dict[str, int]], faulty: Path
) -> None:
    for folder in (clean[0], faulty):
        resources = _load(folder)
        patients = {p["id"] for p in resources["Patient"]}
        encounter_patient = {
            e["id"]: e["subject"]["reference"].removeprefix("Patient/")
            for e in resources["Encounter"]
        }
        for resource_type in RESOURCE_TYPES[1:]:
            for resource in resources[resource_type]:
                field = "patient" if "patient" in resource else "subject"
                patient_id = resource[field]["reference"].removeprefix("Patient/")
                assert patient_id in patients, resource_type
                if "encounter" in resource:
                    encounter_id = resource["encounter"]["reference"].removeprefix("Encounter/")
                    assert encounter_patient[encounter_id] == patient_id
        for patient in resources["Patient"]:
            for link in patient.get("link", []):
                assert link["other"]["reference"].removeprefix("Patient/") in patients


def test_clean_data_is_coded_with_ucum_units_and_parseable_dates(
    clean: tuple[Path, dict[str, int]],
) -> None:
    resources = _load(clean[0])
    assert all(not _truth(clean[0])[kind] for kind in FAULT_KINDS)
    for resource_type, items in resources.items():
        ids = [r["id"] for r in items]
        assert len(ids) == len(set(ids)), resource_type
        for resource in items[1:] if resource_type == "Patient" else items:
            if resource_type in CODE_FIELD:
                assert resource[CODE_FIELD[resource_type]]["coding"][0]["system"] in KNOWN_SYSTEMS
    assert not any("link" in p for p in resources["Patient"])
    for observation in resources["Observation"]:
        quantity = observation["valueQuantity"]
        assert quantity["system"] == UCUM and quantity["code"] in UCUM_UNITS
        assert quantity["unit"] == UCUM_UNITS[quantity["code"]]
        assert observation["code"]["coding"][0]["code"] in OBSERVATION_CODES
        assert _parses(observation["effectiveDateTime"])
    assert all(_parses(e["period"]["start"]) for e in resources["Encounter"])
    codes = {o["code"]["coding"][0]["code"] for o in resources["Observation"]}
    assert {"8867-4", "8480-6", "8462-4", "8310-5", "2339-0", "4548-4"} <= codes
    assert {c["vaccineCode"]["coding"][0]["system"] for c in resources["Immunization"]} == {
        "http://hl7.org/fhir/sid/cvx"
    }


def test_body_measures_keep_their_shape_and_their_bmi(clean: tuple[Path, dict[str, int]]) -> None:
    resources = _load(clean[0])
    units = {o["valueQuantity"]["code"] for o in resources["Observation"]}
    assert {"[in_i]", "[lb_av]", "cm", "kg", "kg/m2", "/min", "mm[Hg]", "Cel", "%"} <= units
    by_encounter: dict[str, dict[str, dict[str, Any]]] = {}
    for observation in resources["Observation"]:
        code = observation["code"]["coding"][0]["code"]
        if code in BODY_MEASURES:
            encounter = observation["encounter"]["reference"]
            by_encounter.setdefault(encounter, {})[code] = observation["valueQuantity"]
    imperial = 0
    for measures in by_encounter.values():
        height, weight, bmi = measures["8302-2"], measures["29463-7"], measures["39156-5"]
        metres = height["value"] * (2.54 if height["code"] == "[in_i]" else 1) / 100
        kilograms = weight["value"] * (0.45359237 if weight["code"] == "[lb_av]" else 1)
        assert abs(kilograms / metres**2 - bmi["value"]) < 0.3
        assert 10 <= bmi["value"] <= 60
        imperial += height["code"] == "[in_i]"
    assert 0.2 <= imperial / len(by_encounter) <= 0.5
    notes = [o for o in resources["Observation"] if "note" in o]
    weights = [o for o in resources["Observation"] if o["code"]["coding"][0]["code"] == "29463-7"]
    assert all(o["code"]["coding"][0]["code"] == "29463-7" for o in notes)
    assert 0.04 <= len(notes) / len(weights) <= 0.18
    onsets = [c["onsetDateTime"] for c in resources["Condition"]]
    assert any(len(onset) == 4 for onset in onsets) and any(len(onset) == 7 for onset in onsets)
    assert len({e["period"]["start"][19:] for e in resources["Encounter"]}) > 2


def test_names_appear_only_in_patients_and_weight_notes(faulty: Path) -> None:
    names = {name.lower() for name in GIVEN_NAMES}
    for resource_type in RESOURCE_TYPES[1:]:
        for line in (faulty / f"{resource_type}.ndjson").read_text().lower().splitlines():
            if '"note"' in line:
                resource = json.loads(line)
                del resource["note"]
                line = json.dumps(resource)
            assert not any(f'"{name}' in line or f" {name}" in line for name in names), line


def test_every_fault_in_the_truth_file_is_in_the_output(faulty: Path) -> None:
    resources = _load(faulty)
    truth = _truth(faulty)
    assert set(truth) == set(TRUTH_KINDS)
    assert all(truth[kind] for kind in FAULT_KINDS), {k: len(v) for k, v in truth.items()}
    by_id: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for resource_type, items in resources.items():
        for resource in items:
            by_id.setdefault((resource_type, resource["id"]), []).append(resource)

    for kind in FAULT_KINDS:
        for entry in truth[kind]:
            found = by_id[(entry["resource_type"], entry["id"])]
            resource, detail = found[0], entry["detail"]
            assert len(found) == (2 if kind == "duplicate_resource" else 1), (kind, entry)
            if kind != "duplicate_resource":
                assert "was" not in detail or detail["was"] != detail["value"]
            if kind in {"unknown_code", "unknown_code_system"} or kind.endswith("_unit"):
                assert _fault_allowed(resource, kind)
            if kind == "duplicate_resource":
                assert found[0] == found[1]
            elif kind == "unknown_code":
                coding = resource["code"]["coding"][0]
                assert coding["system"] == LOINC and coding["code"] == detail["value"]
                assert coding["code"] in UNKNOWN_LOINC and coding["code"] not in OBSERVATION_CODES
            elif kind == "unknown_code_system":
                field = CODE_FIELD[entry["resource_type"]]
                assert resource[field]["coding"][0]["system"] == detail["value"]
                assert detail["value"] in UNKNOWN_SYSTEMS and detail["value"] not in KNOWN_SYSTEMS
            elif kind == "missing_unit":
                assert set(resource["valueQuantity"]) == {"value"}
            elif kind == "non_ucum_unit":
                quantity = resource["valueQuantity"]
                assert quantity["code"] == detail["value"] and quantity["code"] not in UCUM_UNITS
                assert "system" not in quantity
            elif kind == "duplicate_person":
                (original,) = by_id[("Patient", detail["value"].removeprefix("Patient/"))]
                assert resource["link"][0] == {
                    "other": {"reference": detail["value"]},
                    "type": detail["link_type"],
                }
                assert original["link"][0]["other"]["reference"] == f"Patient/{resource['id']}"
                assert resource["name"] == original["name"]
                assert resource["birthDate"] == original["birthDate"]
                assert resource["id"] != original["id"]
            elif kind == "malformed_date":
                field = detail["field"]
                value = resource["period"]["start"] if field == "period.start" else resource[field]
                assert value == detail["value"] and not _parses(value)

    # Nothing is faulted that the truth file does not name.
    duplicates = {key[1] for key, found in by_id.items() if len(found) > 1}
    assert duplicates == _faulted(truth, "duplicate_resource")
    unit_faults = _faulted(truth, "missing_unit", "non_ucum_unit")
    for observation in resources["Observation"]:
        quantity = observation["valueQuantity"]
        if observation["id"] not in unit_faults:
            assert quantity["system"] == UCUM and quantity["code"] in UCUM_UNITS
        if observation["code"]["coding"][0]["code"] in BODY_MEASURES:
            assert observation["id"] not in _faulted(truth, *FAULT_KINDS[:4], "malformed_date")
    date_faults = _faulted(truth, "malformed_date")
    for observation in resources["Observation"]:
        assert _parses(observation["effectiveDateTime"]) != (observation["id"] in date_faults)
    patients = Counter(p["id"] for p in resources["Patient"])
    assert len(patients) == 80 + len(truth["duplicate_person"])


def _fault_allowed(resource: dict[str, Any], kind: str) -> bool:
    """Code and unit faults never touch the body measures BMI is computed from."""
    if resource["resourceType"] != "Observation":
        return kind == "unknown_code_system"
    code = resource["code"]["coding"][0]["code"]
    return code not in BODY_MEASURES


def test_faults_change_only_the_resources_they_name(
    clean: tuple[Path, dict[str, int]], faulty: Path
) -> None:
    truth = _truth(faulty)
    named = _faulted(truth, *FAULT_KINDS)
    # The original of a duplicated person carries the reciprocal link.
    named |= {e["detail"]["value"].removeprefix("Patient/") for e in truth["duplicate_person"]}
    for resource_type in RESOURCE_TYPES:
        before = {
            json.loads(line)["id"]: line
            for line in (clean[0] / f"{resource_type}.ndjson").read_text().splitlines()
        }
        after = {
            json.loads(line)["id"]: line
            for line in (faulty / f"{resource_type}.ndjson").read_text().splitlines()
        }
        assert set(before) <= set(after)
        for resource_id, line in before.items():
            if resource_id not in named:
                assert after[resource_id] == line


def test_lines_are_what_the_json_encoder_writes(faulty: Path) -> None:
    for resource_type in RESOURCE_TYPES:
        for line in (faulty / f"{resource_type}.ndjson").read_text().splitlines():
            assert json.dumps(json.loads(line), separators=(",", ":")) == line


def test_fault_rate_outside_zero_to_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fault_rate"):
        generate(tmp_path, patients=1, seed=1, fault_rate=1.5)


def _persons(folder: Path) -> dict[str, Any]:
    truth: dict[str, Any] = json.loads((folder / synth.PERSONS_FILE).read_text())
    return truth


def test_planted_duplicates_and_their_person_truth(tmp_path: Path) -> None:
    generate(tmp_path / "clean", patients=60, seed=4)
    generate(tmp_path / "dup", patients=60, seed=4, duplicate_rate=0.3)
    clean, dup = _load(tmp_path / "clean"), _load(tmp_path / "dup")
    # The clean data of every person is unchanged by planting duplicates.
    assert [r for r in dup["Observation"]] == clean["Observation"]
    truth = _persons(tmp_path / "dup")
    assert all(len(p["records"]) == 1 for p in _persons(tmp_path / "clean")["persons"])
    records = [r for person in truth["persons"] for r in person["records"]]
    assert sorted(r["id"] for r in records) == sorted(p["id"] for p in dup["Patient"])
    unlinked = [r for r in records if r["kind"] == "unlinked_duplicate"]
    assert 8 <= len(unlinked) <= 30
    assert all(set(r["variations"]) <= set(synth.VARIATIONS) for r in unlinked)
    patients = {p["id"]: p for p in dup["Patient"]}
    for person in truth["persons"]:
        original, *others = (patients[r["id"]] for r in person["records"])
        for other in others:
            assert "link" not in other and other["birthDate"][:4] == original["birthDate"][:4]
            assert other["identifier"][0]["value"] != original["identifier"][0]["value"]
    variations = Counter(v for r in unlinked for v in r["variations"])
    assert len(variations) >= 5, variations
    generate(tmp_path / "again", patients=60, seed=4, duplicate_rate=0.3)
    for name in ("Patient.ndjson", synth.PERSONS_FILE):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "dup" / name).read_bytes()


def test_a_second_source_shares_some_persons_under_its_own_ids(tmp_path: Path) -> None:
    generate(tmp_path / "A", patients=50, seed=4)
    generate(tmp_path / "B", patients=50, seed=4, source="B", overlap=0.5)
    a = {p["id"]: p for p in _load(tmp_path / "A")["Patient"]}
    b = {p["id"]: p for p in _load(tmp_path / "B")["Patient"]}
    assert not set(a) & set(b)
    clusters = synth.load_person_clusters(tmp_path / "A", tmp_path / "B")
    shared = [members for members in clusters.values() if len(members) > 1]
    assert 15 <= len(shared) <= 35
    for members in shared:
        (_, a_id), (_, b_id) = sorted(members)
        assert a[a_id]["identifier"][0] != b[b_id]["identifier"][0]  # their own MRN
        assert a[a_id]["identifier"][1] == b[b_id]["identifier"][1]  # the person's SSN
    b_truth = _persons(tmp_path / "B")
    assert b_truth["source"] == "B"
    kinds = Counter(r["kind"] for p in b_truth["persons"] for r in p["records"])
    assert kinds["other_source"] == len(shared)
    with pytest.raises(ValueError, match="overlap"):
        generate(tmp_path / "C", patients=1, seed=1, overlap=0.5)


# The module is loaded on its own: the package's imports would set a peak far above the
# generator's and hide any growth. VmHWM, unlike ru_maxrss, is not inherited across exec from
# the (large) pytest process.
PEAK_RSS = """
import importlib.util, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("synth", sys.argv[3])
synth = importlib.util.module_from_spec(spec)
spec.loader.exec_module(synth)
synth.generate(Path(sys.argv[1]), patients=int(sys.argv[2]), seed=3)
status = Path("/proc/self/status").read_text().splitlines()
print(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_memory_does_not_grow_with_the_number_of_patients(tmp_path: Path) -> None:
    runs = {
        patients: subprocess.Popen(
            [sys.executable, "-c", PEAK_RSS, str(tmp_path / str(patients)), str(patients), SOURCE],
            stdout=subprocess.PIPE,
            text=True,
        )
        for patients in (100, 1000)
    }
    peak_kib = {}
    for patients, run in runs.items():
        out, _ = run.communicate(timeout=120)
        assert run.returncode == 0
        peak_kib[patients] = int(out.strip())
    # Ten times the patients (~100,000 resources) may not cost more than a few MiB: anything
    # kept per resource would cost far more.
    assert peak_kib[1000] - peak_kib[100] < 4 * 1024, peak_kib


def test_consent_cases_are_what_the_gate_rule_decides(tmp_path: Path) -> None:
    from starvit_assets.lake.consent import read_research_opt_outs

    counts = generate(tmp_path, patients=200, seed=4, fault_rate=0.1)
    cases = synth.load_consent_cases(tmp_path)
    patients = {p["id"] for p in _load(tmp_path)["Patient"]}
    consents = _load(tmp_path)["Consent"]
    assert set(cases) <= patients and len(cases) == 200
    assert set(Counter(cases.values())) == {case for case, _ in synth.CONSENT_CASES}
    assert counts["Consent"] == len(consents)
    listed = json.loads((tmp_path / synth.CONSENTS_FILE).read_text())
    by_patient = {entry["patient"]: entry["consents"] for entry in listed["patients"]}
    assert sorted(i for ids in by_patient.values() for i in ids) == sorted(
        c["id"] for c in consents
    )
    for consent in consents:
        patient = consent["patient"]["reference"].removeprefix("Patient/")
        assert consent["id"] in by_patient[patient]
    assert all(not by_patient[p] for p, case in cases.items() if case == "none")
    denied = {p for p, case in cases.items() if case == synth.OPTED_OUT_CASE}
    # On the export date and any later day: an expired deny stays expired.
    for day in (synth.EXPORT_EPOCH.date(), dt.date(2030, 6, 1)):
        opt_outs = read_research_opt_outs([tmp_path / "Consent.ndjson"], day)
        assert opt_outs.patients == denied
        assert opt_outs.consents_read == len(consents)
    # No fault is ever planted in a Consent.
    assert "Consent" not in {e["resource_type"] for kind in _truth(tmp_path).values() for e in kind}


def test_imperial_measurements_are_listed_in_the_truth_file(
    clean: tuple[Path, dict[str, int]], faulty: Path
) -> None:
    observations = _load(clean[0])["Observation"]
    listed = _truth(clean[0])[IMPERIAL_UNITS]
    imperial = {
        o["id"]: o["valueQuantity"]["code"]
        for o in observations
        if o["valueQuantity"]["code"] in IMPERIAL_CODES
    }
    assert {e["id"]: e["detail"]["value"] for e in listed} == imperial
    assert all(e["resource_type"] == "Observation" for e in listed)
    assert all(e["detail"]["field"] == "valueQuantity.code" for e in listed)
    by_id = {o["id"]: o for o in observations}
    units = {"8302-2": "[in_i]", "29463-7": "[lb_av]"}
    assert all(units[by_id[i]["code"]["coding"][0]["code"]] == unit for i, unit in imperial.items())
    # A patient is measured in one system: all their heights and weights, or none.
    patients: dict[str, set[bool]] = {}
    for o in observations:
        if o["code"]["coding"][0]["code"] in units:
            patients.setdefault(o["subject"]["reference"], set()).add(o["id"] in imperial)
    assert all(len(kinds) == 1 for kinds in patients.values())
    share = sum(kinds == {True} for kinds in patients.values()) / len(patients)
    assert 0.15 <= share <= 0.55
    # Not a fault: the same list whatever the fault rate.
    assert _truth(faulty)[IMPERIAL_UNITS] == listed


def test_cli_fault_rate_plants_the_same_faults_as_the_library(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from starvit_assets.cli import main

    assert (
        main(
            [
                "fhir",
                "synth",
                "--patients",
                "4",
                "--seed",
                "3",
                "--fault-rate",
                "0.3",
                "--out",
                str(tmp_path / "cli"),
            ]
        )
        == 0
    )
    generate(tmp_path / "lib", patients=4, seed=3, fault_rate=0.3)
    truth = _truth(tmp_path / "cli")
    assert sum(len(truth[kind]) for kind in FAULT_KINDS) > 0
    for name in [f"{t}.ndjson" for t in RESOURCE_TYPES] + [TRUTH_FILE]:
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "lib" / name).read_bytes()
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_cli_fault_rate_outside_zero_to_one_is_one_clear_line(
    value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from starvit_assets.cli import EXIT_USER_ERROR, main

    out = tmp_path / "out"
    code = main(["fhir", "synth", "--patients", "2", "--fault-rate", value, "--out", str(out)])
    assert code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("starvit: error: --fault-rate must be between 0 and 1")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_fault_rate_that_is_no_number_is_refused_by_the_parser(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from starvit_assets.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["fhir", "synth", "--fault-rate", "often", "--out", str(tmp_path)])
    assert exited.value.code == 2
    assert "argument --fault-rate: invalid float value: 'often'" in capsys.readouterr().err
