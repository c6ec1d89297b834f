"""The raw Parquet layer: immutable partitions per export, written to staging, then published.

A partition is published by renaming its staged folder into place, which is atomic on one
filesystem: readers see either the whole partition or none of it, and a crash mid-write
leaves only a staging folder that the next attempt replaces.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

LAYER = "deid_raw"
QUARANTINE_LAYER = "deid_quarantine"
PART_FILE = "part-00000.parquet"
_EXPORT_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class PartitionError(Exception):
    """A partition could not be written or published."""


@dataclass(frozen=True)
class RawLake:
    root: Path
    layer: str = LAYER

    def published_dir(self, table: str, export_id: str) -> Path:
        return self.root / self.layer / table / f"export_id={_checked(export_id)}"

    def staging_dir(self, table: str, export_id: str) -> Path:
        return self.root / "_staging" / self.layer / table / f"export_id={_checked(export_id)}"

    def is_published(self, table: str, export_id: str) -> bool:
        return (self.published_dir(table, export_id) / PART_FILE).is_file()

    def prepare_staging(self, table: str, export_id: str) -> Path:
        """An empty staging folder for the partition; returns where its part file goes."""
        staging = self.staging_dir(table, export_id)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        return staging / PART_FILE

    def stage(self, table: str, export_id: str, data: pa.Table) -> Path:
        path = self.prepare_staging(table, export_id)
        pq.write_table(data, path, compression="zstd")
        return path

    def publish(self, table: str, export_id: str) -> Path:
        staging = self.staging_dir(table, export_id)
        target = self.published_dir(table, export_id)
        if not (staging / PART_FILE).is_file():
            raise PartitionError(f"{table}: no staged partition for export {export_id}")
        if target.exists():
            raise PartitionError(
                f"{table}: partition for export {export_id} is already published and immutable"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(target)
        return target / PART_FILE

    def discard_staged(self, table: str, export_id: str) -> None:
        shutil.rmtree(self.staging_dir(table, export_id), ignore_errors=True)

    def partitions(self, table: str) -> list[tuple[str, Path]]:
        """Published partitions of ``table`` as (export id, parquet file), oldest export first."""
        folder = self.root / self.layer / table
        if not folder.is_dir():
            return []
        found = []
        for child in sorted(folder.iterdir()):
            if child.name.startswith("export_id=") and (child / PART_FILE).is_file():
                found.append((child.name.removeprefix("export_id="), child / PART_FILE))
        return found


def _checked(export_id: str) -> str:
    if not _EXPORT_ID.match(export_id):
        raise PartitionError("export id may hold only letters, digits, '.', '_' and '-'")
    return export_id
