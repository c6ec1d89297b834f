"""The view runner against the official SQL on FHIR v2 test files, and the report it writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from starvit_assets.views.conformance import ConformanceSummary, run_conformance

pytestmark = pytest.mark.integration

TESTS_DIR = Path(__file__).parents[3] / "shared" / "sql-on-fhir-v2-tests"

# "<file>: <test title>" -> why the runner cannot pass it. Empty: every test passes.
KNOWN_FAILURES: dict[str, str] = {}


def _suites() -> dict[str, list[str]]:
    """Test file name -> titles of its tests (schema files hold no `tests`)."""
    suites = {}
    for path in sorted(TESTS_DIR.glob("*.json")):
        content = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(content, dict) and "tests" in content:
            suites[path.name] = [test["title"] for test in content["tests"]]
    return suites


@pytest.fixture(scope="module")
def conformance(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[ConformanceSummary, dict[str, Any]]:
    if not TESTS_DIR.is_dir():
        pytest.skip(f"SQL on FHIR v2 test files not found at {TESTS_DIR}")
    report_path = tmp_path_factory.mktemp("conformance") / "test_report.json"
    summary = run_conformance(TESTS_DIR, report_path)
    return summary, json.loads(report_path.read_text(encoding="utf-8"))


def test_every_test_passes_but_the_known_failures(
    conformance: tuple[ConformanceSummary, dict[str, Any]],
) -> None:
    summary, report = conformance
    failed = {
        f"{file_name}: {test['name']}": test["result"].get("error", "")
        for file_name, suite in report.items()
        for test in suite["tests"]
        if not test["result"]["passed"]
    }

    assert set(failed) == set(KNOWN_FAILURES), failed
    assert summary.failed == len(KNOWN_FAILURES)
    assert summary.passed == sum(len(titles) for titles in _suites().values()) - summary.failed


def test_report_has_the_shape_of_test_report_schema(
    conformance: tuple[ConformanceSummary, dict[str, Any]],
) -> None:
    _, report = conformance
    suites = _suites()

    assert set(report) == set(suites)
    for file_name, suite in report.items():
        assert set(suite) == {"tests"}, file_name
        assert [test["name"] for test in suite["tests"]] == suites[file_name]
        for test in suite["tests"]:
            assert set(test) == {"name", "result"}
            assert isinstance(test["name"], str)
            result = test["result"]
            assert isinstance(result["passed"], bool)
            assert set(result) <= {"passed", "error", "details"}
            assert isinstance(result.get("error", ""), str)


def test_report_validates_against_the_published_schema(
    conformance: tuple[ConformanceSummary, dict[str, Any]],
) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    _, report = conformance
    schema = json.loads((TESTS_DIR / "test-report.schema.json").read_text(encoding="utf-8"))

    jsonschema.validate(report, schema)


def test_a_wrong_expectation_is_reported_as_a_failure(tmp_path: Path) -> None:
    suite = {
        "title": "self-check",
        "resources": [{"resourceType": "Patient", "id": "pt1"}],
        "tests": [
            {
                "title": "right",
                "view": {
                    "resource": "Patient",
                    "select": [{"column": [{"name": "id", "path": "id"}]}],
                },
                "expect": [{"id": "pt1"}],
            },
            {
                "title": "wrong",
                "view": {
                    "resource": "Patient",
                    "select": [{"column": [{"name": "id", "path": "id"}]}],
                },
                "expect": [{"id": "pt2"}],
            },
            {
                "title": "count",
                "view": {
                    "resource": "Patient",
                    "select": [{"column": [{"name": "id", "path": "id"}]}],
                },
                "expectCount": 1,
            },
        ],
    }
    (tmp_path / "self.json").write_text(json.dumps(suite), encoding="utf-8")

    summary = run_conformance(tmp_path, tmp_path / "report.out")
    report = json.loads((tmp_path / "report.out").read_text(encoding="utf-8"))

    assert (summary.passed, summary.failed) == (2, 1)
    assert [test["result"]["passed"] for test in report["self.json"]["tests"]] == [
        True,
        False,
        True,
    ]
    assert "rows differ" in report["self.json"]["tests"][1]["result"]["error"]
