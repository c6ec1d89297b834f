"""Per-kind fault rates of the generator (what the demo plants): linked duplicate persons and
a few unknown codes, and no other fault; and the SNOMED CT labels the generator writes are the
shipped, Starvit-written ones."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from starvit_assets.fhir import synth
from starvit_assets.fhir.synth import FAULT_KINDS, PERSONS_FILE, TRUTH_FILE, generate
from starvit_assets.terminology.local import CONTENT_DIR

RATES = {"duplicate_person": 0.2, "unknown_code": 0.01}


def _lines(folder: Path, resource_type: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / f"{resource_type}.ndjson").open()]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("rates")
    generate(root / "clean", patients=60, seed=8)
    generate(root / "planted", patients=60, seed=8, fault_rates=RATES)
    return root / "clean", root / "planted"


def test_only_the_named_kinds_are_planted(folders: tuple[Path, Path]) -> None:
    clean, planted = folders
    truth = json.loads((planted / TRUTH_FILE).read_text())
    assert {kind for kind in FAULT_KINDS if truth[kind]} == set(RATES)
    # Other types are untouched: the faults draw from their own stream.
    for resource_type in ("Encounter", "Condition", "Procedure", "Immunization", "Consent"):
        assert _lines(planted, resource_type) == _lines(clean, resource_type), resource_type
    observations = {o["id"]: o for o in _lines(planted, "Observation")}
    changed = {o["id"] for o in _lines(clean, "Observation") if observations[o["id"]] != o}
    assert changed == {entry["id"] for entry in truth["unknown_code"]}
    assert all(observations[i]["code"]["coding"][0]["code"] in synth.UNKNOWN_LOINC for i in changed)


def test_linked_duplicates_link_to_their_original_and_are_in_the_person_truth(
    folders: tuple[Path, Path],
) -> None:
    _, planted = folders
    truth = json.loads((planted / TRUTH_FILE).read_text())
    patients = {p["id"]: p for p in _lines(planted, "Patient")}
    duplicates = truth["duplicate_person"]
    assert 5 <= len(duplicates) <= 20
    persons = json.loads((planted / PERSONS_FILE).read_text())["persons"]
    linked = {
        r["id"]: person["records"][0]["id"]
        for person in persons
        for r in person["records"]
        if r["kind"] == "linked_duplicate"
    }
    for entry in duplicates:
        duplicate = patients[entry["id"]]
        original_id = entry["detail"]["value"].removeprefix("Patient/")
        assert duplicate["link"][0]["other"]["reference"] == f"Patient/{original_id}"
        assert patients[original_id]["link"][0]["other"]["reference"] == f"Patient/{entry['id']}"
        assert linked[entry["id"]] == original_id


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"fault_rates": {"typo": 0.1}}, "unknown fault kinds typo"),
        ({"fault_rates": {"unknown_code": 1.5}}, "between 0 and 1"),
        ({"fault_rates": {"unknown_code": 0.6, "missing_unit": 0.6}}, "exceed 1"),
        ({"fault_rates": {"unknown_code": 0.1}, "fault_rate": 0.1}, "not both"),
    ],
)
def test_bad_fault_rates_are_refused(
    tmp_path: Path, arguments: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        generate(tmp_path, patients=1, seed=1, **arguments)


# SNOMED CT's semantic tags end its fully specified names: "(procedure)", "(disorder)", ...
_SEMANTIC_TAG = re.compile(
    r"\((procedure|disorder|finding|situation|event|observable entity|regime/therapy|"
    r"substance|body structure|qualifier value|morphologic abnormality|clinical drug|"
    r"product|specimen|environment)\)\s*$"
)


def _snomed_labels() -> dict[str, str]:
    content = json.loads((CONTENT_DIR / "CodeSystem-snomed-ct.json").read_text())
    return {concept["code"]: concept["display"] for concept in content["concept"]}


def test_the_generator_writes_the_shipped_starvit_labels_for_snomed_codes() -> None:
    shipped = _snomed_labels()
    written = {row[0]: row[1] for row in (*synth.PROCEDURES, *synth.REACTIONS)}
    written |= {row[0]: row[1] for row in (*synth.ALLERGIES, *synth.ENCOUNTER_TYPES)}
    written |= {snomed: display for snomed, display, _, _ in synth.CONDITIONS}
    assert written == shipped
    assert not [label for label in shipped.values() if _SEMANTIC_TAG.search(label)]
    for name in ("ValueSet-synthetic-conditions.json", "ConceptMap-snomed-to-icd-10-cm.json"):
        text = (CONTENT_DIR / name).read_text()
        displays = re.findall(r'"code": "(\d+)",\s*"display": "([^"]*)"', text)
        snomed = [(code, label) for code, label in displays if code in shipped]
        assert snomed and all(shipped[code] == label for code, label in snomed), name


def test_cli_fault_flags_plant_the_same_files_as_the_library(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    from starvit_assets.cli import main

    _, planted = folders
    flags = [f"--fault={kind}={rate}" for kind, rate in RATES.items()]
    out = tmp_path / "cli"
    assert (
        main(["fhir", "synth", "--patients", "60", "--seed", "8", *flags, "--out", str(out)]) == 0
    )
    for name in sorted(path.name for path in planted.iterdir()):
        assert (out / name).read_bytes() == (planted / name).read_bytes(), name


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--fault", "unknown_code"], "--fault takes KIND=RATE"),
        (["--fault", "unknown_code=often"], "--fault unknown_code: the rate must be a number"),
        (["--fault", "no_such_kind=0.1"], "unknown fault kinds no_such_kind"),
        (["--fault", "unknown_code=2"], "must be between 0 and 1"),
        (["--fault", "unknown_code=0.1", "--fault-rate", "0.1"], "not both"),
    ],
)
def test_cli_bad_fault_flags_are_one_clear_line(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from starvit_assets.cli import EXIT_USER_ERROR, main

    out = tmp_path / "out"
    assert main(["fhir", "synth", "--patients", "2", *flags, "--out", str(out)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("starvit: error: ") and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
