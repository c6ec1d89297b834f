"""De-identification semantics, without Dagster, a database or a network."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pyarrow as pa
import pytest

from starvit_assets.deid.engine import (
    DeidError,
    LocalDeidEngine,
    birth_year,
    date_shift_days,
    pseudonym,
    shift_fhir_temporal,
    zip3,
)
from starvit_assets.deid.leak import LeakHashSet, identifying_values
from starvit_assets.deid.policy import PolicyError, load_policy

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
REFERENCE = dt.date(2026, 6, 15)
RAW_TABLES_DOC = Path(__file__).resolve().parents[2] / "docs" / "raw-tables.md"


def _engine(key: bytes = KEY) -> LocalDeidEngine:
    return LocalDeidEngine(key, load_policy(), reference_date=REFERENCE)


def _observations(rows: list[dict]) -> pa.Table:
    columns = load_policy().table("observation").columns
    return pa.table({name: [row.get(name) for row in rows] for name in columns}).cast(
        pa.schema(
            [(name, pa.float64() if name == "value_quantity" else pa.string()) for name in columns]
        )
    )


def test_references_get_the_same_token_as_the_resource_they_point_to() -> None:
    patient_columns = load_policy().table("patient").columns
    patients = pa.table(
        {
            name: pa.array(["p-1" if name == "patient_id" else None], pa.string())
            for name in patient_columns
        }
    )
    observations = _observations(
        [{"observation_id": "o-1", "patient_id": "p-1", "encounter_id": "e-1"}]
    )

    patient_token = _engine().deidentify("patient", patients).column("patient_id")[0].as_py()
    observation = _engine().deidentify("observation", observations)

    assert (
        observation.column("patient_id")[0].as_py()
        == patient_token
        == pseudonym(KEY, "Patient", "p-1")
    )
    assert observation.column("encounter_id")[0].as_py() == pseudonym(KEY, "Encounter", "e-1")
    assert re.fullmatch(r"[0-9a-f]{32}", patient_token)
    assert pseudonym(OTHER_KEY, "Patient", "p-1") != patient_token
    assert pseudonym(KEY, "Encounter", "p-1") != patient_token


@pytest.mark.parametrize(
    ("value", "days", "expected"),
    [
        ("2021-03-04T10:15:00+02:00", 30, "2021-04-03T10:15:00+02:00"),
        ("2021-03-04T10:15:00.123Z", -4, "2021-02-28T10:15:00.123Z"),
        ("2021-03-04", 365, "2022-03-04"),
        ("2010-09", 40, "2010-10"),
        ("2010", -1, "2009"),
        ("2024-02-28T23:59:59-05:00", 1, "2024-02-29T23:59:59-05:00"),
    ],
)
def test_date_shift_keeps_precision_and_offset(value: str, days: int, expected: str) -> None:
    assert shift_fhir_temporal(value, days) == expected


def test_date_shift_keeps_intervals_within_a_patient_and_differs_between_patients() -> None:
    rows = [
        {"observation_id": "o1", "patient_id": "p1", "effective_datetime": "2021-01-01T08:00:00Z"},
        {"observation_id": "o2", "patient_id": "p1", "effective_datetime": "2021-03-01T08:00:00Z"},
    ] + [
        {"observation_id": f"x{i}", "patient_id": f"p{i}", "effective_datetime": "2021-01-01"}
        for i in range(2, 40)
    ]
    shifted = (
        _engine()
        .deidentify("observation", _observations(rows))
        .column("effective_datetime")
        .to_pylist()
    )

    first, second = (dt.datetime.fromisoformat(v) for v in shifted[:2])
    assert second - first == dt.timedelta(days=59)
    assert shifted[0] != "2021-01-01T08:00:00Z"
    assert len(set(shifted[2:])) > 30
    offsets = [date_shift_days(KEY, f"p{i}", 365) for i in range(500)]
    assert 0 not in offsets and min(offsets) >= -365 and max(offsets) <= 365


def test_dates_without_a_patient_context_are_dropped_not_left_unshifted() -> None:
    table = _observations(
        [{"observation_id": "o1", "patient_id": None, "effective_datetime": "2021-01-01"}]
    )
    assert _engine().deidentify("observation", table).column("effective_datetime").to_pylist() == [
        None
    ]


def test_an_unparseable_date_fails_without_echoing_the_value() -> None:
    table = _observations(
        [{"observation_id": "o1", "patient_id": "p1", "effective_datetime": "Jane Doe 1980"}]
    )
    with pytest.raises(DeidError) as error:
        _engine().deidentify("observation", table)
    assert "observation.effective_datetime" in str(error.value)
    assert "Jane" not in str(error.value)


@pytest.mark.parametrize(
    ("birth_date", "expected"),
    [
        ("1980-07-01", 1980),
        ("1936-06-16", 1936),  # 89 the day before the reference date's birthday
        ("1936-06-15", 1936),  # 90 on the reference date: collapsed
        ("1900-01-01", 1936),
        ("1930", 1936),
        ("2025", 2025),
    ],
)
def test_birth_year_collapses_ages_of_ninety_and_over(birth_date: str, expected: int) -> None:
    assert birth_year(birth_date, REFERENCE) == expected


@pytest.mark.parametrize(
    ("zip_code", "expected"),
    [("02139", "021"), ("03601", "000"), ("10212-1234", "000"), ("8930", None), ("AB1 2CD", None)],
)
def test_zip3_generalisation(zip_code: str, expected: str | None) -> None:
    assert zip3(zip_code) == expected


def test_a_column_without_a_rule_cannot_cross() -> None:
    table = _observations([{"observation_id": "o1", "patient_id": "p1"}]).append_column(
        "note_text", pa.array(["Jane"])
    )
    with pytest.raises(PolicyError, match=r"columns without a rule.*note_text"):
        _engine().deidentify("observation", table)


def test_a_rule_for_a_missing_column_fails_the_build() -> None:
    table = _observations([{"observation_id": "o1", "patient_id": "p1"}]).drop_columns(["code"])
    with pytest.raises(PolicyError, match="rules for columns the view does not have: code"):
        _engine().deidentify("observation", table)


def test_drop_and_redact(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(
        "version: t\ntables:\n  notes:\n    date_shift_context: patient_id\n    columns:\n"
        "      patient_id: {method: pseudonymise, resource_type: Patient}\n"
        "      text: {method: redact}\n      internal: {method: drop}\n"
    )
    engine = LocalDeidEngine(KEY, load_policy(policy_file), reference_date=REFERENCE)
    result = engine.deidentify(
        "notes", pa.table({"patient_id": ["p"], "text": ["Jane Doe"], "internal": ["x"]})
    )
    assert result.column_names == ["patient_id", "text"]
    assert result.column("text").to_pylist() == [None]


def test_invalid_policies_get_clear_errors(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(
        "version: t\ntables:\n  t:\n    date_shift_context: a\n    columns:\n      a: {method: hash}\n"
    )
    with pytest.raises(PolicyError, match=r"tables\.t\.columns\.a\.method"):
        load_policy(policy_file)
    policy_file.write_text(
        "version: t\ntables:\n  t:\n    date_shift_context: a\n    columns:\n      a: {method: pseudonymise}\n"
    )
    with pytest.raises(PolicyError, match="resource_type is required"):
        load_policy(policy_file)


def test_the_shipped_policy_covers_exactly_the_documented_raw_columns() -> None:
    documented: dict[str, list[str]] = {}
    table = None
    for line in RAW_TABLES_DOC.read_text().splitlines():
        if line.startswith("## "):
            heading = re.match(r"^## (\w+) \(\w+\)$", line)
            table = heading.group(1) if heading else None
            if table:
                documented[table] = []
        elif (
            table
            and line.startswith("| ")
            and not line.startswith("| column")
            and not line.startswith("| ---")
        ):
            documented[table].append(line.split("|")[1].strip())
    policy = load_policy()
    assert set(policy.tables) == set(documented)
    for name, columns in documented.items():
        spec = policy.table(name).linkage_tokens
        tokens = list(spec.tokens) if spec else []
        # The linkage tokens are documented beside the columns, after them.
        assert columns[len(columns) - len(tokens) :] == tokens
        policy.table(name).check_covers(columns[: len(columns) - len(tokens)], name)


def test_leak_detector_finds_planted_canaries_and_reports_positions_only(tmp_path: Path) -> None:
    patient = {
        "id": "pat-123",
        "name": [{"family": "Quixote", "given": ["Alonso"]}],
        "identifier": [{"value": "123-45-6789"}],
        "telecom": [{"value": "555-010-9999"}],
        "address": [{"line": ["1 Windmill Lane"], "city": "La Mancha", "postalCode": "02139"}],
        "birthDate": "1947-10-09",
    }
    hashes = LeakHashSet(KEY)
    hashes.add_patient(patient)
    hashes.save(tmp_path / "hashes.bin")
    loaded = LeakHashSet.load(tmp_path / "hashes.bin", KEY)
    assert len(loaded) == len(hashes) >= 10
    assert b"Quixote" not in (tmp_path / "hashes.bin").read_bytes()

    staged = pa.table(
        {
            "clean": ["38341003", "final", None],
            "leaky": ["  alonso   QUIXOTE ", "ok", "1 windmill lane"],
            "dates": ["1947-10-09", "2020-01-01", None],
        }
    )
    hits = loaded.find_leaks(staged)
    assert {(hit.column, hit.row) for hit in hits} == {("leaky", 0), ("leaky", 2), ("dates", 0)}
    assert LeakHashSet(OTHER_KEY, set()).find_leaks(staged) == []
    assert set(identifying_values(patient)) >= {"pat-123", "Alonso Quixote", "1947-10-09"}


def test_column_date_shift_equals_the_value_by_value_shift() -> None:
    import random

    from starvit_assets.deid.engine import shift_fhir_temporal, shift_fhir_temporal_array

    draw = random.Random(7)
    values: list[str | None] = []
    offsets: list[int | None] = []
    for _ in range(5_000):
        year, month, day = draw.randint(1900, 2030), draw.randint(1, 12), draw.randint(1, 28)
        values.append(
            draw.choice(
                [
                    f"{year}",
                    f"{year}-{month:02d}",
                    f"{year}-{month:02d}-{day:02d}",
                    f"{year}-{month:02d}-{day:02d}T10:11:12+02:00",
                    f"{year}-{month:02d}-{day:02d}T10:11:12.123Z",
                    None,
                ]
            )
        )
        offsets.append(None if draw.random() < 0.05 else draw.randint(-365, 365))
    shifted = shift_fhir_temporal_array(
        pa.array(values, pa.string()), pa.array(offsets, pa.int32())
    )
    expected = [
        None if value is None or offset is None else shift_fhir_temporal(value, offset)
        for value, offset in zip(values, offsets, strict=True)
    ]
    assert shifted.to_pylist() == expected


@pytest.mark.parametrize("value", ["2023-02-30", "last tuesday", "2023-1-5"])
def test_column_date_shift_refuses_what_is_not_a_fhir_date(value: str) -> None:
    from starvit_assets.deid.engine import shift_fhir_temporal_array

    with pytest.raises(ValueError):
        shift_fhir_temporal_array(pa.array([value]), pa.array([3], pa.int32()))


@pytest.mark.parametrize("key", [b"", b"k", b"k" * 32, b"k" * 64, b"k" * 65, bytes(range(200))])
def test_hmac_sha256_is_the_standard_hmac(key: bytes) -> None:
    import hashlib
    import hmac

    from starvit_assets.deid.engine import hmac_sha256

    for message in (b"", b"Patient/123", b"x" * 1000):
        assert hmac_sha256(key, message) == hmac.new(key, message, hashlib.sha256).digest()
