"""The raw warehouse behind one small interface: PostgreSQL (COPY) or BigQuery (GCS + load job).

The Dagster asset asks only for row counts per export and for one partition to be (re)loaded;
which warehouse answers follows ``STARVIT_WAREHOUSE_TARGET``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import psycopg

from starvit_assets.settings import StarvitSettings, WarehouseTarget
from starvit_assets.warehouse.loader import LoadError, load_partition, loaded_row_counts


class RawWarehouse(Protocol):
    def loaded_row_counts(self, table: str) -> dict[str, int]: ...

    def load_partition(self, table: str, export_id: str, parquet_path: Path) -> None: ...


class PostgresRawWarehouse:
    def __init__(self, connection: psycopg.Connection, schema: str) -> None:
        self._connection = connection
        self._schema = schema

    def loaded_row_counts(self, table: str) -> dict[str, int]:
        return loaded_row_counts(self._connection, self._schema, table)

    def load_partition(self, table: str, export_id: str, parquet_path: Path) -> None:
        load_partition(self._connection, self._schema, table, export_id, parquet_path)


class BigQueryRawWarehouse:
    """Uploads the immutable partition to Cloud Storage, then loads it with a load job."""

    def __init__(self, settings: StarvitSettings) -> None:
        from starvit_assets.warehouse.bigquery import (
            BigQueryLoader,
            GcsLake,
            create_bigquery_client,
            create_storage_client,
        )

        if not settings.bq_project or not settings.gcs_bucket:
            raise LoadError("the bigquery target needs STARVIT_BQ_PROJECT and STARVIT_GCS_BUCKET")
        self._lake = GcsLake(settings.gcs_bucket, settings.gcs_prefix)
        self._storage = create_storage_client(settings.bq_project)
        self._loader = BigQueryLoader(
            create_bigquery_client(settings.bq_project, location=settings.bq_location),
            self._lake,
            env=settings.env.value,
            location=settings.bq_location,
        )

    def loaded_row_counts(self, table: str) -> dict[str, int]:
        return self._loader.loaded_row_counts(table)

    def load_partition(self, table: str, export_id: str, parquet_path: Path) -> None:
        from starvit_assets.warehouse.bigquery import upload_partition

        upload_partition(self._storage, self._lake, table, export_id, parquet_path)
        self._loader.load_partition(table, export_id)


@contextmanager
def raw_warehouse(settings: StarvitSettings, warehouse_dsn: str) -> Iterator[RawWarehouse]:
    if settings.warehouse_target == WarehouseTarget.BIGQUERY:
        yield BigQueryRawWarehouse(settings)
        return
    # Autocommit: each load_partition's transaction() is then a real transaction, committed
    # on its own. Without it the first row-count query opens a transaction that every
    # partition's transaction() only nests in as a savepoint, so a refused partition N
    # would undo partitions 1..N-1 as well.
    with psycopg.connect(warehouse_dsn, autocommit=True) as connection:
        yield PostgresRawWarehouse(connection, settings.raw_schema)
