"""The raw warehouse behind one small interface: PostgreSQL (COPY) or BigQuery (GCS + load job).

The Dagster asset asks only for row counts per export and for one partition to be (re)loaded;
which warehouse answers follows ``STARVIT_WAREHOUSE_TARGET`` (``PlatformResource.raw_warehouse``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import psycopg

from starvit_assets.settings import StarvitSettings
from starvit_assets.warehouse.loader import LoadError, load_partition, loaded_row_counts

if TYPE_CHECKING:
    from google.cloud.bigquery import Client as BigQueryClient
    from google.cloud.storage import Client as StorageClient

    from starvit_assets.warehouse.bigquery import GcsLake


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
    """Uploads the immutable partition to Cloud Storage, then loads it with a load job.

    The clients are handed in (the Dagster glue gets them from dagster-gcp's resources), so
    this module stays free of Dagster and tests can point real clients at a local endpoint.
    """

    def __init__(
        self,
        bigquery_client: BigQueryClient,
        storage_client: StorageClient,
        lake: GcsLake,
        *,
        env: str,
        location: str | None = None,
    ) -> None:
        from starvit_assets.warehouse.bigquery import BigQueryLoader

        self._lake = lake
        self._storage = storage_client
        self._loader = BigQueryLoader(bigquery_client, lake, env=env, location=location)

    def loaded_row_counts(self, table: str) -> dict[str, int]:
        return self._loader.loaded_row_counts(table)

    def load_partition(self, table: str, export_id: str, parquet_path: Path) -> None:
        from starvit_assets.warehouse.bigquery import upload_partition

        upload_partition(self._storage, self._lake, table, export_id, parquet_path)
        self._loader.load_partition(table, export_id)


def gcs_lake(settings: StarvitSettings) -> GcsLake:
    """Where the bigquery target loads partitions from; refuses settings that name none."""
    from starvit_assets.warehouse.bigquery import GcsLake

    if not settings.bq_project or not settings.gcs_bucket:
        raise LoadError("the bigquery target needs STARVIT_BQ_PROJECT and STARVIT_GCS_BUCKET")
    return GcsLake(settings.gcs_bucket, settings.gcs_prefix)


@contextmanager
def postgres_raw_warehouse(settings: StarvitSettings, warehouse_dsn: str) -> Iterator[RawWarehouse]:
    # Autocommit: each load_partition's transaction() is then a real transaction, committed
    # on its own. Without it the first row-count query opens a transaction that every
    # partition's transaction() only nests in as a savepoint, so a refused partition N
    # would undo partitions 1..N-1 as well.
    with psycopg.connect(warehouse_dsn, autocommit=True) as connection:
        yield PostgresRawWarehouse(connection, settings.raw_schema)
