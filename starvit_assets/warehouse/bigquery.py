"""Loads raw Parquet partitions from Cloud Storage into BigQuery's raw dataset ``sv_<env>_raw``.

The BigQuery twin of :mod:`starvit_assets.warehouse.loader`, with the same guarantees:

* a load replaces exactly one export's rows, atomically: a load job puts the partition into a
  per-export staging table (WRITE_TRUNCATE), then one multi-statement transaction deletes the
  export's rows from the raw table and inserts the staging rows; a failure anywhere leaves the
  raw table as it was, and running the load again gives the same result;
* schema evolution: a new column becomes a NULLABLE column of the raw table; a changed type is
  refused with an error naming the table and the column;
* errors (:class:`~starvit_assets.warehouse.loader.LoadError`) name the table, the step and
  BigQuery's error reason, never a value: BigQuery's messages can quote data, so they stay in
  the job history that the error points to.

Partitions live at ``gs://<bucket>/<prefix>/deid_raw/<table>/export_id=<id>/part-00000.parquet``,
the lake's layout (:class:`~starvit_assets.lake.partitions.RawLake`); :func:`upload_partition`
copies a published local partition there. The clients are injected, so tests point them at a
local endpoint (:func:`create_bigquery_client`, :func:`create_storage_client`).
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.api_core import exceptions as api_exceptions
from google.cloud import bigquery

from starvit_assets.lake.partitions import LAYER, PART_FILE, PartitionError
from starvit_assets.lake.partitions import _checked as _checked_export_id
from starvit_assets.warehouse.loader import EXPORT_ID, LOADED_AT, LoadError, LoadResult

if TYPE_CHECKING:
    from google.auth.credentials import Credentials
    from google.cloud.storage import Client as StorageClient

PARQUET_CONTENT_TYPE = "application/vnd.apache.parquet"
# Exact decimals stay exact: NUMERIC when it fits, else BIGNUMERIC; never silently STRING.
DECIMAL_TARGET_TYPES = ("NUMERIC", "BIGNUMERIC")
_JOB_TIMEOUT_SECONDS = 600.0
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,299}$")
_STAGING_PREFIX = "_staging__"
# The REST API still answers with the legacy names; compare types by their GoogleSQL names.
_GOOGLESQL_TYPES = {"INTEGER": "INT64", "FLOAT": "FLOAT64", "BOOLEAN": "BOOL", "RECORD": "STRUCT"}


@dataclass(frozen=True)
class GcsLake:
    """The raw lake's layout in a Cloud Storage bucket."""

    bucket: str
    prefix: str = ""
    layer: str = LAYER

    def object_name(self, table: str, export_id: str) -> str:
        try:
            export_id = _checked_export_id(export_id)
        except PartitionError as error:
            raise LoadError(f"{table}: {error}") from None
        parts = [self.prefix.strip("/"), self.layer, table, f"export_id={export_id}", PART_FILE]
        return "/".join(part for part in parts if part)

    def uri(self, table: str, export_id: str) -> str:
        return f"gs://{self.bucket}/{self.object_name(table, export_id)}"


def create_bigquery_client(
    project: str,
    *,
    location: str | None = None,
    credentials: Credentials | None = None,
    api_endpoint: str | None = None,
) -> bigquery.Client:
    """The real client: Application Default Credentials unless ``credentials`` are given."""
    options = {"api_endpoint": api_endpoint} if api_endpoint else None
    return bigquery.Client(
        project=project, credentials=credentials, location=location, client_options=options
    )


def create_storage_client(
    project: str, *, credentials: Credentials | None = None, api_endpoint: str | None = None
) -> StorageClient:
    """A Cloud Storage client, if google-cloud-storage is installed (dbt-bigquery brings it)."""
    try:
        from google.cloud.storage import Client
    except ImportError:
        raise LoadError(
            "uploading partitions needs google-cloud-storage (pip install google-cloud-storage); "
            "or copy the lake to the bucket another way and load from there"
        ) from None
    options = {"api_endpoint": api_endpoint} if api_endpoint else None
    return Client(project=project, credentials=credentials, client_options=options)


def upload_partition(
    storage_client: StorageClient, lake: GcsLake, table: str, export_id: str, parquet_path: Path
) -> str:
    """Copies a published partition to the bucket; returns its ``gs://`` URI.

    Partitions are immutable, so the object is only ever created: uploading the same bytes
    again is a no-op (a re-run after a crash), different bytes are refused.
    """
    name = lake.object_name(table, export_id)
    blob = storage_client.bucket(lake.bucket).blob(name)
    where = f"{table}: upload of export {export_id}"
    try:
        blob.upload_from_filename(
            str(parquet_path),
            content_type=PARQUET_CONTENT_TYPE,
            if_generation_match=0,
            checksum="crc32c",
        )
    except api_exceptions.PreconditionFailed:
        with _google_errors(where):
            blob.reload()
        if blob.crc32c != _crc32c(parquet_path):
            raise LoadError(
                f"{where}: gs://{lake.bucket}/{name} already exists with different content; "
                "partitions are immutable, so publish a new export instead"
            ) from None
    except api_exceptions.GoogleAPICallError as error:
        raise LoadError(f"{where} failed: {_describe(error)}") from None
    return lake.uri(table, export_id)


class BigQueryLoader:
    """Loads lake partitions from Cloud Storage into ``<project>.sv_<env>_raw.<table>``."""

    def __init__(
        self,
        client: bigquery.Client,
        lake: GcsLake,
        *,
        env: str = "dev",
        location: str | None = None,
        job_timeout_seconds: float = _JOB_TIMEOUT_SECONDS,
    ) -> None:
        self._client = client
        self._lake = lake
        self._location = location or client.location
        self._timeout = job_timeout_seconds
        if "`" in client.project:
            raise LoadError("BigQuery project id may not contain a backtick")
        dataset = _checked_name("environment", f"sv_{env}_raw", "dataset")
        self.dataset = bigquery.DatasetReference(client.project, dataset)

    def load_partition(self, table: str, export_id: str) -> LoadResult:
        """Replaces the rows of ``export_id`` in ``table`` with the partition in the bucket."""
        _checked_name("load", table, "table")
        uri = self._lake.uri(table, export_id)
        where = f"{self.dataset.dataset_id}.{table}"
        self._ensure_dataset(where)
        staging = self.dataset.table(_staging_table(table, export_id))
        try:
            with _google_errors(f"{where}: starting the load job for export {export_id}"):
                load = self._client.load_table_from_uri(
                    uri,
                    staging,
                    job_config=_load_config(),
                    job_id_prefix=f"starvit_load_{table}_",
                    location=self._location,
                )
            self._wait(load, where, f"load job for export {export_id}")
            with _google_errors(f"{where}: reading the staged schema"):
                staged = self._client.get_table(staging)
            columns = [field.name for field in staged.schema]
            for column in columns:
                _checked_name(where, column, "column")
            if EXPORT_ID not in columns or LOADED_AT in columns:
                raise LoadError(
                    f"{where}: a partition must have the column {EXPORT_ID} and not {LOADED_AT}"
                )
            added = self._evolve(table, where, staged.schema)
            with _google_errors(f"{where}: starting the replace for export {export_id}"):
                replace = self._client.query(
                    _replace_script(self.dataset, table, staging.table_id, columns),
                    job_config=bigquery.QueryJobConfig(
                        query_parameters=[
                            bigquery.ScalarQueryParameter("export_id", "STRING", export_id)
                        ]
                    ),
                    job_id_prefix=f"starvit_replace_{table}_",
                    location=self._location,
                )
            self._wait(replace, where, f"replace transaction for export {export_id}")
        except BaseException:
            # A staged copy has no use once this attempt is over; the error that ended the
            # attempt is the one to report, not a failure to clean up after it.
            with suppress(api_exceptions.GoogleAPICallError):
                self._client.delete_table(staging, not_found_ok=True)
            raise
        with _google_errors(f"{where}: dropping the staging table"):
            self._client.delete_table(staging, not_found_ok=True)
        return LoadResult(
            table=table, export_id=export_id, rows=int(load.output_rows or 0), added_columns=added
        )

    def loaded_row_counts(self, table: str) -> dict[str, int]:
        """Rows per export id currently in the raw table (empty if the table is absent)."""
        _checked_name("row counts", table, "table")
        where = f"{self.dataset.dataset_id}.{table}"
        try:
            self._client.get_table(self.dataset.table(table))
        except api_exceptions.NotFound:
            return {}
        except api_exceptions.GoogleAPICallError as error:
            raise LoadError(f"{where}: reading the table failed: {_describe(error)}") from None
        with _google_errors(f"{where}: starting the row count query"):
            job = self._client.query(
                f"SELECT {EXPORT_ID}, COUNT(*) AS row_count FROM {_quoted(self.dataset, table)} "
                f"GROUP BY {EXPORT_ID}",
                job_id_prefix=f"starvit_counts_{table}_",
                location=self._location,
            )
        rows = self._wait(job, where, "row count query")
        return {str(row[0]): int(row[1]) for row in rows}

    # -- steps -------------------------------------------------------------------------------

    def _ensure_dataset(self, where: str) -> None:
        try:
            self._client.get_dataset(self.dataset)
            return
        except api_exceptions.NotFound:
            pass
        except api_exceptions.GoogleAPICallError as error:
            raise LoadError(f"{where}: reading the dataset failed: {_describe(error)}") from None
        dataset = bigquery.Dataset(self.dataset)
        dataset.location = self._location
        with _google_errors(f"{where}: creating the dataset"):
            self._client.create_dataset(dataset, exists_ok=True)

    def _evolve(
        self, table: str, where: str, staged: Sequence[bigquery.SchemaField]
    ) -> tuple[str, ...]:
        """Creates the raw table, or adds the partition's new columns to it; refuses changes."""
        reference = self.dataset.table(table)
        try:
            raw = self._client.get_table(reference)
        except api_exceptions.NotFound:
            created = bigquery.Table(
                reference,
                schema=[
                    *(_nullable(field) for field in staged),
                    bigquery.SchemaField(LOADED_AT, "TIMESTAMP", mode="REQUIRED"),
                ],
            )
            # Clustering on the export id keeps each load's DELETE to that export's blocks.
            created.clustering_fields = [EXPORT_ID]
            try:
                self._client.create_table(created)
                return ()
            except api_exceptions.Conflict:
                # Created by a concurrent load since we looked: evolve it like any other.
                pass
            except api_exceptions.GoogleAPICallError as error:
                raise LoadError(f"{where}: creating the table failed: {_describe(error)}") from None
            with _google_errors(f"{where}: reading the table"):
                raw = self._client.get_table(reference)
        except api_exceptions.GoogleAPICallError as error:
            raise LoadError(f"{where}: reading the table failed: {_describe(error)}") from None

        # BigQuery column names are case-insensitive.
        existing = {field.name.lower(): field for field in raw.schema}
        changed = [
            f"{field.name} ({_type_name(existing[field.name.lower()])} -> {_type_name(field)})"
            for field in staged
            if field.name.lower() in existing
            and _type_name(existing[field.name.lower()]) != _type_name(field)
        ]
        if changed:
            raise LoadError(
                f"{where}: column type change refused: {', '.join(changed)}; "
                "migrate the table explicitly"
            )
        added = [_nullable(field) for field in staged if field.name.lower() not in existing]
        if added:
            raw.schema = [*raw.schema, *added]
            try:
                # The etag from get_table makes this fail rather than overwrite a concurrent change.
                self._client.update_table(raw, ["schema"])
            except api_exceptions.PreconditionFailed:
                raise LoadError(
                    f"{where}: the table changed while columns were being added; load again"
                ) from None
            except api_exceptions.GoogleAPICallError as error:
                raise LoadError(
                    f"{where}: adding columns {', '.join(f.name for f in added)} failed: "
                    f"{_describe(error)}"
                ) from None
        return tuple(field.name for field in added)

    def _wait(self, job: Any, where: str, step: str) -> Any:
        try:
            return job.result(timeout=self._timeout)
        except api_exceptions.GoogleAPICallError as error:
            raise LoadError(
                f"{where}: {step} failed: {_describe(error)}; details in BigQuery job {job.job_id}"
            ) from None
        except TimeoutError:
            raise LoadError(
                f"{where}: {step} still running after {self._timeout:.0f} s "
                f"(BigQuery job {job.job_id})"
            ) from None


def _load_config() -> bigquery.LoadJobConfig:
    config = bigquery.LoadJobConfig(
        source_format=bigquery.SourceFormat.PARQUET,
        write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE,
        create_disposition=bigquery.CreateDisposition.CREATE_IF_NEEDED,
        decimal_target_types=list(DECIMAL_TARGET_TYPES),
    )
    options = bigquery.ParquetOptions()
    # A Parquet LIST becomes a REPEATED column rather than a RECORD wrapping "list.element".
    options.enable_list_inference = True
    config.parquet_options = options
    return config


def _replace_script(
    dataset: bigquery.DatasetReference, table: str, staging: str, columns: Sequence[str]
) -> str:
    """The transactional replace; the export id is the query parameter ``@export_id``.

    Only identifiers (checked by :func:`_checked_name`) are written into the SQL. The ASSERT
    runs before the transaction: a partition whose rows carry another export id would make
    the DELETE miss them on the next load, so it is refused before anything changes.
    """
    target = _quoted(dataset, table)
    source = _quoted(dataset, staging)
    names = ", ".join(f"`{column}`" for column in columns)
    return f"""ASSERT NOT EXISTS (
  SELECT 1 FROM {source} WHERE {EXPORT_ID} IS DISTINCT FROM @export_id
) AS 'every row of the partition must carry the export id being loaded';
BEGIN
  BEGIN TRANSACTION;
  DELETE FROM {target} WHERE {EXPORT_ID} = @export_id;
  INSERT INTO {target} ({names}, {LOADED_AT})
  SELECT {names}, CURRENT_TIMESTAMP() FROM {source};
  COMMIT TRANSACTION;
EXCEPTION WHEN ERROR THEN
  ROLLBACK TRANSACTION;
  RAISE;
END;
"""


def _quoted(dataset: bigquery.DatasetReference, table: str) -> str:
    return f"`{dataset.project}.{dataset.dataset_id}.{table}`"


def _staging_table(table: str, export_id: str) -> str:
    # Export ids may hold '.' and '-', which table names may not: the digest keeps "a.b" and
    # "a_b" apart.
    digest = hashlib.sha256(export_id.encode()).hexdigest()[:10]
    return f"{_STAGING_PREFIX}{table}__{re.sub(r'[^A-Za-z0-9_]', '_', export_id)}_{digest}"


def _checked_name(where: str, name: str, kind: str) -> str:
    if not _NAME.match(name):
        raise LoadError(
            f"{where}: {kind} name {name!r} is not a plain identifier "
            "(letters, digits and underscores, not starting with a digit)"
        )
    return name


def _nullable(field: bigquery.SchemaField) -> bigquery.SchemaField:
    """The field as a raw-table column: a later partition may lack values, so never REQUIRED."""
    mode = "REPEATED" if field.mode == "REPEATED" else "NULLABLE"
    return bigquery.SchemaField(
        field.name, field.field_type, mode=mode, fields=[_nullable(f) for f in field.fields]
    )


def _type_name(field: bigquery.SchemaField) -> str:
    name = _GOOGLESQL_TYPES.get(field.field_type.upper(), field.field_type.upper())
    if name == "STRUCT":
        name = f"STRUCT<{', '.join(f'{f.name} {_type_name(f)}' for f in field.fields)}>"
    return f"ARRAY<{name}>" if field.mode == "REPEATED" else name


def _describe(error: api_exceptions.GoogleAPICallError) -> str:
    """The error's class, HTTP status and BigQuery reasons: never its message."""
    reasons = sorted(
        {str(e.get("reason")) for e in getattr(error, "errors", None) or [] if e.get("reason")}
    )
    reason = f", reason {', '.join(reasons)}" if reasons else ""
    return f"{type(error).__name__} (HTTP {error.code}{reason})"


@contextmanager
def _google_errors(where: str) -> Iterator[None]:
    try:
        yield
    except api_exceptions.GoogleAPICallError as error:
        raise LoadError(f"{where} failed: {_describe(error)}") from None


def _crc32c(path: Path) -> str:
    import google_crc32c

    checksum = google_crc32c.Checksum()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            checksum.update(chunk)
    return base64.b64encode(checksum.digest()).decode()
