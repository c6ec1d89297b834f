"""The view runner against the official SQL on FHIR v2 test files, and the report it writes.

Two folders: the part of the suite shared in ``shared/sql-on-fhir-v2-tests``, and the upstream
files it lacks, stored next to this module in ``sof_upstream/`` (see its README.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from starvit_assets.cli import main
from starvit_assets.views.conformance import ConformanceSummary, run_conformance

pytestmark = pytest.mark.integration

TESTS_DIR = Path(__file__).parents[3] / "shared" / "sql-on-fhir-v2-tests"
UPSTREAM_DIR = Path(__file__).parent / "sof_upstream"
FOLDERS = {"shared": TESTS_DIR, "upstream": UPSTREAM_DIR}

# "<file>: <test title>" -> why the runner cannot pass it. Empty: every test passes (also in
# docs/views.md).
KNOWN_FAILURES: dict[str, str] = {}


def _suites(folder: Path) -> dict[str, list[str]]:
    """Test file name -> titles of its tests (schema files hold no `tests`)."""
    suites = {}
    for path in sorted(folder.glob("*.json")):
        content = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(content, dict) and "tests" in content:
            suites[path.name] = [test["title"] for test in content["tests"]]
    return suites


@pytest.fixture(scope="module", params=sorted(FOLDERS))
def conformance(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, ConformanceSummary, dict[str, Any]]:
    folder = FOLDERS[request.param]
    if not folder.is_dir():
        pytest.skip(f"SQL on FHIR v2 test files not found at {folder}")
    report_path = tmp_path_factory.mktemp("conformance") / "test_report.json"
    summary = run_conformance(folder, report_path)
    return folder, summary, json.loads(report_path.read_text(encoding="utf-8"))


def test_every_test_passes_but_the_known_failures(
    conformance: tuple[Path, ConformanceSummary, dict[str, Any]],
) -> None:
    folder, summary, report = conformance
    failed = {
        f"{file_name}: {test['name']}": test["result"].get("error", "")
        for file_name, suite in report.items()
        for test in suite["tests"]
        if not test["result"]["passed"]
    }

    assert set(failed) == set(KNOWN_FAILURES), failed
    assert summary.failed == len(KNOWN_FAILURES)
    assert (
        summary.passed == sum(len(titles) for titles in _suites(folder).values()) - summary.failed
    )


def test_report_has_the_shape_of_test_report_schema(
    conformance: tuple[Path, ConformanceSummary, dict[str, Any]],
) -> None:
    folder, _, report = conformance
    suites = _suites(folder)

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
    conformance: tuple[Path, ConformanceSummary, dict[str, Any]],
) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    if not TESTS_DIR.is_dir():
        pytest.skip("the published schema lives with the shared test files")
    _, _, report = conformance
    schema = json.loads((TESTS_DIR / "test-report.schema.json").read_text(encoding="utf-8"))

    jsonschema.validate(report, schema)


def test_the_upstream_files_pass_through_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report_path = tmp_path / "test_report.json"

    code = main(["views", "conformance", str(UPSTREAM_DIR), "--report", str(report_path)])

    total = sum(len(titles) for titles in _suites(UPSTREAM_DIR).values())
    assert (code, capsys.readouterr().out) == (0, f"{total} passed, 0 failed\n")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert set(report) == {
        "combinations.json",
        "constant_types.json",
        "fn_reference_keys.json",
        "row_index.json",
    }
    shareable = [
        test["title"]
        for test in json.loads((UPSTREAM_DIR / "row_index.json").read_text())["tests"]
        if "shareable" in test.get("tags", [])
    ]
    assert len(shareable) == 9
    assert all(test["result"] == {"passed": True} for test in report["row_index.json"]["tests"])


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
