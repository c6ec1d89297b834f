"""COPY loader against the real embedded PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from starvit_assets.warehouse.loader import LoadError, load_partition, loaded_row_counts

SCHEMA = "loader_test_raw"


def _parquet(tmp_path: Path, name: str, table: pa.Table) -> Path:
    path = tmp_path / f"{name}.parquet"
    pq.write_table(table, path)
    return path


def _partition(
    export_id: str, ids: list[str], extra: dict[str, pa.Array] | None = None
) -> pa.Table:
    columns: dict[str, pa.Array] = {
        "thing_id": pa.array(ids),
        "note": pa.array(["", None] + ['x,"quoted"\n'] * (len(ids) - 2)),
        "amount": pa.array([1.5] * len(ids)),
        "_export_id": pa.array([export_id] * len(ids)),
    }
    columns.update(extra or {})
    return pa.table(columns)


@pytest.fixture()
def connection(warehouse_dsn: str) -> psycopg.Connection:
    with psycopg.connect(warehouse_dsn) as connection:
        connection.execute(f"drop schema if exists {SCHEMA} cascade")
        connection.commit()
        yield connection


def test_load_is_idempotent_per_partition_and_keeps_nulls_apart_from_empty_strings(
    connection: psycopg.Connection, tmp_path: Path
) -> None:
    first = _parquet(tmp_path, "e1", _partition("e1", ["a", "b", "c"]))
    second = _parquet(tmp_path, "e2", _partition("e2", ["d", "e"]))
    load_partition(connection, SCHEMA, "things", "e1", first)
    load_partition(connection, SCHEMA, "things", "e2", second)
    load_partition(connection, SCHEMA, "things", "e1", first)

    assert loaded_row_counts(connection, SCHEMA, "things") == {"e1": 3, "e2": 2}
    notes = connection.execute(
        f"select note from {SCHEMA}.things where _export_id = 'e1' order by thing_id"
    ).fetchall()
    assert [row[0] for row in notes] == ["", None, 'x,"quoted"\n']


def test_new_nullable_column_is_added(connection: psycopg.Connection, tmp_path: Path) -> None:
    load_partition(
        connection, SCHEMA, "things", "e1", _parquet(tmp_path, "e1", _partition("e1", ["a", "b"]))
    )
    wider = _partition("e2", ["c", "d"], {"colour": pa.array(["red", None])})
    result = load_partition(connection, SCHEMA, "things", "e2", _parquet(tmp_path, "e2", wider))

    assert result.added_columns == ("colour",)
    rows = connection.execute(
        f"select thing_id, colour from {SCHEMA}.things order by thing_id"
    ).fetchall()
    assert rows == [("a", None), ("b", None), ("c", "red"), ("d", None)]


def test_type_change_is_refused_and_leaves_the_table_as_it_was(
    connection: psycopg.Connection, tmp_path: Path
) -> None:
    load_partition(
        connection, SCHEMA, "things", "e1", _parquet(tmp_path, "e1", _partition("e1", ["a", "b"]))
    )
    changed = _partition("e2", ["c", "d"], {"amount": pa.array(["1", "2"])})

    with pytest.raises(LoadError, match=r"amount \(double precision -> text\)"):
        load_partition(connection, SCHEMA, "things", "e2", _parquet(tmp_path, "e2", changed))
    assert loaded_row_counts(connection, SCHEMA, "things") == {"e1": 2}
