"""The vectorized flattening against the general evaluator: shipped views on synthetic data,
every conformance view that compiles, and the edge cases where the two could part (dates as
written, nulls, forEachOrNull, other resource types, line mapping, fallbacks)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from starvit_assets.fhir.synth import generate
from starvit_assets.views import vectorized
from starvit_assets.views.runner import ViewDefinitionError, compile_view, shipped_views
from starvit_assets.views.vectorized import (
    FlatBatch,
    InvalidLineError,
    LineViewError,
    VectorizedView,
    compile_vectorized,
    unsupported_reason,
)

CONFORMANCE_DIR = Path(__file__).resolve().parents[3] / "shared" / "sql-on-fhir-v2-tests"
SHIPPED_TYPES = {
    "patient": "Patient",
    "encounter": "Encounter",
    "observation": "Observation",
    "condition": "Condition",
    "medication_request": "MedicationRequest",
    "procedure": "Procedure",
    "immunization": "Immunization",
    "allergy_intolerance": "AllergyIntolerance",
}


def _lines(resources: Sequence[dict[str, Any]]) -> list[bytes]:
    return [json.dumps(resource, separators=(",", ":")).encode() + b"\n" for resource in resources]


def _general(view: dict[str, Any], lines: Sequence[bytes]) -> FlatBatch:
    """What the gate builds today: CompiledView.rows per line, then pa.table with its schema."""
    compiled = compile_view(view)
    columns: dict[str, list[Any]] = {name: [] for name in compiled.column_names}
    index: list[int] = []
    types: list[str | None] = []
    for number, line in enumerate(lines):
        resource = json.loads(line)
        resource_type = resource.get("resourceType")
        types.append(resource_type if isinstance(resource_type, str) else None)
        for row in compiled.rows(resource):
            index.append(number)
            for name in compiled.column_names:
                columns[name].append(row[name])
    return FlatBatch(
        pa.table(columns, schema=compiled.arrow_schema()),
        pa.array(index, pa.int64()),
        pa.array(types, pa.string()),
    )


def _typed_rows(table: pa.Table) -> list[list[tuple[str, Any, str]]]:
    return [
        [(name, value, type(value).__name__) for name, value in row.items()]
        for row in table.to_pylist()
    ]


def _assert_same(got: FlatBatch, expected: FlatBatch) -> None:
    assert got.table.schema == expected.table.schema
    assert _typed_rows(got.table) == _typed_rows(expected.table)
    assert got.table.equals(expected.table)
    assert got.resource_index.type == pa.int64()
    assert got.resource_index.to_pylist() == expected.resource_index.to_pylist()
    assert got.resource_types.to_pylist() == expected.resource_types.to_pylist()


@pytest.fixture
def vectorized_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails a test whose batch would silently take the general path."""

    def refuse(self: VectorizedView, lines: Sequence[bytes]) -> FlatBatch:
        raise AssertionError("the batch fell back to the general evaluator")

    monkeypatch.setattr(VectorizedView, "_evaluate_generally", refuse)


def _compiled(view: dict[str, Any]) -> VectorizedView:
    compiled = compile_vectorized(view)
    assert compiled is not None, unsupported_reason(view)
    return compiled


# --- (1) shipped views on synthetic data --------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("synth")
    generate(folder, patients=60, seed=11)
    return folder


def test_every_shipped_view_compiles() -> None:
    views = shipped_views()
    assert set(views) == set(SHIPPED_TYPES)
    for name, view in views.items():
        assert unsupported_reason(view) is None, name
        compiled = _compiled(view)
        assert compiled.resource_type == SHIPPED_TYPES[name]
        assert compiled.column_names == compile_view(view).column_names


@pytest.mark.parametrize("name", sorted(SHIPPED_TYPES))
def test_shipped_view_matches_the_general_evaluator_on_synthetic_data(
    name: str, synthetic: Path, vectorized_only: None
) -> None:
    view = shipped_views()[name]
    lines = (synthetic / f"{SHIPPED_TYPES[name]}.ndjson").read_bytes().splitlines(keepends=True)
    assert len(lines) > 20
    got = _compiled(view).flatten(lines)
    _assert_same(got, _general(view, lines))
    assert got.table.num_rows == len(lines)


# AllergyIntolerance.type is a code and its category a list of codes, where Encounter.type and
# Observation.category hold CodeableConcepts: no one explicit pyarrow schema reads both, so a
# batch that mixes them takes the general path. The gate reads one type per file.
SHAPE_CLASHES = {"AllergyIntolerance": {"Encounter", "Observation"}}


def _mixed_lines(synthetic: Path, types: Sequence[str]) -> list[bytes]:
    lines = [
        line
        for resource_type in types
        for line in (synthetic / f"{resource_type}.ndjson").read_bytes().splitlines()[:15]
    ]
    random.Random(3).shuffle(lines)
    return lines


def test_shipped_views_on_a_batch_of_mixed_types_in_small_batches(
    synthetic: Path, vectorized_only: None
) -> None:
    lines = _mixed_lines(synthetic, [t for t in SHIPPED_TYPES.values() if t not in SHAPE_CLASHES])
    for name, view in shipped_views().items():
        if SHIPPED_TYPES[name] in SHAPE_CLASHES:
            continue
        compiled = _compiled(view)
        for start in range(0, len(lines), 16):
            batch = lines[start : start + 16]
            _assert_same(compiled.flatten(batch), _general(view, batch))
        assert compiled.flatten(lines).table.num_rows == 15, name


@pytest.mark.parametrize("resource_type", sorted(SHAPE_CLASHES))
def test_a_batch_mixing_types_whose_elements_clash_gives_the_same_rows(
    resource_type: str, synthetic: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fallbacks: list[int] = []
    general = VectorizedView._evaluate_generally

    def counted(self: VectorizedView, lines: Sequence[bytes]) -> FlatBatch:
        fallbacks.append(len(lines))
        return general(self, lines)

    monkeypatch.setattr(VectorizedView, "_evaluate_generally", counted)
    lines = _mixed_lines(synthetic, [resource_type, *sorted(SHAPE_CLASHES[resource_type])])
    names = [
        n for n, t in SHIPPED_TYPES.items() if t in {resource_type, *SHAPE_CLASHES[resource_type]}
    ]
    for name in names:
        view = shipped_views()[name]
        got = _compiled(view).flatten(lines)
        _assert_same(got, _general(view, lines))
        assert got.table.num_rows == 15, name
    assert fallbacks == [len(lines)] * len(names)


# --- (2) conformance views ----------------------------------------------------------------------
# The shared part of the official suite, and the upstream files it lacks (stored in the tests).
UPSTREAM_DIR = Path(__file__).resolve().parents[1] / "integration" / "sof_upstream"


def _conformance_cases() -> Iterator[Any]:
    for folder in (CONFORMANCE_DIR, UPSTREAM_DIR):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.json")):
            suite = json.loads(path.read_text())
            if not isinstance(suite, dict) or "tests" not in suite:
                continue
            for number, test in enumerate(suite["tests"]):
                yield pytest.param(
                    folder.name,
                    suite.get("resources", []),
                    test,
                    id=f"{folder.name}/{path.stem}-{number}-{test.get('title')}",
                )


CONFORMANCE_CASES = list(_conformance_cases())


def _of_view_type(view: dict[str, Any], resources: list[dict[str, Any]]) -> list[bytes]:
    """The gate flattens one resource type per batch: a batch mixing types whose elements have
    other JSON shapes would make pyarrow refuse it, and the general evaluator take it."""
    return _lines(
        [resource for resource in resources if resource.get("resourceType") == view.get("resource")]
    )


@pytest.fixture
def general_fallbacks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records each batch VectorizedView hands to the general evaluator."""
    calls: list[int] = []
    evaluate_generally = VectorizedView._evaluate_generally

    def record(self: VectorizedView, lines: Sequence[bytes]) -> FlatBatch:
        calls.append(len(lines))
        return evaluate_generally(self, lines)

    monkeypatch.setattr(VectorizedView, "_evaluate_generally", record)
    return calls


@pytest.mark.skipif(not CONFORMANCE_CASES, reason="no SQL on FHIR conformance tests")
@pytest.mark.parametrize(("folder", "resources", "test"), CONFORMANCE_CASES)
def test_conformance_view_matches_the_general_evaluator(
    folder: str,
    resources: list[dict[str, Any]],
    test: dict[str, Any],
    general_fallbacks: list[int],
) -> None:
    compiled = compile_vectorized(test["view"])
    if compiled is None:
        pytest.skip(f"not vectorized: {unsupported_reason(test['view'])}")
    lines = _of_view_type(test["view"], resources)
    assert lines, "a conformance view with no resource of its type compares nothing"
    try:
        expected = _general(test["view"], lines)
    except ViewDefinitionError:
        # The general evaluator's error is only reproduced by handing it the batch.
        with pytest.raises(ViewDefinitionError):
            compiled.flatten(lines)
        return
    _assert_same(compiled.flatten(lines), expected)
    assert general_fallbacks == [], "the batch fell back: the general evaluator met itself"


def _raises_generally(resources: list[dict[str, Any]], test: dict[str, Any]) -> bool:
    try:
        _general(test["view"], _of_view_type(test["view"], resources))
    except ViewDefinitionError:
        return True
    return False


# Per folder: (tests, views that compile, of those compared with the vectorized path running;
# the rest expect the general evaluator's error, which only handing it the batch reproduces).
# docs/views.md states these numbers.
CONFORMANCE_COUNTS = {"sql-on-fhir-v2-tests": (102, 62, 61), "sof_upstream": (32, 13, 13)}


@pytest.mark.skipif(not CONFORMANCE_CASES, reason="no SQL on FHIR conformance tests")
def test_conformance_counts_in_the_docs_are_the_true_ones() -> None:
    counts: dict[str, list[int]] = {}
    for case in CONFORMANCE_CASES:
        folder, resources, test = case.values
        tally = counts.setdefault(folder, [0, 0, 0])
        tally[0] += 1
        if compile_vectorized(test["view"]) is not None:
            tally[1] += 1
            tally[2] += not _raises_generally(resources, test)
    assert {folder: tuple(tally) for folder, tally in counts.items()} == {
        folder: expected for folder, expected in CONFORMANCE_COUNTS.items() if folder in counts
    }


# --- (3) edge cases -----------------------------------------------------------------------------
CONDITION_VIEW = shipped_views()["condition"]
PATIENT_VIEW = shipped_views()["patient"]
OBSERVATION_VIEW = shipped_views()["observation"]


def _condition(onset: str, recorded: str | None = None, **extra: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Condition",
        "id": f"c-{onset}",
        "meta": {"versionId": "1", "lastUpdated": "2024-05-01T10:00:00.000Z"},
        "subject": {"reference": "Patient/p1"},
        "onsetDateTime": onset,
        **extra,
    }
    if recorded is not None:
        resource["recordedDate"] = recorded
    return resource


def test_partial_dates_and_offsets_are_kept_as_written(vectorized_only: None) -> None:
    onsets = [
        "2010",
        "2010-09",
        "2010-09-01",
        "2010-09-01T10:00:00+05:30",
        "2010-09-01T10:00:00.000-08:00",
        "2010-09-01T23:59:59.1234567Z",
        "2010-09-01T10:00:00+14:00",
    ]
    resources = [_condition(onset, recorded=onset) for onset in onsets]
    got = _compiled(CONDITION_VIEW).flatten(_lines(resources))
    assert got.table.column("onset_datetime").to_pylist() == onsets
    assert got.table.column("recorded_date").to_pylist() == onsets
    assert got.table.schema.field("onset_datetime").type == pa.string()
    assert got.table.column("last_updated").to_pylist() == ["2024-05-01T10:00:00.000Z"] * 7
    _assert_same(got, _general(CONDITION_VIEW, _lines(resources)))


def test_absent_elements_give_nulls(vectorized_only: None) -> None:
    resources: list[dict[str, Any]] = [
        {"resourceType": "Observation", "id": "bare"},
        {"resourceType": "Observation"},
        {"resourceType": "Observation", "code": {}, "valueString": "not a quantity"},
        {"resourceType": "Observation", "category": [], "code": {"coding": []}},
    ]
    got = _compiled(OBSERVATION_VIEW).flatten(_lines(resources))
    paths = {column["name"]: column["path"] for column in OBSERVATION_VIEW["select"][0]["column"]}
    # join() of nothing is "" (not null) in the general evaluator too.
    nullable = [name for name, path in paths.items() if "join(" not in path]
    assert got.table.column("observation_id").to_pylist() == ["bare", None, None, None]
    for name in nullable:
        if name != "observation_id":
            assert got.table.column(name).null_count == len(resources), name
    _assert_same(got, _general(OBSERVATION_VIEW, _lines(resources)))


FOR_EACH_VIEW: dict[str, Any] = {
    "resourceType": "ViewDefinition",
    "resource": "Patient",
    "select": [
        {"column": [{"name": "id", "path": "getResourceKey()", "type": "string"}]},
        {
            "forEachOrNull": "name",
            "column": [
                {"name": "family", "path": "family", "type": "string"},
                {"name": "given", "path": "given", "type": "string", "collection": True},
            ],
        },
        {
            "forEach": "telecom.where(system = 'phone')",
            "column": [{"name": "phone", "path": "value"}],
        },
    ],
}


def test_for_each_or_null_emits_a_null_row_and_lines_map_to_rows(vectorized_only: None) -> None:
    phone = {"system": "phone", "value": "555"}
    resources: list[dict[str, Any]] = [
        {"resourceType": "Patient", "id": "two-names", "telecom": [phone],
         "name": [{"family": "A", "given": ["x", "y"]}, {"family": "B"}]},
        {"resourceType": "Patient", "id": "no-name", "telecom": [phone]},
        {"resourceType": "Patient", "id": "no-phone", "name": [{"family": "C"}]},
        {"resourceType": "Observation", "id": "other-type"},
        {"resourceType": "Patient", "id": "two-phones", "telecom": [phone, phone, {"value": "1"}]},
    ]  # fmt: skip
    got = _compiled(FOR_EACH_VIEW).flatten(_lines(resources))
    assert got.table.to_pylist() == [
        {"id": "two-names", "family": "A", "given": ["x", "y"], "phone": "555"},
        {"id": "two-names", "family": "B", "given": [], "phone": "555"},
        # The null row is the select on no element: a collection column there is empty.
        {"id": "no-name", "family": None, "given": [], "phone": "555"},
        {"id": "two-phones", "family": None, "given": [], "phone": "555"},
        {"id": "two-phones", "family": None, "given": [], "phone": "555"},
    ]
    assert got.resource_index.to_pylist() == [0, 0, 1, 4, 4]
    assert got.resource_types.to_pylist() == [
        "Patient",
        "Patient",
        "Patient",
        "Observation",
        "Patient",
    ]
    _assert_same(got, _general(FOR_EACH_VIEW, _lines(resources)))


def test_other_resource_types_are_reported_and_give_no_rows(vectorized_only: None) -> None:
    lines = _lines(
        [
            {"resourceType": "Patient", "id": "p1", "gender": "female"},
            {"resourceType": "Observation", "id": "o1", "status": "final"},
            {"id": "no-type"},
            {"resourceType": "Patient", "id": "p2"},
        ]
    )
    got = _compiled(PATIENT_VIEW).flatten(lines)
    assert got.resource_types.to_pylist() == ["Patient", "Observation", None, "Patient"]
    assert got.resource_index.to_pylist() == [0, 3]
    assert got.table.column("patient_id").to_pylist() == ["p1", "p2"]


def test_a_batch_without_the_view_type_gives_an_empty_table(vectorized_only: None) -> None:
    lines = _lines([{"resourceType": "Observation", "id": "o1"}, {"resourceType": "Condition"}])
    got = _compiled(PATIENT_VIEW).flatten(lines)
    assert got.table.num_rows == 0
    assert got.table.schema == compile_view(PATIENT_VIEW).arrow_schema()
    assert got.resource_types.to_pylist() == ["Observation", "Condition"]
    _assert_same(got, _general(PATIENT_VIEW, lines))


def test_blank_lines_have_no_type_and_no_rows(vectorized_only: None) -> None:
    patient = _lines([{"resourceType": "Patient", "id": "p1"}])[0]
    got = _compiled(PATIENT_VIEW).flatten([b"\n", patient, b"", b"  \r\n", patient])
    assert got.resource_types.to_pylist() == [None, "Patient", None, None, "Patient"]
    assert got.resource_index.to_pylist() == [1, 4]
    empty = _compiled(PATIENT_VIEW).flatten([b"\n"])
    assert empty.table.num_rows == 0 and empty.resource_types.to_pylist() == [None]
    nothing = _compiled(PATIENT_VIEW).flatten([])
    assert nothing.table.schema == compile_view(PATIENT_VIEW).arrow_schema()
    assert len(nothing.resource_index) == len(nothing.resource_types) == 0


@pytest.mark.parametrize(
    "bad",
    [b'{"resourceType": "Patient", "id": "p2"', b"[1, 2]", b"not json", b'{"a":1}{"b":2}'],
)
def test_a_line_that_is_not_a_json_object_raises_value_error(bad: bytes) -> None:
    good = _lines([{"resourceType": "Patient", "id": "p1"}])[0]
    with pytest.raises(ValueError, match="line 1 of the batch") as raised:
        _compiled(PATIENT_VIEW).flatten([good, bad, good])
    assert isinstance(raised.value, InvalidLineError) and raised.value.line_index == 1
    assert b"p2" not in str(raised.value).encode()


def test_references_relative_absolute_versioned_and_of_another_type(
    vectorized_only: None,
) -> None:
    references = [
        "Patient/p1",
        "https://fhir.example.org/r4/Patient/p-2.x",
        "Patient/p3/_history/7",
        "Group/g1",
        "#contained",
        "urn:uuid:0b4d2c3e",
        "Patient/",
        "Patient/" + "a" * 65,
    ]
    resources = [
        {"resourceType": "Observation", "id": f"o{i}", "subject": {"reference": reference}}
        for i, reference in enumerate(references)
    ] + [{"resourceType": "Observation", "id": "none", "subject": {"display": "x"}}]
    got = _compiled(OBSERVATION_VIEW).flatten(_lines(resources))
    assert got.table.column("patient_id").to_pylist() == [
        "p1", "p-2.x", "p3", None, None, None, None, None, None,
    ]  # fmt: skip
    _assert_same(got, _general(OBSERVATION_VIEW, _lines(resources)))


def test_decimals_are_the_floats_the_general_evaluator_gives(vectorized_only: None) -> None:
    rng = random.Random(5)
    numbers: list[Any] = [0, 1, -0.0, 0.1, 72.5, 1e-7, 123456789.123456789, 3.141592653589793]
    numbers += [round(rng.uniform(-1e6, 1e6), rng.randint(0, 12)) for _ in range(200)]
    resources = [
        {"resourceType": "Observation", "id": str(i), "valueQuantity": {"value": number}}
        for i, number in enumerate(numbers)
    ]
    lines = _lines(resources)
    # Digits beyond what a double holds, written as the source wrote them.
    lines.append(
        b'{"resourceType":"Observation","valueQuantity":{"value":0.12345678901234567890123}}'
    )
    got = _compiled(OBSERVATION_VIEW).flatten(lines)
    _assert_same(got, _general(OBSERVATION_VIEW, lines))


RICH_VIEW: dict[str, Any] = {
    "resourceType": "ViewDefinition",
    "resource": "Patient",
    "constant": [{"name": "official", "valueCode": "official"}],
    "where": [{"path": "name.exists()"}],
    "select": [
        {
            "column": [
                {"name": "id", "path": "getResourceKey()", "type": "string"},
                {"name": "first_given", "path": "name.given.first()", "type": "string"},
                {"name": "second_name", "path": "name[1].family", "type": "string"},
                {"name": "last_name", "path": "name.last().family", "type": "string"},
                {"name": "official", "path": "name.where(use = %official).family.first()"},
                {"name": "given", "path": "name.given", "type": "string", "collection": True},
                {"name": "joined", "path": "name.family.join(' / ')", "type": "string"},
                {"name": "has_telecom", "path": "telecom.exists()", "type": "boolean"},
                {"name": "no_address", "path": "address.empty()", "type": "boolean"},
                {"name": "active", "path": "active", "type": "boolean"},
                {"name": "births", "path": "multipleBirth.ofType(integer)", "type": "integer"},
                {
                    "name": "births_decimal",
                    "path": "multipleBirth.ofType(integer)",
                    "type": "decimal",
                },
                {
                    "name": "race",
                    "path": "extension('http://e/race').value.ofType(Coding).code.first()",
                },
                {"name": "marker", "path": "'P'", "type": "string"},
            ]
        },
        {
            "forEach": "contact",
            "column": [{"name": "contact_family", "path": "name.family", "type": "string"}],
            "select": [
                {"forEachOrNull": "telecom", "column": [{"name": "contact_tel", "path": "value"}]}
            ],
            "unionAll": [
                {"forEach": "name.given", "column": [{"name": "part", "path": "$this"}]},
                {"forEach": "relationship.coding", "column": [{"name": "part", "path": "code"}]},
            ],
        },
    ],
}


def _random_patient(rng: random.Random, number: int) -> dict[str, Any]:
    def maybe(value: Any) -> Any:
        return value if rng.random() < 0.6 else None

    def some(make: Any, most: int = 3) -> list[Any]:
        return [make() for _ in range(rng.randint(0, most))]

    def name() -> dict[str, Any]:
        return {
            key: value
            for key, value in {
                "use": maybe(rng.choice(["official", "usual", "maiden"])),
                "family": maybe(rng.choice(["Ab", "Cd", "Ef"])),
                "given": maybe(some(lambda: rng.choice(["g", "h", "i"]))),
            }.items()
            if value is not None
        }

    patient: dict[str, Any] = {"resourceType": "Patient", "id": f"p{number}"}
    fields = {
        "name": lambda: some(name),
        "telecom": lambda: some(lambda: {"value": rng.choice(["1", "2"])}),
        "address": lambda: some(lambda: {"city": "x"}, 1),
        "active": lambda: rng.random() < 0.5,
        "multipleBirthInteger": lambda: rng.randint(1, 3),
        "extension": lambda: some(
            lambda: {
                "url": rng.choice(["http://e/race", "http://e/other"]),
                "valueCoding": {"code": rng.choice(["r1", "r2"])},
            },
            2,
        ),
        "contact": lambda: some(
            lambda: {
                "name": name(),
                "telecom": some(lambda: {"value": "c"}, 2),
                "relationship": some(lambda: {"coding": some(lambda: {"code": "N"}, 2)}, 2),
            },
            2,
        ),
    }
    for key, make in fields.items():
        if rng.random() < 0.7:
            patient[key] = make()
    return patient


def test_a_view_with_every_supported_shape_matches_on_random_patients(
    vectorized_only: None,
) -> None:
    compiled = _compiled(RICH_VIEW)
    rng = random.Random(17)
    resources = [_random_patient(rng, number) for number in range(400)]
    # The general evaluator refuses several names in a non-collection column; keep the data in
    # the shape where both must agree on values.
    for patient in resources:
        for name in patient.get("name", []):
            name.pop("use", None)
        if patient.get("name"):
            patient["name"][0]["use"] = "official"
    lines = _lines(resources)
    got = compiled.flatten(lines)
    assert got.table.num_rows > 200
    _assert_same(got, _general(RICH_VIEW, lines))


def test_null_array_entries_are_items_like_in_the_general_evaluator(
    vectorized_only: None,
) -> None:
    view = {
        "resource": "Patient",
        "select": [
            {
                "column": [
                    {"name": "given", "path": "name.given", "type": "string", "collection": True},
                    {"name": "second", "path": "name[1].family", "type": "string"},
                    {"name": "first_given", "path": "name.given.first()", "type": "string"},
                    {"name": "has_name", "path": "name.exists()", "type": "boolean"},
                ]
            },
            {"forEachOrNull": "name", "column": [{"name": "family", "path": "family"}]},
        ],
    }
    resources: list[dict[str, Any]] = [
        {"resourceType": "Patient", "name": [None, {"family": "F", "given": [None, "a"]}]},
        {"resourceType": "Patient", "name": None, "gender": None},
        {"resourceType": "Patient", "name": [{"given": None}]},
    ]
    _assert_same(_compiled(view).flatten(_lines(resources)), _general(view, _lines(resources)))


def test_extension_keeps_the_first_match_per_element_like_fhirpathpy(
    vectorized_only: None,
) -> None:
    race = "http://e/race"
    view = {
        "resource": "Patient",
        "select": [
            {
                "column": [
                    {
                        "name": "codes",
                        "path": f"extension('{race}').value.ofType(Coding).code",
                        "collection": True,
                    },
                    {"name": "all", "path": "extension.url", "collection": True},
                ]
            }
        ],
    }

    def extension(url: str, code: str) -> dict[str, Any]:
        return {"url": url, "valueCoding": {"code": code}}

    resources: list[dict[str, Any]] = [
        {"resourceType": "Patient", "extension": [extension(race, "a"), extension(race, "b")]},
        {"resourceType": "Patient", "extension": [extension("x", "c"), extension(race, "d")]},
        {"resourceType": "Patient"},
    ]
    got = _compiled(view).flatten(_lines(resources))
    assert got.table.column("codes").to_pylist() == [["a"], ["d"], []]
    _assert_same(got, _general(view, _lines(resources)))


JOIN_VIEW: dict[str, Any] = {
    "resource": "Patient",
    "select": [{"column": [{"name": "given", "path": "name.given.join(' ')", "type": "string"}]}],
}
FALLBACK_CASES = {
    # fhirpathpy turns a primitive's `_x` sibling into extra items: the general path decides.
    "sibling": (PATIENT_VIEW, '{"resourceType":"Patient","birthDate":"2000","_birthDate":{"id":"b"}}'),
    "sibling-in-list": (JOIN_VIEW, '{"resourceType":"Patient","name":[{"given":["a"],"_given":[{"id":"x"}]}]}'),
    # join() over a null entry fails in the general evaluator.
    "null-in-join": (JOIN_VIEW, '{"resourceType":"Patient","name":[{"given":["a",null]}]}'),
    # A value pyarrow cannot put in the declared type.
    "number-for-code": (PATIENT_VIEW, '{"resourceType":"Patient","gender":7}'),
    # Duplicate keys: pyarrow refuses them, Python keeps the last.
    "duplicate-key": (PATIENT_VIEW, '{"resourceType":"Patient","gender":"male","gender":"female"}'),
    # fhirpathpy's extension() fails on a null extension array and on an extension without url.
    "null-extensions": (RICH_VIEW, '{"resourceType":"Patient","name":[{}],"extension":null}'),
    "extension-without-url": (RICH_VIEW, '{"resourceType":"Patient","name":[{}],"extension":[{}]}'),
    # An integral decimal beyond 2**53 is an int to the general path, which pyarrow refuses.
    "huge-decimal": (OBSERVATION_VIEW, '{"resourceType":"Observation","valueQuantity":{"value":1e20}}'),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(FALLBACK_CASES))
def test_batches_pyarrow_cannot_reproduce_go_to_the_general_evaluator(case: str) -> None:
    view, line = FALLBACK_CASES[case]
    compiled = _compiled(view)
    lines = [line.encode(), _lines([{"resourceType": compiled.resource_type, "id": "q"}])[0]]
    with pytest.raises(vectorized._Fallback):
        compiled._vectorized(lines)
    try:
        expected: FlatBatch | Exception = _general(view, lines)
    except Exception as error:
        expected = error
    if isinstance(expected, Exception):
        with pytest.raises(Exception) as raised:
            compiled.flatten(lines)
        assert type(raised.value.__cause__ or raised.value) is type(expected)
    else:
        _assert_same(compiled.flatten(lines), expected)


def test_several_values_in_a_non_collection_column_is_the_general_error() -> None:
    view = {"resource": "Patient", "select": [{"column": [{"name": "f", "path": "name.family"}]}]}
    lines = _lines(
        [
            {"resourceType": "Patient", "name": [{"family": "A"}]},
            {"resourceType": "Patient", "name": [{"family": "A"}, {"family": "B"}]},
        ]
    )
    with pytest.raises(ViewDefinitionError) as raised:
        _compiled(view).flatten(lines)
    # Also a ValueError naming the line, so that the gate re-runs the batch line by line.
    assert isinstance(raised.value, LineViewError) and isinstance(raised.value, ValueError)
    assert raised.value.line_index == 1
    assert "returned 2 values" in str(raised.value.__cause__)


@pytest.mark.parametrize(
    "select",
    [
        [{"repeat": ["item"], "column": [{"name": "l", "path": "linkId"}]}],
        [{"column": [{"name": "n", "path": "name.where(use = 'a' or use = 'b').family"}]}],
        [{"column": [{"name": "n", "path": "name"}]}],
        [{"column": [{"name": "n", "path": "deceased"}]}],
        [{"column": [{"name": "n", "path": "name.family.count()", "type": "integer"}]}],
        [{"column": [{"name": "n", "path": "multipleBirth.ofType(integer)", "type": "string"}]}],
        [{"column": [{"name": "n", "path": "notAnElement"}]}],
        [{"column": [{"name": "n", "path": "contained.id"}]}],
        [{"column": [{"name": "n", "path": "getResourceKey()", "collection": True}]}],
    ],
)
def test_unsupported_shapes_fall_back(select: list[dict[str, Any]]) -> None:
    view = {"resource": "Patient", "select": select}
    assert compile_vectorized(view) is None
    assert unsupported_reason(view)


@pytest.mark.parametrize(
    ("resource", "path", "reason"),
    [
        # ofType() keeps the types the general evaluator keeps; the vectorized path reads one
        # JSON member, so a choice where several types match is not vectorized.
        ("Observation", "effective.ofType(DateTime)", "keeps 2 of its types"),
        ("Patient", "extension('u').value.ofType(Quantity).value", "keeps 5 of its types"),
        ("Patient", "extension('u').value.ofType(string)", "keeps 4 of its types"),
        ("Observation", "value.ofType(Instant)", "keeps 0 of its types"),
        ("Patient", "%resource.id", "unsupported FHIRPath"),
        ("Patient", "%rowIndex.toString()", "unsupported FHIRPath"),
    ],
)
def test_of_type_with_several_matching_choices_and_other_variables_are_not_vectorized(
    resource: str, path: str, reason: str
) -> None:
    view = {"resource": resource, "select": [{"column": [{"name": "v", "path": path}]}]}

    assert compile_vectorized(view) is None
    assert reason in str(unsupported_reason(view))


def test_of_type_with_a_system_type_reads_its_one_choice(vectorized_only: None) -> None:
    view = {
        "resource": "Observation",
        "select": [
            {
                "column": [
                    {"name": "time", "path": "value.ofType(Time)"},
                    {"name": "text", "path": "value.ofType(String)"},
                    {"name": "instant", "path": "effective.ofType(Instant)"},
                    {"name": "flag", "path": "value.ofType(Boolean)", "type": "boolean"},
                ]
            }
        ],
    }
    lines = _lines(
        [
            {"resourceType": "Observation", "valueTime": "18:12:00"},
            {"resourceType": "Observation", "valueString": "s", "effectiveInstant": "2015-02-07T13:28:17Z"},
            {"resourceType": "Observation", "valueBoolean": False},
        ]
    )  # fmt: skip

    got = _compiled(view).flatten(lines)

    assert got.table.to_pylist() == [
        {"time": "18:12:00", "text": None, "instant": None, "flag": None},
        {"time": None, "text": "s", "instant": "2015-02-07T13:28:17Z", "flag": None},
        {"time": None, "text": None, "instant": None, "flag": False},
    ]
    _assert_same(got, _general(view, lines))


ROW_INDEX_VIEW: dict[str, Any] = {
    "resource": "Patient",
    "select": [
        {"column": [{"name": "id", "path": "id"}, {"name": "top", "path": "%rowIndex", "type": "integer"}]},
        {
            "forEachOrNull": "contact",
            "column": [
                {"name": "contact", "path": "%rowIndex", "type": "integer"},
                {"name": "family", "path": "name.family"},
                {"name": "has_name", "path": "name.exists()", "type": "boolean"},
                {"name": "source", "path": "'contact'"},
                {"name": "given", "path": "name.given.join(' ')"},
                {"name": "all_given", "path": "name.given", "collection": True},
            ],
            "select": [
                {
                    "unionAll": [
                        {"forEach": "telecom", "column": [
                            {"name": "index", "path": "%rowIndex", "type": "integer"},
                            {"name": "value", "path": "value"}]},
                        {"column": [
                            {"name": "index", "path": "%rowIndex", "type": "integer"},
                            {"name": "value", "path": "'inherited'"}]},
                    ]
                }
            ],
        },
    ],
}  # fmt: skip


def test_row_index_and_the_null_row_match_the_general_evaluator(vectorized_only: None) -> None:
    contact = {
        "name": {"family": "F", "given": ["A", "B"]},
        "telecom": [{"value": "1"}, {"value": "2"}],
    }
    lines = _lines(
        [
            {"resourceType": "Patient", "id": "two", "contact": [contact, {"telecom": [{"value": "3"}]}]},
            {"resourceType": "Patient", "id": "none"},
            {"resourceType": "Patient", "id": "bare", "contact": [{}]},
        ]
    )  # fmt: skip

    got = _compiled(ROW_INDEX_VIEW).flatten(lines)

    rows = [
        (row["id"], row["contact"], row["index"], row["value"]) for row in got.table.to_pylist()
    ]
    assert rows == [
        ("two", 0, 0, "1"),
        ("two", 0, 1, "2"),
        ("two", 0, 0, "inherited"),
        ("two", 1, 0, "3"),
        ("two", 1, 1, "inherited"),
        # The null row: every column below the forEachOrNull, on no element (of a unionAll,
        # the columns of its first branch).
        ("none", 0, 0, None),
        ("bare", 0, 0, "inherited"),
    ]
    assert got.table.to_pylist()[5] == {
        "id": "none", "top": 0, "contact": 0, "family": None, "has_name": False,
        "source": "contact", "given": "", "all_given": [], "index": 0, "value": None,
    }  # fmt: skip
    _assert_same(got, _general(ROW_INDEX_VIEW, lines))


def test_invalid_views_are_left_to_the_general_evaluator() -> None:
    assert compile_vectorized({"resource": "Patient"}) is None
    assert compile_vectorized({"resource": "Patient", "select": [{"forEach": "@@"}]}) is None


def test_read_schema_holds_only_touched_elements_and_no_timestamps() -> None:
    schema = _compiled(CONDITION_VIEW).read_schema
    assert set(schema.names) >= {"resourceType", "id", "meta", "subject", "onsetDateTime"}
    assert "text" not in schema.names and "note" not in schema.names

    def types(data_type: pa.DataType) -> Iterator[pa.DataType]:
        yield data_type
        if isinstance(data_type, pa.StructType):
            for field in data_type:
                yield from types(field.type)
        elif isinstance(data_type, pa.ListType):
            yield from types(data_type.value_type)

    for field in schema:
        assert not any(pa.types.is_temporal(t) for t in types(field.type)), field.name


def test_every_repeating_element_listed_exists_in_the_r4_model() -> None:
    for owner, names in vectorized._ARRAYS.items():
        for name in names:
            is_list, fhir_type = vectorized._element(owner, name)
            assert is_list and fhir_type, f"{owner}.{name}"
