"""Warehouse raw zone: published Parquet partitions COPYed into ``sv_<env>_raw``."""

from collections.abc import Iterator

import dagster as dg
import pyarrow.parquet as pq

from starvit_assets.defs.deid_raw import deid_asset_key
from starvit_assets.defs.resources import PlatformResource
from starvit_assets.views.runner import shipped_views
from starvit_assets.warehouse.loader import LoadError

GROUP = "warehouse_raw"
ROWS_CHECK = "rows_match_lake"


def warehouse_raw_key(table: str) -> dg.AssetKey:
    return dg.AssetKey([GROUP, table])


def build_warehouse_raw_asset(table: str) -> dg.AssetsDefinition:
    key = warehouse_raw_key(table)

    @dg.asset(
        key=key,
        deps=[deid_asset_key(table)],
        group_name=GROUP,
        kinds={"postgres", "bigquery"},
        description=(
            f"Raw `{table}` table in the warehouse raw schema: every published lake partition, "
            "loaded with COPY, one transaction per partition; the dbt source of the staging layer."
        ),
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
        partitions = platform.lake.partitions(table)
        if not partitions:
            raise dg.Failure(
                description=f"no published partitions of deid_raw/{table}: materialize it first"
            )
        loaded: list[str] = []
        try:
            with platform.raw_warehouse() as warehouse:
                before = warehouse.loaded_row_counts(table)
                for export_id, path in partitions:
                    expected = pq.ParquetFile(path).metadata.num_rows
                    if before.get(export_id) == expected:
                        continue
                    warehouse.load_partition(table, export_id, path)
                    loaded.append(export_id)
                after = warehouse.loaded_row_counts(table)
        except LoadError as error:
            raise dg.Failure(description=str(error)) from None
        mismatched = [
            export_id
            for export_id, path in partitions
            if after.get(export_id) != pq.ParquetFile(path).metadata.num_rows
        ]
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
                "rows": dg.MetadataValue.int(sum(after.values())),
                "partitions_loaded": dg.MetadataValue.int(len(loaded)),
                "dagster/relation_identifier": f"warehouse.{schema}.{table}",
            },
        )

    return _load


WAREHOUSE_RAW_ASSETS = [build_warehouse_raw_asset(name) for name in sorted(shipped_views())]
