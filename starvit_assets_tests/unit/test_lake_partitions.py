from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from starvit_assets.lake.partitions import PartitionError, RawLake


def test_partition_is_invisible_until_published_and_then_immutable(tmp_path: Path) -> None:
    lake = RawLake(tmp_path)
    data = pa.table({"id": ["a", "b"]})

    lake.stage("things", "e1", data)
    assert lake.partitions("things") == []
    assert not lake.is_published("things", "e1")

    published = lake.publish("things", "e1")
    assert lake.partitions("things") == [("e1", published)]
    assert pq.read_table(published).equals(data)

    lake.stage("things", "e1", pa.table({"id": ["changed"]}))
    with pytest.raises(PartitionError, match="immutable"):
        lake.publish("things", "e1")
    assert pq.read_table(published).equals(data)


def test_restaging_replaces_a_crashed_attempt(tmp_path: Path) -> None:
    lake = RawLake(tmp_path)
    staged = lake.stage("things", "e1", pa.table({"id": ["partial"]}))
    staged.with_name("junk.tmp").write_text("left by a crash")

    lake.stage("things", "e1", pa.table({"id": ["a"]}))
    assert sorted(p.name for p in staged.parent.iterdir()) == ["part-00000.parquet"]


def test_export_ids_cannot_escape_the_lake(tmp_path: Path) -> None:
    with pytest.raises(PartitionError):
        RawLake(tmp_path).staging_dir("things", "../../etc")
