"""De-identification gate: staged NDJSON -> flattened, de-identified Parquet partitions.

Each partition is written to staging, checked by the blocking checks (contract, PHI leak,
reconciliation), and published only when every one passes. Once published, the staged
NDJSON of that resource type is purged from the PHI zone.
"""

import datetime as dt
from collections.abc import Iterator

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from starvit_assets.defs.extract import fhir_asset_key
from starvit_assets.defs.resources import PlatformResource
from starvit_assets.deid.engine import LocalDeidEngine
from starvit_assets.deid.leak import LeakHashSet
from starvit_assets.deid.policy import load_policy
from starvit_assets.exports import (
    ExportRecordError,
    StagedExport,
    latest_staged_export,
    leak_hashes_path,
    staging_dir,
)
from starvit_assets.lake.contracts import CONTRACTS, TableContract, validate
from starvit_assets.lake.gate import GateError, run_gate
from starvit_assets.settings import StarvitSettings
from starvit_assets.views.runner import compile_view, shipped_views

GROUP = "deid_raw"
CONTRACT_CHECK = "contract"
LEAK_CHECK = "no_phi_leak"
RECONCILE_CHECK = "rows_reconcile"


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
            description="Resources exported = resources read = resources published + filtered.",
        ),
    ]


def _leak_hashes(settings: StarvitSettings) -> LeakHashSet:
    path = leak_hashes_path(settings)
    return LeakHashSet.load(path, settings.key) if path.exists() else LeakHashSet(settings.key)


def build_deid_asset(table: str, view: dict) -> dg.AssetsDefinition:
    resource_type = str(view["resource"])
    contract = CONTRACTS[table]

    @dg.asset(
        key=deid_asset_key(table),
        deps=[fhir_asset_key(resource_type)],
        group_name=GROUP,
        kinds={"parquet", "pyarrow"},
        description=(
            f"De-identified `{table}` rows flattened from FHIR {resource_type} by the "
            f"`{view['name']}` ViewDefinition; one immutable Parquet partition per export."
        ),
        check_specs=_check_specs(table),
        metadata={"zone": "research", "contract": contract.describe()},
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

        if lake.is_published(table, export.export_id):
            context.log.info(f"{table}: export {export.export_id} already published; re-verifying")
            path = lake.published_dir(table, export.export_id) / "part-00000.parquet"
            data = pq.read_table(path)
            yield from _check_results(key, contract, data, settings, export, export.count, 0)
            yield dg.MaterializeResult(
                asset_key=key,
                metadata={"export_id": export.export_id, "rows": data.num_rows, "published": True},
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
        engine = LocalDeidEngine(
            settings.key, policy, reference_date=_export_date(export.transaction_time)
        )
        try:
            result = run_gate(
                table_name=table,
                view=compile_view(view),
                files=export.paths(settings),
                backend=engine,
                key=settings.key,
                export_id=export.export_id,
                policy_version=policy.version,
            )
        except GateError as error:
            raise dg.Failure(description=f"{table}: {error}") from None

        lake.stage(table, export.export_id, result.table)
        checks = list(
            _check_results(
                key,
                contract,
                result.table,
                settings,
                export,
                result.resources_read,
                result.resources_without_rows,
            )
        )
        yield from checks
        if not all(check.passed for check in checks):
            lake.discard_staged(table, export.export_id)
            failed = ", ".join(str(check.check_name) for check in checks if not check.passed)
            raise dg.Failure(
                description=f"{table}: blocking checks failed ({failed}); partition not published"
            )
        published = lake.publish(table, export.export_id)
        _purge_staged(settings, export)
        yield dg.MaterializeResult(
            asset_key=key,
            metadata={
                "export_id": export.export_id,
                "rows": dg.MetadataValue.int(result.rows),
                "resources_read": dg.MetadataValue.int(result.resources_read),
                "policy_version": policy.version,
                "path": dg.MetadataValue.path(str(published)),
                "published": True,
                "dagster/column_schema": _column_schema(result.table.schema),
            },
        )

    return _deid_table


def _check_results(
    key: dg.AssetKey,
    contract: TableContract,
    data: pa.Table,
    settings: StarvitSettings,
    export: StagedExport,
    resources_read: int,
    resources_without_rows: int,
) -> Iterator[dg.AssetCheckResult]:
    failures = validate(contract, data)
    yield dg.AssetCheckResult(
        asset_key=key,
        check_name=CONTRACT_CHECK,
        passed=not failures,
        metadata={"failures": dg.MetadataValue.json(failures), "rows": data.num_rows},
    )
    hits = _leak_hashes(settings).find_leaks(data)
    yield dg.AssetCheckResult(
        asset_key=key,
        check_name=LEAK_CHECK,
        passed=not hits,
        metadata={
            "hits": len(hits),
            "columns_with_hits": dg.MetadataValue.json(sorted({hit.column for hit in hits})),
        },
    )
    published_resources = data.group_by(["_source_file", "_source_line"]).aggregate([]).num_rows
    reconciled = export.count == resources_read == published_resources + resources_without_rows
    yield dg.AssetCheckResult(
        asset_key=key,
        check_name=RECONCILE_CHECK,
        passed=reconciled,
        metadata={
            "exported": export.count,
            "read": resources_read,
            "published_resources": published_resources,
            "filtered": resources_without_rows,
            "quarantined": 0,
        },
    )


def _column_schema(schema: pa.Schema) -> dg.TableSchema:
    return dg.TableSchema(
        columns=[dg.TableColumn(name=field.name, type=str(field.type)) for field in schema]
    )


def _export_date(transaction_time: str) -> dt.date:
    return dt.date.fromisoformat(transaction_time[:10])


def _purge_staged(settings: StarvitSettings, export: StagedExport) -> None:
    for path in export.paths(settings):
        path.unlink(missing_ok=True)
    folder = staging_dir(settings, export.export_id)
    if folder.is_dir() and not any(folder.glob("*.ndjson")):
        for leftover in folder.iterdir():
            leftover.unlink()
        folder.rmdir()


DEID_ASSETS = [build_deid_asset(name, view) for name, view in sorted(shipped_views().items())]
