"""Warehouse raw zone: published Parquet partitions COPYed into ``sv_<env>_raw``.

Each table carries its data contract, the FHIRPath and de-identification method of every
column (``fhir_paths``) and its column lineage from the lake partition it was loaded from
(``dagster/column_lineage``), all derived from the ViewDefinition, the policy and the lake
contract (``starvit_assets.lineage``).
"""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.parquet as pq

from starvit_assets.defs.deid_raw import deid_asset_key
from starvit_assets.defs.resources import PlatformResource
from starvit_assets.lake.contracts import CONTRACTS, LINEAGE_COLUMNS
from starvit_assets.lineage import TableLineage, shipped_lineage
from starvit_assets.settings import load_settings
from starvit_assets.warehouse.loader import EXPORT_ID, LOADED_AT, LoadError

GROUP = "warehouse_raw"
ROWS_CHECK = "rows_match_lake"

# Units a column's values are in, where the column is a measurement.
RAW_UNITS: dict[str, dict[str, str]] = {
    "observation": {"value_quantity": "UCUM unit of the row's value_unit_code (as recorded)"},
}


def warehouse_raw_key(table: str) -> dg.AssetKey:
    return dg.AssetKey([GROUP, table])


def raw_contract(lineage: TableLineage) -> dict[str, Any]:
    """The data contract of a warehouse raw table (docs/raw-tables.md is its prose form)."""
    lake = CONTRACTS[lineage.table]
    contract: dict[str, Any] = {
        "grain": (
            f"one row per {lineage.resource_type} resource version per export; the rows of "
            "every loaded export accumulate"
        ),
        "keys": [[lake.key, EXPORT_ID]],
        "required": [lake.key, *lake.required, *LINEAGE_COLUMNS],
        "semantics": (
            f"FHIR {lineage.resource_type} flattened by the `{lineage.table}` ViewDefinition "
            "and de-identified by the policy (fhir_paths: the FHIRPath and method of each "
            "column); FHIR dates stay strings with their original precision and offset; "
            f"{LOADED_AT} is when the load wrote the row."
        ),
        "columns": [*lineage.published, *lineage.bookkeeping_columns],
    }
    units = RAW_UNITS.get(lineage.table)
    if units:
        contract["units"] = units
    return contract


def raw_column_lineage(lineage: TableLineage) -> dg.TableColumnLineage:
    """Each loaded column from the same column of the published lake partition; the load's
    own ``_loaded_at`` has no upstream column."""
    upstream = deid_asset_key(lineage.table)
    return dg.TableColumnLineage(
        deps_by_column={
            column: [dg.TableColumnDep(asset_key=upstream, column_name=column)]
            for column in (*lineage.published, *LINEAGE_COLUMNS)
        }
    )


@dataclass(frozen=True)
class PartitionLoad:
    partitions: list[tuple[str, Path]]
    loaded: list[str]
    mismatched: list[str]
    rows: int


def load_new_partitions(platform: PlatformResource, table: str) -> PartitionLoad:
    """COPY every published partition of ``table`` the warehouse does not hold yet (by row
    count; an empty partition holds no rows either way); then compare every export's rows."""
    partitions = platform.lake.partitions(table)
    if not partitions:
        raise dg.Failure(
            description=f"no published partitions of deid_raw/{table}: materialize it first"
        )
    expected = {export_id: pq.ParquetFile(path).metadata.num_rows for export_id, path in partitions}
    loaded: list[str] = []
    try:
        with platform.raw_warehouse() as warehouse:
            before = warehouse.loaded_row_counts(table)
            for export_id, path in partitions:
                if export_id in before and before[export_id] == expected[export_id]:
                    continue
                warehouse.load_partition(table, export_id, path)
                loaded.append(export_id)
            after = warehouse.loaded_row_counts(table)
    except LoadError as error:
        raise dg.Failure(description=str(error)) from None
    mismatched = [eid for eid, rows in expected.items() if after.get(eid, 0) != rows]
    return PartitionLoad(partitions, loaded, mismatched, sum(after.values()))


def build_warehouse_raw_asset(table: str) -> dg.AssetsDefinition:
    key = warehouse_raw_key(table)
    lineage = shipped_lineage()[table]
    column_lineage = raw_column_lineage(lineage)

    @dg.asset(
        key=key,
        deps=[deid_asset_key(table)],
        group_name=GROUP,
        kinds={load_settings().warehouse_target.value},
        description=(
            f"Raw `{table}` table in the warehouse raw schema: every published lake partition, "
            "loaded with COPY, one transaction per partition; the dbt source of the staging layer."
        ),
        metadata={
            "contract": dg.MetadataValue.json(raw_contract(lineage)),
            "fhir_paths": dg.MetadataValue.json(lineage.fhir_paths()),
            "dagster/column_lineage": column_lineage,
        },
        check_specs=[
            dg.AssetCheckSpec(
                ROWS_CHECK,
                asset=key,
                blocking=True,
                description="Rows per export in the warehouse equal rows in the lake partition.",
            )
        ],
    )
    def _load(
        context: dg.AssetExecutionContext, platform: PlatformResource
    ) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
        schema = platform.settings.raw_schema
        result = load_new_partitions(platform, table)
        partitions, loaded, mismatched = result.partitions, result.loaded, result.mismatched
        context.log.info(f"{schema}.{table}: loaded {len(loaded)} partition(s)")
        yield dg.AssetCheckResult(
            asset_key=key,
            check_name=ROWS_CHECK,
            passed=not mismatched,
            metadata={"partitions": len(partitions), "mismatched_exports": len(mismatched)},
        )
        yield dg.MaterializeResult(
            asset_key=key,
            metadata={
                "table": f"{schema}.{table}",
                "rows": dg.MetadataValue.int(result.rows),
                "partitions_loaded": dg.MetadataValue.int(len(loaded)),
                "dagster/relation_identifier": f"warehouse.{schema}.{table}",
                # Dagster reads column lineage from materializations too.
                "dagster/column_lineage": column_lineage,
            },
        )

    return _load


WAREHOUSE_RAW_ASSETS = [build_warehouse_raw_asset(name) for name in sorted(shipped_lineage())]
