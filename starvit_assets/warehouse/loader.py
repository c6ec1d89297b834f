"""Loads raw Parquet partitions into the warehouse raw schema with COPY (psycopg 3).

One transaction per partition: the rows of the partition's export are deleted and copied
again, so a re-run replaces exactly that partition and a crash leaves the previous state.
Schema evolution: a new nullable column is added; a changed column type is refused.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from psycopg import sql

LOADED_AT = "_loaded_at"
EXPORT_ID = "_export_id"
_COPY_BATCH_ROWS = 50_000


class LoadError(Exception):
    """A partition could not be loaded; the message names the table and the reason."""


@dataclass(frozen=True)
class LoadResult:
    table: str
    export_id: str
    rows: int
    added_columns: tuple[str, ...]


def postgres_type(arrow_type: pa.DataType) -> str:
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "text"
    if pa.types.is_boolean(arrow_type):
        return "boolean"
    if pa.types.is_int64(arrow_type):
        return "bigint"
    if pa.types.is_integer(arrow_type):
        return "integer"
    if pa.types.is_floating(arrow_type):
        return "double precision"
    raise LoadError(f"no warehouse type for Arrow type {arrow_type}")


def load_partition(
    connection: psycopg.Connection, schema: str, table: str, export_id: str, parquet_path: Path
) -> LoadResult:
    data = pq.read_table(parquet_path)
    with connection.transaction():
        connection.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(schema)))
        added = _ensure_table(connection, schema, table, data.schema)
        target = sql.Identifier(schema, table)
        connection.execute(
            sql.SQL("delete from {} where {} = %s").format(target, sql.Identifier(EXPORT_ID)),
            (export_id,),
        )
        columns = sql.SQL(", ").join(sql.Identifier(name) for name in data.column_names)
        copy_statement = sql.SQL("copy {} ({}) from stdin with (format csv)").format(
            target, columns
        )
        with connection.cursor() as cursor, cursor.copy(copy_statement) as copy:
            for batch in data.to_batches(max_chunksize=_COPY_BATCH_ROWS):
                buffer = io.BytesIO()
                pa_csv.write_csv(batch, buffer, pa_csv.WriteOptions(include_header=False))
                copy.write(buffer.getvalue())
    return LoadResult(table=table, export_id=export_id, rows=data.num_rows, added_columns=added)


def loaded_row_counts(connection: psycopg.Connection, schema: str, table: str) -> dict[str, int]:
    """Rows per export id currently in the warehouse table (empty if the table is absent)."""
    if not _table_exists(connection, schema, table):
        return {}
    rows = connection.execute(
        sql.SQL("select {0}, count(*) from {1} group by {0}").format(
            sql.Identifier(EXPORT_ID), sql.Identifier(schema, table)
        )
    ).fetchall()
    return {str(export_id): int(count) for export_id, count in rows}


def _ensure_table(
    connection: psycopg.Connection, schema: str, table: str, arrow_schema: pa.Schema
) -> tuple[str, ...]:
    wanted = {field.name: postgres_type(field.type) for field in arrow_schema}
    if not _table_exists(connection, schema, table):
        columns = [
            sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(pg_type))
            for name, pg_type in wanted.items()
        ]
        columns.append(
            sql.SQL("{} timestamptz not null default now()").format(sql.Identifier(LOADED_AT))
        )
        connection.execute(
            sql.SQL("create table {} ({})").format(
                sql.Identifier(schema, table), sql.SQL(", ").join(columns)
            )
        )
        connection.execute(
            sql.SQL("create index on {} ({})").format(
                sql.Identifier(schema, table), sql.Identifier(EXPORT_ID)
            )
        )
        return ()
    existing: dict[str, str] = dict(
        connection.execute(
            "select column_name, data_type from information_schema.columns "
            "where table_schema = %s and table_name = %s",
            (schema, table),
        ).fetchall()
    )
    changed = [
        f"{name} ({existing[name]} -> {pg_type})"
        for name, pg_type in wanted.items()
        if name in existing and existing[name] != pg_type
    ]
    if changed:
        raise LoadError(
            f"{schema}.{table}: column type change refused: {', '.join(changed)}; "
            "migrate the table explicitly"
        )
    added = tuple(name for name in wanted if name not in existing)
    for name in added:
        connection.execute(
            sql.SQL("alter table {} add column {} {}").format(
                sql.Identifier(schema, table), sql.Identifier(name), sql.SQL(wanted[name])
            )
        )
    return added


def _table_exists(connection: psycopg.Connection, schema: str, table: str) -> bool:
    row = connection.execute(
        "select 1 from information_schema.tables where table_schema = %s and table_name = %s",
        (schema, table),
    ).fetchone()
    return row is not None
