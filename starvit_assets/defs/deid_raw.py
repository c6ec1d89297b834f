"""De-identification gate: staged NDJSON -> flattened, de-identified Parquet partitions.

Each partition is written to staging, checked by the blocking checks (contract, PHI leak,
reconciliation), and published only when every one passes. Once published, the staged
NDJSON of that resource type is purged from the PHI zone.
"""

import datetime as dt
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from starvit_assets.defs.extract import fhir_dep
from starvit_assets.defs.resources import PlatformResource
from starvit_assets.deid.engine import DeidBackend, DeidError
from starvit_assets.deid.kanonymity import PATIENT_QUASI_IDENTIFIERS, k_anonymity
from starvit_assets.deid.leak import LeakHashSet
from starvit_assets.deid.policy import Policy, PolicyError, load_policy
from starvit_assets.exports import (
    ExportRecordError,
    StagedExport,
    consent_ledger_path,
    latest_staged_export,
    leak_hashes_path,
    remove_export_folder_when_done,
    retracted_file,
    staging_dir,
)
from starvit_assets.lake.consent import (
    CONSENT_FILE_PATTERN,
    ConsentError,
    read_research_opt_outs,
)
from starvit_assets.lake.contracts import CONTRACTS, TableContract, validate_file
from starvit_assets.lake.deletions import write_retractions
from starvit_assets.lake.filters import RESEARCH_OPT_OUT_KIND, FilterError
from starvit_assets.lake.gate import (
    GateCounts,
    GateError,
    build_gate,
    published_schema,
    reconcile,
)
from starvit_assets.lake.partitions import PART_FILE
from starvit_assets.lineage import shipped_lineage
from starvit_assets.linkage.tokens import with_linkage_tokens
from starvit_assets.settings import StarvitSettings
from starvit_assets.views.runner import shipped_views

GROUP = "deid_raw"
CONTRACT_CHECK = "contract"
LEAK_CHECK = "no_phi_leak"
RECONCILE_CHECK = "rows_reconcile"
K_ANONYMITY_CHECK = "k_anonymity"
# Cloud DLP's request quota is per project, but each step's rate limiter knows only its own
# requests: with the DLP backend the deid_raw steps share this Dagster concurrency pool, which
# dagster.yaml limits to one step at a time across all runs (docs/gate.md, "Cloud DLP quota").
DLP_POOL = "cloud_dlp"
PATIENT_TABLE = "patient"
CONSENT_RESOURCE_TYPE = "Consent"


def deid_asset_key(table: str) -> dg.AssetKey:
    return dg.AssetKey([GROUP, table])


def _check_specs(table: str) -> list[dg.AssetCheckSpec]:
    key = deid_asset_key(table)
    return [
        dg.AssetCheckSpec(
            CONTRACT_CHECK,
            asset=key,
            blocking=True,
            description="pandera contract: types, nullability, key uniqueness, allowed values.",
        ),
        dg.AssetCheckSpec(
            LEAK_CHECK,
            asset=key,
            blocking=True,
            description=(
                "No string cell equals an identifying value seen in the PHI zone "
                "(salted hashes compared; no PHI crosses to make this check)."
            ),
        ),
        dg.AssetCheckSpec(
            RECONCILE_CHECK,
            asset=key,
            blocking=True,
            description=(
                "Counted in the written files, not by the gate: lines exported (counted on disk "
                "when staged) = lines read = resources with rows + without rows + lines in the "
                "quarantine file; rows flattened = rows in the partition file + rows in the "
                "quarantine file + held back by the filter."
            ),
        ),
        *(
            [
                dg.AssetCheckSpec(
                    K_ANONYMITY_CHECK,
                    asset=key,
                    blocking=False,
                    description=(
                        "k-anonymity report on the quasi-identifiers "
                        f"({', '.join(PATIENT_QUASI_IDENTIFIERS)}); warns when any class is "
                        "smaller than STARVIT_K_ANONYMITY_THRESHOLD."
                    ),
                )
            ]
            if table == PATIENT_TABLE
            else []
        ),
    ]


def _leak_hashes(settings: StarvitSettings) -> LeakHashSet:
    path = leak_hashes_path(settings)
    return LeakHashSet.load(path, settings.key) if path.exists() else LeakHashSet(settings.key)


def build_deid_asset(table: str, view: dict, pool: str | None = None) -> dg.AssetsDefinition:
    resource_type = str(view["resource"])
    contract = CONTRACTS[table]

    @dg.asset(
        key=deid_asset_key(table),
        # Consent: the research opt-outs the record filter reads from the same export.
        deps=[fhir_dep(resource_type), fhir_dep(CONSENT_RESOURCE_TYPE)],
        group_name=GROUP,
        kinds={"parquet", "pyarrow"},
        description=(
            f"De-identified `{table}` rows flattened from FHIR {resource_type} by the "
            f"`{view['name']}` ViewDefinition; one immutable Parquet partition per export."
        ),
        check_specs=_check_specs(table),
        pool=pool,
        metadata={
            "zone": "research",
            "contract": {
                **contract.describe(),
                "keys": [[contract.key, "_export_id"]],
                "semantics": (
                    f"FHIR {resource_type} flattened by the `{view['name']}` ViewDefinition "
                    "and de-identified by deid/policy.yaml (fhir_paths: the FHIRPath and "
                    "method of each column); one immutable Parquet partition per export, "
                    "published only when every blocking check passes."
                ),
            },
            "fhir_paths": dg.MetadataValue.json(shipped_lineage()[table].fhir_paths()),
        },
    )
    def _deid_table(
        context: dg.AssetExecutionContext, platform: PlatformResource
    ) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
        settings = platform.settings
        lake = platform.lake
        try:
            export = latest_staged_export(settings, resource_type)
        except ExportRecordError as error:
            raise dg.Failure(description=str(error)) from None
        key = deid_asset_key(table)

        quarantine = platform.quarantine
        if lake.is_published(table, export.export_id):
            context.log.info(f"{table}: export {export.export_id} already published; re-verifying")
            folder = lake.published_dir(table, export.export_id)
            data = folder / PART_FILE
            quarantined = quarantine.published_dir(table, export.export_id) / PART_FILE
            counts = GateCounts.load(folder)
            policy = load_policy()
            backend = _backend(platform, policy, _export_date(export.transaction_time))
            expected = published_schema(table, view, backend)
            yield from _check_results(
                key, contract, expected, data, quarantined, settings, export, counts
            )
            yield dg.MaterializeResult(
                asset_key=key,
                metadata={
                    "export_id": export.export_id,
                    "rows": counts.rows_published,
                    **_counts_metadata(counts),
                    "published": True,
                },
            )
            return

        missing = [path.name for path in export.paths(settings) if not path.is_file()]
        if missing:
            raise dg.Failure(
                description=(
                    f"{table}: the staged {resource_type} files of export {export.export_id} are "
                    f"gone and no partition was published: re-materialize fhir/{resource_type}"
                )
            )
        policy = load_policy()
        export_date = _export_date(export.transaction_time)
        # The Consents of every export so far, then any staged with this one (none at all:
        # nobody opted out); an incremental export alone holds only the changed ones.
        ledger = consent_ledger_path(settings)
        consent_files = [ledger] if ledger.is_file() else []
        consent_files += sorted(staging_dir(settings, export.export_id).glob(CONSENT_FILE_PATTERN))
        try:
            opt_outs = read_research_opt_outs(consent_files, export_date)
        except ConsentError as error:
            raise dg.Failure(description=f"{table}: {error}") from None
        # Every opted-out patient as of this export, not only those with new records: what
        # earlier exports published of them is retracted (every table writes the same list).
        write_retractions(
            retracted_file(settings, export.export_id, RESEARCH_OPT_OUT_KIND),
            (("Patient", patient, RESEARCH_OPT_OUT_KIND) for patient in sorted(opt_outs.patients)),
        )
        backend = _backend(platform, policy, export_date)
        gate = build_gate(
            table_name=table,
            view=view,
            backend=backend,
            policy=policy,
            key=settings.key,
            export_date=export_date,
            # Forked workers share nothing but the input: fine for the local engine, not for
            # a DLP client whose request quota is per client.
            workers=settings.gate_workers if settings.deid_backend == "local" else 1,
            research_opt_outs=opt_outs.patients,
        )
        try:
            result = gate.run(
                export.paths(settings),
                export.export_id,
                lake.prepare_staging(table, export.export_id),
                quarantine.prepare_staging(table, export.export_id),
            )
        except (GateError, PolicyError, FilterError, DeidError) as error:
            raise dg.Failure(description=f"{table}: {error}") from None

        counts = result.counts()
        counts.save(lake.staging_dir(table, export.export_id))
        # Before publishing: deid_raw/deleted_resource waits for this partition, then reads it.
        write_retractions(retracted_file(settings, export.export_id, table), result.retracted)
        checks = list(
            _check_results(
                key,
                contract,
                published_schema(table, view, backend),
                result.output,
                result.quarantine_output,
                settings,
                export,
                counts,
            )
        )
        yield from checks
        blocking_failed = [
            str(check.check_name)
            for check in checks
            if not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
        ]
        if blocking_failed:
            lake.discard_staged(table, export.export_id)
            quarantine.discard_staged(table, export.export_id)
            raise dg.Failure(
                description=(
                    f"{table}: blocking checks failed ({', '.join(blocking_failed)}); "
                    "partition not published"
                )
            )
        # The quarantine goes first: a published partition always has its quarantine beside it.
        quarantine.publish(table, export.export_id)
        published = lake.publish(table, export.export_id)
        _purge_staged(settings, export)
        yield dg.MaterializeResult(
            asset_key=key,
            metadata={
                "export_id": export.export_id,
                "rows": dg.MetadataValue.int(result.rows),
                **_counts_metadata(counts),
                "flattened_by": result.flattened_by,
                "consent_resources_read": dg.MetadataValue.int(opt_outs.consents_read),
                "research_opt_out_patients": dg.MetadataValue.int(len(opt_outs.patients)),
                "retracted_by_reason": dg.MetadataValue.json(
                    dict(sorted(Counter(kind for _, _, kind in result.retracted).items()))
                ),
                "policy_version": policy.version,
                "path": dg.MetadataValue.path(str(published)),
                "quarantine_path": dg.MetadataValue.path(
                    str(quarantine.published_dir(table, export.export_id))
                ),
                "published": True,
                "dagster/column_schema": _column_schema(pq.read_schema(published)),
            },
        )

    return _deid_table


def _backend(platform: PlatformResource, policy: Policy, export_date: dt.date) -> DeidBackend:
    settings = platform.settings
    return with_linkage_tokens(
        platform.deid_backend(policy, export_date), policy, lambda: settings.linkage_token_key
    )


def _counts_metadata(counts: GateCounts) -> dict[str, Any]:
    return {
        "resources_read": dg.MetadataValue.int(counts.resources_read),
        "rows_quarantined": dg.MetadataValue.int(counts.rows_quarantined),
        "lines_quarantined": dg.MetadataValue.int(counts.lines_quarantined),
        "rows_held_back": dg.MetadataValue.int(counts.rows_held_back),
        "held_back_by_reason": dg.MetadataValue.json(counts.held_back),
        "quarantined_by_reason": dg.MetadataValue.json(counts.quarantine_reasons),
    }


def _check_results(
    key: dg.AssetKey,
    contract: TableContract,
    expected: pa.Schema,
    data: Path,
    quarantined: Path,
    settings: StarvitSettings,
    export: StagedExport,
    counts: GateCounts,
) -> Iterator[dg.AssetCheckResult]:
    failures = validate_file(contract, data, expected)
    yield dg.AssetCheckResult(
        asset_key=key,
        check_name=CONTRACT_CHECK,
        passed=not failures,
        metadata={
            "failures": dg.MetadataValue.json(failures),
            "rows": counts.rows_published,
            "rows_quarantined": counts.rows_quarantined,
        },
    )
    leak_hashes = _leak_hashes(settings)
    hits = leak_hashes.find_leaks_in_parquet(data)
    quarantine_hits = leak_hashes.find_leaks_in_parquet(quarantined)
    yield dg.AssetCheckResult(
        asset_key=key,
        check_name=LEAK_CHECK,
        passed=not hits and not quarantine_hits,
        metadata={
            "hits": len(hits) + len(quarantine_hits),
            "columns_with_hits": dg.MetadataValue.json(
                sorted({hit.column for hit in (*hits, *quarantine_hits)})
            ),
        },
    )
    reconciliation = reconcile(counts, export.count, data, quarantined)
    yield dg.AssetCheckResult(
        asset_key=key,
        check_name=RECONCILE_CHECK,
        passed=reconciliation.passed,
        description="; ".join(reconciliation.problems) or None,
        metadata={
            "exported": export.count,
            "read": counts.resources_read,
            "resources_with_rows": counts.resources_with_rows,
            "resources_without_rows": counts.resources_without_rows,
            "lines_quarantined": counts.lines_quarantined,
            "rows_flattened": counts.rows_flattened,
            "rows_published": counts.rows_published,
            "rows_quarantined": counts.rows_quarantined,
            "rows_held_back": counts.rows_held_back,
            "rows_in_partition_file": _count_or_missing(reconciliation.rows_in_output),
            "rows_in_quarantine_file": _count_or_missing(reconciliation.rows_in_quarantine),
            "lines_in_quarantine_file": _count_or_missing(reconciliation.lines_in_quarantine),
            "problems": dg.MetadataValue.json(list(reconciliation.problems)),
        },
    )
    if key.path[-1] == PATIENT_TABLE:
        report = k_anonymity(
            pq.read_table(data, columns=list(PATIENT_QUASI_IDENTIFIERS)),
            PATIENT_QUASI_IDENTIFIERS,
            settings.k_anonymity_threshold,
        )
        yield dg.AssetCheckResult(
            asset_key=key,
            check_name=K_ANONYMITY_CHECK,
            passed=report.satisfied,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={name: value for name, value in report.as_metadata().items()},
        )


def _count_or_missing(count: int | None) -> dg.MetadataValue:
    return dg.MetadataValue.int(count) if count is not None else dg.MetadataValue.text("missing")


def _column_schema(schema: pa.Schema) -> dg.TableSchema:
    return dg.TableSchema(
        columns=[dg.TableColumn(name=field.name, type=str(field.type)) for field in schema]
    )


def _export_date(transaction_time: str) -> dt.date:
    return dt.date.fromisoformat(transaction_time[:10])


def _purge_staged(settings: StarvitSettings, export: StagedExport) -> None:
    for path in export.paths(settings):
        path.unlink(missing_ok=True)
    # The export's error lists and its Consent resources (read by every table's
    # record filter) go with the last type; its deleted[] lists and the gates' retractions
    # stay until deid_raw/deleted_resource has carried them across.
    remove_export_folder_when_done(settings, export.export_id)


def deid_assets(deid_backend: str) -> list[dg.AssetsDefinition]:
    """One asset per shipped view. With Cloud DLP they are all in ``DLP_POOL``; the local
    engine shares no quota, so its steps may run side by side."""
    pool = DLP_POOL if deid_backend == "dlp" else None
    return [build_deid_asset(name, view, pool) for name, view in sorted(shipped_views().items())]


DEID_ASSETS = deid_assets("local")
