from __future__ import annotations

import json
from pathlib import Path

from starvit_assets.fhir.synth import RESOURCE_TYPES, generate


def _load(folder: Path, resource_type: str) -> list[dict]:
    return [
        json.loads(line) for line in (folder / f"{resource_type}.ndjson").read_text().splitlines()
    ]


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(first, patients=40, seed=5)
    generate(second, patients=40, seed=5)
    generate(other, patients=40, seed=6)
    for resource_type in RESOURCE_TYPES:
        assert (first / f"{resource_type}.ndjson").read_bytes() == (
            second / f"{resource_type}.ndjson"
        ).read_bytes()
    assert (first / "Patient.ndjson").read_bytes() != (other / "Patient.ndjson").read_bytes()


def test_counts_match_files_and_the_data_has_the_shapes_downstream_needs(tmp_path: Path) -> None:
    counts = generate(tmp_path, patients=80, seed=2)
    resources = {resource_type: _load(tmp_path, resource_type) for resource_type in RESOURCE_TYPES}
    assert counts == {resource_type: len(items) for resource_type, items in resources.items()}
    assert counts["Patient"] == 80 and all(counts.values())

    patient_ids = {p["id"] for p in resources["Patient"]}
    for resource_type in ("Encounter", "Observation", "Condition", "MedicationRequest"):
        for resource in resources[resource_type]:
            assert resource["subject"]["reference"].removeprefix("Patient/") in patient_ids

    units = {o["valueQuantity"]["code"] for o in resources["Observation"]}
    assert {"[in_i]", "[lb_av]", "cm", "kg", "kg/m2"} <= units
    loinc = {o["code"]["coding"][0]["code"] for o in resources["Observation"]}
    assert loinc == {"8302-2", "29463-7", "39156-5"}
    onsets = [c["onsetDateTime"] for c in resources["Condition"]]
    assert any(len(onset) == 4 for onset in onsets) and any(len(onset) == 7 for onset in onsets)
    systems = {coding["system"] for c in resources["Condition"] for coding in c["code"]["coding"]}
    assert systems == {"http://snomed.info/sct", "http://hl7.org/fhir/sid/icd-10-cm"}
    assert all(
        m["medicationCodeableConcept"]["coding"][0]["system"]
        == "http://www.nlm.nih.gov/research/umls/rxnorm"
        for m in resources["MedicationRequest"]
    )
    offsets = {e["period"]["start"][19:] for e in resources["Encounter"]}
    assert len(offsets) > 2
