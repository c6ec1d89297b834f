"""The new-data sensor against a configured FHIR server (the local Bulk Data server, over
real HTTP): it asks for resources updated since its cursor (``count_changed_since``) and
requests an incremental export of today's partition only when there are some."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from starvit_assets.defs.automation import new_fhir_data
from starvit_assets.defs.extract import INCREMENTAL_EXPORT, current_partition_key
from starvit_assets.fhir.server import BulkDataServer
from starvit_assets.fhir.synth import generate

# The synthetic resources were all last updated before the generator's epoch, 2026-01-01.
AFTER_THE_DATA = "2026-03-01T00:00:00Z"
TYPES = ("Patient", "Observation")


@pytest.fixture
def source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    folder = tmp_path / "source"
    generate(folder, patients=3, seed=6, fault_rate=0.0)
    for name in [n for n in os.environ if n.startswith("STARVIT_FHIR_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("STARVIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STARVIT_EXPORT_TYPES", ",".join(TYPES))
    monkeypatch.setenv("STARVIT_FHIR_NETWORK_ATTEMPTS", "1")
    yield folder


def _evaluate(cursor: str | None) -> dg.SensorResult | dg.SkipReason:
    with dg.build_sensor_context(cursor=cursor) as context:
        result = new_fhir_data(context)
    assert isinstance(result, dg.SensorResult | dg.SkipReason)
    return result


def _update_one_observation(folder: Path, when: str) -> None:
    path = folder / "Observation.ndjson"
    resource = json.loads(path.read_text().splitlines()[0])
    resource["meta"] = {"versionId": "2", "lastUpdated": when}
    with path.open("a") as handle:
        handle.write(json.dumps(resource) + "\n")


def test_the_sensor_requests_an_incremental_export_only_when_the_server_has_changes(
    source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with BulkDataServer(source) as server:
        monkeypatch.setenv("STARVIT_FHIR_BASE_URL", server.base_url)

        first = _evaluate(None)  # no cursor yet: one export to start from
        assert isinstance(first, dg.SensorResult) and first.run_requests
        assert first.cursor is not None

        nothing = _evaluate(AFTER_THE_DATA)
        assert isinstance(nothing, dg.SkipReason)
        assert nothing.skip_message == f"no resources updated since {AFTER_THE_DATA}"
        searched = [r for r in server.requests if r.method == "GET" and "$export" not in r.path]
        assert sorted(r.path.rsplit("/", 1)[-1] for r in searched) == sorted(TYPES)
        assert all(r.status == 200 for r in searched)

        _update_one_observation(source, "2026-03-02T08:00:00.000Z")
        changed = _evaluate(AFTER_THE_DATA)

    assert isinstance(changed, dg.SensorResult)
    (request,) = changed.run_requests or []
    assert request.partition_key == current_partition_key()
    assert request.run_config == INCREMENTAL_EXPORT
    assert changed.cursor is not None and changed.cursor > AFTER_THE_DATA
    assert request.run_key == changed.cursor


def test_an_unreachable_server_skips_with_the_reason(
    source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with BulkDataServer(source) as server:
        base_url = server.base_url
    monkeypatch.setenv("STARVIT_FHIR_BASE_URL", base_url)  # stopped: nothing listens there
    result = _evaluate(AFTER_THE_DATA)
    assert isinstance(result, dg.SkipReason)
    assert (result.skip_message or "").startswith("could not ask the FHIR server for changes")
