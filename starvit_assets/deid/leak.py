"""The PHI-leak detector: salted hashes of identifying values, compared with staged output.

The PHI zone adds every identifying value it exports (names, identifiers, telecom, address
lines, full birth dates, resource ids) as a keyed hash; the gate hashes every string cell of
a staged partition the same way. Only hashes are compared and only (column, row) positions are
reported, so no PHI crosses the boundary to make the check.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

DIGEST_BYTES = 16
# Shorter values (a gender code "F", a state "MA") would flag innocent codes.
MIN_VALUE_LENGTH = 3


@dataclass(frozen=True)
class LeakHit:
    column: str
    row: int


def normalise(value: str) -> str:
    return " ".join(value.split()).casefold()


def identifying_values(patient: dict[str, Any]) -> Iterator[str]:
    """The identifying strings of a FHIR Patient (Safe Harbor classes the views could touch)."""
    if patient.get("id"):
        yield str(patient["id"])
    for name in patient.get("name", []):
        parts = [*name.get("given", []), name.get("family")]
        yield from (str(part) for part in parts if part)
        if name.get("text"):
            yield str(name["text"])
        present = [str(part) for part in parts if part]
        if len(present) > 1:
            yield " ".join(present)
    for identifier in patient.get("identifier", []):
        if identifier.get("value"):
            yield str(identifier["value"])
    for telecom in patient.get("telecom", []):
        if telecom.get("value"):
            yield str(telecom["value"])
    for address in patient.get("address", []):
        yield from (str(line) for line in address.get("line", []))
        for field in ("city", "postalCode", "text"):
            if address.get(field):
                yield str(address[field])
    if patient.get("birthDate"):
        yield str(patient["birthDate"])


class LeakHashSet:
    def __init__(self, key: bytes, digests: set[bytes] | None = None) -> None:
        self._salt = hmac.new(key, b"leak-salt", hashlib.sha256).digest()
        self._digests = digests if digests is not None else set()

    def __len__(self) -> int:
        return len(self._digests)

    def _digest(self, value: str) -> bytes:
        return hashlib.blake2b(
            normalise(value).encode(), key=self._salt, digest_size=DIGEST_BYTES
        ).digest()

    def add(self, value: str) -> None:
        if len(normalise(value)) >= MIN_VALUE_LENGTH:
            self._digests.add(self._digest(value))

    def add_patient(self, patient: dict[str, Any]) -> None:
        for value in identifying_values(patient):
            self.add(value)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_bytes(b"".join(sorted(self._digests)))
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: Path, key: bytes) -> LeakHashSet:
        data = path.read_bytes()
        digests = {data[i : i + DIGEST_BYTES] for i in range(0, len(data), DIGEST_BYTES)}
        return cls(key, digests)

    def find_leaks_in_parquet(self, path: Path, batch_rows: int = 50_000) -> list[LeakHit]:
        """``find_leaks`` over a Parquet file one batch at a time; rows count from the file's
        first row."""
        import pyarrow.parquet as pq

        hits: list[LeakHit] = []
        offset = 0
        for record_batch in pq.ParquetFile(path).iter_batches(batch_rows):
            batch = pa.Table.from_batches([record_batch])
            hits.extend(
                LeakHit(column=hit.column, row=hit.row + offset) for hit in self.find_leaks(batch)
            )
            offset += batch.num_rows
        return hits

    def find_leaks(self, table: pa.Table) -> list[LeakHit]:
        hits: list[LeakHit] = []
        for field in table.schema:
            if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
                continue
            column = table.column(field.name).combine_chunks()
            distinct = pc.unique(column).drop_null().to_pylist()
            leaked = [value for value in distinct if self._digest(value) in self._digests]
            if not leaked:
                continue
            mask = pc.is_in(column, value_set=pa.array(leaked, column.type))
            rows = pc.indices_nonzero(pc.fill_null(mask, False)).to_pylist()
            hits.extend(LeakHit(column=field.name, row=row) for row in rows)
        return hits
