"""Linkage tokens: normalisation, recipes, keys, and what crosses the gate (no Dagster)."""

from __future__ import annotations

import datetime as dt
import hmac
import json
from hashlib import sha256
from pathlib import Path

import pyarrow as pa
import pytest

from starvit_assets.deid.engine import LocalDeidEngine, pseudonym
from starvit_assets.deid.leak import LeakHashSet
from starvit_assets.deid.policy import PolicyError, load_policy
from starvit_assets.fhir.synth import generate
from starvit_assets.lake.gate import build_gate
from starvit_assets.linkage.tokens import (
    RECIPES,
    Demographics,
    LinkageTokenBackend,
    canonical_given,
    normalise_birth_date,
    normalise_name,
    normalise_sex,
    normalise_zip5,
    soundex,
    token_inputs,
    tokens,
    with_linkage_tokens,
)
from starvit_assets.settings import StarvitSettings
from starvit_assets.views.runner import shipped_views

KEY = b"linkage-test-key-0000000000000000"
PSEUDONYM_KEY = b"pseudonym-test-key-00000000000000"
EXPORT_DATE = dt.date(2026, 6, 1)
PERSON = Demographics("Kowalczyk", "Tomasz", "1980-02-29", "male", "01139")


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Kowalczyk", "kowalczyk"),
        ("KOWALCZYK", "kowalczyk"),
        ("  O'Brien-Smith ", "obriensmith"),
        ("Délacroix", "delacroix"),
        ("Szabó", "szabo"),
        ("Müller", "muller"),
        ("Straße", "strasse"),  # casefold, not lower
        ("123", None),
        ("", None),
        (None, None),
    ],
)
def test_names_are_casefolded_ascii_letters(raw: str | None, normalised: str | None) -> None:
    assert normalise_name(raw) == normalised


def test_nicknames_map_to_one_given_name() -> None:
    assert canonical_given("Tom") == canonical_given("TOMASZ") == "tomasz"
    assert canonical_given("Liv") == "olivia"
    assert canonical_given("Amara") == "amara"


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("Robert", "R163"),
        ("Rupert", "R163"),
        ("Rubin", "R150"),
        ("Ashcraft", "A261"),  # h does not separate letters of the same code
        ("Tymczak", "T522"),
        ("Pfister", "P236"),
        ("Lee", "L000"),
        ("Kowalczyk", soundex("Kowalczik")),
    ],
)
def test_soundex_is_american_soundex(name: str, code: str) -> None:
    assert soundex(name) == code


def test_dates_zips_and_sex_normalise_or_are_null() -> None:
    assert normalise_birth_date("1980-02-29") == "1980-02-29"
    assert normalise_birth_date("1980-02") is None  # a partial date cannot identify a day
    assert normalise_birth_date("29/02/1980") is None
    assert normalise_zip5("01139-1234") == normalise_zip5("011391234") == "01139"
    assert normalise_zip5("0113") is None
    assert normalise_sex("Female") == "f"
    assert normalise_sex("unknown") is None
    assert normalise_sex(None) is None


def test_recipes_tolerate_the_variations_they_are_designed_for() -> None:
    base = tokens(KEY, PERSON)
    assert all(base.values())
    shouting = tokens(KEY, Demographics("KOWALCZYK", "tom", "1980-02-29", "M", "01139-0000"))
    assert shouting == base
    swapped = tokens(KEY, Demographics("Tomasz", "Kowalczyk", "1980-02-29", "male", "01139"))
    assert swapped["link_token_4"] == base["link_token_4"]
    assert swapped["link_token_1"] != base["link_token_1"]
    moved = tokens(KEY, Demographics("Kowalczyk", "Tomasz", "1980-02-29", "male", "03601"))
    assert moved["link_token_3"] != base["link_token_3"]
    assert moved["link_token_1"] == base["link_token_1"]
    no_sex = tokens(KEY, Demographics("Kowalczyk", "Tomasz", "1980-02-29", None, "01139"))
    assert no_sex["link_token_1"] is None  # a missing input makes no token: never a match
    assert no_sex["link_token_2"] == base["link_token_2"]
    typo = tokens(KEY, Demographics("Kowalczik", "Tomasz", "1980-02-29", "male", "01139"))
    assert typo["link_token_2"] == base["link_token_2"]  # same Soundex
    wrong_day = tokens(KEY, Demographics("Kowalczyk", "Tomasz", "1980-02-28", "male", "01139"))
    assert wrong_day["link_token_3"] == base["link_token_3"]


def test_a_token_is_the_hmac_of_its_versioned_recipe_with_the_linkage_key() -> None:
    text = token_inputs(PERSON)["link_token_1"]
    assert text == "v1|link_token_1|kowalczyk|t|1980-02-29|m"
    assert tokens(KEY, PERSON)["link_token_1"] == hmac.new(KEY, text.encode(), sha256).hexdigest()
    assert tokens(b"another-domain-key-0000000000000", PERSON) != tokens(KEY, PERSON)
    # Recipes differ in their prefix, so two recipes over equal fields never collide.
    assert len(set(tokens(KEY, PERSON).values())) == len(RECIPES)


def test_the_linkage_key_is_its_own_dev_key_and_configurable(tmp_path: Path) -> None:
    settings = StarvitSettings(home=tmp_path)
    assert settings.linkage_token_key != settings.key
    assert settings.linkage_token_key == StarvitSettings(home=tmp_path).linkage_token_key
    shared = "ab" * 32
    assert StarvitSettings(home=tmp_path, linkage_key=shared).linkage_token_key == bytes.fromhex(
        shared
    )
    with pytest.raises(Exception, match="STARVIT_LINKAGE_KEY"):
        _ = StarvitSettings(home=tmp_path, env="prod").linkage_token_key


def test_a_policy_that_publishes_a_linkage_input_is_refused(tmp_path: Path) -> None:
    text = (Path(__file__).parents[2] / "starvit_assets/deid/policy.yaml").read_text()
    leaky = tmp_path / "policy.yaml"
    leaky.write_text(
        text.replace("linkage_family: {method: drop}", "linkage_family: {method: keep}")
    )
    with pytest.raises(PolicyError, match="linkage input family reads 'linkage_family'"):
        load_policy(leaky)


class _Identity:
    """A stand-in backend that changes nothing: the tokens must not depend on the backend."""

    def __init__(self, keep: list[str]) -> None:
        self.keep = keep

    def deidentify(self, table_name: str, rows: pa.Table) -> pa.Table:
        return rows.select(self.keep)


def test_tokens_do_not_depend_on_the_backend() -> None:
    policy = load_policy()
    rows = pa.table(
        {
            "patient_id": ["p1", "p2"],
            "linkage_family": ["Kowalczyk", "Nakamura"],
            "linkage_given": ["Tomasz", "Yuki"],
            "birth_year": ["1980-02-29", "1975-07-01"],
            "gender": ["male", "female"],
            "postal_code_3": ["01139", None],
        }
    )
    one = LinkageTokenBackend(_Identity(["patient_id"]), policy, KEY).deidentify("patient", rows)
    other = LinkageTokenBackend(_Identity([]), policy, KEY).deidentify("patient", rows)
    assert one.column_names == ["patient_id", *RECIPES]
    for name in RECIPES:
        assert one.column(name).to_pylist() == other.column(name).to_pylist()
    assert one.column("link_token_1")[0].as_py() == tokens(KEY, PERSON)["link_token_1"]
    assert one.column("link_token_3")[1].as_py() is None  # no ZIP


def test_no_raw_name_or_birth_date_crosses_into_the_lake_table(tmp_path: Path) -> None:
    source = tmp_path / "source"
    generate(source, patients=40, seed=5, duplicate_rate=0.3)
    patients = [json.loads(line) for line in (source / "Patient.ndjson").read_text().splitlines()]
    policy = load_policy()
    backend = with_linkage_tokens(
        LocalDeidEngine(PSEUDONYM_KEY, policy, reference_date=EXPORT_DATE), policy, lambda: KEY
    )
    gate = build_gate(
        table_name="patient",
        view=shipped_views()["patient"],
        backend=backend,
        policy=policy,
        key=PSEUDONYM_KEY,
        export_date=EXPORT_DATE,
    )
    result = gate.run(
        [source / "Patient.ndjson"], "export-1", tmp_path / "out.parquet", tmp_path / "q.parquet"
    )
    table = result.table
    assert result.rows == len(patients) and result.reconciles()
    assert "linkage_family" not in table.column_names
    assert "linkage_given" not in table.column_names
    # Every string cell against every name part and birth date, as the PHI-leak check does.
    leaks = LeakHashSet(PSEUDONYM_KEY)
    for patient in patients:
        leaks.add_patient(patient)
    assert leaks.find_leaks_in_parquet(result.output) == []
    cells = {str(value) for column in table.columns for value in column.to_pylist()}
    for patient in patients:
        name = patient["name"][0]
        for value in (name["family"], *name["given"], patient["birthDate"]):
            assert value not in cells
            assert value.casefold() not in cells
    # The tokens are there, equal to those computed in the PHI zone from the raw record.
    by_id = {pseudonym(PSEUDONYM_KEY, "Patient", p["id"]): p for p in patients}
    for row in table.to_pylist():
        patient = by_id[row["patient_id"]]
        name = patient["name"][0]
        raw = Demographics(
            name["family"],
            name["given"][0],
            patient["birthDate"],
            patient.get("gender"),
            patient["address"][0]["postalCode"],
        )
        assert {k: row[k] for k in RECIPES} == tokens(KEY, raw)
