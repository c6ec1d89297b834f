"""Automation: the daily full-lineage schedule and the new-FHIR-data sensor."""

import hashlib
from pathlib import Path

import dagster as dg

from starvit_assets.fhir.auth import load_auth_from_env
from starvit_assets.fhir.client import BulkDataClient
from starvit_assets.fhir.errors import ExportError
from starvit_assets.settings import load_settings

full_lineage_job = dg.define_asset_job(
    "full_lineage",
    selection=dg.AssetSelection.all(),
    description="Export from FHIR through de-identification, warehouse, dbt and the graph load.",
)

daily_full_lineage = dg.ScheduleDefinition(
    name="daily_full_lineage",
    job=full_lineage_job,
    cron_schedule="0 2 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)


def source_fingerprint(folder: Path) -> str | None:
    """A fingerprint of the NDJSON files' names, sizes and modification times (no content)."""
    files = sorted(folder.glob("*.ndjson")) if folder.is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


@dg.sensor(
    name="new_fhir_data",
    job=full_lineage_job,
    minimum_interval_seconds=60,
    description=(
        "Starts the full lineage when the FHIR source has new data: resources updated since the "
        "last run (a `_lastUpdated` count search) on a configured server, or a change to the "
        "embedded server's NDJSON folder."
    ),
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def new_fhir_data(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    settings = load_settings()
    if settings.fhir_base_url:
        return _changed_on_server(context, settings.fhir_base_url, settings.resource_types)
    fingerprint = source_fingerprint(settings.embedded_source_dir)
    if fingerprint is None:
        return dg.SkipReason("no NDJSON files in the embedded source folder")
    if fingerprint == context.cursor:
        return dg.SkipReason("the embedded source folder has not changed")
    return dg.SensorResult(run_requests=[dg.RunRequest(run_key=fingerprint)], cursor=fingerprint)


def _changed_on_server(
    context: dg.SensorEvaluationContext, base_url: str, types: list[str]
) -> dg.SensorResult | dg.SkipReason:
    import datetime as dt

    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if context.cursor is None:
        return dg.SensorResult(run_requests=[dg.RunRequest(run_key=now)], cursor=now)
    try:
        auth = load_auth_from_env(fhir_base_url=base_url)
        with BulkDataClient(base_url, auth=auth) as client:
            changed = client.count_changed_since(types, context.cursor)
    except ExportError as error:
        return dg.SkipReason(f"could not ask the FHIR server for changes: {error}")
    if changed == 0:
        return dg.SkipReason(f"no resources updated since {context.cursor}")
    # Only what changed since the last export's watermark; the daily schedule exports in full.
    incremental = {"ops": {"fhir_export": {"config": {"incremental": True}}}}
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=now, run_config=incremental)], cursor=now
    )
