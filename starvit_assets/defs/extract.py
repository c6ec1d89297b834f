"""PHI zone: FHIR Bulk Data export, one asset per resource type (a multi-asset).

The exports are partitioned by UTC day (the day a run exports on; today's partition exists
from midnight). A partition's run is incremental from the stored watermark unless it is a
full refresh (``FhirExportConfig(full_refresh=True)``, the ``fhir_full_refresh`` job);
``starvit_assets.fhir.increments`` decides the `_since`. The zones downstream are
unpartitioned and keyed by export id; they depend on the *latest* partition only
(``fhir_dep``), so a new export of today triggers their chain once.

The staged NDJSON stays under ``$STARVIT_HOME/phi/staging``; only counts, file names and
the transaction time reach Dagster metadata.
"""

import datetime as dt
import json
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from starvit_assets.defs.resources import PlatformResource
from starvit_assets.deid.leak import LeakHashSet
from starvit_assets.exports import (
    ExportRecordError,
    StagedExport,
    consent_ledger_path,
    export_id_for,
    latest_staged_export,
    leak_hashes_path,
    record_staged_export,
    staging_dir,
)
from starvit_assets.fhir.auth import load_auth_from_env
from starvit_assets.fhir.client import (
    BulkDataClient,
    ExportProgress,
    ExportRequest,
    ExportResult,
    ManifestComparison,
    compare_with_manifest,
    iter_deleted_references,
)
from starvit_assets.fhir.errors import ExportError
from starvit_assets.fhir.export_state import ALL_TYPES
from starvit_assets.fhir.increments import plan_since
from starvit_assets.fhir.server import BulkDataServer
from starvit_assets.lake.consent import ConsentError, update_consent_ledger
from starvit_assets.lake.partitions import RawLake
from starvit_assets.settings import StarvitSettings
from starvit_assets.views.runner import shipped_views

RESOURCE_TYPES = (
    "Patient",
    "Encounter",
    "Observation",
    "Condition",
    "MedicationRequest",
    "Procedure",
    "Immunization",
    "AllergyIntolerance",
    # Read in the PHI zone by the gate's record filter (research opt-outs); no table of it
    # crosses the gate, and its staged files go with the export's last de-identified type.
    "Consent",
)
CONSENT = "Consent"
GROUP = "phi_extract"
MANIFEST_CHECK = "manifest_counts_match"
EMBEDDED_SOURCE_PREFIX = "embedded+"

# One partition per UTC day; end_offset=1 makes today's partition exist from midnight, so the
# schedule, the sensors and the demo all export into the day they run on.
EXPORT_PARTITIONS = dg.DailyPartitionsDefinition(start_date="2025-01-01", end_offset=1)


def fhir_asset_key(resource_type: str) -> dg.AssetKey:
    return dg.AssetKey(["fhir", resource_type])


def fhir_dep(resource_type: str) -> dg.AssetDep:
    """The dependency of an unpartitioned asset on the export of ``resource_type``.

    It maps to the latest partition only. With Dagster's default (every partition) the
    ``any_deps_missing`` guard of ``eager()`` would hold forever, since past days are never
    all exported; with the latest one, an export of today triggers the downstream chain once.
    Between midnight UTC and the first export of the new day the guard holds the gate back,
    which has nothing new to do then.
    """
    return dg.AssetDep(fhir_asset_key(resource_type), partition_mapping=dg.LastPartitionMapping())


def current_partition_key(now: dt.datetime | None = None) -> str:
    """Today's (UTC) export partition: what the schedule, the sensors and the demo target."""
    moment = now or dt.datetime.now(dt.UTC)
    return EXPORT_PARTITIONS.get_partition_key_for_timestamp(moment.timestamp())


@contextmanager
def fhir_base_url(settings: StarvitSettings) -> Iterator[str]:
    """The configured server, or the embedded Bulk Data server over the local source folder."""
    if settings.fhir_base_url:
        yield settings.fhir_base_url
        return
    source = settings.embedded_source_dir
    if not source.is_dir() or not any(source.glob("*.ndjson")):
        raise dg.Failure(
            description=(
                f"no FHIR source configured and no NDJSON files in {source}: set "
                "STARVIT_FHIR_BASE_URL, or run `starvit fhir synth --out "
                f"{source}` (or `make demo`) to generate synthetic data"
            ),
            allow_retries=False,
        )
    with BulkDataServer(source) as server:
        yield server.base_url


class FhirExportConfig(dg.Config):
    """Run configuration of an export: incremental (the default) or a full refresh."""

    full_refresh: bool = False
    """Export everything, ignoring the stored watermark (the watermark still advances)."""


INCREMENTAL_EXPORT = {"ops": {"fhir_export": {"config": {"full_refresh": False}}}}
FULL_REFRESH_EXPORT = {"ops": {"fhir_export": {"config": {"full_refresh": True}}}}


@dataclass
class _ProgressTrail:
    """Export progress into the run's log, and the last X-Progress into the metadata. The
    client limits ``detail`` to a status, an X-Progress text or a local file name."""

    log: dg.DagsterLogManager
    status_polls: int = 0
    last_progress: str = ""

    def __call__(self, progress: ExportProgress) -> None:
        if progress.event == "waiting":
            self.status_polls += 1
            self.last_progress = progress.detail
        if progress.event in {"waiting", "manifest", "resume", "abandon", "re-kick"}:
            self.log.info(f"FHIR export {progress.event}: {progress.detail}")


def _export_contract(resource_type: str) -> dict[str, object]:
    return {
        "grain": f"one FHIR {resource_type} resource per NDJSON line, per export",
        "keys": [[f"{resource_type}.id", "export_id"]],
        "semantics": (
            f"FHIR R4 {resource_type} resources as the source's Bulk Data $export returned "
            "them (a full export, or the resources changed since the stored watermark), "
            "partitioned by the UTC day of the export; identified PHI, kept only until de-identified. Dagster metadata holds counts, "
            "file names and the transaction time only."
        ),
    }


@dg.multi_asset(
    name="fhir_export",
    specs=[
        dg.AssetSpec(
            fhir_asset_key(resource_type),
            description=(
                f"FHIR {resource_type} resources from a Bulk Data $export, staged as NDJSON "
                "in the PHI zone; purged once de-identified."
            ),
            group_name=GROUP,
            kinds={"fhir", "ndjson"},
            skippable=True,
            metadata={
                "zone": "phi",
                "resource_type": resource_type,
                "contract": dg.MetadataValue.json(_export_contract(resource_type)),
            },
        )
        for resource_type in RESOURCE_TYPES
    ],
    check_specs=[
        dg.AssetCheckSpec(
            MANIFEST_CHECK,
            asset=fhir_asset_key(resource_type),
            blocking=True,
            description=(
                "Lines staged on disk equal the export manifest's count (output[].count) for "
                "each of this type's files; passes with 'not stated' when the server gave none."
            ),
        )
        for resource_type in RESOURCE_TYPES
    ],
    can_subset=True,
    partitions_def=EXPORT_PARTITIONS,
    # Network faults the client could not ride out end the attempt; a later attempt resumes the
    # same export from its saved state instead of starting again.
    retry_policy=dg.RetryPolicy(max_retries=3, delay=60, backoff=dg.Backoff.EXPONENTIAL),
)
def fhir_export(
    context: dg.AssetExecutionContext, config: FhirExportConfig, platform: PlatformResource
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    settings = platform.settings
    if not context.has_partition_key:
        raise dg.Failure(
            description=(
                "the FHIR exports are partitioned by day: run one partition (today's for a "
                f"regular export, {current_partition_key()} now), not a range or no partition"
            ),
            allow_retries=False,
        )
    window = context.partition_time_window
    selected = [t for t in RESOURCE_TYPES if fhir_asset_key(t) in context.selected_asset_keys]
    incoming = settings.phi_staging_dir / "_incoming"
    started = time.monotonic()
    trail = _ProgressTrail(context.log)
    with fhir_base_url(settings) as base_url:
        # Only a configured server needs credentials; the embedded one serves the local folder.
        embedded = not settings.fhir_base_url
        auth = None if embedded else load_auth_from_env(fhir_base_url=base_url)
        state_dir = settings.home / "state" / "fhir"
        # The embedded server listens on a new port each run: a stable name keeps its
        # watermarks, and its exports, held in the memory of a stopped server, cannot resume.
        source_name = EMBEDDED_SOURCE_PREFIX + settings.embedded_source_dir.as_uri()
        with BulkDataClient(
            base_url,
            auth=auth,
            state_dir=state_dir,
            source_name=source_name if embedded else None,
            progress=trail,
        ) as client:
            request = ExportRequest(types=tuple(selected))
            if embedded and client.cancel_saved_export(request):
                context.log.info("a saved export of the embedded server was discarded")
            plan = plan_since(
                watermark=client.watermark(request),
                window_start=window.start,
                window_end=window.end,
                full_refresh=config.full_refresh,
                superseded=_not_yet_deidentified(settings, platform.lake, selected),
            )
            context.log.info(f"export of {', '.join(selected)}: {plan.reason}")
            request = request.with_since(plan.since)
            # A saved, unfinished export of this very request resumes into the files it
            # already downloaded; any other leftovers go, or they would linger in staging.
            if incoming.exists() and not client.can_resume(request):
                shutil.rmtree(incoming)
            try:
                result = client.export(incoming, request=request)
            except ExportError as error:
                raise dg.Failure(description=f"FHIR export: {error}") from None
    duration = time.monotonic() - started

    export_id = export_id_for(result.transaction_time)
    target = staging_dir(settings, export_id)
    if target.exists():
        shutil.rmtree(target)
    incoming.rename(target)
    _remember_identifying_values(settings, target, result)
    if CONSENT in selected:
        _update_consent_ledger(settings, target, result)

    if result.watermark_held_back:
        context.log.warning(
            f"the server reported {result.severe_error_outcomes} OperationOutcome(s) of "
            "severity error or fatal: the _since watermark of "
            f"{', '.join(result.watermark_held_back)} stays where it was, so the next "
            "incremental export fetches those types again"
        )
    for resource_type in selected:
        files = [path.name for path in result.files.get(resource_type, [])]
        staged = compare_with_manifest(result.manifest, target, resource_type)
        record_staged_export(
            settings,
            StagedExport(
                export_id=export_id,
                resource_type=resource_type,
                transaction_time=result.transaction_time,
                files=tuple(files),
                count=staged.staged_lines,
                since=result.since,
            ),
        )
        key = fhir_asset_key(resource_type)
        yield dg.MaterializeResult(
            asset_key=key,
            metadata={
                "export_id": export_id,
                "transaction_time": result.transaction_time,
                "resources": dg.MetadataValue.int(staged.staged_lines),
                "files": dg.MetadataValue.int(len(files)),
                "export_errors": dg.MetadataValue.int(len(result.errors)),
                "export_error_issue_codes": dg.MetadataValue.json(dict(result.error_issue_counts)),
                "export_severe_error_outcomes": dg.MetadataValue.int(result.severe_error_outcomes),
                "watermark_held_back": _watermark_held_back(result, resource_type),
                "deleted_in_export": dg.MetadataValue.int(result.deleted_count),
                "resumed": result.resumed,
                "rekicks": dg.MetadataValue.int(result.rekicks),
                "status_polls": dg.MetadataValue.int(trail.status_polls),
                "last_x_progress": trail.last_progress,
                "partition": context.partition_key,
                "full_refresh": config.full_refresh,
                "incremental": result.since is not None,
                "since": result.since or "",
                "since_reason": plan.reason,
                "duration_seconds": dg.MetadataValue.float(round(duration, 3)),
            },
        )
        yield manifest_count_check(resource_type, staged)


def _watermark_held_back(result: ExportResult, resource_type: str) -> bool:
    """Whether this type's `_since` watermark stayed put because the server reported errors."""
    return bool({resource_type, ALL_TYPES} & set(result.watermark_held_back))


def manifest_count_check(resource_type: str, staged: ManifestComparison) -> dg.AssetCheckResult:
    """The staged lines of ``resource_type`` against the counts its export manifest states."""
    stated = staged.manifest_count
    if stated is None:
        description = "the manifest states no count for this type's files: nothing to compare"
    elif staged.matches:
        description = "every staged file has the lines its manifest entry counts"
    else:
        description = (
            f"{len(staged.mismatched_files)} staged file(s) differ from the manifest's count"
        )
    return dg.AssetCheckResult(
        asset_key=fhir_asset_key(resource_type),
        check_name=MANIFEST_CHECK,
        passed=staged.matches,
        description=description,
        metadata={
            "manifest_count": "not stated" if stated is None else dg.MetadataValue.int(stated),
            "staged_lines": dg.MetadataValue.int(staged.staged_lines),
            "files": dg.MetadataValue.int(staged.files),
            "files_without_manifest_count": dg.MetadataValue.int(staged.files_without_count),
            "mismatched_files": dg.MetadataValue.json(list(staged.mismatched_files)),
        },
    )


def _not_yet_deidentified(
    settings: StarvitSettings, lake: RawLake, types: Sequence[str]
) -> dict[str, str | None]:
    """The latest staged export of each type that some de-identified table of that type has
    not published yet, by export id, with the `_since` it was made with."""
    tables: dict[str, list[str]] = {}
    for table, view in shipped_views().items():
        tables.setdefault(str(view["resource"]), []).append(table)
    pending: dict[str, str | None] = {}
    for resource_type in types:
        try:
            export = latest_staged_export(settings, resource_type)
        except ExportRecordError:
            continue
        consumers = tables.get(resource_type, [])
        if not all(lake.is_published(table, export.export_id) for table in consumers):
            pending[export.export_id] = export.since
    return pending


def _update_consent_ledger(settings: StarvitSettings, folder: Path, result: ExportResult) -> None:
    """Keep every Consent across exports: an incremental one carries only the changed ones,
    and the gate's research opt-outs need them all (lake/consent.py)."""
    try:
        update_consent_ledger(
            consent_ledger_path(settings),
            [folder / path.name for path in result.files.get(CONSENT, [])],
            iter_deleted_references([folder / path.name for path in result.deleted_files]),
            full=result.since is None,
        )
    except ConsentError as error:
        raise dg.Failure(description=f"fhir/{CONSENT}: {error}", allow_retries=False) from None


def _remember_identifying_values(
    settings: StarvitSettings, folder: Path, result: ExportResult
) -> None:
    """Add the exported patients' identifying values to the salted leak hash set."""
    path = leak_hashes_path(settings)
    hashes = LeakHashSet.load(path, settings.key) if path.exists() else LeakHashSet(settings.key)
    for file_path in result.files.get("Patient", []):
        with (folder / file_path.name).open("rb") as handle:
            for line in handle:
                if line.strip():
                    hashes.add_patient(json.loads(line))
    hashes.save(path)
