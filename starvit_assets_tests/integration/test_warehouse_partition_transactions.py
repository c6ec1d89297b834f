"""One transaction per partition, through the Dagster glue: ``load_new_partitions`` with the
``PlatformResource``'s PostgreSQL raw warehouse, on the embedded PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import psycopg
import pyarrow as pa
import pytest
from psycopg import sql

from starvit_assets.defs.resources import PlatformResource
from starvit_assets.defs.warehouse import load_new_partitions
from starvit_assets.lake.partitions import RawLake
from starvit_assets.settings import load_settings

pytestmark = pytest.mark.integration

TABLE = "partition_txn_probe"


def _partition(export_id: str, ids: list[str], amount: pa.Array) -> pa.Table:
    return pa.table(
        {
            "thing_id": pa.array(ids),
            "amount": amount,
            "_export_id": pa.array([export_id] * len(ids)),
        }
    )


def test_a_refused_partition_leaves_the_partitions_before_it_committed(
    warehouse_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STARVIT_LAKE_DIR", str(tmp_path / "lake"))
    schema = load_settings().raw_schema
    target = sql.Identifier(schema, TABLE)
    with psycopg.connect(warehouse_dsn, autocommit=True) as connection:
        connection.execute(sql.SQL("drop table if exists {}").format(target))

    lake = RawLake(tmp_path / "lake")
    lake.stage(TABLE, "e1", _partition("e1", ["a", "b", "c"], pa.array([1.5, 2.5, 3.5])))
    lake.publish(TABLE, "e1")
    # The same column as text: the loader refuses a type change.
    lake.stage(TABLE, "e2", _partition("e2", ["d", "e"], pa.array(["1", "2"])))
    lake.publish(TABLE, "e2")

    with pytest.raises(dg.Failure, match=r"amount \(double precision -> text\)"):
        load_new_partitions(PlatformResource(), TABLE)

    # A new connection sees only committed rows: partition e1 stayed, e2 never arrived.
    with psycopg.connect(warehouse_dsn) as connection:
        rows = connection.execute(
            sql.SQL("select _export_id, count(*) from {} group by _export_id").format(target)
        ).fetchall()
    assert rows == [("e1", 3)]
