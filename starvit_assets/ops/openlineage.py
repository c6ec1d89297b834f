"""OpenLineage RunEvents for Dagster asset materializations, written without the
openlineage-python client (spec 2-0-2 field names).

One OpenLineage job per asset (namespace ``starvit``, name = the asset key), one OpenLineage run
per (Dagster run, asset), with the Dagster run as its ``parent``. Inputs are the upstream assets,
the output is the asset with its column schema and, when known, its column lineage. Events carry
names, types and identifiers only: never a value, and never an error message (the
ErrorMessageRunFacet would copy exception text, which may quote data).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol
from urllib.parse import urlsplit

import httpx

from starvit_assets.ops.delivery import post_json

if TYPE_CHECKING:
    import dagster as dg

EventType = Literal["START", "RUNNING", "COMPLETE", "ABORT", "FAIL", "OTHER"]

NAMESPACE: Final = "starvit"
PRODUCER: Final = "urn:starvit:dagster-openlineage-sensor:0.1.0"
SCHEMA_URL: Final = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent"
PARENT_FACET_URL: Final = (
    "https://openlineage.io/spec/facets/1-1-0/ParentRunFacet.json#/$defs/ParentRunFacet"
)
JOB_TYPE_FACET_URL: Final = (
    "https://openlineage.io/spec/facets/2-0-3/JobTypeJobFacet.json#/$defs/JobTypeJobFacet"
)
SCHEMA_FACET_URL: Final = (
    "https://openlineage.io/spec/facets/1-1-1/SchemaDatasetFacet.json#/$defs/SchemaDatasetFacet"
)
COLUMN_LINEAGE_FACET_URL: Final = (
    "https://openlineage.io/spec/facets/1-2-0/ColumnLineageDatasetFacet.json"
    "#/$defs/ColumnLineageDatasetFacet"
)
LINEAGE_PATH: Final = "/api/v1/lineage"

# Stable, so that the COMPLETE and FAIL events of one (Dagster run, asset) share a runId.
_RUN_NAMESPACE: Final = uuid.UUID("5f0c1d2e-7a3b-5c4d-9e8f-0a1b2c3d4e5f")


class LineageError(Exception):
    """An event could not be emitted; the message names the transport, never the event."""


@dataclass(frozen=True)
class InputField:
    """One input column an output column is computed from."""

    asset_key: str
    field: str


@dataclass(frozen=True)
class Column:
    name: str
    type: str | None = None


def lineage_run_id(dagster_run_id: str, asset_key: str) -> str:
    return str(uuid.uuid5(_RUN_NAMESPACE, f"{dagster_run_id}/{asset_key}"))


def _facet(schema_url: str, **body: Any) -> dict[str, Any]:
    return {"_producer": PRODUCER, "_schemaURL": schema_url, **body}


def _iso(moment: dt.datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def build_run_event(
    *,
    event_type: EventType,
    dagster_run_id: str,
    asset_key: str,
    event_time: dt.datetime,
    inputs: Sequence[str] = (),
    columns: Sequence[Column] | None = None,
    column_lineage: Mapping[str, Sequence[InputField]] | None = None,
    parent_job_name: str | None = None,
    namespace: str = NAMESPACE,
) -> dict[str, Any]:
    """One RunEvent for one asset in one Dagster run."""
    run_facets: dict[str, Any] = {}
    if parent_job_name:
        # Dagster run ids are UUIDs, as the ParentRunFacet requires.
        run_facets["parent"] = _facet(
            PARENT_FACET_URL,
            run={"runId": dagster_run_id},
            job={"namespace": namespace, "name": parent_job_name},
        )
    output_facets: dict[str, Any] = {}
    if columns:
        output_facets["schema"] = _facet(
            SCHEMA_FACET_URL,
            fields=[
                {"name": column.name, **({"type": column.type} if column.type else {})}
                for column in columns
            ],
        )
    if column_lineage:
        output_facets["columnLineage"] = _facet(
            COLUMN_LINEAGE_FACET_URL,
            fields={
                output: {
                    "inputFields": [
                        {"namespace": namespace, "name": source.asset_key, "field": source.field}
                        for source in sources
                    ]
                }
                for output, sources in column_lineage.items()
            },
        )
    output: dict[str, Any] = {"namespace": namespace, "name": asset_key}
    if output_facets:
        output["facets"] = output_facets
    return {
        "eventType": event_type,
        "eventTime": _iso(event_time),
        "run": {"runId": lineage_run_id(dagster_run_id, asset_key), "facets": run_facets},
        "job": {
            "namespace": namespace,
            "name": asset_key,
            "facets": {
                "jobType": _facet(
                    JOB_TYPE_FACET_URL,
                    processingType="BATCH",
                    integration="DAGSTER",
                    jobType="ASSET",
                )
            },
        },
        "inputs": [{"namespace": namespace, "name": key} for key in sorted(set(inputs))],
        "outputs": [output],
        "producer": PRODUCER,
        "schemaURL": SCHEMA_URL,
    }


_EVENT_TYPES: Final = frozenset({"START", "RUNNING", "COMPLETE", "ABORT", "FAIL", "OTHER"})


def validate_run_event(event: Mapping[str, Any]) -> list[str]:
    """Problems with the fields the 2-0-2 RunEvent schema requires; empty when none."""
    problems: list[str] = []
    for name in ("eventTime", "producer", "schemaURL", "run", "job"):
        if name not in event:
            problems.append(f"missing {name}")
    if event.get("eventType") not in _EVENT_TYPES:
        problems.append("eventType is not one of START|RUNNING|COMPLETE|ABORT|FAIL|OTHER")
    try:
        dt.datetime.fromisoformat(str(event.get("eventTime")))
    except ValueError:
        problems.append("eventTime is not an ISO 8601 date-time")
    run = event.get("run")
    if not isinstance(run, Mapping):
        problems.append("run is not an object")
    else:
        try:
            uuid.UUID(str(run.get("runId")))
        except ValueError:
            problems.append("run.runId is not a UUID")
    job = event.get("job")
    if not isinstance(job, Mapping) or not job.get("namespace") or not job.get("name"):
        problems.append("job needs namespace and name")
    for side in ("inputs", "outputs"):
        for dataset in event.get(side, []):
            if (
                not isinstance(dataset, Mapping)
                or not dataset.get("namespace")
                or not dataset.get("name")
            ):
                problems.append(f"{side} entries need namespace and name")
    for where, facets in _all_facets(event):
        for facet_name, facet in facets.items():
            if (
                not isinstance(facet, Mapping)
                or not facet.get("_producer")
                or not facet.get("_schemaURL")
            ):
                problems.append(f"{where} facet {facet_name} needs _producer and _schemaURL")
    return problems


def _all_facets(event: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    found: list[tuple[str, Mapping[str, Any]]] = []
    for where in ("run", "job"):
        part = event.get(where)
        if isinstance(part, Mapping) and isinstance(part.get("facets"), Mapping):
            found.append((where, part["facets"]))
    for side in ("inputs", "outputs"):
        for dataset in event.get(side, []):
            if isinstance(dataset, Mapping) and isinstance(dataset.get("facets"), Mapping):
                found.append((side, dataset["facets"]))
    return found


# --- from Dagster records -------------------------------------------------------------------


def _columns(metadata: Mapping[str, Any]) -> list[Column] | None:
    schema = getattr(metadata.get("dagster/column_schema"), "schema", None)
    if schema is None:
        return None
    return [Column(column.name, column.type or None) for column in schema.columns]


def _column_lineage(metadata: Mapping[str, Any]) -> dict[str, list[InputField]] | None:
    lineage = getattr(metadata.get("dagster/column_lineage"), "column_lineage", None)
    if lineage is None:
        return None
    return {
        output: [InputField(dep.asset_key.to_user_string(), dep.column_name) for dep in deps]
        for output, deps in lineage.deps_by_column.items()
    }


def complete_event(
    record: dg.EventLogRecord,
    *,
    upstream: Sequence[str],
    job_name: str | None,
    namespace: str = NAMESPACE,
) -> dict[str, Any] | None:
    """COMPLETE for one materialization record; column schema and lineage from its metadata."""
    materialization = record.asset_materialization
    if materialization is None:
        return None
    metadata = materialization.metadata
    return build_run_event(
        event_type="COMPLETE",
        dagster_run_id=record.run_id,
        asset_key=materialization.asset_key.to_user_string(),
        event_time=dt.datetime.fromtimestamp(record.timestamp, dt.UTC),
        inputs=upstream,
        columns=_columns(metadata),
        column_lineage=_column_lineage(metadata),
        parent_job_name=job_name,
        namespace=namespace,
    )


def upstream_from_tags(record: dg.EventLogRecord) -> list[str]:
    """Upstream keys Dagster wrote on the materialization, for assets outside the asset graph."""
    materialization = record.asset_materialization
    prefix = "dagster/input_event_pointer/"
    tags = (materialization.tags or {}) if materialization else {}
    return sorted(name.removeprefix(prefix) for name in tags if name.startswith(prefix))


# --- transports -----------------------------------------------------------------------------


class Transport(Protocol):
    def emit(self, event: Mapping[str, Any]) -> None: ...


class FileTransport:
    """Appends one JSON event per line, as the OpenLineage client's file transport does."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def emit(self, event: Mapping[str, Any]) -> None:
        line = (json.dumps(event, separators=(",", ":"), sort_keys=True) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One write on an O_APPEND descriptor, so lines from two processes do not interleave.
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(descriptor, line)
        finally:
            os.close(descriptor)


class HttpTransport:
    """POSTs each event to ``<url>/api/v1/lineage`` (Marquez and compatible servers)."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout: float = 10.0,
        attempts: int = 3,
        backoff_seconds: float = 1.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        base = url.rstrip("/")
        self.endpoint = base if base.endswith(LINEAGE_PATH) else base + LINEAGE_PATH
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = timeout
        self._attempts = max(1, attempts)
        self._backoff = backoff_seconds
        self._transport = transport

    def __repr__(self) -> str:
        return f"HttpTransport(endpoint={self.endpoint!r})"

    def emit(self, event: Mapping[str, Any]) -> None:
        failure = post_json(
            self.endpoint,
            event,
            headers=self._headers,
            timeout=self._timeout,
            attempts=self._attempts,
            backoff_seconds=self._backoff,
            transport=self._transport,
        )
        if failure is None:
            return
        raise LineageError(f"openlineage http: emit failed ({failure})")


def transport_from_env(environ: Mapping[str, str] | None = None) -> Transport | None:
    """``STARVIT_OPENLINEAGE_URL`` (HTTP) or ``STARVIT_OPENLINEAGE_FILE`` (NDJSON); None = off."""
    env = environ if environ is not None else os.environ
    url = env.get("STARVIT_OPENLINEAGE_URL")
    if url:
        if urlsplit(url).scheme not in ("http", "https"):
            raise LineageError("STARVIT_OPENLINEAGE_URL must be an http(s) URL")
        api_key = env.get("STARVIT_OPENLINEAGE_API_KEY")
        key_file = env.get("STARVIT_OPENLINEAGE_API_KEY_FILE")
        if not api_key and key_file:
            api_key = Path(key_file).read_text().strip() or None
        return HttpTransport(url, api_key=api_key)
    path = env.get("STARVIT_OPENLINEAGE_FILE")
    if path:
        return FileTransport(Path(path).expanduser())
    return None


def namespace_from_env(environ: Mapping[str, str] | None = None) -> str:
    env = environ if environ is not None else os.environ
    return env.get("STARVIT_OPENLINEAGE_NAMESPACE") or NAMESPACE
