"""The de-identification gate for one table: staged NDJSON in, de-identified Arrow tables out.

Flattening (ViewDefinition), the record filter, de-identification (policy) and the row-level
contract happen here, in memory. Every input line ends in exactly one place:

- a line that is not JSON, or not a resource of the view's type, is quarantined (lineage only);
- a resource the view yields no row for is counted as ``resources_without_rows``;
- every flattened row is published, quarantined with a reason, or held back by the record
  filter and counted by reason.

A record held back for what it now is (its status, a security label, a date out of range, a
missing element) is also returned, as its resource type, id and the kind of hold
(``GateResult.retracted``), for the PHI zone only: the id is in the clear, so it crosses only
as a pseudonymised retraction (lake/deletions.py), which takes an earlier published version of
the resource out of the warehouse. A record held back by a research opt-out is not listed: the
opt-out retracts the whole patient.

Only the returned tables, which hold de-identified columns and lineage, may be written to the
lake; reasons name columns and rules, never values.
"""

from __future__ import annotations

import datetime as dt
import gc
import itertools
import json
import multiprocessing
import re
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from starvit_assets.deid.engine import FHIR_TEMPORAL_PATTERN, DeidBackend, content_hashes
from starvit_assets.deid.policy import Policy
from starvit_assets.lake.contracts import (
    CONTRACTS,
    TableContract,
    row_violations,
)
from starvit_assets.lake.filters import (
    RESEARCH_OPT_OUT_KIND,
    FilterConfig,
    FilterOutcome,
    RecordFilter,
    load_filters,
    record_filter,
)
from starvit_assets.lake.keys import SeenKeys
from starvit_assets.views.runner import CompiledView, ViewDefinitionError, compile_view
from starvit_assets.views.vectorized import VectorizedView, compile_vectorized

BATCH_LINES = 10_000
COMPRESSION = "zstd"
_READ_BLOCK = 8 << 20
_NEWLINE = ord("\n")
# A line with nothing but ASCII whitespace (what bytes.strip removes) between two others: a
# pattern that starts with a literal, so the scan runs at memchr speed.
_BLANK_INNER_LINE = re.compile(rb"\n[ \t\r\x0b\x0c]*\n")
QUARANTINE_REASON = "_quarantine_reason"
# Every reason for a line that never became a row starts so: the quarantine file tells its
# line-level rows from its row-level ones by this alone.
LINE_PROBLEM = "line: "
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


def published_schema(table_name: str, view: dict[str, Any], backend: DeidBackend) -> pa.Schema:
    """What a published partition holds: the view's columns as ``backend`` de-identifies them
    (an empty table: nothing is sent anywhere), then lineage. The contract check holds every
    partition file to it."""
    empty = compile_view(view).arrow_schema().empty_table()
    return pa.schema([*backend.deidentify(table_name, empty).schema, *lineage_schema()])


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
    # (resource type, id in the clear, kind of hold): PHI zone only, never saved with the counts.
    retracted: tuple[tuple[str, str, str], ...] = ()

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


@dataclass(frozen=True)
class Reconciliation:
    """The ``rows_reconcile`` check, from what was written rather than what the gate counted.

    Rows are counted in the Parquet files themselves (their footers; the quarantine's reason
    column tells line-level rows from row-level ones) and lines from the export record (counted
    on disk when the export was staged), so a file that lost, gained or never got rows, or a
    line the gate never read, fails it even when the gate's own counters agree with each other.
    ``problems`` name counts and files, never values.
    """

    lines_exported: int
    rows_in_output: int | None
    rows_in_quarantine: int | None
    lines_in_quarantine: int | None
    problems: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.problems


def reconcile(
    counts: GateCounts, lines_exported: int, output: Path, quarantine_output: Path
) -> Reconciliation:
    """Input lines = resources with rows + without rows + lines in the quarantine file; rows
    flattened = rows in the output file + row-level rows in the quarantine file + held back."""
    problems: list[str] = []
    rows_in_output = _parquet_rows(output)
    if rows_in_output is None:
        problems.append(f"{output.name}: the partition file is missing or unreadable")
    quarantine = _quarantine_rows(quarantine_output)
    rows_in_quarantine = lines_in_quarantine = None
    if quarantine is None:
        problems.append(f"{quarantine_output.name}: the quarantine file is missing or unreadable")
    else:
        lines_in_quarantine, rows_in_quarantine = quarantine
    if lines_exported != counts.resources_read:
        problems.append(
            f"lines exported ({lines_exported}) != lines read ({counts.resources_read})"
        )
    if lines_in_quarantine is not None:
        lines = counts.resources_with_rows + counts.resources_without_rows + lines_in_quarantine
        if lines != lines_exported:
            problems.append(
                f"lines exported ({lines_exported}) != resources with rows "
                f"({counts.resources_with_rows}) + without rows ({counts.resources_without_rows})"
                f" + lines in the quarantine file ({lines_in_quarantine})"
            )
    if rows_in_output is not None and rows_in_quarantine is not None:
        rows = rows_in_output + rows_in_quarantine + counts.rows_held_back
        if rows != counts.rows_flattened:
            problems.append(
                f"rows flattened ({counts.rows_flattened}) != rows in the partition file "
                f"({rows_in_output}) + row-level rows in the quarantine file "
                f"({rows_in_quarantine}) + held back ({counts.rows_held_back})"
            )
    for written, counted, what in (
        (rows_in_output, counts.rows_published, "rows published"),
        (rows_in_quarantine, counts.rows_quarantined, "rows quarantined"),
        (lines_in_quarantine, counts.lines_quarantined, "lines quarantined"),
    ):
        if written is not None and written != counted:
            problems.append(f"{what}: the gate counted {counted}, the files hold {written}")
    return Reconciliation(
        lines_exported=lines_exported,
        rows_in_output=rows_in_output,
        rows_in_quarantine=rows_in_quarantine,
        lines_in_quarantine=lines_in_quarantine,
        problems=tuple(problems),
    )


def _parquet_rows(path: Path) -> int | None:
    try:
        return int(pq.ParquetFile(path).metadata.num_rows)
    except (OSError, pa.ArrowException):
        return None


def _quarantine_rows(path: Path) -> tuple[int, int] | None:
    """(line-level rows, row-level rows) of a quarantine file."""
    total = _parquet_rows(path)
    if total is None:
        return None
    try:
        reasons = pq.read_table(path, columns=[QUARANTINE_REASON]).column(QUARANTINE_REASON)
    except (OSError, KeyError, pa.ArrowException):
        return None
    line_level = pc.sum(pc.fill_null(pc.starts_with(reasons, LINE_PROBLEM), False)).as_py()
    return int(line_level or 0), total - int(line_level or 0)


@dataclass
class _Lines:
    """The non-blank lines of one chunk (of one file), with their line numbers."""

    data: list[bytes]
    file: str
    numbers: list[int]

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
    # Processes for the first pass (flatten, filter, de-identify) of a multi-batch input. Only
    # for a backend that may run in forked copies of itself: the local engine, not Cloud DLP
    # (its request quota is per client).
    workers: int = 1

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

        The input is cut into chunks of ``BATCH_LINES`` lines. Each chunk is flattened, filtered
        and de-identified on its own (in ``workers`` forked processes when there is more than
        one chunk); this process then applies the row-level contract, marking a key it has
        already seen as a duplicate, and writes the rows in input order. Memory stays bounded
        by a few chunks plus the set of keys seen.
        """
        self.policy.table(self.table_name).check_covers(self.compiled.column_names, self.table_name)
        self.record_filter.check_columns(self.compiled.column_names)
        scratch_schema = published_schema(self.table_name, self.view, self.backend).append(
            pa.field(QUARANTINE_REASON, pa.string())
        )
        first_pass = _FirstPass(
            gate=self,
            vectorized=compile_vectorized(self.view),
            export_id=export_id,
            schema=scratch_schema,
        )
        held_back: Counter[str] = Counter()
        retracted: list[tuple[str, str, str]] = []
        quarantine_reasons: Counter[str] = Counter()
        seen_keys = SeenKeys()
        resources_read = resources_with_rows = resources_without_rows = 0
        lines_quarantined = rows_flattened = rows_published = rows_quarantined = 0
        with (
            pq.ParquetWriter(
                output, _output_schema(scratch_schema), compression=COMPRESSION
            ) as output_writer,
            pq.ParquetWriter(
                quarantine_output, scratch_schema, compression=COMPRESSION
            ) as quarantine_writer,
        ):
            for outcome in _map_in_order(first_pass, _plan_chunks(files), self.workers):
                resources_read += outcome.resources_read
                resources_with_rows += outcome.resources_with_rows
                resources_without_rows += outcome.resources_without_rows
                rows_flattened += outcome.rows_flattened
                held_back.update(outcome.held_back)
                retracted.extend(
                    (self.compiled.resource_type, resource_id, kind)
                    for resource_id, kind in outcome.retracted
                )
                if outcome.line_quarantine is not None:
                    lines_quarantined += outcome.line_quarantine.num_rows
                    quarantine_reasons.update(
                        outcome.line_quarantine.column(QUARANTINE_REASON).to_pylist()
                    )
                    quarantine_writer.write_table(outcome.line_quarantine)
                batch = outcome.rows
                reason = pc.coalesce(
                    batch.column(QUARANTINE_REASON),
                    row_violations(
                        self.contract,
                        batch,
                        duplicates=seen_keys.later_duplicates(batch.column(self.contract.key)),
                    ),
                )
                bad = pc.is_valid(reason)
                if not pc.any(bad).as_py():
                    output_writer.write_table(batch.drop_columns([QUARANTINE_REASON]))
                    rows_published += batch.num_rows
                    continue
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
                    str(value) for value in quarantined.column(QUARANTINE_REASON).to_pylist()
                )
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
            flattened_by="vectorized" if first_pass.vectorized is not None else "general",
            retracted=tuple(retracted),
        )

    def _first_pass(self, chunk: _Chunk, job: _FirstPass) -> _ChunkOutcome:
        """Flatten, filter and de-identify one chunk (in a worker when there are several)."""
        lines = _chunk_lines(chunk)
        flat = self._flatten(lines, job.vectorized)
        problem_lines = [i for i, problem in enumerate(flat.line_problems) if problem]
        with_rows = (
            pc.count_distinct(flat.resource_index).as_py() if len(flat.resource_index) else 0
        )
        lineage = self._lineage(lines, job.export_id)
        outcome = self.record_filter.apply(flat.table)
        rows, reasons = self._null_malformed_dates(flat.table.filter(outcome.passed))
        deidentified = self.backend.deidentify(self.table_name, rows)
        row_lineage = lineage.take(pc.filter(flat.resource_index, outcome.passed))
        batch = pa.Table.from_arrays(
            [*deidentified.columns, *row_lineage.columns, reasons], schema=job.schema
        )
        line_quarantine = None
        if problem_lines:
            line_quarantine = _lineage_only(
                lineage.take(pa.array(problem_lines, pa.int64())),
                pa.array([str(flat.line_problems[i]) for i in problem_lines], pa.string()),
                job.schema,
            )
        return _ChunkOutcome(
            resources_read=len(lines),
            resources_with_rows=with_rows,
            resources_without_rows=len(lines) - len(problem_lines) - with_rows,
            rows_flattened=flat.table.num_rows,
            held_back=outcome.held_back,
            retracted=self._retracted(flat.table, outcome),
            rows=batch,
            line_quarantine=line_quarantine,
        )

    def _retracted(self, rows: pa.Table, outcome: FilterOutcome) -> list[tuple[str, str]]:
        """(id, kind of hold) of the held-back rows that retract their resource: every kind but
        a research opt-out (its Patient is retracted instead), and only rows with an id."""
        if not outcome.held_back:
            return []
        ids = rows.column(self.contract.key).cast(pa.string())
        listed = pc.and_(
            pc.fill_null(pc.not_equal(outcome.held_back_as, RESEARCH_OPT_OUT_KIND), False),
            pc.fill_null(pc.greater(pc.utf8_length(ids), 0), False),
        )
        return list(
            zip(
                pc.filter(ids, listed).to_pylist(),
                pc.filter(outcome.held_back_as, listed).to_pylist(),
                strict=True,
            )
        )

    def _flatten(self, lines: _Lines, vectorized: VectorizedView | None) -> _Flattened:
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
                problems.append(f"{LINE_PROBLEM}not valid JSON")
                continue
            if not isinstance(resource, dict) or resource.get("resourceType") != view.resource_type:
                problems.append(self._wrong_type())
                continue
            try:
                rows = view.rows(resource)
            except ViewDefinitionError:
                problems.append(f"{LINE_PROBLEM}the view cannot be evaluated on this resource")
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
        return f"{LINE_PROBLEM}resource type is not {self.compiled.resource_type}"

    def _lineage(self, lines: _Lines, export_id: str) -> pa.Table:
        count = len(lines)
        return pa.table(
            {
                "_export_id": pa.array([export_id] * count, pa.string()),
                "_source_file": pa.array([lines.file] * count, pa.string()),
                "_source_line": pa.array(lines.numbers, pa.int64()),
                "_content_hash": pa.array(content_hashes(self.key, lines.data), pa.string()),
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


@dataclass(frozen=True)
class _Chunk:
    """At most ``BATCH_LINES`` physical lines of one file: bytes ``start`` to ``end``."""

    index: int
    path: Path
    start: int
    end: int
    first_line: int


@dataclass(frozen=True)
class _ChunkOutcome:
    resources_read: int
    resources_with_rows: int
    resources_without_rows: int
    rows_flattened: int
    held_back: Counter[str]
    retracted: list[tuple[str, str]]  # (id in the clear, kind of hold): stays in the PHI zone
    # De-identified rows with lineage and the reason found so far (malformed dates).
    rows: pa.Table
    line_quarantine: pa.Table | None


@dataclass(frozen=True)
class _FirstPass:
    """The first pass over one chunk, with everything it needs; runs in a worker as is."""

    gate: Gate
    vectorized: VectorizedView | None
    export_id: str
    schema: pa.Schema

    def __call__(self, chunk: _Chunk) -> _ChunkOutcome:
        return self.gate._first_pass(chunk, self)


_worker_job: _FirstPass | None = None


def _start_worker(job: _FirstPass) -> None:  # pragma: no cover - runs in the worker
    global _worker_job
    _worker_job = job


def _run_in_worker(chunk: _Chunk) -> _ChunkOutcome:  # pragma: no cover - runs in the worker
    assert _worker_job is not None, "worker not started"
    return _worker_job(chunk)


def _map_in_order(
    job: _FirstPass, chunks: Iterator[_Chunk], workers: int
) -> Iterator[_ChunkOutcome]:
    """``job`` on every chunk, outcomes in input order; in forked workers when it pays.

    The job reaches the workers by fork, not by pickling. At most two chunks a worker are in
    flight, so memory stays flat however long the input is.
    """
    head = list(itertools.islice(chunks, 2))
    if workers <= 1 or len(head) < 2:
        yield from map(job, itertools.chain(head, chunks))
        return
    with _frozen_heap():
        yield from _map_in_pool(job, itertools.chain(head, chunks), workers)


def _map_in_pool(
    job: _FirstPass, chunks: Iterator[_Chunk], workers: int
) -> Iterator[_ChunkOutcome]:
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("fork"),
        initializer=_start_worker,
        initargs=(job,),
    )
    pending: deque[Future[_ChunkOutcome]] = deque()
    try:
        for chunk in chunks:
            pending.append(pool.submit(_run_in_worker, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise GateError(
            "a gate worker process died (killed, or out of memory?); nothing was published: "
            "re-run, or set fewer STARVIT_GATE_WORKERS"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def _frozen_heap() -> Iterator[None]:
    """Keep the garbage collector of forked children off the inherited heap: scanning it
    would touch, and so copy, every page the parent shares with them (gc.freeze)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _plan_chunks(files: Sequence[Path]) -> Iterator[_Chunk]:
    """Cut the files into chunks of ``BATCH_LINES`` physical lines (the last may be shorter)."""
    index = 0
    for path in files:
        start = position = pending_lines = 0
        first_line = 1
        with path.open("rb") as handle:
            while block := handle.read(_READ_BLOCK):
                newlines = np.flatnonzero(np.frombuffer(block, np.uint8) == _NEWLINE)
                taken = 0
                while len(newlines) - taken >= BATCH_LINES - pending_lines:
                    last = taken + BATCH_LINES - pending_lines - 1
                    end = position + int(newlines[last]) + 1
                    yield _Chunk(index, path, start, end, first_line)
                    index += 1
                    first_line += BATCH_LINES
                    start, taken, pending_lines = end, last + 1, 0
                pending_lines += len(newlines) - taken
                position += len(block)
        if position > start:
            yield _Chunk(index, path, start, position, first_line)
            index += 1


def _chunk_lines(chunk: _Chunk) -> _Lines:
    """The chunk's non-blank lines (CR of CRLF removed), numbered within their file."""
    with chunk.path.open("rb") as handle:
        handle.seek(chunk.start)
        data = handle.read(chunk.end - chunk.start)
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()
    if b"\r" in data:
        lines = [line.rstrip(b"\r") for line in lines]
    if lines[0].strip() and lines[-1].strip() and _BLANK_INNER_LINE.search(data) is None:
        numbers = list(range(chunk.first_line, chunk.first_line + len(lines)))
    else:
        numbers = [number for number, line in enumerate(lines, chunk.first_line) if line.strip()]
        lines = [lines[number - chunk.first_line] for number in numbers]
    return _Lines(lines, chunk.path.name, numbers)


def build_gate(
    *,
    table_name: str,
    view: dict[str, Any],
    backend: DeidBackend,
    policy: Policy,
    key: bytes,
    export_date: dt.date,
    filters: FilterConfig | None = None,
    workers: int = 1,
    research_opt_outs: frozenset[str] = frozenset(),
) -> Gate:
    return Gate(
        table_name=table_name,
        view=view,
        backend=backend,
        policy=policy,
        record_filter=record_filter(
            filters or load_filters(), table_name, export_date, research_opt_outs
        ),
        key=key,
        workers=workers,
    )
