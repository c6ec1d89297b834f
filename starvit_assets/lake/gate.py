"""The de-identification gate for one table: staged NDJSON in, de-identified Arrow tables out.

Flattening (ViewDefinition), the record filter, de-identification (policy) and the row-level
contract happen here, in memory. Every input line ends in exactly one place:

- a line that is not JSON, or not a resource of the view's type, is quarantined (lineage only);
- a resource the view yields no row for is counted as ``resources_without_rows``;
- every flattened row is published, quarantined with a reason, or held back by the record
  filter and counted by reason.

Only the returned tables, which hold de-identified columns and lineage, may be written to the
lake; reasons name columns and rules, never values.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from starvit_assets.deid.engine import FHIR_TEMPORAL_PATTERN, DeidBackend, content_hash
from starvit_assets.deid.policy import Policy
from starvit_assets.lake.contracts import (
    CONTRACTS,
    TableContract,
    later_duplicates,
    row_violations,
)
from starvit_assets.lake.filters import FilterConfig, RecordFilter, load_filters, record_filter
from starvit_assets.views.runner import CompiledView, ViewDefinitionError, compile_view
from starvit_assets.views.vectorized import compile_vectorized

BATCH_LINES = 20_000
COMPRESSION = "zstd"
_READ_BLOCK = 8 << 20
QUARANTINE_REASON = "_quarantine_reason"
_TEMPORAL_METHODS = ("date_shift", "generalise")


class GateError(Exception):
    """Input that cannot cross the gate at all; the message names file and line, never content."""


def lineage_schema() -> pa.Schema:
    return pa.schema(
        [
            ("_export_id", pa.string()),
            ("_source_file", pa.string()),
            ("_source_line", pa.int64()),
            ("_content_hash", pa.string()),
            ("_policy_version", pa.string()),
        ]
    )


@dataclass(frozen=True)
class GateCounts:
    """What the gate did with every line and row; saved beside the partition (holds no PHI)."""

    resources_read: int
    resources_with_rows: int
    resources_without_rows: int
    lines_quarantined: int
    rows_flattened: int
    rows_published: int
    rows_quarantined: int
    held_back: dict[str, int]
    quarantine_reasons: dict[str, int]
    reconciles: bool

    FILE: ClassVar[str] = "gate-counts.json"

    @property
    def rows_held_back(self) -> int:
        return sum(self.held_back.values())

    def save(self, folder: Path) -> None:
        (folder / self.FILE).write_text(json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def load(cls, folder: Path) -> GateCounts:
        return cls(**json.loads((folder / cls.FILE).read_text()))


@dataclass(frozen=True)
class GateResult:
    output: Path
    quarantine_output: Path
    rows: int
    rows_quarantined: int
    resources_read: int
    resources_with_rows: int
    resources_without_rows: int
    lines_quarantined: int
    rows_flattened: int
    held_back: dict[str, int]
    quarantine_reasons: dict[str, int]
    flattened_by: str

    @property
    def table(self) -> pa.Table:
        return pq.read_table(self.output)

    @property
    def quarantine(self) -> pa.Table:
        return pq.read_table(self.quarantine_output)

    @property
    def rows_held_back(self) -> int:
        return sum(self.held_back.values())

    def reconciles(self) -> bool:
        """Every line and every flattened row is accounted for exactly once."""
        lines = self.resources_with_rows + self.resources_without_rows + self.lines_quarantined
        rows = self.rows + self.rows_quarantined + self.rows_held_back
        return self.resources_read == lines and self.rows_flattened == rows

    def counts(self) -> GateCounts:
        return GateCounts(
            resources_read=self.resources_read,
            resources_with_rows=self.resources_with_rows,
            resources_without_rows=self.resources_without_rows,
            lines_quarantined=self.lines_quarantined,
            rows_flattened=self.rows_flattened,
            rows_published=self.rows,
            rows_quarantined=self.rows_quarantined,
            held_back=self.held_back,
            quarantine_reasons=self.quarantine_reasons,
            reconciles=self.reconciles(),
        )


@dataclass
class _Lines:
    data: list[bytes] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    numbers: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class _Flattened:
    table: pa.Table
    resource_index: pa.Array
    # Per line: None when the line is fine, else why it cannot be flattened.
    line_problems: list[str | None]


@dataclass(frozen=True)
class Gate:
    table_name: str
    view: dict[str, Any]
    backend: DeidBackend
    policy: Policy
    record_filter: RecordFilter
    key: bytes

    @cached_property
    def compiled(self) -> CompiledView:
        return compile_view(self.view)

    @cached_property
    def contract(self) -> TableContract:
        return CONTRACTS[self.table_name]

    @cached_property
    def _temporal_columns(self) -> list[str]:
        rules = self.policy.table(self.table_name).columns
        return [
            name
            for name, rule in rules.items()
            if rule.method == "date_shift"
            or (rule.method == "generalise" and rule.kind == "birth_year")
        ]

    def run(
        self, files: Sequence[Path], export_id: str, output: Path, quarantine_output: Path
    ) -> GateResult:
        """Write the publishable rows to ``output`` and the quarantine to ``quarantine_output``.

        Two passes keep memory bounded by one batch plus the key column: the first flattens,
        filters and de-identifies batch by batch into a scratch file; the second, knowing every
        key, applies the row-level contract and splits the rows between the two outputs.
        """
        self.policy.table(self.table_name).check_covers(self.compiled.column_names, self.table_name)
        self.record_filter.check_columns(self.compiled.column_names)
        vectorized = compile_vectorized(self.view)
        deidentified_schema = self.backend.deidentify(
            self.table_name, self.compiled.arrow_schema().empty_table()
        ).schema
        scratch_schema = pa.schema(
            [*deidentified_schema, *lineage_schema(), pa.field(QUARANTINE_REASON, pa.string())]
        )
        scratch = output.with_name(output.name + ".scratch")
        held_back: Counter[str] = Counter()
        quarantine_reasons: Counter[str] = Counter()
        keys: list[pa.Array] = []
        resources_read = resources_with_rows = resources_without_rows = 0
        lines_quarantined = rows_flattened = rows_published = rows_quarantined = 0
        try:
            with (
                pq.ParquetWriter(scratch, scratch_schema, compression="none") as scratch_writer,
                pq.ParquetWriter(
                    quarantine_output, scratch_schema, compression=COMPRESSION
                ) as quarantine_writer,
            ):
                for lines in _read_lines(files):
                    resources_read += len(lines)
                    flat = self._flatten(lines, vectorized)
                    rows_flattened += flat.table.num_rows
                    with_rows = set(pc.unique(flat.resource_index).to_pylist())
                    resources_with_rows += len(with_rows)
                    resources_without_rows += sum(
                        1
                        for index, problem in enumerate(flat.line_problems)
                        if problem is None and index not in with_rows
                    )
                    lineage = self._lineage(lines, export_id)
                    outcome = self.record_filter.apply(flat.table)
                    held_back.update(outcome.held_back)
                    rows, reasons = self._null_malformed_dates(flat.table.filter(outcome.passed))
                    deidentified = self.backend.deidentify(self.table_name, rows)
                    row_lineage = lineage.take(pc.filter(flat.resource_index, outcome.passed))
                    batch = pa.Table.from_arrays(
                        [*deidentified.columns, *row_lineage.columns, reasons],
                        schema=scratch_schema,
                    )
                    scratch_writer.write_table(batch)
                    keys.append(deidentified.column(self.contract.key).combine_chunks())
                    problem_lines = [i for i, problem in enumerate(flat.line_problems) if problem]
                    if problem_lines:
                        lines_quarantined += len(problem_lines)
                        line_reasons = [str(flat.line_problems[i]) for i in problem_lines]
                        quarantine_reasons.update(line_reasons)
                        quarantine_writer.write_table(
                            _lineage_only(
                                lineage.take(pa.array(problem_lines, pa.int64())),
                                pa.array(line_reasons, pa.string()),
                                scratch_schema,
                            )
                        )
                scratch_writer.close()  # the second pass reads what the first wrote
                duplicates = later_duplicates(
                    pa.concat_arrays([key.cast(pa.string()) for key in keys])
                    if keys
                    else pa.array([], pa.string())
                )
                del keys
                with pq.ParquetWriter(
                    output, _output_schema(scratch_schema), compression=COMPRESSION
                ) as output_writer:
                    offset = 0
                    for record_batch in pq.ParquetFile(scratch).iter_batches(BATCH_LINES):
                        batch = pa.Table.from_batches([record_batch], schema=scratch_schema)
                        reason = pc.coalesce(
                            batch.column(QUARANTINE_REASON),
                            row_violations(
                                self.contract,
                                batch,
                                duplicates=duplicates.slice(offset, batch.num_rows),
                            ),
                        )
                        offset += batch.num_rows
                        bad = pc.is_valid(reason)
                        batch = batch.set_column(
                            batch.schema.get_field_index(QUARANTINE_REASON),
                            scratch_schema.field(QUARANTINE_REASON),
                            reason,
                        )
                        good = batch.filter(pc.invert(bad)).drop_columns([QUARANTINE_REASON])
                        quarantined = batch.filter(bad)
                        output_writer.write_table(good)
                        quarantine_writer.write_table(quarantined)
                        rows_published += good.num_rows
                        rows_quarantined += quarantined.num_rows
                        quarantine_reasons.update(
                            str(value)
                            for value in quarantined.column(QUARANTINE_REASON).to_pylist()
                        )
        finally:
            scratch.unlink(missing_ok=True)
        return GateResult(
            output=output,
            quarantine_output=quarantine_output,
            rows=rows_published,
            rows_quarantined=rows_quarantined,
            resources_read=resources_read,
            resources_with_rows=resources_with_rows,
            resources_without_rows=resources_without_rows,
            lines_quarantined=lines_quarantined,
            rows_flattened=rows_flattened,
            held_back=dict(sorted(held_back.items())),
            quarantine_reasons=dict(sorted(quarantine_reasons.items())),
            flattened_by="vectorized" if vectorized is not None else "general",
        )

    def _flatten(self, lines: _Lines, vectorized: Any) -> _Flattened:
        if vectorized is not None:
            try:
                batch = vectorized.flatten(lines.data)
            except ValueError:
                pass  # a line is not JSON: the general path finds and quarantines it
            else:
                wrong = pc.not_equal(batch.resource_types, self.compiled.resource_type)
                problems: list[str | None] = [
                    self._wrong_type() if is_wrong else None
                    for is_wrong in pc.fill_null(wrong, True).to_pylist()
                ]
                keep = pc.invert(pc.is_in(batch.resource_index, _indices(problems)))
                return _Flattened(
                    batch.table.filter(keep), pc.filter(batch.resource_index, keep), problems
                )
        return self._flatten_general(lines)

    def _flatten_general(self, lines: _Lines) -> _Flattened:
        view = self.compiled
        columns: dict[str, list[object]] = {name: [] for name in view.column_names}
        resource_index: list[int] = []
        problems: list[str | None] = []
        for index, line in enumerate(lines.data):
            try:
                resource = json.loads(line)
            except json.JSONDecodeError:
                problems.append("line: not valid JSON")
                continue
            if not isinstance(resource, dict) or resource.get("resourceType") != view.resource_type:
                problems.append(self._wrong_type())
                continue
            try:
                rows = view.rows(resource)
            except ViewDefinitionError:
                problems.append("line: the view cannot be evaluated on this resource")
                continue
            problems.append(None)
            for row in rows:
                for name in view.column_names:
                    columns[name].append(row.get(name))
                resource_index.append(index)
        return _Flattened(
            pa.table(columns, schema=view.arrow_schema()),
            pa.array(resource_index, pa.int64()),
            problems,
        )

    def _wrong_type(self) -> str:
        return f"line: resource type is not {self.compiled.resource_type}"

    def _lineage(self, lines: _Lines, export_id: str) -> pa.Table:
        count = len(lines)
        return pa.table(
            {
                "_export_id": pa.array([export_id] * count, pa.string()),
                "_source_file": pa.array(lines.files, pa.string()),
                "_source_line": pa.array(lines.numbers, pa.int64()),
                "_content_hash": pa.array(
                    [content_hash(self.key, line) for line in lines.data], pa.string()
                ),
                "_policy_version": pa.array([self.policy.version] * count, pa.string()),
            },
            schema=lineage_schema(),
        )

    def _null_malformed_dates(self, rows: pa.Table) -> tuple[pa.Table, pa.Array]:
        """Dates the policy must shift or generalise but cannot parse: the value is dropped and
        the row quarantined, so one bad date never stops a partition nor crosses unshifted."""
        reason = pa.nulls(rows.num_rows, pa.string())
        for name in self._temporal_columns:
            values = rows.column(name).cast(pa.string())
            malformed = pc.and_(
                pc.is_valid(values),
                pc.invert(
                    pc.fill_null(pc.match_substring_regex(values, FHIR_TEMPORAL_PATTERN), False)
                ),
            )
            malformed = pc.or_(malformed, _impossible_dates(values))
            if pc.any(malformed).as_py():
                reason = pc.coalesce(
                    reason,
                    pc.if_else(
                        malformed,
                        pa.scalar(f"{name}: not a FHIR date"),
                        pa.scalar(None, pa.string()),
                    ),
                )
                rows = rows.set_column(
                    rows.schema.get_field_index(name),
                    rows.schema.field(name),
                    pc.if_else(malformed, pa.scalar(None, values.type), values).cast(
                        rows.schema.field(name).type
                    ),
                )
        return rows, reason


def _output_schema(scratch_schema: pa.Schema) -> pa.Schema:
    return scratch_schema.remove(scratch_schema.get_field_index(QUARANTINE_REASON))


def _lineage_only(lineage: pa.Table, reasons: pa.Array, schema: pa.Schema) -> pa.Table:
    """Quarantine rows for lines that never became a row: lineage and reason, nothing else."""
    columns = {name: lineage.column(name) for name in lineage.column_names}
    arrays = [
        columns[field.name]
        if field.name in columns
        else reasons
        if field.name == QUARANTINE_REASON
        else pa.nulls(len(reasons), field.type)
        for field in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def _impossible_dates(values: pa.ChunkedArray) -> pa.Array:
    """Full dates that match the pattern but name no calendar day (2023-02-30)."""
    days = pc.utf8_slice_codeunits(values, 0, 10)
    full = pc.fill_null(pc.equal(pc.utf8_length(days), 10), False)
    candidates = pc.if_else(full, days, pa.scalar(None, pa.string()))
    # strptime rolls 2023-02-30 over to March: only a round trip tells a real day.
    parsed = pc.strptime(candidates, "%Y-%m-%d", "s", error_is_null=True)
    round_trip = pc.cast(pc.cast(parsed, pa.date32()), pa.string())
    return pc.and_(full, pc.fill_null(pc.not_equal(round_trip, candidates), True))


def _indices(problems: list[str | None]) -> pa.Array:
    return pa.array([i for i, problem in enumerate(problems) if problem], pa.int64())


def _read_lines(files: Sequence[Path]) -> Iterator[_Lines]:
    """Non-empty lines in batches of ``BATCH_LINES``, with their file and line number."""
    batch = _Lines()
    for path in files:
        number = 0
        for block in _line_blocks(path):
            numbers = range(number + 1, number + 1 + len(block))
            number += len(block)
            stripped = [line.rstrip(b"\r") for line in block]
            kept = [(n, line) for n, line in zip(numbers, stripped, strict=True) if line.strip()]
            while kept:
                room = BATCH_LINES - len(batch)
                taken, kept = kept[:room], kept[room:]
                batch.data.extend(line for _, line in taken)
                batch.numbers.extend(n for n, _ in taken)
                batch.files.extend([path.name] * len(taken))
                if len(batch) >= BATCH_LINES:
                    yield batch
                    batch = _Lines()
    if batch:
        yield batch


def _line_blocks(path: Path) -> Iterator[list[bytes]]:
    """The file's lines, a block at a time (the last line may lack its newline)."""
    remainder = b""
    with path.open("rb") as handle:
        while block := handle.read(_READ_BLOCK):
            lines = (remainder + block).split(b"\n")
            remainder = lines.pop()
            yield lines
    if remainder:
        yield [remainder]


def build_gate(
    *,
    table_name: str,
    view: dict[str, Any],
    backend: DeidBackend,
    policy: Policy,
    key: bytes,
    export_date: dt.date,
    filters: FilterConfig | None = None,
) -> Gate:
    return Gate(
        table_name=table_name,
        view=view,
        backend=backend,
        policy=policy,
        record_filter=record_filter(filters or load_filters(), table_name, export_date),
        key=key,
    )
