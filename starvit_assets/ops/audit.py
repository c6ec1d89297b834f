"""The audit trail: which run produced which asset from which inputs, under which policy and
code version, with which check outcomes, and every manual override.

It lives in the ``audit`` schema of the operational PostgreSQL (Dagster's database), apart from
the research data, and holds no PHI: identifiers, counts and versions only. Values are copied
from materialization metadata only for allowlisted keys and only when they have the expected
shape, so a free-form metadata value (which could quote data) never reaches the audit tables.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import psycopg
from psycopg.types.json import Jsonb

from starvit_assets.settings import REPO_ROOT

if TYPE_CHECKING:
    import dagster as dg

SCHEMA: Final = "audit"
TEXT_MAX: Final = 200

# A fixed key, so that concurrent sensors serialize their DDL instead of racing on the catalog.
_DDL_LOCK_KEY: Final = 0x5374617276697401

_DDL: Final = """
create schema if not exists audit;

create table if not exists audit.run (
    run_id          text primary key,
    job_name        text not null,
    launched_by     text,
    status          text not null,
    started_at      timestamptz,
    ended_at        timestamptz,
    code_version    text,
    policy_version  text,
    recorded_at     timestamptz not null default now()
);

create table if not exists audit.materialization (
    run_id          text not null references audit.run (run_id),
    event_id        bigint not null,
    asset_key       text not null,
    partition       text,
    export_id       text,
    row_count       bigint,
    counts          jsonb not null default '{}'::jsonb,
    policy_version  text,
    created_at      timestamptz not null,
    primary key (run_id, event_id)
);
create index if not exists materialization_asset_key_idx
    on audit.materialization (asset_key, created_at desc);
create index if not exists materialization_event_id_idx
    on audit.materialization (event_id);

create table if not exists audit.materialization_input (
    run_id           text not null,
    event_id         bigint not null,
    input_asset_key  text not null,
    input_event_id   bigint,
    primary key (run_id, event_id, input_asset_key),
    foreign key (run_id, event_id) references audit.materialization (run_id, event_id)
);

create table if not exists audit.check_result (
    run_id          text not null references audit.run (run_id),
    event_id        bigint not null,
    asset_key       text not null,
    check_name      text not null,
    passed          boolean not null,
    severity        text not null,
    partition       text,
    created_at      timestamptz not null,
    primary key (run_id, event_id)
);
create index if not exists check_result_asset_key_idx
    on audit.check_result (asset_key, created_at desc);

create table if not exists audit.manual_override (
    override_id     bigserial primary key,
    who             text not null,
    what            text not null,
    why             text not null,
    asset_key       text,
    run_id          text,
    occurred_at     timestamptz not null default now()
);

create or replace function audit.refuse_change() returns trigger language plpgsql as $$
begin
    -- Only the retention job may delete, and only what the six-year audit window has passed.
    if tg_op = 'DELETE' and old.occurred_at < now() - interval '6 years' then
        return old;
    end if;
    raise exception 'audit.% is append-only', tg_table_name;
end
$$;
drop trigger if exists manual_override_append_only on audit.manual_override;
create trigger manual_override_append_only
    before update or delete on audit.manual_override
    for each row execute function audit.refuse_change();
"""

# Metadata keys copied into the audit trail. Text values must match _SAFE_TEXT; counts must be
# integers. Everything else in the metadata (paths, JSON, schemas, descriptions) stays out.
TEXT_KEYS: Final = frozenset({"export_id", "policy_version"})
COUNT_KEYS: Final = frozenset(
    {
        "rows",
        "dagster/row_count",
        "resources",
        "resources_read",
        "files",
        "rows_quarantined",
        "rows_held_back",
        "lines_quarantined",
        "partitions_loaded",
        "export_errors",
        "deleted_in_export",
    }
)
COUNT_PREFIXES: Final = ("rows/",)
ROW_COUNT_KEYS: Final = ("rows", "dagster/row_count", "resources")

_SAFE_TEXT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:+\-]{0,127}")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@+\-]{0,99}")
_SAFE_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-/]{0,299}")
_INPUT_POINTER_PREFIX: Final = "dagster/input_event_pointer/"


class AuditError(Exception):
    pass


_prepared: set[str] = set()


def ensure_audit_schema(dsn: str) -> None:
    """Create the audit schema and tables if missing; safe to call repeatedly and concurrently."""
    with psycopg.connect(dsn) as connection:
        connection.execute("select pg_advisory_xact_lock(%s)", (_DDL_LOCK_KEY,))
        connection.execute(_DDL)
    _prepared.add(dsn)


def _ensure_once(dsn: str) -> None:
    if dsn not in _prepared:
        ensure_audit_schema(dsn)


def audit_dsn() -> str:
    """``STARVIT_AUDIT_DSN`` when set (e.g. a role that may only insert), else Dagster's own
    database, which the platform already runs."""
    explicit = os.environ.get("STARVIT_AUDIT_DSN")
    if explicit:
        return explicit
    return _platform_dagster_dsn()


@functools.cache
def _platform_dagster_dsn() -> str:
    # Resolving may start (or probe) the embedded server: once per sensor process is enough.
    from starvit_assets import platform
    from starvit_assets.settings import load_settings

    return platform.resolve_endpoints(load_settings()).dagster_dsn


# --- allowlisting ---------------------------------------------------------------------------


def safe_text(value: Any, pattern: re.Pattern[str] = _SAFE_TEXT) -> str | None:
    return value if isinstance(value, str) and pattern.fullmatch(value) else None


def _raw(value: Any) -> Any:
    """A Dagster MetadataValue's plain value (``IntMetadataValue(3).value == 3``)."""
    return getattr(value, "value", value)


def _is_count_key(name: str) -> bool:
    return name in COUNT_KEYS or (
        name.startswith(COUNT_PREFIXES) and bool(_SAFE_KEY.fullmatch(name))
    )


def allowlisted_metadata(metadata: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, int]]:
    """(text values, counts) for allowlisted keys whose values have the expected shape."""
    texts: dict[str, str] = {}
    counts: dict[str, int] = {}
    for name, value in metadata.items():
        raw = _raw(value)
        if name in TEXT_KEYS:
            text = safe_text(raw)
            if text is not None:
                texts[name] = text
        elif _is_count_key(name) and isinstance(raw, int) and not isinstance(raw, bool):
            counts[name] = raw
    return texts, counts


def launched_by(tags: Mapping[str, str]) -> str:
    """Who or what started the run, from Dagster's run tags (staff or automation, never PHI)."""
    for tag, prefix in (
        ("dagster/user", "user"),
        ("user", "user"),
        ("dagster/schedule_name", "schedule"),
        ("dagster/sensor_name", "sensor"),
        ("dagster/backfill", "backfill"),
    ):
        value = tags.get(tag)
        if value:
            name = safe_text(value, _SAFE_NAME)
            return f"{prefix}:{name}" if name else f"{prefix}:[redacted]"
    return "manual"


@functools.cache
def _git_sha() -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return safe_text(result.stdout.strip())


def code_version(tags: Mapping[str, str]) -> str | None:
    """The run's ``starvit/code_version`` tag, else ``STARVIT_CODE_VERSION`` (set by the image
    build), else the checkout's git sha."""
    for value in (tags.get("starvit/code_version"), os.environ.get("STARVIT_CODE_VERSION")):
        if value:
            return safe_text(value)
    return _git_sha()


# --- reading a run --------------------------------------------------------------------------


@dataclass(frozen=True)
class MaterializationAudit:
    event_id: int
    asset_key: str
    partition: str | None
    export_id: str | None
    row_count: int | None
    counts: Mapping[str, int]
    policy_version: str | None
    created_at: dt.datetime
    inputs: Mapping[str, int | None] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckAudit:
    event_id: int
    asset_key: str
    check_name: str
    passed: bool
    severity: str
    partition: str | None
    created_at: dt.datetime


@dataclass(frozen=True)
class RunAudit:
    run_id: str
    job_name: str
    launched_by: str
    status: str
    started_at: dt.datetime | None
    ended_at: dt.datetime | None
    code_version: str | None
    policy_version: str | None
    materializations: tuple[MaterializationAudit, ...]
    checks: tuple[CheckAudit, ...]


def _timestamp(value: float | None) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(value, dt.UTC) if value is not None else None


def _inputs(tags: Mapping[str, str]) -> dict[str, int | None]:
    inputs: dict[str, int | None] = {}
    for name, value in tags.items():
        if not name.startswith(_INPUT_POINTER_PREFIX):
            continue
        key = safe_text(name.removeprefix(_INPUT_POINTER_PREFIX), _SAFE_KEY)
        if key is None:
            continue
        inputs[key] = int(value) if value.isdigit() else None
    return inputs


def _materialization(record: dg.EventLogRecord) -> MaterializationAudit | None:
    materialization = record.asset_materialization
    if materialization is None:
        return None
    texts, counts = allowlisted_metadata(materialization.metadata)
    row_count = next((counts[name] for name in ROW_COUNT_KEYS if name in counts), None)
    created = _timestamp(record.timestamp)
    assert created is not None
    return MaterializationAudit(
        event_id=record.storage_id,
        asset_key=materialization.asset_key.to_user_string(),
        partition=safe_text(materialization.partition),
        export_id=texts.get("export_id"),
        row_count=row_count,
        counts=counts,
        policy_version=texts.get("policy_version"),
        created_at=created,
        inputs=_inputs(materialization.tags or {}),
    )


def _check(record: dg.EventLogRecord) -> CheckAudit | None:
    from dagster import AssetCheckEvaluation

    event = record.event_log_entry.dagster_event
    evaluation = event.event_specific_data if event is not None else None
    if not isinstance(evaluation, AssetCheckEvaluation):
        return None
    created = _timestamp(record.timestamp)
    assert created is not None
    return CheckAudit(
        event_id=record.storage_id,
        asset_key=evaluation.asset_key.to_user_string(),
        check_name=safe_text(evaluation.check_name, _SAFE_NAME) or "[redacted]",
        passed=bool(evaluation.passed),
        severity=str(getattr(evaluation.severity, "value", evaluation.severity)),
        partition=safe_text(getattr(evaluation, "partition", None)),
        created_at=created,
    )


def read_run(instance: dg.DagsterInstance, run_id: str) -> RunAudit:
    """Everything the audit keeps about one run, read from Dagster's run and event storage."""
    from dagster import DagsterEventType

    record = instance.get_run_record_by_id(run_id)
    if record is None:
        raise AuditError(f"run {run_id} is not in this Dagster instance")
    run = record.dagster_run
    materializations = tuple(
        audit
        for event in instance.get_records_for_run(
            run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION
        ).records
        if (audit := _materialization(event)) is not None
    )
    checks = tuple(
        check
        for event in instance.get_records_for_run(
            run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION
        ).records
        if (check := _check(event)) is not None
    )
    policies = sorted({m.policy_version for m in materializations if m.policy_version})
    return RunAudit(
        run_id=run.run_id,
        job_name=run.job_name,
        launched_by=launched_by(run.tags),
        status=run.status.value,
        started_at=_timestamp(record.start_time),
        ended_at=_timestamp(record.end_time),
        code_version=code_version(run.tags),
        policy_version=",".join(policies) or None,
        materializations=materializations,
        checks=checks,
    )


@dataclass(frozen=True)
class AssetOutcomes:
    """Which of a run's planned assets were materialized, failed, or never ran."""

    materialized: tuple[str, ...]
    failed: tuple[str, ...]
    not_run: tuple[str, ...]
    failed_steps: int
    error_types: tuple[str, ...]


def asset_outcomes(instance: dg.DagsterInstance, run_id: str) -> AssetOutcomes:
    """Planned assets against materializations and step failures.

    Dagster OSS emits no ASSET_FAILED_TO_MATERIALIZE for a failed step, so a failed asset is a
    planned one whose step failed without materializing it. Only the exception's class is
    kept: its message may quote data.
    """
    from dagster import DagsterEventType

    def records(event_type: DagsterEventType) -> Sequence[dg.EventLogRecord]:
        return instance.get_records_for_run(run_id, of_type=event_type).records

    planned: dict[str, str | None] = {}
    for record in records(DagsterEventType.ASSET_MATERIALIZATION_PLANNED):
        event = record.event_log_entry.dagster_event
        if event is not None and event.asset_key is not None:
            planned[event.asset_key.to_user_string()] = event.step_key
    materialized = {
        materialization.asset_key.to_user_string()
        for record in records(DagsterEventType.ASSET_MATERIALIZATION)
        if (materialization := record.asset_materialization) is not None
    }
    failed_steps: set[str] = set()
    error_types: list[str] = []
    for record in records(DagsterEventType.STEP_FAILURE):
        event = record.event_log_entry.dagster_event
        if event is None:
            continue
        if event.step_key:
            failed_steps.add(event.step_key)
        error_type = _error_type(event)
        if error_type and error_type not in error_types:
            error_types.append(error_type)
    failed = sorted(
        key for key, step in planned.items() if key not in materialized and step in failed_steps
    )
    not_run = sorted(set(planned) - materialized - set(failed))
    return AssetOutcomes(
        materialized=tuple(sorted(materialized)),
        failed=tuple(failed),
        not_run=tuple(not_run),
        failed_steps=len(failed_steps),
        error_types=tuple(error_types),
    )


def _error_type(event: dg.DagsterEvent) -> str | None:
    """The user exception's class: Dagster wraps it in DagsterExecutionStepExecutionError."""
    data = event.step_failure_data
    error = data.error if data is not None else None
    if error is None:
        return None
    while error.cls_name == "DagsterExecutionStepExecutionError" and error.cause is not None:
        error = error.cause
    return error.cls_name


# --- writing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditWrite:
    """Rows inserted by one ``record_run``; zeros when the run had been recorded before."""

    materializations: int
    inputs: int
    checks: int


def write_run(dsn: str, audit: RunAudit) -> AuditWrite:
    """Insert one run's audit rows in one transaction. Re-recording a run inserts nothing new;
    the run row takes the latest status and end time."""
    _ensure_once(dsn)
    with psycopg.connect(dsn) as connection:
        connection.execute(
            """
            insert into audit.run (run_id, job_name, launched_by, status, started_at, ended_at,
                                   code_version, policy_version)
            values (%s, %s, %s, %s, %s, %s, %s, %s)
            on conflict (run_id) do update set
                status = excluded.status,
                ended_at = excluded.ended_at,
                policy_version = coalesce(excluded.policy_version, audit.run.policy_version)
            """,
            (
                audit.run_id,
                audit.job_name,
                audit.launched_by,
                audit.status,
                audit.started_at,
                audit.ended_at,
                audit.code_version,
                audit.policy_version,
            ),
        )
        materializations = inputs = checks = 0
        for m in audit.materializations:
            cursor = connection.execute(
                """
                insert into audit.materialization (run_id, event_id, asset_key, partition,
                    export_id, row_count, counts, policy_version, created_at)
                values (%s, %s, %s, %s, %s, %s, %s, %s, %s)
                on conflict do nothing
                """,
                (
                    audit.run_id,
                    m.event_id,
                    m.asset_key,
                    m.partition,
                    m.export_id,
                    m.row_count,
                    Jsonb(dict(m.counts)),
                    m.policy_version,
                    m.created_at,
                ),
            )
            materializations += cursor.rowcount
            for input_key, input_event in m.inputs.items():
                cursor = connection.execute(
                    """
                    insert into audit.materialization_input (run_id, event_id, input_asset_key,
                        input_event_id)
                    values (%s, %s, %s, %s)
                    on conflict do nothing
                    """,
                    (audit.run_id, m.event_id, input_key, input_event),
                )
                inputs += cursor.rowcount
        for c in audit.checks:
            cursor = connection.execute(
                """
                insert into audit.check_result (run_id, event_id, asset_key, check_name, passed,
                    severity, partition, created_at)
                values (%s, %s, %s, %s, %s, %s, %s, %s)
                on conflict do nothing
                """,
                (
                    audit.run_id,
                    c.event_id,
                    c.asset_key,
                    c.check_name,
                    c.passed,
                    c.severity,
                    c.partition,
                    c.created_at,
                ),
            )
            checks += cursor.rowcount
    return AuditWrite(materializations=materializations, inputs=inputs, checks=checks)


def record_run(dsn: str, instance: dg.DagsterInstance, run_id: str) -> AuditWrite:
    """Read a finished run from Dagster and write its audit rows (idempotent)."""
    return write_run(dsn, read_run(instance, run_id))


def record_manual_override(
    dsn: str,
    *,
    who: str,
    what: str,
    why: str,
    asset_key: str | None = None,
    run_id: str | None = None,
) -> int:
    """Append a manual override (a forced re-run, a waived check, a released quarantine).

    ``what`` and ``why`` are free text typed by a person: name the asset, check and ticket,
    never a patient or a value. Rows cannot be changed or deleted afterwards.
    """
    for name, value in (("who", who), ("what", what), ("why", why)):
        if not value.strip():
            raise AuditError(f"a manual override needs '{name}'")
        if len(value) > 2000:
            raise AuditError(f"'{name}' is longer than 2000 characters")
    _ensure_once(dsn)
    with psycopg.connect(dsn) as connection:
        row = connection.execute(
            """
            insert into audit.manual_override (who, what, why, asset_key, run_id)
            values (%s, %s, %s, %s, %s)
            returning override_id
            """,
            (who.strip(), what.strip(), why.strip(), asset_key, run_id),
        ).fetchone()
    assert row is not None
    return int(row[0])


# --- queries --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AssetRun:
    run_id: str
    job_name: str
    status: str
    launched_by: str | None
    started_at: dt.datetime | None
    ended_at: dt.datetime | None
    code_version: str | None
    policy_version: str | None
    partition: str | None
    export_id: str | None
    row_count: int | None
    materialized_at: dt.datetime


def runs_for_asset(dsn: str, asset_key: str, limit: int = 100) -> list[AssetRun]:
    """Runs that materialized ``asset_key`` (``deid_raw/patient``), newest first."""
    _ensure_once(dsn)
    with psycopg.connect(dsn) as connection:
        rows = connection.execute(
            """
            select r.run_id, r.job_name, r.status, r.launched_by, r.started_at, r.ended_at,
                   r.code_version, coalesce(m.policy_version, r.policy_version), m.partition,
                   m.export_id, m.row_count, m.created_at
            from audit.materialization m
            join audit.run r using (run_id)
            where m.asset_key = %s
            order by m.created_at desc, m.event_id desc
            limit %s
            """,
            (asset_key, limit),
        ).fetchall()
    return [AssetRun(*row) for row in rows]


@dataclass(frozen=True)
class RunInput:
    """One upstream asset a run's materialization read, and the run that had produced it."""

    asset_key: str
    input_asset_key: str
    input_event_id: int | None
    input_run_id: str | None
    input_export_id: str | None
    input_policy_version: str | None


def inputs_of_run(dsn: str, run_id: str) -> list[RunInput]:
    """The upstream materializations each of the run's materializations was computed from.

    Dagster records, on every materialization, a pointer to the latest materialization of each
    upstream asset at that moment; joined with the audit rows it names the producing run and
    export. ``input_run_id`` is null when that upstream run predates the audit trail.
    """
    _ensure_once(dsn)
    with psycopg.connect(dsn) as connection:
        rows = connection.execute(
            """
            select m.asset_key, i.input_asset_key, i.input_event_id, u.run_id, u.export_id,
                   u.policy_version
            from audit.materialization m
            join audit.materialization_input i on i.run_id = m.run_id and i.event_id = m.event_id
            left join audit.materialization u
                   on u.event_id = i.input_event_id and u.asset_key = i.input_asset_key
            where m.run_id = %s
            order by m.asset_key, i.input_asset_key
            """,
            (run_id,),
        ).fetchall()
    return [RunInput(*row) for row in rows]


def check_results_for_run(dsn: str, run_id: str) -> list[tuple[str, str, bool, str]]:
    """(asset_key, check_name, passed, severity) of one run."""
    _ensure_once(dsn)
    with psycopg.connect(dsn) as connection:
        rows = connection.execute(
            """
            select asset_key, check_name, passed, severity from audit.check_result
            where run_id = %s order by asset_key, check_name, event_id
            """,
            (run_id,),
        ).fetchall()
    return [(str(a), str(c), bool(p), str(s)) for a, c, p, s in rows]


def record_runs(dsn: str, instance: dg.DagsterInstance, run_ids: Iterable[str]) -> AuditWrite:
    """Backfill: record several runs (e.g. those that ended before the sensor was switched on)."""
    totals = AuditWrite(0, 0, 0)
    for run_id in run_ids:
        written = record_run(dsn, instance, run_id)
        totals = AuditWrite(
            totals.materializations + written.materializations,
            totals.inputs + written.inputs,
            totals.checks + written.checks,
        )
    return totals
