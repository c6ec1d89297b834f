"""The export asset against a configured FHIR server (the local Bulk Data server, over real
HTTP): its manifest check compares the staged lines with the manifest's ``count``, a retried
attempt resumes the export it started, and error OperationOutcomes hold the watermark back."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster._core.execution.plan.active import ActiveExecution

from starvit_assets.defs.extract import (
    MANIFEST_CHECK,
    current_partition_key,
    fhir_asset_key,
    fhir_export,
)
from starvit_assets.defs.resources import PlatformResource
from starvit_assets.fhir.server import BulkDataServer, Faults
from starvit_assets.fhir.synth import generate
from starvit_assets_tests.conftest import TEST_KEY_HEX

TYPES = ("Patient", "Observation")


@dataclass
class Configured:
    home: Path
    counts: dict[str, int]
    server: BulkDataServer
    instance: dg.DagsterInstance

    def run(self, run_config: dict[str, Any] | None = None) -> dg.ExecuteInProcessResult:
        return dg.materialize(
            [fhir_export],
            selection=[fhir_asset_key(t) for t in TYPES],
            partition_key=current_partition_key(),
            run_config=run_config,
            resources={"platform": PlatformResource()},
            instance=self.instance,
            raise_on_error=False,
        )

    @property
    def watermarks(self) -> dict[str, str]:
        body = json.loads((self.home / "state" / "fhir" / "watermarks.json").read_text())
        marks: dict[str, str] = body["sources"][self.server.base_url]
        return marks

    def kick_offs(self) -> int:
        return sum(1 for r in self.server.requests if r.path.endswith("/$export"))


def _metadata(result: dg.ExecuteInProcessResult) -> dict[str, dict[str, Any]]:
    return {
        event.materialization.asset_key.path[1]: {
            name: value.value for name, value in event.materialization.metadata.items()
        }
        for event in result.get_asset_materialization_events()
    }


def _checks(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {
        evaluation.asset_key.path[1]: evaluation
        for evaluation in result.get_asset_check_evaluations()
        if evaluation.check_name == MANIFEST_CHECK
    }


@pytest.fixture
def configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Configured]:
    source = tmp_path / "source"
    counts = generate(source, patients=4, seed=5, fault_rate=0.0)
    for name in list(os.environ):
        if name.startswith("STARVIT_FHIR_") or name in (
            "STARVIT_LAKE_DIR",
            "STARVIT_WAREHOUSE_DSN",
        ):
            monkeypatch.delenv(name)
    monkeypatch.setenv("STARVIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STARVIT_ENV", "dev")
    monkeypatch.setenv("STARVIT_PSEUDONYMISATION_KEY", TEST_KEY_HEX)
    # One download at a time, so "the first file succeeds, the next fails" is deterministic.
    monkeypatch.setenv("STARVIT_FHIR_DOWNLOAD_CONCURRENCY", "1")
    monkeypatch.setenv("STARVIT_FHIR_POLL_INTERVAL", "0.01")
    monkeypatch.setenv("STARVIT_FHIR_MAX_RETRY_AFTER", "0.2")
    with (
        BulkDataServer(source, retry_after_seconds=0) as server,
        dg.DagsterInstance.ephemeral() as instance,
    ):
        monkeypatch.setenv("STARVIT_FHIR_BASE_URL", server.base_url)
        yield Configured(tmp_path / "home", counts, server, instance)


def test_the_manifest_check_passes_when_the_staged_lines_equal_the_manifest_count(
    configured: Configured,
) -> None:
    result = configured.run()
    assert result.success
    metadata, checks = _metadata(result), _checks(result)
    export_id = metadata["Patient"]["export_id"]
    manifest = json.loads(
        (configured.home / "phi" / "staging" / export_id / "manifest.json").read_text()
    )
    for resource_type in TYPES:
        stated = sum(o["count"] for o in manifest["output"] if o["type"] == resource_type)
        check = checks[resource_type]
        assert check.passed, resource_type
        assert check.metadata["manifest_count"].value == stated == configured.counts[resource_type]
        assert check.metadata["staged_lines"].value == stated
        assert check.metadata["mismatched_files"].value == []


def _retry_at_once(monkeypatch: pytest.MonkeyPatch, between_attempts: Callable[[], None]) -> None:
    """Start Dagster's retry of a failed step at once instead of after the RetryPolicy's delay
    (60 s, then 120 s, ...), calling ``between_attempts`` first. Whether a failure is retried,
    and how often, stays Dagster's decision; only the wait is skipped."""
    original = ActiveExecution.mark_up_for_retry

    def mark_up_for_retry(
        self: ActiveExecution, step_key: str, at_time: float | None = None
    ) -> None:
        between_attempts()
        original(self, step_key, None)

    monkeypatch.setattr(ActiveExecution, "mark_up_for_retry", mark_up_for_retry)


def test_a_retried_attempt_resumes_the_saved_export_and_the_check_fails_on_a_changed_file(
    configured: Configured, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Network faults the client could not ride out end the attempt, and Dagster retries it.
    assert fhir_export.op.retry_policy == dg.RetryPolicy(
        max_retries=3, delay=60, backoff=dg.Backoff.EXPONENTIAL
    )
    # The first file arrives; the next is cut off and not retried within the attempt.
    monkeypatch.setenv("STARVIT_FHIR_DOWNLOAD_ATTEMPTS", "1")
    configured.server.faults = Faults(healthy_files=1, drop_connection=1)
    incoming = configured.home / "phi" / "staging" / "_incoming"
    finished: list[Path] = []

    def change_the_finished_file() -> None:
        # Same size, one line fewer: the resumed attempt keeps the file (its saved record
        # still matches), so only the re-count against the manifest can notice.
        finished.extend(sorted(incoming.glob("*.ndjson")))
        lines = finished[0].read_bytes().split(b"\n")
        lines[0] = b" " * len(lines[0])
        finished[0].write_bytes(b"\n".join(lines))

    _retry_at_once(monkeypatch, change_the_finished_file)
    result = configured.run()

    events = [event.event_type_value for event in result.all_events]
    assert events.count("STEP_UP_FOR_RETRY") == 1
    assert len(finished) == 1  # the first attempt downloaded exactly one file
    assert configured.kick_offs() == 1  # the retry polled the saved status URL
    metadata, checks = _metadata(result), _checks(result)
    assert all(metadata[t]["resumed"] is True for t in TYPES)
    tampered = finished[0].name.split(".")[0]
    check = checks[tampered]
    assert not check.passed and not result.success  # a blocking check: the step fails
    assert check.metadata["mismatched_files"].value == [finished[0].name]
    stated = check.metadata["manifest_count"].value
    assert stated == configured.counts[tampered]
    assert check.metadata["staged_lines"].value == stated - 1
    (other,) = set(TYPES) - {tampered}
    assert checks[other].passed


def test_error_outcomes_hold_the_watermark_back_and_the_metadata_says_so(
    configured: Configured,
) -> None:
    assert configured.run().success
    before = configured.watermarks
    assert set(before) == set(TYPES)

    configured.server.faults = Faults(error_codes=("processing",))
    with_errors = configured.run()
    assert with_errors.success  # fail_on_errors is off: the export is kept
    metadata = _metadata(with_errors)
    for resource_type in TYPES:
        assert metadata[resource_type]["export_severe_error_outcomes"] == 1
        assert metadata[resource_type]["watermark_held_back"] is True
    assert configured.watermarks == before

    configured.server.faults = Faults()
    clean = configured.run()
    assert clean.success
    assert all(_metadata(clean)[t]["watermark_held_back"] is False for t in TYPES)
    after = configured.watermarks
    assert all(after[t] == _metadata(clean)[t]["transaction_time"] != before[t] for t in TYPES)
