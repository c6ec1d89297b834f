"""Retention policies as plain functions; ``defs/retention.py`` runs them nightly.

| data | where | kept | enforced by |
| --- | --- | --- | --- |
| PHI staging | ``$STARVIT_HOME/phi/staging/<export_id>/`` | until de-identified, never past ``STARVIT_PHI_MAX_AGE_DAYS`` (7) | delete |
| analytics events | ``audit.analytics_event`` and ``STARVIT_ANALYTICS_EVENT_TABLES`` | 13 months | delete rows |
| audit records | every table in schema ``audit`` with a time column | 6 years | delete rows |
| lake partitions | ``lake/deid_raw``, ``lake/deid_quarantine`` | 6 years | report only |

Every result carries counts, table names and export ids, never a row or a file's content.
Lake partitions are never deleted here: they are immutable inputs of published research, and
removing one is a decision for a person, not a timer.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Literal

import psycopg
from psycopg import sql
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from starvit_assets.exports import DELETED_FILES_GLOB, RETRACTED_FILES_GLOB
from starvit_assets.lake.partitions import LAYER, QUARANTINE_LAYER, PartitionError, RawLake

PHI_MAX_AGE_DAYS_LIMIT = 7
AUDIT_SCHEMA = "audit"
# Names tried in order when an audit table has no explicit rule; a guess at "some timestamp
# column" could pick reviewed_at and delete the wrong rows, so unknown tables are skipped.
TIME_COLUMNS = ("occurred_at", "recorded_at", "created_at", "event_time", "logged_at", "ts")
_TIME_TYPES = frozenset(
    {"timestamp with time zone", "timestamp without time zone", "date"},
)
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_TABLE_ENTRY = re.compile(rf"^({_IDENTIFIER})\.({_IDENTIFIER})(?::({_IDENTIFIER}))?$")
_EXPORT_DATE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})")


class RetentionError(Exception):
    """A retention setting is invalid."""


class RetentionSettings(BaseSettings):
    """Retention windows. The PHI maximum may be lowered, never raised past the policy's 7 days:
    raising it is a policy change, made in code and reviewed, not an environment tweak."""

    model_config = SettingsConfigDict(env_prefix="STARVIT_", extra="ignore")

    phi_max_age_days: int = Field(default=PHI_MAX_AGE_DAYS_LIMIT, ge=1, le=PHI_MAX_AGE_DAYS_LIMIT)
    analytics_retention_months: int = Field(default=13, ge=1)
    audit_retention_months: int = Field(default=72, ge=1)
    lake_retention_months: int = Field(default=72, ge=1)
    analytics_event_tables: str = Field(
        default=f"{AUDIT_SCHEMA}.analytics_event:occurred_at",
        description="Comma-separated schema.table[:time_column] kept for the analytics window",
    )

    @property
    def phi_max_age(self) -> dt.timedelta:
        return dt.timedelta(days=self.phi_max_age_days)


def months_before(moment: dt.datetime, months: int) -> dt.datetime:
    """Calendar months back, the day clamped to the month's end (31 March - 1 month = 28/29 Feb)."""
    index = moment.year * 12 + (moment.month - 1) - months
    year, month = divmod(index, 12)
    month += 1
    next_month = dt.date(year + (month == 12), month % 12 + 1, 1)
    last_day = (next_month - dt.timedelta(days=1)).day
    return moment.replace(year=year, month=month, day=min(moment.day, last_day))


# --- PHI staging ---------------------------------------------------------------------------
@dataclass
class PhiPurgeResult:
    files_deleted: int = 0
    bytes_deleted: int = 0
    folders_deleted: int = 0
    deidentified_files_deleted: int = 0
    expired_files_deleted: int = 0
    files_kept: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)

    def _failed(self, error: BaseException) -> None:
        self.errors += 1
        kind = type(error).__name__
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


def _walk_files(folder: Path) -> Iterator[Path]:
    # followlinks=False: a symlink in staging must never lead the purge outside of it.
    for directory, _, files in os.walk(folder, followlinks=False):
        for name in files:
            yield Path(directory) / name


def _mtime(path: Path) -> dt.datetime:
    return dt.datetime.fromtimestamp(path.lstat().st_mtime, dt.UTC)


def _size(path: Path) -> int:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return 0
    return info.st_size if stat.S_ISREG(info.st_mode) else 0


def expired_phi_files(staging_root: Path, *, max_age: dt.timedelta, now: dt.datetime) -> list[Path]:
    """Files in PHI staging last modified more than ``max_age`` before ``now``."""
    if not staging_root.is_dir():
        return []
    cutoff = now - max_age
    expired = []
    for path in _walk_files(staging_root):
        try:
            if _mtime(path) < cutoff:
                expired.append(path)
        except FileNotFoundError:
            continue
    return expired


def resource_type_of(file_name: str) -> str | None:
    """``Observation.2.ndjson`` -> ``Observation``; the export's own lists (``_error.*``) and
    partial downloads have none."""
    if file_name.startswith("_") or not file_name.endswith(".ndjson"):
        return None
    return file_name.split(".", 1)[0] or None


def _awaits_deletions_asset(file_name: str) -> bool:
    return fnmatch(file_name, DELETED_FILES_GLOB) or fnmatch(file_name, RETRACTED_FILES_GLOB)


def deidentified_in_lake(
    lake: RawLake, tables_by_resource: Mapping[str, Sequence[str]]
) -> Callable[[str, str], bool]:
    """A predicate: has every table flattened from this resource type been published for this
    export? Only then is the staged NDJSON no longer needed."""

    def predicate(export_id: str, resource_type: str) -> bool:
        tables = tables_by_resource.get(resource_type, ())
        try:
            return bool(tables) and all(lake.is_published(table, export_id) for table in tables)
        except PartitionError:
            # Not an export id the lake accepts, so nothing of it can have been published.
            return False

    return predicate


def purge_phi_staging(
    staging_root: Path,
    *,
    max_age: dt.timedelta,
    now: dt.datetime,
    is_deidentified: Callable[[str, str], bool],
    dry_run: bool = False,
) -> PhiPurgeResult:
    """Delete staged exports past the maximum age, and staged files already de-identified.

    An export folder is the unit of the age rule: if any file in it is too old, the whole folder
    goes (a partial export is useless, and deleting more PHI is the safe direction). Failures are
    counted, not raised, so one stuck file does not stop the rest; the check then fails.
    """
    result = PhiPurgeResult()
    if not staging_root.is_dir():
        return result
    cutoff = now - max_age
    for child in sorted(staging_root.iterdir()):
        if child.is_symlink() or child.is_file():
            _purge_loose_file(child, cutoff, result, dry_run=dry_run)
        elif child.is_dir():
            files = list(_walk_files(child))
            if any(_is_older(path, cutoff) for path in files) or (
                not files and _is_older(child, cutoff)
            ):
                _remove_folder(child, files, result, dry_run=dry_run, expired=True)
            elif not child.name.startswith("_"):
                _purge_deidentified(child, files, is_deidentified, result, dry_run=dry_run)
            else:
                # ``_incoming`` is an export still downloading; only the age rule applies.
                result.files_kept += len(files)
    return result


def _is_older(path: Path, cutoff: dt.datetime) -> bool:
    try:
        return _mtime(path) < cutoff
    except FileNotFoundError:
        return False


def _purge_loose_file(
    path: Path, cutoff: dt.datetime, result: PhiPurgeResult, *, dry_run: bool
) -> None:
    if not _is_older(path, cutoff):
        result.files_kept += 1
        return
    size = _size(path)
    try:
        if not dry_run:
            path.unlink()
    except FileNotFoundError:
        return
    except OSError as error:
        result._failed(error)
        return
    result.files_deleted += 1
    result.expired_files_deleted += 1
    result.bytes_deleted += size


def _remove_folder(
    folder: Path,
    files: list[Path],
    result: PhiPurgeResult,
    *,
    dry_run: bool,
    expired: bool,
) -> None:
    sizes = sum(_size(path) for path in files)
    removed = len(files)
    if not dry_run:
        failures: list[BaseException] = []
        shutil.rmtree(folder, onerror=lambda _f, _p, info: failures.append(info[1]))
        for failure in failures:
            if not isinstance(failure, FileNotFoundError):
                result._failed(failure)
        if folder.exists():
            remaining = list(_walk_files(folder))
            result.files_kept += len(remaining)
            removed -= len(remaining)
            sizes -= sum(_size(path) for path in remaining)
        else:
            result.folders_deleted += 1
    else:
        result.folders_deleted += 1
    result.files_deleted += removed
    result.bytes_deleted += sizes
    if expired:
        result.expired_files_deleted += removed
    else:
        result.deidentified_files_deleted += removed


def _purge_deidentified(
    folder: Path,
    files: list[Path],
    is_deidentified: Callable[[str, str], bool],
    result: PhiPurgeResult,
    *,
    dry_run: bool,
) -> None:
    export_id = folder.name
    remaining: list[Path] = []
    for path in files:
        resource_type = resource_type_of(path.name)
        if path.parent == folder and resource_type and is_deidentified(export_id, resource_type):
            size = _size(path)
            try:
                if not dry_run:
                    path.unlink()
            except FileNotFoundError:
                continue
            except OSError as error:
                result._failed(error)
                remaining.append(path)
                continue
            result.files_deleted += 1
            result.deidentified_files_deleted += 1
            result.bytes_deleted += size
        else:
            remaining.append(path)
    # The export's error list serves no purpose once every type is de-identified; its deleted[]
    # and retraction lists wait for deid_raw/deleted_resource, which removes them and then the
    # folder (``exports.remove_export_folder_when_done``, the gate's own rule). Only the age
    # rule takes them earlier.
    if remaining and any(
        resource_type_of(path.name) or _awaits_deletions_asset(path.name) for path in remaining
    ):
        result.files_kept += len(remaining)
        return
    _remove_folder(folder, remaining, result, dry_run=dry_run, expired=False)


# --- warehouse tables ----------------------------------------------------------------------
Category = Literal["analytics", "audit"]
Status = Literal["pruned", "would_prune", "missing", "no_time_column", "error"]


@dataclass(frozen=True)
class ForeignKey:
    child: tuple[str, str]
    child_columns: tuple[str, ...]
    parent: tuple[str, str]
    parent_columns: tuple[str, ...]


@dataclass(frozen=True)
class TableRule:
    """Rows of ``schema.table`` older than ``months`` go, judged by ``time_column``; a table
    with no time column of its own may ``follow`` a foreign key to a timed parent, and goes with
    the parent's expired rows (``audit.materialization_input`` follows its materialization)."""

    schema: str
    table: str
    time_column: str | None
    months: int
    category: Category
    follows: ForeignKey | None = None
    parent_time_column: str | None = None

    @property
    def name(self) -> str:
        return f"{self.schema}.{self.table}"


@dataclass(frozen=True)
class TablePruneResult:
    rule: TableRule
    status: Status
    cutoff: dt.datetime
    rows_deleted: int = 0
    rows_past_window: int = 0
    rows_held_by_references: int = 0
    error_kind: str | None = None


def parse_table_entries(text: str) -> list[tuple[str, str, str | None]]:
    """``"audit.analytics_event:occurred_at, web.page_view"`` -> (schema, table, column)."""
    entries = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        match = _TABLE_ENTRY.match(entry)
        if match is None:
            raise RetentionError(
                f"analytics table entry {entry!r} is not schema.table or schema.table:column"
            )
        entries.append((match.group(1), match.group(2), match.group(3)))
    return entries


_FOREIGN_KEYS = """
select cn.nspname, c.relname, pn.nspname, p.relname,
       array(select a.attname from unnest(con.conkey) with ordinality as k(num, pos)
             join pg_attribute a on a.attrelid = con.conrelid and a.attnum = k.num
             order by k.pos)::text[],
       array(select a.attname from unnest(con.confkey) with ordinality as k(num, pos)
             join pg_attribute a on a.attrelid = con.confrelid and a.attnum = k.num
             order by k.pos)::text[]
from pg_constraint con
join pg_class c on c.oid = con.conrelid
join pg_namespace cn on cn.oid = c.relnamespace
join pg_class p on p.oid = con.confrelid
join pg_namespace pn on pn.oid = p.relnamespace
where con.contype = 'f'
order by cn.nspname, c.relname, con.conname
"""


def foreign_keys(connection: psycopg.Connection) -> list[ForeignKey]:
    return [
        ForeignKey((child_schema, child), tuple(child_cols), (parent_schema, parent), tuple(cols))
        for child_schema, child, parent_schema, parent, child_cols, cols in connection.execute(
            _FOREIGN_KEYS
        )
    ]


def table_rules(
    connection: psycopg.Connection,
    settings: RetentionSettings,
    keys: Sequence[ForeignKey] | None = None,
) -> list[TableRule]:
    """The configured analytics tables and every table of the audit schema, children before
    the parents they reference, so that no delete trips a foreign key.

    A configured table that does not exist still gets a rule (reported as missing); an audit
    table with neither a known time column nor a timed parent is reported, never guessed at.
    """
    keys = foreign_keys(connection) if keys is None else keys
    candidates: dict[tuple[str, str], tuple[str | None, int, Category]] = {}
    for schema, table, column in parse_table_entries(settings.analytics_event_tables):
        candidates[(schema, table)] = (
            column or _time_column(connection, schema, table),
            settings.analytics_retention_months,
            "analytics",
        )
    for (table,) in connection.execute(
        "select table_name from information_schema.tables "
        "where table_schema = %s and table_type = 'BASE TABLE' order by table_name",
        [AUDIT_SCHEMA],
    ).fetchall():
        candidates.setdefault(
            (AUDIT_SCHEMA, table),
            (
                _time_column(connection, AUDIT_SCHEMA, table),
                settings.audit_retention_months,
                "audit",
            ),
        )

    rules: dict[tuple[str, str], TableRule] = {}
    for (schema, table), (column, months, category) in candidates.items():
        rule = TableRule(schema, table, column, months, category)
        if column is None:
            parent_key = next(
                (
                    key
                    for key in keys
                    if key.child == (schema, table)
                    and key.parent in candidates
                    and candidates[key.parent][0] is not None
                ),
                None,
            )
            if parent_key is not None:
                parent_column, parent_months, _ = candidates[parent_key.parent]
                rule = TableRule(
                    schema, table, None, parent_months, category, parent_key, parent_column
                )
        rules[(schema, table)] = rule
    return [rules[name] for name in _children_first(list(rules), keys)]


def _children_first(
    tables: list[tuple[str, str]], keys: Sequence[ForeignKey]
) -> list[tuple[str, str]]:
    remaining = set(tables)
    ordered: list[tuple[str, str]] = []
    while remaining:
        ready = sorted(
            table
            for table in remaining
            if not any(
                key.parent == table and key.child in remaining and key.child != table
                for key in keys
            )
        )
        if not ready:
            # A reference cycle: order does not matter for correctness (the guards below keep
            # referenced rows), only for how many nights a cycle takes to clear.
            ready = sorted(remaining)
        ordered.extend(ready)
        remaining.difference_update(ready)
    return ordered


def _time_columns(connection: psycopg.Connection, schema: str, table: str) -> dict[str, str]:
    rows = connection.execute(
        "select column_name, data_type from information_schema.columns "
        "where table_schema = %s and table_name = %s",
        [schema, table],
    ).fetchall()
    return {name: kind for name, kind in rows if kind in _TIME_TYPES}


def _time_column(connection: psycopg.Connection, schema: str, table: str) -> str | None:
    columns = _time_columns(connection, schema, table)
    return next((name for name in TIME_COLUMNS if name in columns), None)


def _table_exists(connection: psycopg.Connection, schema: str, table: str) -> bool:
    row = connection.execute(
        "select to_regclass(%s) is not null",
        [sql.Identifier(schema, table).as_string(connection)],
    ).fetchone()
    return bool(row and row[0])


def _join(
    left: str, left_columns: Sequence[str], right: str, right_columns: Sequence[str]
) -> sql.Composable:
    return sql.SQL(" and ").join(
        sql.SQL("{} = {}").format(sql.Identifier(left, a), sql.Identifier(right, b))
        for a, b in zip(left_columns, right_columns, strict=True)
    )


def _expired(rule: TableRule) -> sql.Composable:
    """Rows of ``rule`` (alias ``t``) past the window, ignoring what references them."""
    if rule.time_column is not None:
        return sql.SQL("{} < %(cutoff)s").format(sql.Identifier("t", rule.time_column))
    assert rule.follows is not None and rule.parent_time_column is not None
    return sql.SQL(
        "exists (select 1 from {parent} as p where {join} and {time} < %(cutoff)s)"
    ).format(
        parent=sql.Identifier(*rule.follows.parent),
        join=_join("p", rule.follows.parent_columns, "t", rule.follows.child_columns),
        time=sql.Identifier("p", rule.parent_time_column),
    )


def _unreferenced(rule: TableRule, keys: Sequence[ForeignKey]) -> sql.Composable:
    """Rows of ``rule`` (alias ``t``) that no other row references: deleting a referenced row
    would fail on its foreign key, or cascade into a younger child."""
    guards = [
        sql.SQL("not exists (select 1 from {child} as c where {join})").format(
            child=sql.Identifier(*key.child),
            join=_join("c", key.child_columns, "t", key.parent_columns),
        )
        for key in keys
        if key.parent == (rule.schema, rule.table)
    ]
    return sql.SQL(" and ").join(guards) if guards else sql.SQL("true")


def prune_table(
    connection: psycopg.Connection,
    rule: TableRule,
    *,
    now: dt.datetime,
    keys: Sequence[ForeignKey] = (),
    batch_size: int = 10_000,
    dry_run: bool = False,
) -> TablePruneResult:
    """Delete rows past the rule's window, in batches, each committed on its own.

    Batches keep locks and WAL bursts short on a large audit table, and a failure part-way
    keeps what was already pruned. ``connection`` must be in autocommit mode.
    """
    cutoff = months_before(now, rule.months)
    if not _table_exists(connection, rule.schema, rule.table):
        return TablePruneResult(rule, "missing", cutoff)
    if rule.follows is None and (
        rule.time_column is None
        or rule.time_column not in _time_columns(connection, rule.schema, rule.table)
    ):
        return TablePruneResult(rule, "no_time_column", cutoff)
    target = sql.Identifier(rule.schema, rule.table)
    expired = _expired(rule)
    deletable = sql.SQL("{} and {}").format(expired, _unreferenced(rule, keys))
    count = sql.SQL(
        "select count(*) filter (where {deletable}), count(*) from {target} as t where {expired}"
    ).format(deletable=deletable, target=target, expired=expired)
    delete_batch = sql.SQL(
        "with doomed as (select t.ctid from {target} as t where {deletable} limit %(limit)s) "
        "delete from {target} where ctid in (select ctid from doomed)"
    ).format(target=target, deletable=deletable)
    params = {"cutoff": cutoff, "limit": batch_size}
    deleted = 0
    try:
        if not dry_run:
            while True:
                cursor = connection.execute(delete_batch, params)
                deleted += max(cursor.rowcount, 0)
                if cursor.rowcount < batch_size:
                    break
        row = connection.execute(count, params).fetchone()
    except psycopg.Error as error:
        # The exception class only: a server message can quote the offending row.
        return TablePruneResult(
            rule, "error", cutoff, rows_deleted=deleted, error_kind=type(error).__name__
        )
    past, all_expired = (row[0], row[1]) if row else (0, 0)
    return TablePruneResult(
        rule,
        "would_prune" if dry_run else "pruned",
        cutoff,
        rows_deleted=deleted,
        rows_past_window=past,
        rows_held_by_references=all_expired - past,
    )


def prune_tables(
    dsn: str,
    settings: RetentionSettings,
    *,
    now: dt.datetime,
    batch_size: int = 10_000,
    dry_run: bool = False,
) -> list[TablePruneResult]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        keys = foreign_keys(connection)
        return [
            prune_table(
                connection, rule, now=now, keys=keys, batch_size=batch_size, dry_run=dry_run
            )
            for rule in table_rules(connection, settings, keys)
        ]


# --- lake (report only) --------------------------------------------------------------------
@dataclass
class LakeRetentionReport:
    partitions: int = 0
    past_retention: int = 0
    oldest_partition_date: dt.date | None = None
    past_retention_by_table: dict[str, int] = field(default_factory=dict)


def partition_date(export_id: str, part_file: Path) -> dt.date:
    """The export's date from its id (the server's transaction time), else the file's mtime.

    The id is preferred: a restore from backup resets modification times.
    """
    match = _EXPORT_DATE.match(export_id)
    if match:
        try:
            return dt.date(int(match.group(1)), int(match.group(2)), int(match.group(3)))
        except ValueError:
            pass
    return _mtime(part_file).date()


def lake_retention_report(lake_root: Path, *, months: int, now: dt.datetime) -> LakeRetentionReport:
    report = LakeRetentionReport()
    cutoff = months_before(now, months).date()
    for layer in (LAYER, QUARANTINE_LAYER):
        folder = lake_root / layer
        if not folder.is_dir():
            continue
        lake = RawLake(lake_root, layer=layer)
        for table_dir in sorted(path for path in folder.iterdir() if path.is_dir()):
            for export_id, part in lake.partitions(table_dir.name):
                report.partitions += 1
                day = partition_date(export_id, part)
                if report.oldest_partition_date is None or day < report.oldest_partition_date:
                    report.oldest_partition_date = day
                if day < cutoff:
                    report.past_retention += 1
                    key = f"{layer}/{table_dir.name}"
                    report.past_retention_by_table[key] = (
                        report.past_retention_by_table.get(key, 0) + 1
                    )
    return report
