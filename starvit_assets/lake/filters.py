"""The record allowlist filter (``filters.yaml``): which flattened records may cross the gate.

It runs on the view's columns before de-identification, so its reasons are about record kinds
(status, missing elements, a research opt-out, dates out of range, security labels), never
about values. Every record held back is counted under exactly one reason: the first rule it
fails, in the order required -> consent -> security labels -> status -> dates.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

DEFAULT_FILTERS = Path(__file__).with_name("filters.yaml")
EXPORT_DATE = "export"


class FilterError(Exception):
    """The filter configuration is invalid or names columns the view does not have."""


class StatusRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    column: str
    allowed: tuple[str, ...]


class DateRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    column: str
    not_before: str | None = None
    not_after: str | Literal["export"] | None = None


class TableFilter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    required: tuple[str, ...] = ()
    status: StatusRule | None = None
    dates: DateRule | None = None
    excluded_security_labels: tuple[str, ...] | None = None
    # The column holding the (PHI-zone) patient id that research opt-outs are matched on;
    # unset: the default's.
    consent_patient_column: str | None = None


class Defaults(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    excluded_security_labels: tuple[str, ...] = ()
    consent_patient_column: str | None = None


class FilterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    version: str
    defaults: Defaults = Defaults()
    tables: dict[str, TableFilter]


SECURITY_LABELS_COLUMN = "security_labels"
RESEARCH_OPT_OUT = "consent: research opt-out"
# The kind of each rule, a coarse code (no column, no value) that may cross the gate as the
# reason of a retraction (lake/deletions.py).
MISSING_ELEMENT = "missing_element"
RESEARCH_OPT_OUT_KIND = "research_opt_out"
SECURITY_LABEL = "security_label"
STATUS = "status"
DATE_RANGE = "date_range"
HOLD_KINDS = (MISSING_ELEMENT, RESEARCH_OPT_OUT_KIND, SECURITY_LABEL, STATUS, DATE_RANGE)


@dataclass(frozen=True)
class FilterOutcome:
    passed: pa.Array  # boolean, one per row
    held_back: Counter[str]
    # Per row, the kind of the rule that held it back (null where it passed).
    held_back_as: pa.Array


@dataclass(frozen=True)
class RecordFilter:
    table: str
    rules: TableFilter
    excluded_labels: tuple[str, ...]
    export_date: dt.date
    consent_column: str | None = None
    # Patients whose research Consent denies research use (lake/consent.py).
    opted_out_patients: frozenset[str] = frozenset()

    def columns(self) -> list[str]:
        named = list(self.rules.required)
        if self.consent_column:
            named.append(self.consent_column)
        if self.rules.status:
            named.append(self.rules.status.column)
        if self.rules.dates:
            named.append(self.rules.dates.column)
        if self.excluded_labels:
            named.append(SECURITY_LABELS_COLUMN)
        return named

    def check_columns(self, view_columns: list[str]) -> None:
        missing = sorted(set(self.columns()) - set(view_columns))
        if missing:
            raise FilterError(
                f"record filter for table {self.table!r} names columns the view does not have: "
                + ", ".join(missing)
            )

    def apply(self, rows: pa.Table) -> FilterOutcome:
        remaining = pa.array([True] * rows.num_rows, pa.bool_())
        held_back: Counter[str] = Counter()
        kinds = pa.nulls(rows.num_rows, pa.string())

        def hold(reason: str, failing: pa.Array, kind: str) -> None:
            nonlocal remaining, kinds
            failing = pc.and_(remaining, pc.fill_null(failing, False))
            count = pc.sum(failing).as_py() or 0
            if count:
                held_back[reason] += count
                remaining = pc.and_(remaining, pc.invert(failing))
                kinds = pc.if_else(failing, pa.scalar(kind, pa.string()), kinds)

        for column in self.rules.required:
            values = rows.column(column)
            empty = pc.equal(pc.utf8_length(values.cast(pa.string())), 0)
            missing = pc.or_(pc.is_null(values), pc.fill_null(empty, False))
            hold(f"missing {column}", missing, MISSING_ELEMENT)
        if self.consent_column and self.opted_out_patients:
            patients = rows.column(self.consent_column).cast(pa.string())
            opted_out = pa.array(sorted(self.opted_out_patients), pa.string())
            hold(RESEARCH_OPT_OUT, pc.is_in(patients, value_set=opted_out), RESEARCH_OPT_OUT_KIND)
        if self.excluded_labels:
            labels = pc.split_pattern(
                pc.fill_null(rows.column(SECURITY_LABELS_COLUMN).cast(pa.string()), ""), " "
            )
            for label in self.excluded_labels:
                hold(f"security label {label}", _contains_label(labels, label), SECURITY_LABEL)
        if self.rules.status:
            status = self.rules.status
            values = rows.column(status.column).cast(pa.string())
            allowed = pc.is_in(values, value_set=pa.array(status.allowed, pa.string()))
            hold(
                f"{status.column} not allowed",
                pc.and_(pc.is_valid(values), pc.invert(allowed)),
                STATUS,
            )
        if self.rules.dates:
            dates = self.rules.dates
            day = pc.utf8_slice_codeunits(rows.column(dates.column).cast(pa.string()), 0, 10)
            if dates.not_before:
                hold(
                    f"{dates.column} before {dates.not_before}",
                    pc.less(day, dates.not_before),
                    DATE_RANGE,
                )
            if dates.not_after:
                bound = (
                    self.export_date.isoformat()
                    if dates.not_after == EXPORT_DATE
                    else dates.not_after
                )
                hold(f"{dates.column} after {dates.not_after}", pc.greater(day, bound), DATE_RANGE)
        return FilterOutcome(passed=remaining, held_back=held_back, held_back_as=kinds)


def _contains_label(labels: pa.Array, label: str) -> pa.Array:
    flat = pc.list_flatten(labels)
    parents = pc.list_parent_indices(labels)
    hits = pc.equal(flat, label)
    rows_with_hit = pc.unique(pc.filter(parents, hits))
    return pc.is_in(
        pa.array(range(len(labels)), pa.int64()), value_set=rows_with_hit.cast(pa.int64())
    )


def load_filters(path: Path | None = None) -> FilterConfig:
    source = path or DEFAULT_FILTERS
    try:
        return FilterConfig.model_validate(yaml.safe_load(source.read_text()))
    except (OSError, yaml.YAMLError) as error:
        raise FilterError(
            f"cannot read the record filter {source}: {type(error).__name__}"
        ) from None
    except ValidationError as error:
        locations = "; ".join(
            f"{'.'.join(str(p) for p in issue['loc'])}: {issue['msg']}" for issue in error.errors()
        )
        raise FilterError(f"invalid record filter {source}: {locations}") from None


def record_filter(
    config: FilterConfig,
    table: str,
    export_date: dt.date,
    opted_out_patients: frozenset[str] = frozenset(),
) -> RecordFilter:
    rules = config.tables.get(table, TableFilter())
    labels = (
        rules.excluded_security_labels
        if rules.excluded_security_labels is not None
        else config.defaults.excluded_security_labels
    )
    return RecordFilter(
        table=table,
        rules=rules,
        excluded_labels=labels,
        export_date=export_date,
        consent_column=rules.consent_patient_column or config.defaults.consent_patient_column,
        opted_out_patients=opted_out_patients,
    )
