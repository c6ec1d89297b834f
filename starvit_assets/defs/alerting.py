"""Operational sensors: alerts, the audit trail and OpenLineage emission.

All of them read Dagster's own run and event storage (PostgreSQL, see ``dagster.yaml``) and
write only identifiers and counts. The cursor-based sensors query the event log by storage id
across runs, which the PostgreSQL storage supports; the run-sharded SQLite storage does not.
"""

import datetime as dt
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg

from starvit_assets.ops.audit import asset_outcomes, audit_dsn, record_run
from starvit_assets.ops.notify import (
    Alert,
    CheckFailure,
    FreshnessChange,
    NotifyError,
    asset_link,
    notifiers_from_env,
    run_link,
    send_alert,
)
from starvit_assets.ops.openlineage import (
    LineageError,
    Transport,
    build_run_event,
    complete_event,
    namespace_from_env,
    transport_from_env,
    upstream_from_tags,
)

RUN_FAILURE_ALERT = "alert_on_run_failure"
ASSET_ALERTS = "alert_on_asset_health"
OPENLINEAGE = "openlineage_emitter"
# A tick handles at most this many events of each kind; the rest wait for the next tick.
BATCH = 200

# Freshness: a degradation, or a recovery from one. UNKNOWN -> PASS (first evaluation) is noise.
_BAD_FRESHNESS = frozenset({"WARN", "FAIL"})


def event_records_after(
    instance: dg.DagsterInstance,
    event_type: dg.DagsterEventType,
    after: int,
    limit: int = BATCH,
) -> Sequence[dg.EventLogRecord]:
    """Event records of one type across all runs with storage id > ``after``, oldest first.

    ``DagsterInstance.get_event_records`` is deprecated and warns for these types, and
    ``fetch_materializations`` needs an asset key; the storage-level call is what both wrap.
    """
    return instance.event_log_storage.get_event_records(
        dg.EventRecordsFilter(event_type=event_type, after_cursor=after),
        limit=limit,
        ascending=True,
    )


def latest_storage_id(instance: dg.DagsterInstance, event_type: dg.DagsterEventType) -> int:
    records = instance.event_log_storage.get_event_records(
        dg.EventRecordsFilter(event_type=event_type), limit=1, ascending=False
    )
    return records[0].storage_id if records else 0


def _state(value: Any) -> str:
    return str(getattr(value, "value", value))


# --- run failures ----------------------------------------------------------------------------


def run_failure_alert(
    instance: dg.DagsterInstance,
    run: dg.DagsterRun,
    environ: Mapping[str, str] | None = None,
) -> Alert:
    """The alert for a failed run: which assets failed or did not run, and the exception
    classes. The failure message itself is left out: it may quote data."""
    outcomes = asset_outcomes(instance, run.run_id)
    return Alert(
        kind="run_failure",
        run_id=run.run_id,
        job_name=run.job_name,
        asset_keys=outcomes.failed,
        error_types=outcomes.error_types,
        counts={
            "failed_steps": outcomes.failed_steps,
            "assets_failed": len(outcomes.failed),
            "assets_not_run": len(outcomes.not_run),
            "assets_materialized": len(outcomes.materialized),
        },
        link=run_link(run.run_id, environ),
    )


@dg.run_failure_sensor(
    name=RUN_FAILURE_ALERT,
    minimum_interval_seconds=30,
    description=(
        "Sends an alert (webhook and/or e-mail, STARVIT_ALERT_*) for every failed run: job, "
        "run id, failed assets, exception classes and counts; never the error message."
    ),
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def alert_on_run_failure(context: dg.RunFailureSensorContext) -> dg.SkipReason | None:
    notifiers = notifiers_from_env()
    if not notifiers:
        return dg.SkipReason("no alert notifier configured (STARVIT_ALERT_*)")
    alert = run_failure_alert(context.instance, context.dagster_run)
    report = send_alert(alert, notifiers)
    context.log.info(
        f"run failure alert for {context.dagster_run.run_id}: delivered to "
        f"{len(report.delivered)} notifier(s), failed on {len(report.failed)}"
    )
    if report.nothing_delivered:
        # Raising keeps the run unprocessed, so the next tick tries again.
        raise NotifyError("; ".join(report.failed))
    return None


# --- asset checks and freshness --------------------------------------------------------------


@dataclass(frozen=True)
class AlertCursor:
    check: int
    freshness: int

    def dumps(self) -> str:
        return json.dumps({"check": self.check, "freshness": self.freshness})

    @classmethod
    def parse(cls, text: str | None) -> "AlertCursor | None":
        if not text:
            return None
        data = json.loads(text)
        return cls(check=int(data["check"]), freshness=int(data["freshness"]))

    @classmethod
    def now(cls, instance: dg.DagsterInstance) -> "AlertCursor":
        """Start at the newest events: history is not re-alerted when the sensor is turned on."""
        return cls(
            check=latest_storage_id(instance, dg.DagsterEventType.ASSET_CHECK_EVALUATION),
            freshness=latest_storage_id(instance, dg.DagsterEventType.FRESHNESS_STATE_CHANGE),
        )


def check_failure_alerts(
    records: Sequence[dg.EventLogRecord], environ: Mapping[str, str] | None = None
) -> list[Alert]:
    """One alert per run for the failed check evaluations among ``records``."""
    by_run: dict[str, list[CheckFailure]] = {}
    for record in records:
        event = record.event_log_entry.dagster_event
        evaluation = event.event_specific_data if event is not None else None
        if not isinstance(evaluation, dg.AssetCheckEvaluation) or evaluation.passed:
            continue
        by_run.setdefault(record.run_id, []).append(
            CheckFailure(
                asset_key=evaluation.asset_key.to_user_string(),
                check_name=evaluation.check_name,
                severity=_state(evaluation.severity),
            )
        )
    alerts: list[Alert] = []
    for run_id, failures in by_run.items():
        keys = tuple(dict.fromkeys(failure.asset_key for failure in failures))
        alerts.append(
            Alert(
                kind="check_failure",
                # Checks reported outside a run carry an empty run id.
                run_id=run_id or None,
                asset_keys=keys,
                failed_checks=tuple(failures),
                counts={
                    "checks_failed": len(failures),
                    "blocking_severity": sum(f.severity == "ERROR" for f in failures),
                },
                link=run_link(run_id, environ) if run_id else asset_link(keys[0], environ),
            )
        )
    return alerts


def freshness_alert(
    records: Sequence[dg.EventLogRecord], environ: Mapping[str, str] | None = None
) -> Alert | None:
    """One alert for the freshness degradations and recoveries among ``records``."""
    changes: list[FreshnessChange] = []
    for record in records:
        event = record.event_log_entry.dagster_event
        # FreshnessStateChange is not exported by dagster, hence read by attribute.
        change: Any = event.event_specific_data if event is not None else None
        if change is None or not hasattr(change, "new_state"):
            continue
        new, previous = _state(change.new_state), _state(change.previous_state)
        if new in _BAD_FRESHNESS or (new == "PASS" and previous in _BAD_FRESHNESS):
            changes.append(FreshnessChange(change.key.to_user_string(), previous, new))
    if not changes:
        return None
    return Alert(
        kind="freshness",
        asset_keys=tuple(dict.fromkeys(change.asset_key for change in changes)),
        freshness_changes=tuple(changes),
        counts={
            "failing": sum(c.new_state == "FAIL" for c in changes),
            "warning": sum(c.new_state == "WARN" for c in changes),
            "recovered": sum(c.new_state == "PASS" for c in changes),
        },
        link=asset_link(changes[0].asset_key, environ) if len(changes) == 1 else None,
    )


def asset_health_alerts(
    instance: dg.DagsterInstance,
    cursor: AlertCursor,
    environ: Mapping[str, str] | None = None,
) -> tuple[list[Alert], AlertCursor]:
    checks = event_records_after(instance, dg.DagsterEventType.ASSET_CHECK_EVALUATION, cursor.check)
    freshness = event_records_after(
        instance, dg.DagsterEventType.FRESHNESS_STATE_CHANGE, cursor.freshness
    )
    alerts = check_failure_alerts(checks, environ)
    fresh = freshness_alert(freshness, environ)
    if fresh is not None:
        alerts.append(fresh)
    advanced = AlertCursor(
        check=checks[-1].storage_id if checks else cursor.check,
        freshness=freshness[-1].storage_id if freshness else cursor.freshness,
    )
    return alerts, advanced


@dg.sensor(
    name=ASSET_ALERTS,
    minimum_interval_seconds=60,
    description=(
        "Sends an alert for failed asset check evaluations (one per run) and for freshness "
        "state changes to WARN or FAIL and back to PASS, as emitted by the freshness daemon."
    ),
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def alert_on_asset_health(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    instance = context.instance
    cursor = AlertCursor.parse(context.cursor)
    notifiers = notifiers_from_env()
    if cursor is None or not notifiers:
        # Nothing is owed for the past: start (or keep) the cursor at the newest events.
        return dg.SensorResult(
            cursor=AlertCursor.now(instance).dumps(),
            skip_reason=None if notifiers else "no alert notifier configured (STARVIT_ALERT_*)",
        )
    alerts, advanced = asset_health_alerts(instance, cursor)
    for alert in alerts:
        report = send_alert(alert, notifiers)
        if report.nothing_delivered:
            # The cursor is not saved, so these events are alerted again on the next tick.
            raise NotifyError("; ".join(report.failed))
    context.log.info(f"sent {len(alerts)} asset health alert(s)")
    return dg.SensorResult(cursor=advanced.dumps())


# --- audit trail -----------------------------------------------------------------------------


def _audit_sensor(status: dg.DagsterRunStatus) -> dg.SensorDefinition:
    @dg.run_status_sensor(
        run_status=status,
        name=f"audit_run_{status.value.lower()}",
        minimum_interval_seconds=30,
        description=(
            f"Writes every {status.value} run to the audit schema: run, materializations "
            "(allowlisted metadata only), their inputs and check results. Idempotent."
        ),
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def _audit(context: dg.RunStatusSensorContext) -> None:
        run_id = context.dagster_run.run_id
        written = record_run(audit_dsn(), context.instance, run_id)
        context.log.info(
            f"audit: run {run_id}: {written.materializations} materialization(s), "
            f"{written.inputs} input link(s), {written.checks} check result(s) written"
        )

    return _audit


AUDIT_SENSORS: list[dg.SensorDefinition] = [
    _audit_sensor(status)
    for status in (
        dg.DagsterRunStatus.SUCCESS,
        dg.DagsterRunStatus.FAILURE,
        dg.DagsterRunStatus.CANCELED,
    )
]


# --- OpenLineage -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LineageCursor:
    materialization: int = 0
    run_failure: int = 0

    def dumps(self) -> str:
        return json.dumps(
            {"materialization": self.materialization, "run_failure": self.run_failure}
        )

    @classmethod
    def parse(cls, text: str | None) -> "LineageCursor":
        if not text:
            return cls()
        data = json.loads(text)
        return cls(int(data["materialization"]), int(data["run_failure"]))


def _upstream_lookup(
    repository_def: dg.RepositoryDefinition | None,
) -> Callable[[dg.AssetKey, dg.EventLogRecord | None], list[str]]:
    """Parents from the asset graph; for an asset outside it, from the materialization's
    input tags (a failed asset has none)."""
    graph = repository_def.asset_graph if repository_def is not None else None

    def upstream(key: dg.AssetKey, record: dg.EventLogRecord | None) -> list[str]:
        if graph is not None and graph.has(key):
            return sorted(parent.to_user_string() for parent in graph.get(key).parent_keys)
        return upstream_from_tags(record) if record is not None else []

    return upstream


@dataclass(frozen=True)
class LineageTick:
    emitted: int
    cursor: LineageCursor
    error: str | None = None


def emit_lineage(
    instance: dg.DagsterInstance,
    transport: Transport,
    cursor: LineageCursor,
    repository_def: dg.RepositoryDefinition | None = None,
    namespace: str = "starvit",
) -> LineageTick:
    """COMPLETE per new materialization, FAIL per asset of newly failed runs whose step failed.

    Stops at the first emit error; the returned cursor covers what was emitted.
    """
    upstream = _upstream_lookup(repository_def)
    job_names: dict[str, str | None] = {}

    def job_of(run_id: str) -> str | None:
        if run_id not in job_names:
            run = instance.get_run_by_id(run_id) if run_id else None
            job_names[run_id] = run.job_name if run is not None else None
        return job_names[run_id]

    emitted = 0
    position = cursor
    try:
        for record in event_records_after(
            instance, dg.DagsterEventType.ASSET_MATERIALIZATION, cursor.materialization
        ):
            if record.asset_key is None:
                continue
            event = complete_event(
                record,
                upstream=upstream(record.asset_key, record),
                job_name=job_of(record.run_id),
                namespace=namespace,
            )
            if event is not None:
                transport.emit(event)
                emitted += 1
            position = LineageCursor(record.storage_id, position.run_failure)
        for record in event_records_after(
            instance, dg.DagsterEventType.RUN_FAILURE, cursor.run_failure
        ):
            for key in asset_outcomes(instance, record.run_id).failed:
                transport.emit(
                    build_run_event(
                        event_type="FAIL",
                        dagster_run_id=record.run_id,
                        asset_key=key,
                        event_time=dt.datetime.fromtimestamp(record.timestamp, dt.UTC),
                        inputs=upstream(dg.AssetKey.from_user_string(key), None),
                        parent_job_name=job_of(record.run_id),
                        namespace=namespace,
                    )
                )
                emitted += 1
            position = LineageCursor(position.materialization, record.storage_id)
    except (LineageError, OSError) as error:
        return LineageTick(emitted, position, f"{type(error).__name__}: {error}")
    return LineageTick(emitted, position)


@dg.sensor(
    name=OPENLINEAGE,
    minimum_interval_seconds=60,
    description=(
        "Emits OpenLineage RunEvents (COMPLETE per materialization, FAIL per failed asset) to "
        "STARVIT_OPENLINEAGE_URL or STARVIT_OPENLINEAGE_FILE; idle when neither is set."
    ),
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def openlineage_emitter(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    transport = transport_from_env()
    if transport is None:
        return dg.SkipReason("OpenLineage is off: set STARVIT_OPENLINEAGE_URL or _FILE")
    tick = emit_lineage(
        context.instance,
        transport,
        LineageCursor.parse(context.cursor),
        context.repository_def,
        namespace_from_env(),
    )
    context.log.info(f"emitted {tick.emitted} OpenLineage event(s)")
    return dg.SensorResult(
        cursor=tick.cursor.dumps(),
        skip_reason=f"emit failed, retrying next tick ({tick.error})" if tick.error else None,
    )


ALERTING_SENSORS: list[dg.SensorDefinition] = [alert_on_run_failure, alert_on_asset_health]
OPENLINEAGE_SENSORS: list[dg.SensorDefinition] = [openlineage_emitter]
