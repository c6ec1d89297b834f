"""The partitioned export asset against the embedded Bulk Data server, over real HTTP: the
first run is full, the next fetch only what changed, a full refresh ignores the watermark, a
past day starts at its window, and an export that was never de-identified is not skipped."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from starvit_assets.defs.deid_raw import deid_asset_key
from starvit_assets.defs.extract import (
    FULL_REFRESH_EXPORT,
    current_partition_key,
    fhir_asset_key,
    fhir_export,
)
from starvit_assets.defs.resources import PlatformResource
from starvit_assets.fhir.synth import generate
from starvit_assets_tests.conftest import TEST_KEY_HEX

TYPES = ("Patient", "Observation")


@dataclass
class Exports:
    source: Path
    counts: dict[str, int]
    instance: dg.DagsterInstance

    def run(
        self,
        partition: str | None = None,
        run_config: dict[str, Any] | None = None,
        with_deid: bool = False,
    ) -> dict[str, dict[str, Any]]:
        """Materialize the Patient and Observation exports; metadata per resource type."""
        from starvit_assets.defs.deid_raw import DEID_ASSETS

        selection = [fhir_asset_key(t) for t in TYPES]
        assets: list[dg.AssetsDefinition] = [fhir_export]
        if with_deid:
            selection += [deid_asset_key("patient"), deid_asset_key("observation")]
            assets += DEID_ASSETS
        result = dg.materialize(
            assets,
            selection=selection,
            partition_key=partition or current_partition_key(),
            run_config=run_config,
            resources={"platform": PlatformResource()},
            instance=self.instance,
        )
        assert result.success
        metadata: dict[str, dict[str, Any]] = {}
        for event in result.get_asset_materialization_events():
            materialization = event.materialization
            if materialization.asset_key.path[0] == "fhir":
                metadata[materialization.asset_key.path[1]] = {
                    name: value.value for name, value in materialization.metadata.items()
                }
        return metadata


@pytest.fixture
def exports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Exports]:
    source = tmp_path / "source"
    counts = generate(source, patients=4, seed=5, fault_rate=0.0)
    for name in ("STARVIT_FHIR_BASE_URL", "STARVIT_LAKE_DIR", "STARVIT_WAREHOUSE_DSN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STARVIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STARVIT_ENV", "dev")
    monkeypatch.setenv("STARVIT_SOURCE_DIR", str(source))
    monkeypatch.setenv("STARVIT_PSEUDONYMISATION_KEY", TEST_KEY_HEX)
    with dg.DagsterInstance.ephemeral() as instance:
        yield Exports(source, counts, instance)


def _append_changed_observation(source: Path) -> None:
    """One Observation updated after every export so far (the server filters on lastUpdated)."""
    path = source / "Observation.ndjson"
    first = json.loads(path.read_text().splitlines()[0])
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    first["meta"] = {"versionId": "2", "lastUpdated": later.strftime("%Y-%m-%dT%H:%M:%SZ")}
    with path.open("a") as handle:
        handle.write(json.dumps(first) + "\n")


def test_partitions_run_full_then_incremental_and_never_skip_an_undeidentified_export(
    exports: Exports,
) -> None:
    first = exports.run()
    assert first["Patient"]["incremental"] is False
    assert "no watermark" in first["Patient"]["since_reason"]
    assert first["Patient"]["partition"] == current_partition_key()
    for resource_type in TYPES:
        assert first[resource_type]["resources"] == exports.counts[resource_type]
    # The metadata the issue asks for: counts, transactionTime, duration, files, errors.
    for name in ("transaction_time", "duration_seconds", "files", "export_errors"):
        assert name in first["Observation"], name
    assert first["Observation"]["status_polls"] >= 0 and "last_x_progress" in first["Observation"]

    # Not de-identified in between: the next export may not start at the new watermark.
    second = exports.run()
    assert second["Observation"]["incremental"] is False
    assert "not de-identified" in second["Observation"]["since_reason"]
    assert second["Observation"]["resources"] == exports.counts["Observation"]

    # Exported and de-identified in one run: still full, since the second was never gated.
    exports.run(with_deid=True)

    _append_changed_observation(exports.source)
    incremental = exports.run()
    assert incremental["Observation"]["incremental"] is True
    assert incremental["Observation"]["since_reason"] == "since the stored watermark"
    assert incremental["Observation"]["resources"] == 1
    assert incremental["Patient"]["resources"] == 0

    # A past day re-exports from its own window's start (and covers the pending export).
    past = exports.run(partition="2025-06-01")
    assert past["Observation"]["since"] == "2025-06-01T00:00:00Z"
    assert "past day" in past["Observation"]["since_reason"]
    assert past["Observation"]["partition"] == "2025-06-01"

    refresh = exports.run(run_config=FULL_REFRESH_EXPORT)
    assert refresh["Observation"]["full_refresh"] is True
    assert refresh["Observation"]["since"] == ""
    assert refresh["Observation"]["resources"] == exports.counts["Observation"] + 1
    assert refresh["Patient"]["resources"] == exports.counts["Patient"]


def test_a_run_without_a_partition_fails_with_a_clear_message(exports: Exports) -> None:
    result = dg.materialize(
        [fhir_export],
        selection=[fhir_asset_key("Patient")],
        resources={"platform": PlatformResource()},
        instance=exports.instance,
        raise_on_error=False,
    )
    assert not result.success
    failures = [event for event in result.all_events if event.is_step_failure]
    assert failures
    error = failures[0].step_failure_data.user_failure_data
    assert error is not None and "partitioned by day" in (error.description or "")
