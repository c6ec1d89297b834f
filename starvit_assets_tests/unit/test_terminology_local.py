"""The embedded terminology service over the shipped content, and the validation logic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from starvit_assets.clinical.terminology import CODE_SYSTEMS
from starvit_assets.fhir import synth
from starvit_assets.terminology.local import CONTENT_DIR, ContentError, LocalTerminology
from starvit_assets.terminology.model import (
    Coding,
    NotFoundError,
    TranslateRequest,
    Validation,
    parameter_values,
    translation_from_parameters,
    translation_parameters,
    validation_from_parameters,
    validation_parameters,
)
from starvit_assets.terminology.validation import (
    CODE_COLUMNS,
    CodeValidationRow,
    judge_shares,
    merge_occurrences,
    shares_by_system,
    validate_and_map,
)

VITAL_SIGNS = "https://starvit.example.org/fhir/ValueSet/vital-signs"
VACCINES = "https://starvit.example.org/fhir/ValueSet/vaccines"


@pytest.fixture(scope="module")
def local() -> LocalTerminology:
    return LocalTerminology()


def _synthetic_codings() -> list[Coding]:
    codings = [Coding(synth.LOINC, code) for code in synth.OBSERVATION_CODES]
    for snomed, _, icd10, _ in synth.CONDITIONS:
        codings += [Coding(synth.SNOMED, snomed), Coding(synth.ICD10CM, icd10)]
    codings += [Coding(synth.RXNORM, code) for code, _ in synth.MEDICATIONS]
    codings += [Coding(synth.CVX, code) for code, _ in synth.VACCINES]
    for rows in (synth.PROCEDURES, synth.REACTIONS, synth.ENCOUNTER_TYPES, synth.ALLERGIES):
        codings += [Coding(synth.SNOMED, row[0]) for row in rows]
    return codings


def test_every_code_the_synthetic_data_uses_is_valid(local: LocalTerminology) -> None:
    invalid = [
        c
        for c, v in zip(
            _synthetic_codings(), local.validate_codes(_synthetic_codings()), strict=True
        )
        if not v.valid
    ]
    assert invalid == []


# The codes the generator writes into each raw column with one fixed system (CODE_COLUMNS).
_SYNTHETIC_CODES_BY_COLUMN: dict[tuple[str, str, str], list[str]] = {
    ("condition", "snomed_code", synth.SNOMED): [row[0] for row in synth.CONDITIONS],
    ("condition", "icd10_code", synth.ICD10CM): [row[2] for row in synth.CONDITIONS],
    ("medication_request", "rxnorm_code", synth.RXNORM): [code for code, _ in synth.MEDICATIONS],
    ("procedure", "snomed_code", synth.SNOMED): [code for code, _ in synth.PROCEDURES],
    ("immunization", "cvx_code", synth.CVX): [code for code, _ in synth.VACCINES],
    ("allergy_intolerance", "snomed_code", synth.SNOMED): [row[0] for row in synth.ALLERGIES],
    ("allergy_intolerance", "reaction_snomed_code", synth.SNOMED): [
        code for code, _ in synth.REACTIONS
    ],
}


def test_every_fixed_system_coded_column_has_the_generators_codes_shipped(
    local: LocalTerminology,
) -> None:
    fixed = {(c.table, c.code_column, c.system) for c in CODE_COLUMNS if c.system is not None}
    # A new coded column must say here which codes the generator writes into it.
    assert fixed == set(_SYNTHETIC_CODES_BY_COLUMN)
    for (table, column, system), codes in _SYNTHETIC_CODES_BY_COLUMN.items():
        assert local.knows_system(system), (table, column)
        answers = local.validate_codes([Coding(system, code) for code in codes])
        invalid = [code for code, answer in zip(codes, answers, strict=True) if not answer.valid]
        assert invalid == [], (table, column)


def test_every_shipped_code_system_has_a_short_name_the_refined_models_join_on() -> None:
    """The refined models reach the validation through the ``code_systems`` seed (an inner
    join): a shipped system missing from CODE_SYSTEMS would validate but never arrive."""
    short_names = {system.uri for system in CODE_SYSTEMS}
    shipped = {
        json.loads(path.read_text())["url"] for path in CONTENT_DIR.glob("CodeSystem-*.json")
    }
    assert shipped - short_names == set()
    assert {c.system for c in CODE_COLUMNS if c.system is not None} <= short_names


@pytest.mark.parametrize("code", synth.UNKNOWN_LOINC)
def test_planted_unknown_loinc_codes_are_invalid_in_a_known_system(
    local: LocalTerminology, code: str
) -> None:
    answer = local.validate_code(Coding(synth.LOINC, code))
    assert answer == Validation(
        valid=False,
        system_known=True,
        message=f"Unknown code '{code}' in the CodeSystem '{synth.LOINC}'",
    )


@pytest.mark.parametrize("system", synth.UNKNOWN_SYSTEMS)
def test_planted_unknown_systems_make_every_code_invalid(
    local: LocalTerminology, system: str
) -> None:
    answer = local.validate_code(Coding(system, "8302-2"))
    assert not answer.valid
    assert not answer.system_known
    assert system in (answer.message or "")


def test_a_wrong_display_is_invalid_and_says_the_right_one(local: LocalTerminology) -> None:
    answer = local.validate_code(Coding(synth.LOINC, "8302-2", "Body weight"))
    assert not answer.valid
    assert answer.display == "Body height"
    assert "should be 'Body height'" in (answer.message or "")


def test_lookup_names_the_code_system_and_refuses_unknown_codes(local: LocalTerminology) -> None:
    found = local.lookup(Coding(synth.CVX, "208"))
    assert found.display == "COVID-19, mRNA, LNP-S, PF, 30 mcg/0.3 mL dose"
    assert found.name.startswith("CVX")
    with pytest.raises(NotFoundError, match="Unknown code '999'"):
        local.lookup(Coding(synth.CVX, "999"))
    with pytest.raises(NotFoundError, match="could not be found"):
        local.lookup(Coding("http://example.org/none", "1"))


def test_value_sets_validate_membership_and_expand(local: LocalTerminology) -> None:
    assert local.validate_in_value_set(VITAL_SIGNS, Coding(synth.LOINC, "8867-4")).valid
    glucose = local.validate_in_value_set(VITAL_SIGNS, Coding(synth.LOINC, "2339-0"))
    assert not glucose.valid and glucose.system_known
    # The vaccines value set includes the whole (shipped) CVX system.
    expansion = local.expand(VACCINES)
    assert expansion.total == len(synth.VACCINES)
    assert {c.code for c in expansion.contains} == {code for code, _ in synth.VACCINES}
    assert local.expand(VACCINES, count=2).total == len(synth.VACCINES)
    assert len(local.expand(VACCINES, count=2).contains) == 2
    assert [c.code for c in local.expand(VACCINES, filter_text="mmr").contains] == ["03"]
    with pytest.raises(NotFoundError, match="ValueSet"):
        local.expand("https://starvit.example.org/fhir/ValueSet/none")


def test_the_concept_map_maps_each_synthetic_condition_to_its_icd10_code(
    local: LocalTerminology,
) -> None:
    for snomed, _, icd10, _ in synth.CONDITIONS:
        translation = local.translate(
            TranslateRequest(Coding(synth.SNOMED, snomed), target_system=synth.ICD10CM)
        )
        best = translation.best()
        assert translation.result and best is not None
        assert (best.target.system, best.target.code, best.equivalence) == (
            synth.ICD10CM,
            icd10,
            "equivalent",
        )
    none = local.translate(
        TranslateRequest(Coding(synth.SNOMED, "430193006"), target_system=synth.ICD10CM)
    )
    assert not none.result and none.best() is None


def test_shipped_code_systems_are_declared_fragments_with_a_licence_statement() -> None:
    for path in CONTENT_DIR.glob("CodeSystem-*.json"):
        resource = json.loads(path.read_text())
        assert resource["content"] == "fragment", path.name
        assert resource["copyright"], path.name
        assert resource["count"] == len(resource["concept"]), path.name
    snomed = json.loads((CONTENT_DIR / "CodeSystem-snomed-ct.json").read_text())
    assert "licence" in snomed["copyright"] or "licensed" in snomed["copyright"]


def test_unreadable_content_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "CodeSystem-bad.json").write_text("{not json")
    with pytest.raises(ContentError, match=r"CodeSystem-bad\.json: not readable JSON"):
        LocalTerminology([tmp_path])
    (tmp_path / "CodeSystem-bad.json").write_text(
        json.dumps({"resourceType": "Patient", "url": "x"})
    )
    with pytest.raises(ContentError, match="'Patient' is not terminology"):
        LocalTerminology([tmp_path])
    with pytest.raises(ContentError, match="does not exist"):
        LocalTerminology([tmp_path / "missing"])


def test_parameters_round_trip_validation_and_translation(local: LocalTerminology) -> None:
    unknown = Validation(valid=False, system_known=False, message="no such system")
    wire = validation_parameters(unknown, "http://loinc.org/")
    assert parameter_values(wire)["x-caused-by-unknown-system"] == ["http://loinc.org/"]
    assert validation_from_parameters(wire) == unknown
    translation = local.translate(TranslateRequest(Coding(synth.SNOMED, "38341003")))
    assert translation_from_parameters(translation_parameters(translation)) == translation
    with pytest.raises(ValueError, match="without a boolean result"):
        validation_from_parameters({"resourceType": "Parameters", "parameter": []})


def test_validation_rows_map_valid_snomed_codes_and_count_occurrences(
    local: LocalTerminology,
) -> None:
    occurrences = merge_occurrences(
        [
            ("condition", synth.SNOMED, "38341003", 4),
            ("encounter", synth.SNOMED, "38341003", 1),
            ("observation", synth.LOINC, "99999-9", 2),
            ("observation", "http://loinc.org/", "8302-2", 1),
        ]
    )
    rows = {(row.code_system, row.code): row for row in validate_and_map(local, occurrences)}
    hypertension = rows[(synth.SNOMED, "38341003")]
    assert hypertension.is_valid and hypertension.occurrences == 5
    assert hypertension.source_tables == "condition,encounter"
    assert (hypertension.mapped_system, hypertension.mapped_code) == (synth.ICD10CM, "I10")
    assert hypertension.terminology_service == "embedded"
    unknown = rows[(synth.LOINC, "99999-9")]
    assert not unknown.is_valid and unknown.system_known and unknown.mapped_code is None
    slash = rows[("http://loinc.org/", "8302-2")]
    assert not slash.is_valid and not slash.system_known


def _row(
    system: str, code: str, valid: bool, occurrences: int, known: bool = True
) -> CodeValidationRow:
    return CodeValidationRow(
        system, code, valid, known, None, None, None, None, None, None, occurrences, "t", "embedded"
    )


def test_the_share_check_judges_known_systems_each_and_unknown_systems_as_one_pool() -> None:
    rows = [
        _row(synth.LOINC, "8302-2", True, 97),
        _row(synth.LOINC, "99999-9", False, 3),
        _row(synth.SNOMED, "38341003", True, 50),
        _row("urn:oid:1.2", "x", False, 2, known=False),
    ]
    shares = {share.code_system: share for share in shares_by_system(rows)}
    assert shares[synth.LOINC].valid_share == pytest.approx(0.97)
    assert not shares["urn:oid:1.2"].system_known
    passing = judge_shares(
        list(shares.values()), min_valid_share=0.95, max_unknown_system_share=0.05
    )
    assert passing.passed, passing.description
    assert passing.unknown_system_share == pytest.approx(2 / 152)
    strict = judge_shares(
        list(shares.values()), min_valid_share=0.98, max_unknown_system_share=0.05
    )
    assert not strict.passed and strict.below_threshold == (synth.LOINC,)
    no_unknown = judge_shares(
        list(shares.values()), min_valid_share=0.9, max_unknown_system_share=0.01
    )
    assert not no_unknown.passed and no_unknown.below_threshold == ()
    assert "1.32% of coded rows in an unknown system" in no_unknown.description
