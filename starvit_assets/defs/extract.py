"""PHI zone: FHIR Bulk Data export, one asset per resource type (a multi-asset).

The staged NDJSON stays under ``$STARVIT_HOME/phi/staging``; only counts, file names and
the transaction time reach Dagster metadata.
"""

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg

from starvit_assets.defs.resources import PlatformResource
from starvit_assets.deid.leak import LeakHashSet
from starvit_assets.exports import (
    StagedExport,
    export_id_for,
    leak_hashes_path,
    record_staged_export,
    staging_dir,
)
from starvit_assets.fhir.auth import load_auth_from_env
from starvit_assets.fhir.client import BulkDataClient, ExportRequest, ExportResult
from starvit_assets.fhir.errors import ExportError
from starvit_assets.fhir.server import BulkDataServer
from starvit_assets.settings import StarvitSettings

RESOURCE_TYPES = (
    "Patient",
    "Encounter",
    "Observation",
    "Condition",
    "MedicationRequest",
    "Procedure",
    "Immunization",
)
GROUP = "phi_extract"
MANIFEST_CHECK = "manifest_counts_match"


def fhir_asset_key(resource_type: str) -> dg.AssetKey:
    return dg.AssetKey(["fhir", resource_type])


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
            )
        )
    with BulkDataServer(source) as server:
        yield server.base_url


class FhirExportConfig(dg.Config):
    """Run configuration of an export: a full export (the default) or an incremental one."""

    incremental: bool = False
    """Only resources changed since the last export's transactionTime (the stored watermark)."""


def _export_contract(resource_type: str) -> dict[str, object]:
    return {
        "grain": f"one FHIR {resource_type} resource per NDJSON line, per export",
        "keys": [[f"{resource_type}.id", "export_id"]],
        "semantics": (
            f"FHIR R4 {resource_type} resources as the source's Bulk Data $export returned "
            "them (a full export, or the resources changed since the stored watermark); "
            "identified PHI, kept only until de-identified. Dagster metadata holds counts, "
            "file names and the transaction time only."
        ),
    }


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


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
            description="Lines staged on disk equal the export manifest's count for this type.",
        )
        for resource_type in RESOURCE_TYPES
    ],
    can_subset=True,
    # Network faults the client could not ride out end the attempt; a later attempt resumes the
    # same export from its saved state instead of starting again.
    retry_policy=dg.RetryPolicy(max_retries=3, delay=60, backoff=dg.Backoff.EXPONENTIAL),
)
def fhir_export(
    context: dg.AssetExecutionContext, config: FhirExportConfig, platform: PlatformResource
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    settings = platform.settings
    selected = [t for t in RESOURCE_TYPES if fhir_asset_key(t) in context.selected_asset_keys]
    incoming = settings.phi_staging_dir / "_incoming"
    started = time.monotonic()
    with fhir_base_url(settings) as base_url:
        # Only a configured server needs credentials; the embedded one serves the local folder.
        auth = load_auth_from_env(fhir_base_url=base_url) if settings.fhir_base_url else None
        state_dir = settings.home / "state" / "fhir"
        with BulkDataClient(base_url, auth=auth, state_dir=state_dir) as client:
            request = ExportRequest(types=tuple(selected))
            # A saved, unfinished export resumes into the files it already downloaded.
            if incoming.exists() and not client.has_saved_export(request):
                shutil.rmtree(incoming)
            try:
                result = client.export(incoming, request=request, incremental=config.incremental)
            except ExportError as error:
                raise dg.Failure(description=f"FHIR export: {error}") from None
    duration = time.monotonic() - started

    export_id = export_id_for(result.transaction_time)
    target = staging_dir(settings, export_id)
    if target.exists():
        shutil.rmtree(target)
    incoming.rename(target)
    _remember_identifying_values(settings, target, result)

    for resource_type in selected:
        files = [path.name for path in result.files.get(resource_type, [])]
        expected = result.counts.get(resource_type, 0)
        on_disk = sum(_count_lines(target / name) for name in files)
        record_staged_export(
            settings,
            StagedExport(
                export_id=export_id,
                resource_type=resource_type,
                transaction_time=result.transaction_time,
                files=tuple(files),
                count=on_disk,
            ),
        )
        key = fhir_asset_key(resource_type)
        yield dg.MaterializeResult(
            asset_key=key,
            metadata={
                "export_id": export_id,
                "transaction_time": result.transaction_time,
                "resources": dg.MetadataValue.int(on_disk),
                "files": dg.MetadataValue.int(len(files)),
                "export_errors": dg.MetadataValue.int(len(result.errors)),
                "export_error_issue_codes": dg.MetadataValue.json(dict(result.error_issue_counts)),
                "deleted_in_export": dg.MetadataValue.int(result.deleted_count),
                "resumed": result.resumed,
                "incremental": config.incremental,
                "since": result.since or "",
                "duration_seconds": dg.MetadataValue.float(round(duration, 3)),
            },
        )
        yield dg.AssetCheckResult(
            asset_key=key,
            check_name=MANIFEST_CHECK,
            passed=on_disk == expected,
            metadata={"manifest_count": expected, "staged_lines": on_disk},
        )


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
