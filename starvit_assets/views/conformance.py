"""Runs SQL on FHIR v2 conformance test files and writes the standard ``test_report.json``."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starvit_assets.views.runner import ViewDefinitionError, compile_view


@dataclass
class ConformanceSummary:
    passed: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    shareable_failures: list[str] = field(default_factory=list)


def _canonical(row: Any) -> str:
    return json.dumps(row, sort_keys=True)


def run_test(test: dict[str, Any], resources: list[dict[str, Any]]) -> tuple[bool, str | None]:
    """One test case: (passed, reason when it failed)."""
    try:
        view = compile_view(test["view"])
        rows = [row for resource in resources for row in view.rows(resource)]
    except ViewDefinitionError as error:
        if test.get("expectError"):
            return True, None
        return False, f"unexpected error: {error}"
    except Exception as error:
        if test.get("expectError"):
            return True, None
        return False, f"runner crashed: {type(error).__name__}: {error}"
    if test.get("expectError"):
        return False, "expected an error, got rows"
    if "expectColumns" in test:
        if view.column_names != test["expectColumns"]:
            return False, f"columns {view.column_names} != {test['expectColumns']}"
        return True, None
    expected = test.get("expect", [])
    if Counter(map(_canonical, rows)) != Counter(map(_canonical, expected)):
        return False, f"rows differ: got {len(rows)}, expected {len(expected)}"
    return True, None


def run_conformance(tests_dir: Path, report_path: Path) -> ConformanceSummary:
    summary = ConformanceSummary()
    report: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for path in sorted(tests_dir.glob("*.json")):
        suite = json.loads(path.read_text())
        if not isinstance(suite, dict) or "tests" not in suite:
            continue
        results = []
        for test in suite["tests"]:
            passed, reason = run_test(test, suite.get("resources", []))
            result: dict[str, Any] = {"passed": passed}
            if not passed:
                result["error"] = reason or "failed"
                name = f"{path.name}: {test.get('title')}: {reason}"
                summary.failures.append(name)
                if "shareable" in test.get("tags", []):
                    summary.shareable_failures.append(name)
                summary.failed += 1
            else:
                summary.passed += 1
            results.append({"name": test.get("title", ""), "result": result})
        report[path.name] = {"tests": results}
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return summary
