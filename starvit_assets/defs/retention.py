"""The nightly retention job: purge PHI staging, prune analytics and audit rows, report on the
lake, then verify that what must be gone is gone.

An op job rather than an asset: pruning produces no data asset, and an asset would be swept
into ``full_lineage`` (it selects every asset) and run in the middle of an export. The checks
run as the job's last op and read the disk and the databases afresh, so they catch what the
prune missed (a file it could not delete, a row a trigger kept) rather than trusting its counts.
Metadata carries counts, table names and export-folder counts only, never a path to a patient's
file or a row.
"""

import datetime as dt
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dagster as dg

from starvit_assets.defs.resources import PlatformResource
from starvit_assets.ops.logging import read_secret
from starvit_assets.ops.retention import (
    PhiPurgeResult,
    RetentionSettings,
    TablePruneResult,
    deidentified_in_lake,
    expired_phi_files,
    lake_retention_report,
    prune_tables,
    purge_phi_staging,
)
from starvit_assets.views.runner import shipped_views

JOB_NAME = "retention_prune"
AUDIT_DSN_VARIABLE = "STARVIT_RETENTION_AUDIT_DSN"

PHI_CHECK = "phi_staging_within_max_age"
TABLES_CHECK = "tables_within_retention"
LAKE_CHECK = "lake_partitions_within_retention"


class PruneConfig(dg.Config):
    dry_run: bool = False
    batch_size: int = 10_000


@dataclass(frozen=True)
class CheckOutcome:
    name: str
    passed: bool
    blocking: bool
    summary: str
    metadata: dict[str, Any]


def tables_by_resource() -> dict[str, list[str]]:
    tables: dict[str, list[str]] = {}
    for table, view in shipped_views().items():
        tables.setdefault(str(view["resource"]), []).append(table)
    return tables


def retention_databases(platform: PlatformResource) -> dict[str, str]:
    """Label -> DSN of each database whose audit and analytics tables are pruned.

    The audit trail lives in Dagster's database unless ``STARVIT_AUDIT_DSN`` moves it; that
    DSN may be an insert-only role, so pruning takes its own ``STARVIT_RETENTION_AUDIT_DSN``
    (or ``..._FILE``), a role allowed to delete.
    """
    endpoints = platform.endpoints
    audit = (
        read_secret(AUDIT_DSN_VARIABLE)
        if os.environ.get(AUDIT_DSN_VARIABLE) or os.environ.get(f"{AUDIT_DSN_VARIABLE}_FILE")
        else endpoints.dagster_dsn
    )
    databases = {"warehouse": endpoints.warehouse_dsn}
    if audit != endpoints.warehouse_dsn:
        databases["audit"] = audit
    return databases


def _phi_metadata(result: PhiPurgeResult, retention: RetentionSettings) -> dict[str, Any]:
    return {
        "phi_max_age_days": retention.phi_max_age_days,
        "phi_files_deleted": dg.MetadataValue.int(result.files_deleted),
        "phi_files_deleted_deidentified": dg.MetadataValue.int(result.deidentified_files_deleted),
        "phi_files_deleted_expired": dg.MetadataValue.int(result.expired_files_deleted),
        "phi_folders_deleted": dg.MetadataValue.int(result.folders_deleted),
        "phi_bytes_deleted": dg.MetadataValue.int(result.bytes_deleted),
        "phi_files_kept": dg.MetadataValue.int(result.files_kept),
        "phi_delete_errors": dg.MetadataValue.int(result.errors),
        "phi_delete_error_kinds": dg.MetadataValue.json(result.error_kinds),
    }


def _tables_metadata(results: Mapping[str, list[TablePruneResult]]) -> dict[str, Any]:
    by_table: dict[str, dict[str, Any]] = {}
    for database, table_results in results.items():
        for result in table_results:
            by_table[f"{database}:{result.rule.name}"] = {
                "category": result.rule.category,
                "status": result.status,
                "cutoff": result.cutoff.date().isoformat(),
                "rows_deleted": result.rows_deleted,
                "rows_past_window": result.rows_past_window,
                "rows_held_by_references": result.rows_held_by_references,
                **({"error": result.error_kind} if result.error_kind else {}),
            }
    flat = [result for table_results in results.values() for result in table_results]
    return {
        "table_rows_deleted": dg.MetadataValue.int(sum(r.rows_deleted for r in flat)),
        "tables_pruned": dg.MetadataValue.int(sum(r.status == "pruned" for r in flat)),
        "tables_missing": dg.MetadataValue.int(sum(r.status == "missing" for r in flat)),
        "tables_without_time_column": dg.MetadataValue.int(
            sum(r.status == "no_time_column" for r in flat)
        ),
        "table_errors": dg.MetadataValue.int(sum(r.status == "error" for r in flat)),
        "tables": dg.MetadataValue.json(by_table),
    }


@dg.op(
    name="prune",
    description=(
        "Purge PHI staging (de-identified exports, and anything past STARVIT_PHI_MAX_AGE_DAYS), "
        "delete analytics rows past 13 months and audit rows past 6 years, and count lake "
        "partitions past 6 years (report only)."
    ),
    tags={"starvit/operation": "retention"},
)
def prune(context: dg.OpExecutionContext, config: PruneConfig, platform: PlatformResource) -> None:
    settings = platform.settings
    retention = RetentionSettings()
    now = dt.datetime.now(dt.UTC)
    # PHI first: a database outage must not keep PHI on disk past its window.
    phi = purge_phi_staging(
        settings.phi_staging_dir,
        max_age=retention.phi_max_age,
        now=now,
        is_deidentified=deidentified_in_lake(platform.lake, tables_by_resource()),
        dry_run=config.dry_run,
    )
    context.log.info(
        f"PHI staging: {phi.files_deleted} files deleted ({phi.deidentified_files_deleted} "
        f"de-identified, {phi.expired_files_deleted} past {retention.phi_max_age_days} days), "
        f"{phi.errors} could not be deleted"
        + (" [dry run: nothing deleted]" if config.dry_run else "")
    )
    tables = {
        database: prune_tables(
            dsn, retention, now=now, batch_size=config.batch_size, dry_run=config.dry_run
        )
        for database, dsn in retention_databases(platform).items()
    }
    lake = lake_retention_report(
        settings.lake_root, months=retention.lake_retention_months, now=now
    )
    context.add_output_metadata(
        {
            "dry_run": config.dry_run,
            **_phi_metadata(phi, retention),
            **_tables_metadata(tables),
            "lake_partitions": dg.MetadataValue.int(lake.partitions),
            "lake_partitions_past_retention": dg.MetadataValue.int(lake.past_retention),
        }
    )


def evaluate_checks(platform: PlatformResource, now: dt.datetime) -> list[CheckOutcome]:
    settings = platform.settings
    retention = RetentionSettings()
    expired = expired_phi_files(settings.phi_staging_dir, max_age=retention.phi_max_age, now=now)
    expired_folders = {
        path.relative_to(settings.phi_staging_dir).parts[0]
        for path in expired
        if path.parent != settings.phi_staging_dir
    }
    outcomes = [
        CheckOutcome(
            PHI_CHECK,
            passed=not expired,
            blocking=True,
            summary=(
                f"{len(expired)} PHI staging files older than "
                f"{retention.phi_max_age_days} days remain"
            ),
            metadata={
                "expired_files": len(expired),
                "expired_export_folders": len(expired_folders),
                "phi_max_age_days": retention.phi_max_age_days,
            },
        )
    ]

    # A dry run counts what a prune would still delete now: zero unless something resisted.
    tables = {
        database: prune_tables(dsn, retention, now=now, dry_run=True)
        for database, dsn in retention_databases(platform).items()
    }
    flat = [(database, r) for database, results in tables.items() for r in results]
    lingering = {
        f"{database}:{r.rule.name}": r.rows_past_window
        for database, r in flat
        if r.rows_past_window > 0
    }
    errors = {f"{database}:{r.rule.name}": r.error_kind for database, r in flat if r.error_kind}
    unmanaged = sorted(
        f"{database}:{r.rule.name}" for database, r in flat if r.status == "no_time_column"
    )
    outcomes.append(
        CheckOutcome(
            TABLES_CHECK,
            passed=not lingering and not errors,
            blocking=True,
            summary=(
                f"{sum(lingering.values())} rows past their window remain in {len(lingering)} "
                f"tables; {len(errors)} tables could not be checked"
            ),
            metadata={
                "rows_past_window": sum(lingering.values()),
                "tables_with_rows_past_window": dg.MetadataValue.json(lingering),
                "table_errors": dg.MetadataValue.json(errors),
                "tables_without_time_column": dg.MetadataValue.json(unmanaged),
            },
        )
    )

    lake = lake_retention_report(
        settings.lake_root, months=retention.lake_retention_months, now=now
    )
    outcomes.append(
        CheckOutcome(
            LAKE_CHECK,
            passed=lake.past_retention == 0,
            # Report only: deleting a published partition is a person's decision.
            blocking=False,
            summary=(
                f"{lake.past_retention} of {lake.partitions} lake partitions are older than "
                f"{retention.lake_retention_months} months"
            ),
            metadata={
                "partitions": lake.partitions,
                "past_retention": lake.past_retention,
                "past_retention_by_table": dg.MetadataValue.json(lake.past_retention_by_table),
                "oldest_partition_date": (
                    lake.oldest_partition_date.isoformat() if lake.oldest_partition_date else ""
                ),
            },
        )
    )
    return outcomes


@dg.op(
    name="verify_retention",
    ins={"after_prune": dg.In(dg.Nothing)},
    description=(
        f"Blocking: {PHI_CHECK} (no PHI staging file older than the maximum age) and "
        f"{TABLES_CHECK} (no analytics or audit row past its window). "
        f"Warning: {LAKE_CHECK} (lake partitions past 6 years, for a person to decide)."
    ),
    tags={"starvit/operation": "retention"},
)
def verify_retention(context: dg.OpExecutionContext, platform: PlatformResource) -> None:
    outcomes = evaluate_checks(platform, dt.datetime.now(dt.UTC))
    metadata: dict[str, Any] = {}
    for outcome in outcomes:
        metadata[f"{outcome.name}/passed"] = outcome.passed
        for key, value in outcome.metadata.items():
            metadata[f"{outcome.name}/{key}"] = value
        if not outcome.passed:
            log = context.log.error if outcome.blocking else context.log.warning
            log(f"{outcome.name} failed: {outcome.summary}")
    failed = [outcome for outcome in outcomes if outcome.blocking and not outcome.passed]
    if failed:
        raise dg.Failure(
            description="retention checks failed: "
            + "; ".join(f"{outcome.name} ({outcome.summary})" for outcome in failed),
            metadata=metadata,
        )
    context.add_output_metadata(metadata)


@dg.job(
    name=JOB_NAME,
    description=(
        "Nightly retention: PHI staging purge, analytics (13 months) and audit (6 years) "
        "pruning, lake report; fails when the verification finds anything past its window. "
        "Run with op config prune.config.dry_run=true to count without deleting."
    ),
    tags={"starvit/operation": "retention"},
)
def retention_prune_job() -> None:
    verify_retention(after_prune=prune())


nightly_retention_prune = dg.ScheduleDefinition(
    name="nightly_retention_prune",
    job=retention_prune_job,
    # 03:00 UTC: after the 02:00 full lineage has usually de-identified the day's export.
    cron_schedule="0 3 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)


@dataclass(frozen=True)
class RetentionDefs:
    jobs: list[dg.JobDefinition]
    schedules: list[dg.ScheduleDefinition]
    # Empty by design (see the module docstring); listed so the lead's wiring stays uniform.
    assets: list[dg.AssetsDefinition]
    asset_checks: list[dg.AssetChecksDefinition]


RETENTION_DEFS = RetentionDefs(
    jobs=[retention_prune_job],
    schedules=[nightly_retention_prune],
    assets=[],
    asset_checks=[],
)
