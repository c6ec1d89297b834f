"""Error OperationOutcomes in a manifest's error[] hold the `_since` watermark back, so the
next incremental export fetches again what the server failed to export (local Bulk Data
server, real HTTP); warnings never do."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from pathlib import Path

import pytest

from starvit_assets.fhir.client import BulkDataClient, ExportConfig, ExportRequest, _severe_outcomes
from starvit_assets.fhir.server import BulkDataServer, Faults
from starvit_assets.fhir.synth import generate

FAST = ExportConfig(poll_interval=0.01, max_poll_interval=0.05, max_retry_after=0.05)
TYPES = ("Patient", "Observation")


@pytest.fixture(autouse=True)
def _no_ambient_client_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("STARVIT_FHIR_")]:
        monkeypatch.delenv(name)


def _watermarks(state: Path, source: str) -> dict[str, str]:
    marks: dict[str, str] = json.loads((state / "watermarks.json").read_text())["sources"][source]
    return marks


def _append_changed_observation(folder: Path) -> str:
    path = folder / "Observation.ndjson"
    resource = json.loads(path.read_text().splitlines()[0])
    now = dt.datetime.now(dt.UTC)
    resource["meta"] = {"versionId": "2", "lastUpdated": now.isoformat(timespec="milliseconds")}
    with path.open("a") as handle:
        handle.write(json.dumps(resource) + "\n")
    return str(resource["id"])


def test_an_export_with_error_outcomes_keeps_the_previous_watermark(tmp_path: Path) -> None:
    data, state = tmp_path / "data", tmp_path / "state"
    generate(data, patients=3, seed=8, fault_rate=0.0)
    with BulkDataServer(data, retry_after_seconds=0) as server:
        client = BulkDataClient(server.base_url, config=FAST, state_dir=state)
        first = client.export(tmp_path / "1", types=list(TYPES), incremental=True)
        assert _watermarks(state, server.base_url) == dict.fromkeys(TYPES, first.transaction_time)

        time.sleep(0.01)
        changed = _append_changed_observation(data)
        server.faults = Faults(error_codes=("processing",))
        failed = client.export(
            tmp_path / "2", types=list(TYPES), incremental=True, fail_on_errors=False
        )
        assert failed.since == first.transaction_time
        assert failed.severe_error_outcomes == 1
        # The outcome names no resource type: nothing says which resources it lost.
        assert failed.watermark_held_back == TYPES
        assert _watermarks(state, server.base_url) == dict.fromkeys(TYPES, first.transaction_time)

        server.faults = Faults()
        again = client.export(tmp_path / "3", types=list(TYPES), incremental=True)
    # The next incremental export starts where the one with errors started: the changed
    # Observation comes again.
    assert again.since == first.transaction_time
    assert [json.loads(line)["id"] for line in again.files["Observation"][0].open()] == [changed]
    assert again.watermark_held_back == () and again.severe_error_outcomes == 0
    assert _watermarks(state, server.base_url) == dict.fromkeys(TYPES, again.transaction_time)


def test_warnings_alone_advance_the_watermark(tmp_path: Path) -> None:
    data, state = tmp_path / "data", tmp_path / "state"
    generate(data, patients=2, seed=8, fault_rate=0.0)
    # A custom associated-data code the server does not know: under lenient handling it is
    # ignored with a warning in error[] (the standard codes are accepted).
    request = ExportRequest(
        types=("Patient",), include_associated_data=("_starvitUnknownData",), lenient=True
    )
    with BulkDataServer(data, retry_after_seconds=0) as server:
        client = BulkDataClient(server.base_url, config=FAST, state_dir=state)
        result = client.export(tmp_path / "out", request=request)
    assert result.error_outcomes == 1 and result.severe_error_outcomes == 0
    assert result.watermark_held_back == ()
    assert _watermarks(state, server.base_url) == {"Patient": result.transaction_time}


def _outcome(severity: str, **where: list[str]) -> str:
    issue = {"severity": severity, "code": "processing", "diagnostics": "Jane Doe", **where}
    return json.dumps({"resourceType": "OperationOutcome", "issue": [issue]}) + "\n"


def test_an_outcome_that_names_its_type_holds_back_only_that_type(tmp_path: Path) -> None:
    errors = tmp_path / "_error.1.ndjson"
    errors.write_text(
        _outcome("error", expression=["Observation.valueQuantity"])
        + _outcome("fatal", location=["Observation/abc"])
        + _outcome("warning", expression=["Patient.name"])
    )
    severe = _severe_outcomes([errors])
    assert severe.outcomes == 2
    assert severe.types_to_hold_back(["Patient", "Observation"]) == ("Observation",)
    # A system export without _type: "*" is held too, or it would skip the lost Observations.
    assert severe.types_to_hold_back(["*", "Patient", "Observation"]) == ("*", "Observation")
    # A type the request did not name, or an outcome naming none: every type is held.
    assert severe.types_to_hold_back(["Patient", "Condition"]) == ("Patient", "Condition")
    errors.write_text(errors.read_text() + _outcome("error"))
    unattributed = _severe_outcomes([errors])
    assert unattributed.types_to_hold_back(["Patient", "Observation"]) == ("Patient", "Observation")
    errors.write_text(_outcome("warning", expression=["Observation.code"]))
    assert _severe_outcomes([errors]).types_to_hold_back(["Observation"]) == ()


def test_a_filtered_export_with_errors_still_leaves_the_watermark_alone(tmp_path: Path) -> None:
    data, state = tmp_path / "data", tmp_path / "state"
    generate(data, patients=2, seed=8, fault_rate=0.0)
    faults = Faults(error_codes=("processing",))
    with BulkDataServer(data, retry_after_seconds=0, faults=faults) as server:
        client = BulkDataClient(server.base_url, config=FAST, state_dir=state)
        request = ExportRequest(types=("Observation",), elements=("Observation.code",))
        result = client.export(tmp_path / "out", request=request)
    assert result.severe_error_outcomes == 1 and result.watermark_held_back == ()
    assert not (state / "watermarks.json").exists()
