"""Automation: what starts runs.

* The FHIR exports are the only assets started by a schedule or a sensor: the daily schedule,
  the new-FHIR-data sensor and the Medplum subscription sensor (``defs/subscriptions.py``)
  all target today's partition of the ``fhir_exports`` job (the ``phi_extract`` group),
  incremental from the stored watermark; ``fhir_full_refresh`` is the same job as a full
  export.
* Everything downstream follows by declarative automation: each zone's condition is set in
  the one-pass policy of ``definitions.py`` (``ZONE_POLICIES``), and the automation condition
  sensor below evaluates them.
* ``full_lineage`` stays as the manual "everything, in one run" job (demo, first load).
"""

import datetime as dt
import hashlib
from pathlib import Path

import dagster as dg

from starvit_assets.defs.extract import (
    EXPORT_PARTITIONS,
    FULL_REFRESH_EXPORT,
    INCREMENTAL_EXPORT,
    current_partition_key,
)
from starvit_assets.defs.extract import GROUP as EXPORT_GROUP
from starvit_assets.fhir.auth import load_auth_from_env
from starvit_assets.fhir.client import BulkDataClient
from starvit_assets.fhir.errors import ExportError
from starvit_assets.settings import load_settings

AUTOMATION_SENSOR = "default_automation_condition_sensor"

full_lineage_job = dg.define_asset_job(
    "full_lineage",
    selection=dg.AssetSelection.all(),
    description=(
        "Export from FHIR through de-identification, warehouse, dbt and the graph load, in one "
        "run: for a first load and for demos. Day to day, the exports run on their own and "
        "declarative automation runs the rest."
    ),
)

fhir_exports_job = dg.define_asset_job(
    "fhir_exports",
    selection=dg.AssetSelection.groups(EXPORT_GROUP),
    partitions_def=EXPORT_PARTITIONS,
    description=(
        "FHIR Bulk Data exports only (all types, or the subset a run request selects), "
        "incremental from the stored watermark, into one day's partition; the assets "
        "downstream follow by their automation conditions."
    ),
)

fhir_full_refresh_job = dg.define_asset_job(
    "fhir_full_refresh",
    selection=dg.AssetSelection.groups(EXPORT_GROUP),
    partitions_def=EXPORT_PARTITIONS,
    config=FULL_REFRESH_EXPORT,
    description=(
        "A full FHIR export that ignores the stored watermarks (first load, after a restore, "
        "or to re-sync a server that reports no deletions); run it for today's partition."
    ),
)

# The name is kept (its on/off state is stored under it); it still yields the daily lineage:
# the exports run here and the automation condition sensor runs everything downstream.
daily_full_lineage = dg.build_schedule_from_partitioned_job(
    fhir_exports_job,
    name="daily_full_lineage",
    hour_of_day=2,
    minute_of_hour=0,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description=(
        "At 02:00 UTC, today's partition of the FHIR exports, every type, incremental from "
        "the stored watermark; downstream follows by automation."
    ),
)


# --- declarative automation of the zones downstream of the exports ------------------------
def _guards() -> dg.AutomationCondition:
    """Never while the asset or one of its parents is in a run, never over a missing parent,
    never over a parent whose blocking checks failed. ``eager()`` already carries the first
    three in Dagster 1.13; they are stated again so that the guard does not rest on how
    ``eager()`` is defined, and so that an ``OR`` branch (code change) is guarded too."""
    return (
        ~dg.AutomationCondition.in_progress()
        & ~dg.AutomationCondition.any_deps_in_progress()
        & ~dg.AutomationCondition.any_deps_missing()
        & dg.AutomationCondition.all_deps_blocking_checks_passed()
    )


def downstream_condition() -> dg.AutomationCondition:
    """Rebuild when a parent updated (or will be requested on the same tick, so one tick
    requests the whole chain as one run). A parent updated by a run that also targeted this
    asset does not count (``eager``'s ``executed_with_root_target``), so a ``full_lineage``
    run never triggers a second pass: no cascade, no cycle."""
    return (dg.AutomationCondition.eager() & _guards()).with_label("eager_guarded")


def dbt_condition() -> dg.AutomationCondition:
    """``downstream_condition`` plus a rebuild when the model's code version (dbt checksum of
    its SQL, or of the seed's CSV) changed since it was last handled: a deployed change to a
    model or a seed is built without waiting for the next export."""
    handled = (
        dg.AutomationCondition.newly_requested()
        | dg.AutomationCondition.newly_updated()
        | dg.AutomationCondition.initial_evaluation()
    ).with_label("handled")
    # since_last_handled(), spelled out: its typing admits no asset-only operand.
    code_changed = dg.AutomationCondition.code_version_changed().since(handled)
    return ((dg.AutomationCondition.eager() | code_changed) & _guards()).with_label(
        "eager_or_code_changed_guarded"
    )


automation_condition_sensor = dg.AutomationConditionSensorDefinition(
    AUTOMATION_SENSOR,
    # Every asset; those without a condition (the exports) are not evaluated.
    target=dg.AssetSelection.all(),
    # Dagster creates a sensor of this name by itself, but stopped; this one runs by default,
    # like the schedule and the other sensors, so a fresh deployment automates from the start.
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description=(
        "Evaluates the automation conditions of every zone downstream of the FHIR exports "
        "(eager, with in-progress, missing-parent and blocking-check guards)."
    ),
)


# --- the new-data sensor ---------------------------------------------------------------------
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
    job=fhir_exports_job,
    minimum_interval_seconds=60,
    description=(
        "Starts today's partition of the FHIR exports when the source has new data: an "
        "incremental export when a configured server reports resources updated since the last "
        "run (a `_lastUpdated` count search), a full refresh when the embedded server's NDJSON "
        "folder changed. Downstream follows by declarative automation."
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
    # Files edited in place keep whatever meta.lastUpdated they had: only a full export is sure
    # to see the change.
    request = dg.RunRequest(
        run_key=fingerprint,
        partition_key=current_partition_key(),
        run_config=FULL_REFRESH_EXPORT,
    )
    return dg.SensorResult(run_requests=[request], cursor=fingerprint)


def _changed_on_server(
    context: dg.SensorEvaluationContext, base_url: str, types: list[str]
) -> dg.SensorResult | dg.SkipReason:
    moment = dt.datetime.now(dt.UTC)
    now = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    partition = current_partition_key(moment)
    if context.cursor is None:
        first = dg.RunRequest(run_key=now, partition_key=partition, run_config=INCREMENTAL_EXPORT)
        return dg.SensorResult(run_requests=[first], cursor=now)
    try:
        auth = load_auth_from_env(fhir_base_url=base_url)
        with BulkDataClient(base_url, auth=auth) as client:
            changed = client.count_changed_since(types, context.cursor)
    except ExportError as error:
        return dg.SkipReason(f"could not ask the FHIR server for changes: {error}")
    if changed == 0:
        return dg.SkipReason(f"no resources updated since {context.cursor}")
    # Only what changed since the last export's watermark.
    request = dg.RunRequest(run_key=now, partition_key=partition, run_config=INCREMENTAL_EXPORT)
    return dg.SensorResult(run_requests=[request], cursor=now)
