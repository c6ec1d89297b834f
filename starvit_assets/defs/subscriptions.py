"""Medplum rest-hook Subscriptions -> incremental FHIR exports of the types that changed.

Medplum POSTs a notification for every create/update matching a Subscription's criteria: the
resource itself (Medplum's rest-hook payload) or a FHIR notification Bundle. The
``SubscriptionReceiver`` (a stdlib ``ThreadingHTTPServer``) validates the body as JSON and
keeps **only the resource type(s) it names and the time received**: never an id, a reference
or any content. It writes them as a small event file into
``$STARVIT_HOME/state/subscription-events/``, the non-PHI bookkeeping folder. The
``medplum_subscription_events`` sensor turns the waiting files into one run request of the
``fhir_exports`` job for the named ``fhir/<Type>`` assets (today's partition, an incremental
export from the stored watermark); declarative automation takes it from there.

The receiver checks, when configured, a bearer token (the Subscription's ``channel.header``)
and Medplum's ``X-Signature`` (HMAC-SHA256 of the body under the Subscription's
``subscription-secret`` extension). Without either it listens on loopback only.
"""

import argparse
import contextlib
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

import dagster as dg

from starvit_assets.defs.automation import (
    INCREMENTAL_EXPORT,
    fhir_exports_job,
    fhir_full_refresh_job,
    full_lineage_job,
)
from starvit_assets.defs.extract import RESOURCE_TYPES, current_partition_key, fhir_asset_key
from starvit_assets.ops.logging import read_secret
from starvit_assets.settings import StarvitSettings, load_settings

logger = logging.getLogger("starvit.subscriptions")

SENSOR_NAME = "medplum_subscription_events"
EVENTS_FOLDER = "subscription-events"
DEFAULT_PATH = "/medplum/subscription"
DEFAULT_PORT = 8590
TOKEN_VARIABLE = "STARVIT_SUBSCRIPTION_TOKEN"
SECRET_VARIABLE = "STARVIT_SUBSCRIPTION_SECRET"
SIGNATURE_HEADER = "X-Signature"
MAX_BODY_BYTES = 16 * 1024 * 1024
# A tick claims at most this many event files; the rest wait for the next tick.
MAX_EVENTS_PER_TICK = 500
TRIGGER_TAG = "starvit/trigger"

_FHIR_TYPE = re.compile(r"^[A-Z][A-Za-z]{0,63}$")
# The type in a literal reference or a full URL; the id is matched so as to anchor, never kept.
_REFERENCE_TYPE = re.compile(
    r"(?:^|/)(?P<type>[A-Z][A-Za-z]{0,63})/[A-Za-z0-9\-.]{1,64}(?:/_history/[A-Za-z0-9\-.]{1,64})?$"
)
# Resources that carry a notification rather than being the changed data.
_NOTIFICATION_RESOURCES = frozenset({"Bundle", "SubscriptionStatus", "Parameters"})


# --- notifications -> resource types ---------------------------------------------------------
def notification_resource_types(body: Mapping[str, Any]) -> set[str]:
    """The resource types a notification names, and nothing else.

    * a resource (Medplum's rest-hook payload): its ``resourceType``;
    * a notification ``Bundle`` (R4B/R5 topic-based, or the R4 backport's ``history``
      Bundle): the type of each entry's resource, or of its ``fullUrl``/``request.url`` for
      id-only payloads, plus the types of ``SubscriptionStatus`` focus references.
    """
    resource_type = body.get("resourceType")
    if resource_type == "Bundle":
        types: set[str] = set()
        for entry in _dicts(body.get("entry")):
            resource = entry.get("resource")
            if isinstance(resource, dict):
                types |= notification_resource_types(resource)
                continue
            request = entry.get("request")
            urls = [entry.get("fullUrl"), request.get("url") if isinstance(request, dict) else None]
            types |= {t for t in map(_reference_type, urls) if t}
        return types
    if resource_type == "SubscriptionStatus":
        focus = [event.get("focus") for event in _dicts(body.get("notificationEvent"))]
        return {t for t in (_reference_type(_reference_of(f)) for f in focus) if t}
    if resource_type == "Parameters":  # the R4 backport's SubscriptionStatus
        parts = [
            p for parameter in _dicts(body.get("parameter")) for p in _dicts(parameter.get("part"))
        ]
        focus = [p.get("valueReference") for p in parts if p.get("name") == "focus"]
        return {t for t in (_reference_type(_reference_of(f)) for f in focus) if t}
    if isinstance(resource_type, str) and _FHIR_TYPE.match(resource_type):
        return {resource_type}
    return set()


def _dicts(value: object) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _reference_of(value: object) -> object:
    return value.get("reference") if isinstance(value, dict) else None


def _reference_type(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    match = _REFERENCE_TYPE.search(value.split("?")[0])
    if match is None or match["type"] in _NOTIFICATION_RESOURCES:
        return None
    return match["type"]


# --- event files -----------------------------------------------------------------------------
@dataclass(frozen=True)
class SubscriptionEvent:
    """What an event file holds: resource types and the time received. Nothing else."""

    resource_types: tuple[str, ...]
    received_at: str

    def to_json(self) -> str:
        return json.dumps(
            {"resource_types": list(self.resource_types), "received_at": self.received_at}
        )


def events_dir(settings: StarvitSettings) -> Path:
    return settings.state_dir / EVENTS_FOLDER


def write_event(folder: Path, resource_types: Iterable[str], now: dt.datetime) -> Path:
    """One event file, written atomically; names sort by the time received."""
    folder.mkdir(parents=True, exist_ok=True)
    event = SubscriptionEvent(
        resource_types=tuple(sorted(set(resource_types))),
        received_at=now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    )
    name = f"{now.astimezone(dt.UTC).strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:12]}.json"
    partial = folder / f".{name}.partial"
    partial.write_text(event.to_json())
    partial.replace(folder / name)
    return folder / name


def pending_event_files(folder: Path, limit: int = MAX_EVENTS_PER_TICK) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.glob("*.json") if not path.name.startswith("."))[:limit]


def read_event(path: Path) -> SubscriptionEvent | None:
    """The event of a file, or None when it is unreadable or not an event file."""
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(body, dict) or not isinstance(body.get("resource_types"), list):
        return None
    types = tuple(t for t in body["resource_types"] if isinstance(t, str) and _FHIR_TYPE.match(t))
    return SubscriptionEvent(resource_types=types, received_at=str(body.get("received_at", "")))


# --- the receiver ----------------------------------------------------------------------------
class SubscriptionReceiver:
    """A tiny HTTP endpoint for Medplum rest-hook notifications (see the module docstring).

    Use as a context manager (serves in a background thread) or call ``serve_forever``.
    """

    def __init__(
        self,
        events_folder: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        path: str = DEFAULT_PATH,
        token: str | None = None,
        secret: str | None = None,
        resource_types: Sequence[str] = RESOURCE_TYPES,
    ) -> None:
        if token is None and secret is None and not _is_loopback(host):
            raise ValueError(
                f"an unauthenticated subscription receiver listens on loopback only: set "
                f"{TOKEN_VARIABLE} and/or {SECRET_VARIABLE} to listen on {host}"
            )
        self.events_folder = events_folder
        self.path = path
        self.token = token
        self.secret = secret
        self.resource_types = frozenset(resource_types)
        self._server = ThreadingHTTPServer((host, port), _handler_for(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @classmethod
    def from_env(cls, settings: StarvitSettings, **kwargs: Any) -> "SubscriptionReceiver":
        """Token and secret from STARVIT_SUBSCRIPTION_TOKEN / _SECRET (or their ``_FILE``)."""
        return cls(
            events_dir(settings),
            token=_optional_secret(TOKEN_VARIABLE),
            secret=_optional_secret(SECRET_VARIABLE),
            **kwargs,
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}{self.path}"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="subscription-receiver", daemon=True
        )
        self._thread.start()

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "SubscriptionReceiver":
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def accept(self, headers: Mapping[str, str], body: bytes) -> tuple[HTTPStatus, dict]:
        """The answer to one notification, and its event file written when it names a type
        this platform exports. Answers carry resource types and reasons, never content."""
        headers = {name.lower(): value for name, value in headers.items()}
        if self.token is not None:
            expected = f"Bearer {self.token}"
            if not hmac.compare_digest(headers.get("authorization", ""), expected):
                return HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong bearer token"}
        if self.secret is not None:
            signature = hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
            given = headers.get(SIGNATURE_HEADER.lower(), "").lower()
            if not hmac.compare_digest(given, signature):
                return HTTPStatus.UNAUTHORIZED, {"error": f"missing or wrong {SIGNATURE_HEADER}"}
        content_type = headers.get("content-type", "application/json").lower()
        if "json" not in content_type:
            return HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "expected a JSON body"}
        try:
            notification = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return HTTPStatus.BAD_REQUEST, {"error": "the body is not JSON"}
        if not isinstance(notification, dict) or not isinstance(
            notification.get("resourceType"), str
        ):
            return HTTPStatus.BAD_REQUEST, {"error": "the body is not a FHIR resource"}
        types = sorted(notification_resource_types(notification) & self.resource_types)
        if types:
            write_event(self.events_folder, types, dt.datetime.now(dt.UTC))
        logger.info("subscription notification: resource types %s", types or "none exported")
        return HTTPStatus.OK, {"resource_types": types}


def _handler_for(receiver: SubscriptionReceiver) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        server_version = "StarvitSubscriptions/1.0"

        def log_message(self, format: str, *args: Any) -> None:
            # The request line may carry a query string; log the method and path only.
            logger.debug("%s %s", self.command, self.path.split("?")[0])

        def do_POST(self) -> None:
            if self.path.split("?")[0] != receiver.path:
                self._answer(HTTPStatus.NOT_FOUND, {"error": "not found"})
                return
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self._answer(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length required"})
                return
            if int(length) > MAX_BODY_BYTES:
                self._answer(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "body too large"})
                return
            body = self.rfile.read(int(length))
            status, answer = receiver.accept(dict(self.headers.items()), body)
            self._answer(status, answer)

        def do_GET(self) -> None:
            self._answer(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "POST a notification"})

        def _answer(self, status: HTTPStatus, body: dict) -> None:
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return _Handler


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _optional_secret(name: str) -> str | None:
    if os.environ.get(name) is None and os.environ.get(f"{name}_FILE") is None:
        return None
    return read_secret(name)


# --- the sensor ------------------------------------------------------------------------------
def _claimed(cursor: str | None) -> list[str]:
    if not cursor:
        return []
    try:
        names = json.loads(cursor)
    except ValueError:
        return []
    return [name for name in names if isinstance(name, str)] if isinstance(names, list) else []


def _export_in_flight(instance: dg.DagsterInstance) -> bool:
    """An export run queued or running: a second one would share its staging folder."""
    runs = instance.get_run_records(
        filters=dg.RunsFilter(
            statuses=[
                dg.DagsterRunStatus.QUEUED,
                dg.DagsterRunStatus.NOT_STARTED,
                dg.DagsterRunStatus.STARTING,
                dg.DagsterRunStatus.STARTED,
            ],
        ),
        limit=100,
    )
    export_jobs = {fhir_exports_job.name, fhir_full_refresh_job.name, full_lineage_job.name}
    return any(record.dagster_run.job_name in export_jobs for record in runs)


@dg.sensor(
    name=SENSOR_NAME,
    job=fhir_exports_job,
    minimum_interval_seconds=30,
    description=(
        "Starts an incremental FHIR export of the resource types Medplum's rest-hook "
        "Subscriptions reported (event files written by the SubscriptionReceiver); waits "
        "while an export is queued or running, so notifications coalesce into one run."
    ),
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def medplum_subscription_events(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    folder = events_dir(load_settings())
    # The files claimed on the previous tick: that tick's run request is stored with the
    # cursor that names them, so they can go now. A tick that never completed leaves them to
    # be claimed again (the same files give the same run key, so Dagster runs them once).
    for name in _claimed(context.cursor):
        (folder / name).unlink(missing_ok=True)
    files = pending_event_files(folder)
    if not files:
        return dg.SensorResult(skip_reason="no subscription events waiting", cursor="[]")
    if _export_in_flight(context.instance):
        return dg.SensorResult(
            skip_reason=f"{len(files)} event(s) wait for the running export to finish",
            cursor="[]",
        )
    types: set[str] = set()
    unreadable = 0
    for path in files:
        event = read_event(path)
        if event is None:
            unreadable += 1
        else:
            types.update(event.resource_types)
    if unreadable:
        context.log.warning(f"{unreadable} unreadable subscription event file(s) discarded")
    names = [path.name for path in files]
    selected = [t for t in RESOURCE_TYPES if t in types]
    if not selected:
        return dg.SensorResult(
            skip_reason="the waiting events name no exported resource type",
            cursor=json.dumps(names),
        )
    run_key = "medplum-" + hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    request = dg.RunRequest(
        run_key=run_key,
        asset_selection=[fhir_asset_key(t) for t in selected],
        partition_key=current_partition_key(),
        run_config=INCREMENTAL_EXPORT,
        tags={TRIGGER_TAG: "medplum-subscription", "starvit/resource_types": ",".join(selected)},
    )
    return dg.SensorResult(run_requests=[request], cursor=json.dumps(names))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m starvit_assets.defs.subscriptions``: serve until interrupted."""
    parser = argparse.ArgumentParser(description="Medplum rest-hook subscription receiver")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--path", default=DEFAULT_PATH)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    receiver = SubscriptionReceiver.from_env(
        load_settings(), host=args.host, port=args.port, path=args.path
    )
    logger.info("listening on %s", receiver.url)
    with contextlib.suppress(KeyboardInterrupt):
        receiver.serve_forever()
    receiver.stop()


if __name__ == "__main__":
    main()
