"""k-anonymity of de-identified rows on their quasi-identifiers (a report, not a gate)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc

PATIENT_QUASI_IDENTIFIERS = ("birth_year", "gender", "postal_code_3")


@dataclass(frozen=True)
class KAnonymityReport:
    k: int
    records: int
    classes: int
    smallest_class: int
    classes_below_k: int
    records_below_k: int

    @property
    def satisfied(self) -> bool:
        return self.records_below_k == 0

    def as_metadata(self) -> dict[str, int | float]:
        share = self.records_below_k / self.records if self.records else 0.0
        return {**asdict(self), "share_below_k": round(share, 4)}


def k_anonymity(table: pa.Table, quasi_identifiers: tuple[str, ...], k: int) -> KAnonymityReport:
    """Equivalence classes over ``quasi_identifiers`` (nulls form their own value)."""
    if table.num_rows == 0:
        return KAnonymityReport(k, 0, 0, 0, 0, 0)
    sizes = (
        table.select(list(quasi_identifiers))
        .group_by(list(quasi_identifiers), use_threads=False)
        .aggregate([([], "count_all")])
        .column("count_all")
    )
    below = pc.less(sizes, k)
    return KAnonymityReport(
        k=k,
        records=table.num_rows,
        classes=len(sizes),
        smallest_class=int(pc.min(sizes).as_py()),
        classes_below_k=int(pc.sum(below).as_py() or 0),
        records_below_k=int(pc.sum(pc.filter(sizes, below)).as_py() or 0),
    )
