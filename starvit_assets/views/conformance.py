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
    if "expectCount" in test:
        if len(rows) != test["expectCount"]:
            return False, f"got {len(rows)} rows, expected {test['expectCount']}"
        return True, None
    expected = test.get("expect", [])
    if "expectColumns" in test:
        # With expectColumns the order of the columns and of the rows is part of the result.
        if view.column_names != test["expectColumns"]:
            return False, f"columns {view.column_names} != {test['expectColumns']}"
        if [list(row.items()) for row in rows] != [
            [(name, row.get(name)) for name in test["expectColumns"]] for row in expected
        ]:
            return False, f"rows differ in value or order: got {rows}, expected {expected}"
        return True, None
    if Counter(map(_canonical, rows)) != Counter(map(_canonical, expected)):
        missing = Counter(map(_canonical, expected)) - Counter(map(_canonical, rows))
        extra = Counter(map(_canonical, rows)) - Counter(map(_canonical, expected))
        return False, (
            f"rows differ: got {len(rows)}, expected {len(expected)}; "
            f"missing {sorted(missing.elements())}, unexpected {sorted(extra.elements())}"
        )
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
