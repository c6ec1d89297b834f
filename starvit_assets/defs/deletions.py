"""Deletions and retractions: de-identified partitions, then the raw table.

``deid_raw/deleted_resource`` turns each staged export's ``_deleted.<n>.ndjson`` (the
manifest's deleted[] lists) and ``_retracted.<name>.ndjson`` (what the gates held back, and the
research opt-outs as of the export) into one immutable Parquet partition (empty when there is
nothing to remove) with the resource ids pseudonymised as the gate pseudonymises them
(``starvit_assets.lake.deletions``). It publishes an export's partition only once every
``deid_raw`` table whose latest export it is has published: before that, the gates have not
decided. ``warehouse_raw/deleted_resource`` loads the partitions like every other raw table.
The dbt macro ``exclude_deleted`` leaves these resources out of every refined model.
"""

import datetime as dt
import functools
import json
from collections.abc import Iterator

import dagster as dg
import pyarrow.parquet as pq

from starvit_assets.defs.deid_raw import (
    CONTRACT_CHECK,
    LEAK_CHECK,
    RECONCILE_CHECK,
    deid_asset_key,
)
from starvit_assets.defs.deid_raw import GROUP as DEID_GROUP
from starvit_assets.defs.extract import RESOURCE_TYPES, fhir_asset_key
from starvit_assets.defs.resources import PlatformResource
from starvit_assets.defs.warehouse import GROUP as WAREHOUSE_GROUP
from starvit_assets.defs.warehouse import ROWS_CHECK, load_new_partitions, warehouse_raw_key
from starvit_assets.deid.engine import DeidBackend, DeidError
from starvit_assets.deid.leak import LeakHashSet
from starvit_assets.deid.policy import Policy, PolicyError, load_policy
from starvit_assets.exports import (
    DELETED_FILES_GLOB,
    RETRACTED_FILES_GLOB,
    ExportRecordError,
    latest_staged_export,
    leak_hashes_path,
    remove_export_folder_when_done,
    staging_dir,
)
from starvit_assets.lake.contracts import DELETIONS_CONTRACT, validate_file
from starvit_assets.lake.deletions import (
    DELETIONS_SCHEMA,
    DELETIONS_TABLE,
    deletions_table,
    published_ids,
)
from starvit_assets.lake.partitions import RawLake
from starvit_assets.settings import StarvitSettings
from starvit_assets.views.runner import shipped_views

DELETIONS_KEY = deid_asset_key(DELETIONS_TABLE)
WAREHOUSE_DELETIONS_KEY = warehouse_raw_key(DELETIONS_TABLE)
_COLUMNS = [field.name for field in DELETIONS_SCHEMA]


def pending_exports(settings: StarvitSettings, published: set[str]) -> dict[str, str]:
    """Export id -> transactionTime of every export whose deletions are not published yet:
    the latest recorded export of each type, and any staged export that still holds a
    deleted[] list or a retraction (a record may already point at a newer export)."""
    found: dict[str, str] = {}
    for resource_type in RESOURCE_TYPES:
        try:
            export = latest_staged_export(settings, resource_type)
        except ExportRecordError:
            continue
        found[export.export_id] = export.transaction_time
    staging = settings.phi_staging_dir
    for folder in sorted(staging.iterdir()) if staging.is_dir() else []:
        manifest = folder / "manifest.json"
        waiting = any(folder.glob(DELETED_FILES_GLOB)) or any(folder.glob(RETRACTED_FILES_GLOB))
        if folder.name.startswith("_") or not waiting:
            continue
        if folder.name not in found and manifest.is_file():
            found[folder.name] = str(json.loads(manifest.read_text())["transactionTime"])
    return {eid: when for eid, when in sorted(found.items()) if eid not in published}


def undecided_tables(settings: StarvitSettings, lake: RawLake, export_id: str) -> list[str]:
    """The ``deid_raw`` tables whose latest recorded export is ``export_id`` and that have not
    published it yet: their gate has not decided what it retracts. (A table whose type a newer
    export superseded never publishes this one: that export brings its changes again.)"""
    undecided = []
    for table, view in sorted(shipped_views().items()):
        try:
            export = latest_staged_export(settings, str(view["resource"]))
        except ExportRecordError:
            continue
        if export.export_id == export_id and not lake.is_published(table, export_id):
            undecided.append(table)
    return undecided


def _backend(platform: PlatformResource, export_date: dt.date, policy: Policy) -> DeidBackend:
    return platform.deid_backend(policy, export_date)


@dg.asset(
    key=DELETIONS_KEY,
    # The gated tables: their retractions are read once they have published the export.
    deps=[
        *(fhir_asset_key(resource_type) for resource_type in RESOURCE_TYPES),
        *(deid_asset_key(table) for table in sorted(shipped_views())),
    ],
    group_name=DEID_GROUP,
    kinds={"parquet", "pyarrow"},
    description=(
        "Resources the exports' deleted[] lists reported deleted, and resources the gate "
        "retracted (a newer version held back by the record filter, every record of a patient "
        "who opted out of research), one row per resource per export with its reason, ids "
        "pseudonymised as the gate does; one immutable Parquet partition per export (empty when "
        "there is nothing to remove), published once every gate of the export has decided."
    ),
    check_specs=[
        dg.AssetCheckSpec(
            CONTRACT_CHECK,
            asset=DELETIONS_KEY,
            blocking=True,
            description=(
                "pandera contract: types, resource_id unique, type, reason and export time "
                "present, reason one of the known codes."
            ),
        ),
        dg.AssetCheckSpec(
            LEAK_CHECK,
            asset=DELETIONS_KEY,
            blocking=True,
            description="No string cell equals an identifying value seen in the PHI zone.",
        ),
        dg.AssetCheckSpec(
            RECONCILE_CHECK,
            asset=DELETIONS_KEY,
            blocking=True,
            description=(
                "DELETE entries and retractions read = rows published + duplicates + entries "
                "refused by reason + retractions of nothing published."
            ),
        ),
    ],
    metadata={
        "zone": "research",
        "contract": {
            "grain": "one row per deleted or retracted resource per export",
            "keys": [["resource_type", "resource_id", "_export_id"]],
            "semantics": (
                "The DELETE entries of the Bulk Data manifest's deleted[] Bundles (reason "
                "deleted) and the gate's retractions (reason status, security_label, "
                "date_range, missing_element or research_opt_out); resource_id pseudonymised "
                "with its resource type (the same token as the resource's own rows); "
                "export_transaction_time is the export's transactionTime, the deletion time "
                "itself is not carried."
            ),
        },
    },
)
def deleted_resource(
    context: dg.AssetExecutionContext, platform: PlatformResource
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    settings = platform.settings
    lake = platform.lake
    published = {export_id for export_id, _path in lake.partitions(DELETIONS_TABLE)}
    pending = pending_exports(settings, published)
    path = leak_hashes_path(settings)
    leak_hashes = (
        LeakHashSet.load(path, settings.key) if path.exists() else LeakHashSet(settings.key)
    )
    try:
        policy = load_policy()
    except PolicyError as error:
        raise dg.Failure(description=f"{DELETIONS_TABLE}: {error}") from None

    rows = entries = duplicates = hits = nothing_to_retract = 0
    contract_failures: list[str] = []
    refused: dict[str, int] = {}
    retracted: dict[str, int] = {}
    published_now = 0
    waiting: list[str] = []
    reconciles = True
    for export_id, transaction_time in pending.items():
        undecided = undecided_tables(settings, lake, export_id)
        if undecided:
            waiting.append(export_id)
            context.log.info(
                f"{DELETIONS_TABLE}: export {export_id} waits for {', '.join(undecided)}"
            )
            continue
        folder = staging_dir(settings, export_id)
        files = sorted(folder.glob(DELETED_FILES_GLOB)) if folder.is_dir() else []
        retractions = sorted(folder.glob(RETRACTED_FILES_GLOB)) if folder.is_dir() else []
        export_date = dt.date.fromisoformat(transaction_time[:10])
        try:
            data, counts = deletions_table(
                files,
                policy=policy,
                backend_for=functools.partial(_backend, platform, export_date),
                key=settings.key,
                export_id=export_id,
                transaction_time=transaction_time,
                retraction_paths=retractions,
                published=functools.partial(published_ids, lake, up_to=export_id),
            )
        except (DeidError, PolicyError) as error:
            raise dg.Failure(description=f"{DELETIONS_TABLE}: {error}") from None
        staged = lake.prepare_staging(DELETIONS_TABLE, export_id)
        pq.write_table(data, staged, compression="zstd")
        export_hits = len(leak_hashes.find_leaks_in_parquet(staged))
        failures = validate_file(DELETIONS_CONTRACT, staged, DELETIONS_SCHEMA)
        contract_failures.extend(f"{export_id}: {failure}" for failure in failures)
        hits += export_hits
        reconciles = reconciles and counts.reconciles
        if export_hits or failures or not counts.reconciles:
            lake.discard_staged(DELETIONS_TABLE, export_id)
            continue
        lake.publish(DELETIONS_TABLE, export_id)
        published_now += 1
        for carried in (*files, *retractions):
            carried.unlink()
        remove_export_folder_when_done(settings, export_id)
        rows += counts.rows
        entries += counts.entries
        duplicates += counts.duplicates
        nothing_to_retract += counts.nothing_to_retract
        for reason, count in counts.refused.items():
            refused[reason] = refused.get(reason, 0) + count
        for reason, count in counts.retracted_by_reason.items():
            retracted[reason] = retracted.get(reason, 0) + count
        context.log.info(
            f"{DELETIONS_TABLE}: export {export_id}: {counts.rows} row(s), "
            f"{sum(counts.retracted_by_reason.values())} of them retraction(s)"
        )

    yield dg.AssetCheckResult(
        asset_key=DELETIONS_KEY,
        check_name=CONTRACT_CHECK,
        passed=not contract_failures,
        metadata={"failures": dg.MetadataValue.json(contract_failures)},
    )
    yield dg.AssetCheckResult(
        asset_key=DELETIONS_KEY, check_name=LEAK_CHECK, passed=hits == 0, metadata={"hits": hits}
    )
    yield dg.AssetCheckResult(
        asset_key=DELETIONS_KEY,
        check_name=RECONCILE_CHECK,
        passed=reconciles,
        metadata={
            "entries": entries,
            "rows": rows,
            "duplicates": duplicates,
            "retractions_with_nothing_published": nothing_to_retract,
        },
    )
    if hits or contract_failures or not reconciles:
        raise dg.Failure(
            description=f"{DELETIONS_TABLE}: blocking checks failed; partition(s) not published"
        )
    yield dg.MaterializeResult(
        asset_key=DELETIONS_KEY,
        metadata={
            "exports_published": dg.MetadataValue.int(published_now),
            "exports_waiting_for_gates": dg.MetadataValue.json(waiting),
            "rows": dg.MetadataValue.int(rows),
            "duplicates": dg.MetadataValue.int(duplicates),
            "refused_by_reason": dg.MetadataValue.json(refused),
            "retracted_by_reason": dg.MetadataValue.json(dict(sorted(retracted.items()))),
            "retractions_with_nothing_published": dg.MetadataValue.int(nothing_to_retract),
            "policy_version": policy.version,
            "dagster/column_schema": dg.TableSchema(
                columns=[
                    dg.TableColumn(name=field.name, type=str(field.type))
                    for field in DELETIONS_SCHEMA
                ]
            ),
        },
    )


@dg.asset(
    key=WAREHOUSE_DELETIONS_KEY,
    deps=[DELETIONS_KEY],
    group_name=WAREHOUSE_GROUP,
    kinds={"postgres", "bigquery"},
    description=(
        "Raw `deleted_resource` table in the warehouse raw schema: every published deletions "
        "partition, loaded with COPY, one transaction per partition."
    ),
    metadata={
        "contract": dg.MetadataValue.json(
            {
                "grain": (
                    "one row per deleted or retracted resource per export; every loaded export "
                    "accumulates"
                ),
                "keys": [["resource_type", "resource_id", "_export_id"]],
                "required": _COLUMNS,
                "semantics": (
                    "the de-identified deletions and retractions of deid_raw/deleted_resource"
                ),
                "columns": [*_COLUMNS, "_loaded_at"],
            }
        ),
        "dagster/column_lineage": dg.TableColumnLineage(
            deps_by_column={
                column: [dg.TableColumnDep(asset_key=DELETIONS_KEY, column_name=column)]
                for column in _COLUMNS
            }
        ),
    },
    check_specs=[
        dg.AssetCheckSpec(
            ROWS_CHECK,
            asset=WAREHOUSE_DELETIONS_KEY,
            blocking=True,
            description="Rows per export in the warehouse equal rows in the lake partition.",
        )
    ],
)
def warehouse_deleted_resource(
    context: dg.AssetExecutionContext, platform: PlatformResource
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    schema = platform.settings.raw_schema
    result = load_new_partitions(platform, DELETIONS_TABLE)
    context.log.info(f"{schema}.{DELETIONS_TABLE}: loaded {len(result.loaded)} partition(s)")
    yield dg.AssetCheckResult(
        asset_key=WAREHOUSE_DELETIONS_KEY,
        check_name=ROWS_CHECK,
        passed=not result.mismatched,
        metadata={
            "partitions": len(result.partitions),
            "mismatched_exports": len(result.mismatched),
        },
    )
    yield dg.MaterializeResult(
        asset_key=WAREHOUSE_DELETIONS_KEY,
        metadata={
            "table": f"{schema}.{DELETIONS_TABLE}",
            "rows": dg.MetadataValue.int(result.rows),
            "partitions_loaded": dg.MetadataValue.int(len(result.loaded)),
            "dagster/relation_identifier": f"warehouse.{schema}.{DELETIONS_TABLE}",
        },
    )


DELETION_ASSETS = [deleted_resource, warehouse_deleted_resource]
