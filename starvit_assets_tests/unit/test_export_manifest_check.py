"""``manifest_counts_match``: staged files re-counted against the manifest's ``output[].count``,
per file, under the local names the client gives them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starvit_assets.defs.extract import manifest_count_check
from starvit_assets.fhir.client import compare_with_manifest


def _manifest(*outputs: tuple[str, int | None]) -> dict[str, Any]:
    entries = []
    for number, (resource_type, count) in enumerate(outputs):
        entry: dict[str, Any] = {"type": resource_type, "url": f"https://files/{number}"}
        if count is not None:
            entry["count"] = count
        entries.append(entry)
    return {"transactionTime": "2026-12-07T10:00:00Z", "output": entries, "error": []}


def _stage(folder: Path, name: str, lines: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    body = "".join(f'{{"resourceType": "X", "id": "{n}"}}\n' for n in range(lines))
    (folder / name).write_text(body + "\n")  # a trailing blank line is no resource


def test_every_file_is_compared_with_its_own_count(tmp_path: Path) -> None:
    manifest = _manifest(("Observation", 3), ("Patient", 2), ("Observation", 4))
    _stage(tmp_path, "Observation.1.ndjson", 3)
    _stage(tmp_path, "Observation.2.ndjson", 4)
    _stage(tmp_path, "Patient.ndjson", 2)
    staged = compare_with_manifest(manifest, tmp_path, "Observation")
    assert (staged.manifest_count, staged.staged_lines, staged.files) == (7, 7, 2)
    check = manifest_count_check("Observation", staged)
    assert check.passed and check.metadata["manifest_count"].value == 7

    # One line short in the second file: the type fails, and names the file.
    _stage(tmp_path, "Observation.2.ndjson", 3)
    short = compare_with_manifest(manifest, tmp_path, "Observation")
    assert short.mismatched_files == ("Observation.2.ndjson",) and short.staged_lines == 6
    check = manifest_count_check("Observation", short)
    assert not check.passed
    assert check.metadata["mismatched_files"].value == ["Observation.2.ndjson"]
    # The sums of files that both differ cannot hide one another.
    _stage(tmp_path, "Observation.1.ndjson", 4)
    assert compare_with_manifest(manifest, tmp_path, "Observation").mismatched_files == (
        "Observation.1.ndjson",
        "Observation.2.ndjson",
    )
    assert compare_with_manifest(manifest, tmp_path, "Patient").matches


def test_a_missing_file_has_no_lines(tmp_path: Path) -> None:
    staged = compare_with_manifest(_manifest(("Patient", 2)), tmp_path, "Patient")
    assert staged.mismatched_files == ("Patient.ndjson",) and staged.staged_lines == 0


def test_counts_the_server_did_not_state_are_said_so(tmp_path: Path) -> None:
    _stage(tmp_path, "Condition.1.ndjson", 5)
    _stage(tmp_path, "Condition.2.ndjson", 2)
    partly = compare_with_manifest(
        _manifest(("Condition", None), ("Condition", 2)), tmp_path, "Condition"
    )
    assert (partly.manifest_count, partly.files_without_count, partly.staged_lines) == (2, 1, 7)
    assert partly.matches

    unstated = compare_with_manifest(
        _manifest(("Condition", None), ("Condition", None)), tmp_path, "Condition"
    )
    check = manifest_count_check("Condition", unstated)
    assert check.passed and check.metadata["manifest_count"].value == "not stated"
    assert check.metadata["staged_lines"].value == 7
    assert "no count" in (check.description or "")
