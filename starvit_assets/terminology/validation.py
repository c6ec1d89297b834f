"""Validate and map the (system, code) pairs the warehouse holds; summarise per code system.

Pure logic over a ``TerminologyService``: which raw columns carry codes, which code systems
are mapped to which (ConceptMap ``$translate``), the validation table's rows and the share of
valid codes per code system that the asset check judges.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from starvit_assets.clinical.terminology import CODE_SYSTEMS
from starvit_assets.terminology.model import Coding, TerminologyService, TranslateRequest

_URI = {system.short_name: system.uri for system in CODE_SYSTEMS}
SNOMED = _URI["snomed"]
ICD10CM = _URI["icd10cm"]
RXNORM = _URI["rxnorm"]
LOINC = _URI["loinc"]
CVX = _URI["cvx"]


@dataclass(frozen=True)
class CodeColumn:
    """Where a raw table holds codes: the code column, and the system column or the one
    system the view's FHIRPath selected (``coding.where(system=...)``)."""

    table: str
    code_column: str
    system_column: str | None = None
    system: str | None = None


# The coded columns of the warehouse raw tables (docs/raw-tables.md). A table that is not
# loaded yet is skipped, so a new table can be listed before its first export.
CODE_COLUMNS: tuple[CodeColumn, ...] = (
    CodeColumn("observation", "code", system_column="code_system"),
    CodeColumn("condition", "snomed_code", system=SNOMED),
    CodeColumn("condition", "icd10_code", system=ICD10CM),
    CodeColumn("medication_request", "rxnorm_code", system=RXNORM),
    CodeColumn("encounter", "type_code", system_column="type_system"),
    CodeColumn("procedure", "snomed_code", system=SNOMED),
    CodeColumn("immunization", "cvx_code", system=CVX),
    CodeColumn("allergy_intolerance", "snomed_code", system=SNOMED),
    CodeColumn("allergy_intolerance", "reaction_snomed_code", system=SNOMED),
)

# Source system -> the system its codes are translated to ($translate targetsystem).
MAP_TARGETS: Mapping[str, str] = {SNOMED: ICD10CM}


@dataclass(frozen=True)
class CodeOccurrence:
    system: str
    code: str
    occurrences: int
    tables: tuple[str, ...]


@dataclass(frozen=True)
class CodeValidationRow:
    code_system: str
    code: str
    is_valid: bool
    system_known: bool
    display: str | None
    message: str | None
    mapped_system: str | None
    mapped_code: str | None
    mapped_display: str | None
    map_equivalence: str | None
    occurrences: int
    source_tables: str
    terminology_service: str


COLUMNS = tuple(CodeValidationRow.__dataclass_fields__)


def merge_occurrences(
    counts: Iterable[tuple[str, str, str, int]],
) -> list[CodeOccurrence]:
    """(table, system, code, rows) from each coded column -> one entry per (system, code)."""
    totals: dict[tuple[str, str], int] = {}
    tables: dict[tuple[str, str], set[str]] = {}
    for table, system, code, rows in counts:
        key = (system, code)
        totals[key] = totals.get(key, 0) + rows
        tables.setdefault(key, set()).add(table)
    return [
        CodeOccurrence(system, code, totals[(system, code)], tuple(sorted(tables[(system, code)])))
        for system, code in sorted(totals)
    ]


def validate_and_map(
    service: TerminologyService,
    occurrences: Sequence[CodeOccurrence],
    map_targets: Mapping[str, str] = MAP_TARGETS,
) -> list[CodeValidationRow]:
    """Every code validated against its system; valid codes of a mapped system translated."""
    codings = [Coding(item.system, item.code) for item in occurrences]
    validations = service.validate_codes(codings)
    to_map = [
        index
        for index, (item, validation) in enumerate(zip(occurrences, validations, strict=True))
        if validation.valid and item.system in map_targets
    ]
    translations = service.translate_many(
        [
            TranslateRequest(codings[index], target_system=map_targets[codings[index].system])
            for index in to_map
        ]
    )
    best = {
        index: translation.best() for index, translation in zip(to_map, translations, strict=True)
    }
    rows = []
    for index, (item, validation) in enumerate(zip(occurrences, validations, strict=True)):
        match = best.get(index)
        rows.append(
            CodeValidationRow(
                code_system=item.system,
                code=item.code,
                is_valid=validation.valid,
                system_known=validation.system_known,
                display=validation.display,
                message=validation.message,
                mapped_system=match.target.system if match else None,
                mapped_code=match.target.code if match else None,
                mapped_display=match.target.display if match else None,
                map_equivalence=match.equivalence if match else None,
                occurrences=item.occurrences,
                source_tables=",".join(item.tables),
                terminology_service=service.description,
            )
        )
    return rows


@dataclass(frozen=True)
class SystemShare:
    code_system: str
    system_known: bool
    codes: int
    valid_codes: int
    occurrences: int
    valid_occurrences: int

    @property
    def valid_share(self) -> float:
        return self.valid_occurrences / self.occurrences if self.occurrences else 1.0


@dataclass(frozen=True)
class ShareVerdict:
    passed: bool
    systems: tuple[SystemShare, ...]
    below_threshold: tuple[str, ...]
    unknown_system_share: float
    description: str


def shares_by_system(rows: Iterable[CodeValidationRow]) -> list[SystemShare]:
    grouped: dict[str, list[CodeValidationRow]] = {}
    for row in rows:
        grouped.setdefault(row.code_system, []).append(row)
    return [
        SystemShare(
            code_system=system,
            system_known=all(row.system_known for row in members),
            codes=len(members),
            valid_codes=sum(row.is_valid for row in members),
            occurrences=sum(row.occurrences for row in members),
            valid_occurrences=sum(row.occurrences for row in members if row.is_valid),
        )
        for system, members in sorted(grouped.items())
    ]


def judge_shares(
    shares: Sequence[SystemShare], *, min_valid_share: float, max_unknown_system_share: float
) -> ShareVerdict:
    """Passed when every known code system has at least ``min_valid_share`` of its coded rows
    valid and at most ``max_unknown_system_share`` of all coded rows use an unknown system.

    Unknown systems are judged as one pool: each is by definition 0 % valid, so a per-system
    threshold would fail on a single stray row."""
    known = [share for share in shares if share.system_known]
    below = tuple(s.code_system for s in known if s.valid_share < min_valid_share)
    total = sum(share.occurrences for share in shares)
    unknown = sum(share.occurrences for share in shares if not share.system_known)
    unknown_share = unknown / total if total else 0.0
    passed = not below and unknown_share <= max_unknown_system_share
    parts = [f"{len(known)} known code system(s), {len(shares) - len(known)} unknown"]
    if below:
        parts.append(f"below {min_valid_share:.0%} valid: {', '.join(below)}")
    parts.append(
        f"{unknown_share:.2%} of coded rows in an unknown system (limit {max_unknown_system_share:.0%})"
    )
    return ShareVerdict(
        passed=passed,
        systems=tuple(shares),
        below_threshold=below,
        unknown_system_share=unknown_share,
        description="; ".join(parts),
    )
