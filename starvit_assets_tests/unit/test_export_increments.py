"""Which `_since` a partitioned export run asks for, and which partition the schedule, the
sensors and the demo target."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import dagster as dg
import pytest

from starvit_assets.fhir.increments import format_instant, plan_since

DAY_START = dt.datetime(2026, 12, 2, tzinfo=dt.UTC)
DAY_END = DAY_START + dt.timedelta(days=1)


def _plan(watermark: str | None, **kwargs: object) -> tuple[str | None, str]:
    plan = plan_since(watermark=watermark, window_start=DAY_START, window_end=DAY_END, **kwargs)  # type: ignore[arg-type]
    return plan.since, plan.reason


def test_todays_partition_continues_from_the_watermark() -> None:
    assert _plan("2026-12-02T02:00:03.120Z")[0] == "2026-12-02T02:00:03.120Z"
    # Yesterday's export, continued today.
    assert _plan("2026-12-01T02:00:00Z")[0] == "2026-12-01T02:00:00Z"


def test_no_watermark_or_a_full_refresh_is_a_full_export() -> None:
    assert _plan(None)[0] is None
    since, reason = _plan("2026-12-02T02:00:00Z", full_refresh=True)
    assert since is None and "full refresh" in reason


def test_a_past_day_re_run_starts_at_that_days_window() -> None:
    since, reason = _plan("2026-12-05T02:00:00Z")
    assert since == "2026-12-02T00:00:00Z"
    assert "past day" in reason
    # The watermark exactly at the window's end is already past it.
    assert _plan(format_instant(DAY_END))[0] == "2026-12-02T00:00:00Z"


def test_an_export_not_yet_de_identified_pulls_the_since_back() -> None:
    superseded = {"20261202T010000Z": "2026-12-01T20:00:00Z"}
    since, reason = _plan("2026-12-02T01:00:00Z", superseded=superseded)
    assert since == "2026-12-01T20:00:00Z"
    assert "20261202T010000Z" in reason and "not de-identified" in reason
    # An older export's later `_since` changes nothing.
    assert _plan("2026-12-02T01:00:00Z", superseded={"x": "2026-12-02T01:30:00Z"})[0] == (
        "2026-12-02T01:00:00Z"
    )
    # A full export not yet de-identified is replaced by a full export.
    assert _plan("2026-12-02T01:00:00Z", superseded={"x": None})[0] is None
    # A full refresh stays full.
    assert (
        _plan("2026-12-02T01:00:00Z", superseded={"x": "2026-12-01T00:00:00Z"}, full_refresh=True)[
            0
        ]
        is None
    )


# --- what targets which partition --------------------------------------------------------------
@pytest.fixture(scope="module")
def repository() -> dg.RepositoryDefinition:
    from starvit_assets.definitions import defs

    return defs.get_repository_def()


def test_the_daily_schedule_runs_todays_partition_at_two(
    repository: dg.RepositoryDefinition,
) -> None:
    schedule = repository.get_schedule_def("daily_full_lineage")
    assert schedule.cron_schedule == "0 2 * * *"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    tick = dt.datetime(2026, 12, 3, 2, 0, tzinfo=dt.UTC)
    with dg.build_schedule_context(scheduled_execution_time=tick) as context:
        requests = schedule.evaluate_tick(context).run_requests
    assert requests is not None and [r.partition_key for r in requests] == ["2026-12-03"]
    # Incremental: no run config, so the asset's default (full_refresh=False) applies.
    assert not requests[0].run_config


def test_the_full_refresh_job_ignores_the_watermark_by_its_config() -> None:
    from starvit_assets.definitions import defs
    from starvit_assets.defs.extract import FULL_REFRESH_EXPORT

    job = defs.resolve_job_def("fhir_full_refresh")
    exports = defs.resolve_job_def("fhir_exports")
    assert job.partitions_def == exports.partitions_def
    assert set(job.asset_layer.selected_asset_keys) == set(exports.asset_layer.selected_asset_keys)
    for partitioned, expected in ((job, FULL_REFRESH_EXPORT), (exports, {})):
        assert partitioned.partitioned_config is not None
        config = partitioned.partitioned_config.get_run_config_for_partition_key("2026-12-02")
        assert config == expected


def test_a_changed_embedded_folder_requests_a_full_refresh_of_today(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from starvit_assets.defs.automation import new_fhir_data
    from starvit_assets.defs.extract import FULL_REFRESH_EXPORT, current_partition_key

    monkeypatch.delenv("STARVIT_FHIR_BASE_URL", raising=False)
    monkeypatch.setenv("STARVIT_SOURCE_DIR", str(tmp_path))
    (tmp_path / "Patient.ndjson").write_text('{"resourceType": "Patient", "id": "p"}\n')
    with dg.build_sensor_context() as context:
        result = new_fhir_data(context)
    assert isinstance(result, dg.SensorResult) and result.run_requests
    request = result.run_requests[0]
    assert request.partition_key == current_partition_key()
    assert request.run_config == FULL_REFRESH_EXPORT


def test_todays_partition_is_the_utc_day() -> None:
    from starvit_assets.defs.extract import current_partition_key

    late = dt.datetime(2026, 3, 4, 23, 59, tzinfo=dt.UTC)
    assert current_partition_key(late) == "2026-03-04"
    assert current_partition_key(late + dt.timedelta(minutes=1)) == "2026-03-05"
