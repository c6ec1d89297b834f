"""A local FHIR Bulk Data server (IG v2.0.0, async pattern) over a folder of NDJSON files.

Kick-off (`[base]/$export`, `[base]/Patient/$export`, `[base]/Group/<id>/$export`) by GET or by
POST of a FHIR ``Parameters`` resource, with ``Prefer: respond-async`` (and optionally
``handling=lenient``), answers 202 with a status URL; the status URL answers 202 with
``Retry-After`` and ``X-Progress`` until the export is ready, then the manifest (``output``,
``error``, ``deleted``, ``requiresAccessToken``; paged with ``link`` next when the client sent
``allowPartialManifests`` and the server has a page size); files are streamed as
``application/fhir+ndjson``. Output is filtered at kick-off into a per-export folder, so
manifest counts equal the lines served.

Supported kick-off parameters: ``_outputFormat``, ``_since`` (on ``meta.lastUpdated``),
``_type``, ``_elements`` (root elements; ``SUBSETTED`` tag), ``patient`` (POST only, not at
system level), ``_typeFilter`` (``Type?param=value[&...]`` on root elements, codings and
references, no modifiers or prefixes), ``allowPartialManifests``, ``includeAssociatedData``
(the IG's two Provenance codes, accepted; the folder holds no Provenance of the server's
making, so they add nothing). A POST body must give each parameter the IG's ``value[x]``
(``includeAssociatedData`` a ``valueCode``, ...). Other codes and parameters are refused with
400, or ignored with a warning in ``error[]`` under ``Prefer: handling=lenient``.

Data folder conventions: ``<Type>.ndjson`` and ``<Type>.<n>.ndjson`` hold resources (served
as they are: one line is one resource version); ``Group`` resources define groups by
``member.entity`` (the group ``all`` always exists and means every patient);
``_deleted.ndjson`` holds tombstones ``{"resourceType", "id", "meta": {"lastUpdated"}}``.

Auth is off by default. ``access_token`` requires one fixed bearer token; ``oauth_clients``
runs an OAuth2 token endpoint (``POST /oauth2/token``: client_credentials with
client_secret_basic, client_secret_post or a private_key_jwt assertion) with SMART discovery
at ``[base]/.well-known/smart-configuration`` (``server_auth.py``); its tokens expire after
``token_lifetime`` seconds.

``Faults`` injects the failures a production server shows (throttling, transient and fatal
errors at kick-off and while polling, odd Retry-After values, dropped, stalled, slow, expired
and short files, partial ``error[]``, expiring tokens, a failing token endpoint); the default is
no fault at all, so ``starvit fhir serve`` behaves normally. Logs carry paths and statuses
only, never resource content or credentials.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, parse_qsl, quote, unquote, urlsplit

from starvit_assets.fhir.server_auth import (
    SMART_CONFIGURATION,
    TOKEN_PATH,
    OAuthClient,
    TokenService,
)

logger = logging.getLogger("starvit.fhir.server")

BASE_PATH = "/fhir"
NDJSON_FORMATS = {"application/fhir+ndjson", "application/ndjson", "ndjson"}
KNOWN_PARAMETERS = {
    "_outputFormat",
    "_since",
    "_type",
    "_typeFilter",
    "_elements",
    "patient",
    "includeAssociatedData",
    "allowPartialManifests",
}
TOMBSTONES = "_deleted.ndjson"
SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
}
_INSTANT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
_TYPE_NAME = re.compile(r"^[A-Z][A-Za-z]+$")
_SEARCH_NAME = re.compile(r"^(_id|[a-z][A-Za-z0-9-]*)$")
_TYPE_FILTER_SPLIT = re.compile(r",(?=[A-Z][A-Za-z]+\?)")
_PATIENT_REFERENCE_FIELDS = ("subject", "patient", "beneficiary")
_CHUNK = 64 * 1024
_MAX_BODY = 1024 * 1024
_MAX_RECORDED = 100_000  # requests kept for inspection; a long `fhir serve` stays bounded
# The value[x] each kick-off parameter takes in a POST Parameters body (IG v2.0.0).
PARAMETER_TYPES = {
    "_outputFormat": "valueString",
    "_since": "valueInstant",
    "_type": "valueString",
    "_elements": "valueString",
    "patient": "valueReference",
    "includeAssociatedData": "valueCode",
    "_typeFilter": "valueString",
    "allowPartialManifests": "valueBoolean",
}
ASSOCIATED_DATA = {"LatestProvenanceResources", "RelevantProvenanceResources"}


def parse_instant(value: str) -> dt.datetime:
    if not _INSTANT.match(value):
        raise ValueError("not a FHIR instant")
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def _format_instant(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _http_date(moment: dt.datetime) -> str:
    return moment.strftime("%a, %d %b %Y %H:%M:%S GMT")


@dataclass
class Faults:
    """Failures to inject; counters count down as they fire. All off by default."""

    kickoff_429: int = 0  # kick-offs answered 429 "an export is already running"
    status_429: int = 0  # status polls answered 429 "polling too often"
    status_transient: int = 0  # status polls answered 503 + OperationOutcome "transient"
    status_fatal: bool = False  # status answers 500 + "processing": the export failed
    retry_after: str | None = None  # raw Retry-After on 202/429/503, e.g. "99999999999"
    retry_after_date_in: float | None = None  # Retry-After as an HTTP-date this far ahead
    healthy_files: int = 0  # file requests served normally before the file faults start
    drop_connection: int = 0  # file responses cut off half-way (connection closed)
    gone: int = 0  # file requests answered 410 Gone
    truncate: int = 0  # file responses missing their last line (a short, clean body)
    expired_exports: int = 0  # exports whose manifest Expires is already past
    file_503: int = 0  # file requests answered 503 + Retry-After
    error_codes: tuple[str, ...] = ()  # one OperationOutcome per code in error[]
    since_slack_seconds: float = 0.0  # re-send resources this much older than _since
    kickoff_transient: int = 0  # kick-offs answered 503 + OperationOutcome "transient"
    kickoff_fatal: bool = False  # kick-offs answered 500 + "processing": cannot start
    slow_files: int = 0  # file responses throttled: small chunks with a pause between
    slow_chunk_bytes: int = 4096
    slow_chunk_delay: float = 0.02  # seconds between the chunks of a slow file
    stall_files: int = 0  # file responses that stop half-way for stall_seconds, then close
    stall_seconds: float = 5.0
    tokens_expire_after: int | None = None  # requests each access token is good for
    token_failures: int = 0  # token requests answered token_failure_status
    token_failure_status: int = 503
    token_delay: float = 0.0  # seconds each token request takes
    discovery_without_token_endpoint: bool = False  # a misconfigured smart-configuration

    def take(self, name: str) -> bool:
        with _FAULT_LOCK:
            left = getattr(self, name)
            if left > 0:
                setattr(self, name, left - 1)
                return True
            return False

    @classmethod
    def parse(cls, assignments: Iterable[str]) -> Faults:
        """Faults from ``NAME=VALUE`` texts (``starvit fhir serve --fault``); ValueError names
        the bad one."""
        faults = cls()
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for assignment in assignments:
            name, equals, raw = assignment.partition("=")
            name = name.strip()
            if not equals or name not in fields:
                raise ValueError(
                    f"unknown fault {name!r}: use NAME=VALUE with NAME one of "
                    f"{', '.join(sorted(fields))}"
                )
            setattr(faults, name, _fault_value(name, str(fields[name].type), raw.strip()))
        return faults


_FAULT_LOCK = threading.Lock()


def _fault_value(name: str, kind: str, raw: str) -> Any:
    try:
        if kind == "bool":
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return raw.lower() in ("true", "1", "yes")
        if kind.startswith("tuple"):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if raw.lower() in ("", "none") and "None" in kind:
            return None
        if kind.startswith("int"):
            value: int | float = int(raw)
        elif kind.startswith("float"):
            value = float(raw)
        else:
            return raw
    except ValueError:
        raise ValueError(f"fault {name}: {raw!r} is not a valid {kind}") from None
    if value < 0:
        raise ValueError(f"fault {name}: must not be negative")
    return value


@dataclass(frozen=True)
class ServerRequest:
    """One request as the server saw it: method, path (no query), status, bearer sent.

    Kept in memory for tests (never logged): the headers (lower-case names), a token
    request's form, and the decoded header and claims of its client assertion.
    """

    method: str
    path: str
    status: int
    authorized: bool
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    form: Mapping[str, str] = field(default_factory=dict, repr=False)
    assertion_header: Mapping[str, Any] | None = field(default=None, repr=False)
    assertion_claims: Mapping[str, Any] | None = field(default=None, repr=False)


@dataclass
class _Export:
    folder: Path
    request: str
    transaction_time: str
    outputs: list[dict[str, Any]]
    deleted: list[dict[str, Any]]
    errors: list[dict[str, Any]]
    polls_left: int
    polls_total: int
    page_size: int | None
    expires_at: dt.datetime
    cancelled: bool = False


@dataclass
class _State:
    data_dir: Path
    work_dir: Path
    polls_before_ready: int
    retry_after_seconds: int
    max_lines_per_file: int | None
    manifest_page_size: int | None
    expires_seconds: float
    access_token: str | None
    tokens: TokenService | None
    requires_access_token: bool
    faults: Faults
    exports: dict[str, _Export] = field(default_factory=dict)
    requests: deque[ServerRequest] = field(default_factory=lambda: deque(maxlen=_MAX_RECORDED))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def source_files(self, resource_type: str) -> list[Path]:
        return sorted(self.data_dir.glob(f"{resource_type}.ndjson")) + sorted(
            self.data_dir.glob(f"{resource_type}.*.ndjson")
        )

    def available_types(self) -> list[str]:
        names = {path.name.split(".")[0] for path in self.data_dir.glob("*.ndjson")}
        return sorted(name for name in names if _TYPE_NAME.match(name))


class _KickOffError(Exception):
    def __init__(self, status: int, code: str, diagnostics: str) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.code = code


@dataclass
class _Selection:
    """Everything a kick-off asked for, validated."""

    types: list[str]
    since: dt.datetime | None
    elements: dict[str, set[str]]  # resource type ("*" for all) -> root element names
    type_filters: dict[str, list[list[tuple[str, str]]]]  # type -> OR of AND-ed criteria
    patients: set[str] | None  # patient ids in scope; None means every patient
    compartment: bool  # patient/group level: only Patient-compartment resources
    allow_partial: bool
    warnings: list[tuple[str, str]]


def _operation_outcome(code: str, diagnostics: str, severity: str = "error") -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }


class _Handler(BaseHTTPRequestHandler):
    server_version = "StarvitBulkData/1.1"
    state: _State
    base_url: str
    _status_sent = 0
    _recorded = False
    _assertion: tuple[Any, Any] = (None, None)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.command, self.path.split("?")[0])

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status_sent = code
        # Recorded before the body goes out, so a test that got its answer sees the record.
        self._record()
        super().send_response(code, message)

    def _record(self) -> None:
        if self._recorded:
            return
        self._recorded = True
        record = ServerRequest(
            self.command,
            urlsplit(self.path).path,
            self._status_sent,
            "Authorization" in self.headers,
            headers={name.lower(): value for name, value in self.headers.items()},
            form=getattr(self, "_form", {}),
            assertion_header=self._assertion[0],
            assertion_claims=self._assertion[1],
        )
        with self.state.lock:
            self.state.requests.append(record)

    # --- responses ---
    def _json(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        content_type = (
            "application/json" if body.get("transactionTime") else "application/fhir+json"
        )
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _empty(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _error(
        self, status: int, code: str, diagnostics: str, headers: dict[str, str] | None = None
    ) -> None:
        self._json(status, _operation_outcome(code, diagnostics), headers)

    def _retry_after(self) -> str:
        faults = self.state.faults
        if faults.retry_after is not None:
            return faults.retry_after
        if faults.retry_after_date_in is not None:
            moment = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=faults.retry_after_date_in)
            return _http_date(moment)
        return str(self.state.retry_after_seconds)

    # --- routing ---
    def _bearer_ok(self) -> bool:
        authorization = self.headers.get("Authorization")
        tokens = self.state.tokens
        if tokens is not None:
            return tokens.accepts(authorization, max_uses=self.state.faults.tokens_expire_after)
        token = self.state.access_token
        return token is None or authorization == f"Bearer {token}"

    def _unauthorized(self) -> None:
        # RFC 6750 3: no error code when no token came; invalid_token for an expired, revoked
        # or used-up one, without saying which.
        challenge = 'Bearer error="invalid_token"' if "Authorization" in self.headers else "Bearer"
        self._error(
            401, "login", "a valid bearer token is required", {"WWW-Authenticate": challenge}
        )

    def _dispatch(self, handler: Callable[[], None]) -> None:
        self._status_sent = 0
        self._recorded = False
        self._form: dict[str, str] = {}
        self._assertion: tuple[Any, Any] = (None, None)
        try:
            handler()
        finally:
            self._record()  # a request that failed before any response (status 0)

    def do_GET(self) -> None:
        self._dispatch(self._get)

    def do_POST(self) -> None:
        self._dispatch(self._post)

    def do_DELETE(self) -> None:
        self._dispatch(self._delete)

    def _route(self) -> tuple[str, str] | None:
        url = urlsplit(self.path)
        if not url.path.startswith(BASE_PATH + "/"):
            self._error(404, "not-found", "unknown path")
            return None
        return url.path[len(BASE_PATH) :], url.query

    @staticmethod
    def _is_kick_off(route: str) -> bool:
        return route in ("/$export", "/Patient/$export") or bool(
            re.fullmatch(r"/Group/[^/]+/\$export", route)
        )

    def _get(self) -> None:
        routed = self._route()
        if routed is None:
            return
        route, raw_query = routed
        if route == "/metadata":
            self._json(200, _capability_statement())
            return
        if route == SMART_CONFIGURATION:
            self._smart_configuration()
            return
        if route.startswith("/$export-file/"):
            self._file(route.removeprefix("/$export-file/"))
            return
        if not self._bearer_ok():
            self._unauthorized()
            return
        if self._is_kick_off(route):
            query = parse_qs(raw_query, keep_blank_values=True)
            self._kick_off(
                route,
                f"{self.base_url}{route}" + (f"?{raw_query}" if raw_query else ""),
                query,
                post=False,
            )
        elif route.startswith("/$export-status/"):
            self._status(route.removeprefix("/$export-status/"))
        elif route.startswith("/$export-manifest/"):
            export_id, _, page = route.removeprefix("/$export-manifest/").partition("/")
            self._manifest_page(export_id, page)
        elif _TYPE_NAME.match(route.lstrip("/")):
            self._search_count(route.lstrip("/"), parse_qs(raw_query, keep_blank_values=True))
        else:
            self._error(404, "not-found", "unknown path")

    def _post(self) -> None:
        if urlsplit(self.path).path == TOKEN_PATH:
            self._token()
            return
        routed = self._route()
        if routed is None:
            return
        route, _ = routed
        if not self._is_kick_off(route):
            self._error(404, "not-found", "unknown path")
            return
        if not self._bearer_ok():
            self._unauthorized()
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self._error(413, "too-costly", "the Parameters body is too large")
            return
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            query = _parameters_to_query(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            self._error(400, "invalid", "the body must be a FHIR Parameters resource")
            return
        except ValueError as error:
            self._error(400, "invalid", f"the body must be a FHIR Parameters resource: {error}")
            return
        # For a POST the IG's manifest.request is the URL without the parameters.
        self._kick_off(route, f"{self.base_url}{route}", query, post=True)

    def _delete(self) -> None:
        routed = self._route()
        if routed is None:
            return
        if not self._bearer_ok():
            self._unauthorized()
            return
        export_id = routed[0].removeprefix("/$export-status/")
        with self.state.lock:
            export = self.state.exports.get(export_id)
            if export is None or export.cancelled:
                self._error(404, "not-found", "no such export")
                return
            export.cancelled = True
        shutil.rmtree(export.folder, ignore_errors=True)
        self._json(202, _operation_outcome("informational", "export cancelled", "information"))

    # --- authorization server ---
    def _origin(self) -> str:
        return self.base_url.removesuffix(BASE_PATH)

    def _smart_configuration(self) -> None:
        tokens = self.state.tokens
        if tokens is None:
            # Without OAuth there is nothing to discover (SMART: 404 is the right answer).
            self._error(404, "not-found", "this server does not use OAuth")
            return
        broken = self.state.faults.discovery_without_token_endpoint
        config = tokens.smart_configuration(self._origin(), without_token_endpoint=broken)
        payload = json.dumps(config).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _token(self) -> None:
        tokens = self.state.tokens
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(min(length, _MAX_BODY)) if length else b""
        if tokens is None:
            self._oauth_json(404, {"error": "not_found"}, {})
            return
        headers = {name.lower(): value for name, value in self.headers.items()}
        if headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            try:
                self._form = dict(parse_qsl(body.decode(), keep_blank_values=True))
            except UnicodeDecodeError:
                self._form = {}
        faults = self.state.faults
        if faults.take("token_failures"):
            self._oauth_json(faults.token_failure_status, {"error": "temporarily_unavailable"}, {})
            return
        if faults.token_delay:
            time.sleep(faults.token_delay)
        # The assertion's aud must name this endpoint, as this client reached it (Host header)
        # or as the server announces it.
        audiences = {self._origin() + TOKEN_PATH}
        if self.headers.get("Host"):
            audiences.add(f"http://{self.headers['Host']}{TOKEN_PATH}")
        outcome = tokens.token(headers, self._form, audiences)
        self._assertion = (outcome.assertion_header, outcome.assertion_claims)
        self._oauth_json(outcome.status, outcome.body, outcome.headers)

    def _oauth_json(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    # --- operations ---
    def _kick_off(
        self, route: str, request_url: str, query: dict[str, list[str]], *, post: bool
    ) -> None:
        if "respond-async" not in self.headers.get("Prefer", ""):
            self._error(400, "invalid", "the Prefer header must include respond-async")
            return
        if self.state.faults.take("kickoff_429"):
            self._error(
                429,
                "throttled",
                "an export is already running",
                {"Retry-After": self._retry_after()},
            )
            return
        if self.state.faults.take("kickoff_transient"):
            self._error(503, "transient", "try again later", {"Retry-After": self._retry_after()})
            return
        if self.state.faults.kickoff_fatal:
            self._error(500, "processing", "the export could not be started")
            return
        lenient = "handling=lenient" in self.headers.get("Prefer", "")
        try:
            selection = self._select(route, query, post=post, lenient=lenient)
        except _KickOffError as error:
            self._error(error.status, error.code, str(error))
            return
        export_id = uuid.uuid4().hex
        folder = self.state.work_dir / export_id
        folder.mkdir(parents=True)
        transaction_time = dt.datetime.now(dt.UTC)
        outputs, deleted, problems = _build_export(
            self.state, selection, folder, self._file_url(export_id)
        )
        errors: list[dict[str, Any]] = []
        outcomes = [
            _operation_outcome(code, diagnostics, "warning")
            for code, diagnostics in selection.warnings
        ]
        outcomes += [_operation_outcome("invalid", diagnostics) for diagnostics in problems]
        outcomes += [
            _operation_outcome(code, "injected export error")
            for code in self.state.faults.error_codes
        ]
        if outcomes:
            with (folder / "_errors.ndjson").open("w") as handle:
                for outcome in outcomes:
                    handle.write(json.dumps(outcome) + "\n")
            errors.append(
                {
                    "type": "OperationOutcome",
                    "url": self._file_url(export_id)("_errors.ndjson"),
                    "count": len(outcomes),
                }
            )
        expires_at = transaction_time + dt.timedelta(seconds=self.state.expires_seconds)
        if self.state.faults.take("expired_exports"):
            expires_at = transaction_time - dt.timedelta(seconds=60)
        page_size = self.state.manifest_page_size if selection.allow_partial else None
        with self.state.lock:
            self.state.exports[export_id] = _Export(
                folder=folder,
                request=request_url,
                transaction_time=_format_instant(transaction_time),
                outputs=outputs,
                deleted=deleted,
                errors=errors,
                polls_left=self.state.polls_before_ready,
                polls_total=self.state.polls_before_ready,
                page_size=page_size,
                expires_at=expires_at,
            )
        self._empty(
            HTTPStatus.ACCEPTED, {"Content-Location": f"{self.base_url}/$export-status/{export_id}"}
        )

    def _file_url(self, export_id: str) -> Callable[[str], str]:
        return lambda name: f"{self.base_url}/$export-file/{export_id}/{quote(name)}"

    def _select(
        self, route: str, query: dict[str, list[str]], *, post: bool, lenient: bool
    ) -> _Selection:
        warnings: list[tuple[str, str]] = []

        def refuse(code: str, diagnostics: str) -> None:
            # The IG: refuse what is not supported, unless the client asked for leniency.
            if not lenient:
                raise _KickOffError(400, code, diagnostics)
            warnings.append((code, f"ignored: {diagnostics}"))

        for name in sorted(set(query) - KNOWN_PARAMETERS):
            refuse("not-supported", f"parameter {name} is not supported")
        output_format = query.get("_outputFormat", ["application/fhir+ndjson"])[0]
        if output_format not in NDJSON_FORMATS:
            raise _KickOffError(400, "not-supported", "only ndjson output is supported")
        types = self.state.available_types()
        if "_type" in query:
            types = _split(query["_type"])
            if any(not _TYPE_NAME.match(name) for name in types):
                raise _KickOffError(400, "invalid", "invalid _type")
        since = None
        if "_since" in query:
            try:
                since = parse_instant(query["_since"][0])
            except ValueError:
                raise _KickOffError(400, "invalid", "_since must be a FHIR instant") from None
        elements: dict[str, set[str]] = {}
        for element in _split(query.get("_elements", [])):
            resource_type, _, name = element.rpartition(".")
            if "." in name or not name:
                raise _KickOffError(400, "invalid", "_elements takes root elements only")
            elements.setdefault(resource_type or "*", set()).add(name)
        for value in _split(query.get("includeAssociatedData", [])):
            # The folder holds no Provenance of its own making, so a supported value adds
            # nothing; custom (_-prefixed) and unknown values are refused, as the IG asks.
            if value not in ASSOCIATED_DATA:
                refuse("not-supported", f"includeAssociatedData value {value} is not supported")
        type_filters = _parse_type_filters(query.get("_typeFilter", []))
        allow_partial = query.get("allowPartialManifests", ["false"])[0].lower() == "true"
        level_patients = self._level_patients(route)
        compartment = route != "/$export"
        patients = level_patients
        requested = [ref.removeprefix("Patient/") for ref in _split(query.get("patient", []))]
        if requested:
            if not post:
                refuse("invalid", "the patient parameter is only allowed in a POST kick-off")
            elif not compartment:
                refuse("invalid", "the patient parameter does not apply to a system-level export")
            else:
                outside = [
                    p for p in requested if level_patients is not None and p not in level_patients
                ]
                if outside:
                    refuse("not-found", f"{len(outside)} requested patient(s) are not in the group")
                patients = {p for p in requested if level_patients is None or p in level_patients}
        return _Selection(
            types=types,
            since=since,
            elements=elements,
            type_filters=type_filters,
            patients=patients,
            compartment=compartment,
            allow_partial=allow_partial,
            warnings=warnings,
        )

    def _level_patients(self, route: str) -> set[str] | None:
        if not route.startswith("/Group/"):
            return None
        group_id = unquote(route.split("/")[2])
        if group_id == "all":
            return None
        for line in _lines(self.state.source_files("Group")):
            group = json.loads(line)
            if group.get("id") == group_id:
                return {
                    str(member.get("entity", {}).get("reference", "")).removeprefix("Patient/")
                    for member in group.get("member", [])
                }
        raise _KickOffError(404, "not-found", "unknown group")

    def _status(self, export_id: str) -> None:
        faults = self.state.faults
        with self.state.lock:
            export = self.state.exports.get(export_id)
        if export is None or export.cancelled:
            self._error(404, "not-found", "no such export")
            return
        if faults.status_fatal:
            self._error(500, "processing", "the export failed")
            return
        if faults.take("status_429"):
            self._error(
                429, "throttled", "polling too frequently", {"Retry-After": self._retry_after()}
            )
            return
        if faults.take("status_transient"):
            self._error(503, "transient", "try again later", {"Retry-After": self._retry_after()})
            return
        with self.state.lock:
            polls_left = export.polls_left
            export.polls_left = max(0, polls_left - 1)
        if polls_left > 0:
            done = export.polls_total - polls_left
            headers = {
                "Retry-After": self._retry_after(),
                "X-Progress": f"{int(100 * done / max(1, export.polls_total))}% complete",
            }
            if export.page_size:
                # STU3 partial manifest: the files ready so far, no link yet.
                self._json(202, self._manifest_body(export, export_id, 1, with_link=False), headers)
            else:
                self._empty(HTTPStatus.ACCEPTED, headers)
            return
        self._send_manifest(export, export_id, 1)

    def _manifest_page(self, export_id: str, page: str) -> None:
        with self.state.lock:
            export = self.state.exports.get(export_id)
        if export is None or export.cancelled or not page.isdigit() or not export.page_size:
            self._error(404, "not-found", "no such manifest page")
            return
        self._send_manifest(export, export_id, int(page))

    def _send_manifest(self, export: _Export, export_id: str, page: int) -> None:
        body = self._manifest_body(export, export_id, page, with_link=True)
        if body is None:
            self._error(404, "not-found", "no such manifest page")
            return
        # send_response already adds Date, which the client measures Expires against.
        self._json(200, body, {"Expires": _http_date(export.expires_at)})

    def _manifest_body(self, export: _Export, export_id: str, page: int, *, with_link: bool) -> Any:
        size = export.page_size or max(1, len(export.outputs))
        pages = max(1, -(-len(export.outputs) // size))
        if page > pages:
            return None
        manifest: dict[str, Any] = {
            "transactionTime": export.transaction_time,
            "request": export.request,
            "requiresAccessToken": bool(
                (self.state.access_token or self.state.tokens) and self.state.requires_access_token
            ),
            "output": export.outputs[(page - 1) * size : page * size],
            "deleted": export.deleted if page == 1 else [],
            "error": export.errors,
        }
        if with_link and page < pages:
            manifest["link"] = [
                {
                    "relation": "next",
                    "url": f"{self.base_url}/$export-manifest/{export_id}/{page + 1}",
                }
            ]
        return manifest

    def _file(self, tail: str) -> None:
        export_id, _, name = tail.partition("/")
        name = unquote(name)
        with self.state.lock:
            export = self.state.exports.get(export_id)
        if export is None or export.cancelled or "/" in name or not name.endswith(".ndjson"):
            self._error(404, "not-found", "no such file")
            return
        if self.state.requires_access_token and not self._bearer_ok():
            self._unauthorized()
            return
        path = export.folder / name
        if not path.is_file():
            self._error(404, "not-found", "no such file")
            return
        faults = self.state.faults
        if dt.datetime.now(dt.UTC) >= export.expires_at:
            self._error(410, "not-found", "the file has expired")
            return
        if faults.take("healthy_files"):
            self._send_file(path)
            return
        if faults.take("gone"):
            self._error(410, "not-found", "the file has expired")
            return
        if faults.take("file_503"):
            self._error(503, "transient", "try again later", {"Retry-After": self._retry_after()})
            return
        if faults.take("truncate"):
            with path.open("rb") as handle:
                lines = handle.readlines()
            self._send_ndjson_bytes(b"".join(lines[:-1]))
            return
        if faults.take("stall_files"):
            self._send_file(path, drop=True, stall=faults.stall_seconds)
            return
        if faults.take("slow_files"):
            self._send_file(
                path, chunk=max(1, faults.slow_chunk_bytes), pause=faults.slow_chunk_delay
            )
            return
        self._send_file(path, drop=faults.take("drop_connection"))

    def _send_file(
        self,
        path: Path,
        *,
        drop: bool = False,
        stall: float = 0.0,
        chunk: int = _CHUNK,
        pause: float = 0.0,
    ) -> None:
        size = path.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", "application/fhir+ndjson")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        with path.open("rb") as handle:
            if drop:
                # Half the promised bytes, then (after a stall, if any) a closed socket:
                # what a proxy timeout or a hung storage backend does.
                self.wfile.write(handle.read(max(1, size // 2)))
                self.wfile.flush()
                time.sleep(stall)
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            while block := handle.read(chunk):
                self.wfile.write(block)
                if pause:
                    # A throttled link: each pause stays below the client's read timeout.
                    self.wfile.flush()
                    time.sleep(pause)

    def _send_ndjson_bytes(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/fhir+ndjson")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _search_count(self, resource_type: str, query: dict[str, list[str]]) -> None:
        if set(query) - {"_lastUpdated", "_summary"} or query.get("_summary", ["count"]) != [
            "count"
        ]:
            self._error(
                400, "not-supported", "only _lastUpdated=gt<instant>&_summary=count is supported"
            )
            return
        since = None
        if "_lastUpdated" in query:
            value = query["_lastUpdated"][0]
            if not value.startswith("gt"):
                self._error(400, "not-supported", "only the gt prefix is supported")
                return
            try:
                since = parse_instant(value[2:])
            except ValueError:
                self._error(400, "invalid", "_lastUpdated must be a FHIR instant")
                return
        total = _filter_into(self.state.source_files(resource_type), None, since)
        self._json(200, {"resourceType": "Bundle", "type": "searchset", "total": total})


# --- kick-off helpers -----------------------------------------------------------------------
def _split(values: list[str]) -> list[str]:
    """Repeated parameters count as one comma-delimited list (IG v2)."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _parameters_to_query(body: Any) -> dict[str, list[str]]:
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise ValueError("not a Parameters resource")
    query: dict[str, list[str]] = {}
    for parameter in body.get("parameter", []):
        if not isinstance(parameter, dict) or not isinstance(parameter.get("name"), str):
            raise ValueError("a parameter without a name")
        value: Any = None
        for key, candidate in parameter.items():
            if key.startswith("value"):
                expected = PARAMETER_TYPES.get(parameter["name"], key)
                if key != expected:
                    raise ValueError(f"{parameter['name']} takes {expected}, not {key}")
                value = candidate
        if isinstance(value, dict):
            value = value.get("reference")
        if isinstance(value, bool):
            value = "true" if value else "false"
        if value is None:
            raise ValueError("a parameter without a value")
        query.setdefault(parameter["name"], []).append(str(value))
    return query


def _parse_type_filters(values: list[str]) -> dict[str, list[list[tuple[str, str]]]]:
    filters: dict[str, list[list[tuple[str, str]]]] = {}
    for value in values:
        for subquery in _TYPE_FILTER_SPLIT.split(value):
            resource_type, _, search = subquery.partition("?")
            if not _TYPE_NAME.match(resource_type) or not search:
                raise _KickOffError(400, "invalid", "_typeFilter entries must be Type?query")
            criteria = parse_qsl(search, keep_blank_values=True)
            for name, _criterion in criteria:
                if not _SEARCH_NAME.match(name):
                    # _include, _sort, modifiers (name:exact) and chains are out of scope.
                    raise _KickOffError(
                        400, "not-supported", "only simple name=value _typeFilter criteria"
                    )
            filters.setdefault(resource_type, []).append(criteria)
    return filters


def _value_matches(field_value: Any, wanted: str) -> bool:
    if isinstance(field_value, list):
        return any(_value_matches(item, wanted) for item in field_value)
    if isinstance(field_value, bool):
        return wanted.lower() == ("true" if field_value else "false")
    if isinstance(field_value, str | int | float):
        return str(field_value).lower() == wanted.lower()
    if isinstance(field_value, dict):
        if "coding" in field_value:
            return _value_matches(field_value["coding"], wanted)
        if "code" in field_value:
            system = field_value.get("system", "")
            code = str(field_value["code"])
            return wanted in (code, f"{system}|{code}")
        if "reference" in field_value:
            reference = str(field_value["reference"])
            return reference == wanted or reference.endswith("/" + wanted)
    return False


def _matches_filters(resource: dict[str, Any], filters: list[list[tuple[str, str]]]) -> bool:
    for criteria in filters:
        if all(
            any(
                _value_matches(resource.get("id") if name == "_id" else resource.get(name), v)
                for v in value.split(",")
            )
            for name, value in criteria
        ):
            return True
    return False


def _patient_of(resource: dict[str, Any]) -> str | None:
    if resource.get("resourceType") == "Patient":
        return str(resource.get("id"))
    for name in _PATIENT_REFERENCE_FIELDS:
        value = resource.get(name)
        if isinstance(value, dict) and str(value.get("reference", "")).startswith("Patient/"):
            return str(value["reference"]).removeprefix("Patient/")
    return None


def _subset(resource: dict[str, Any], elements: dict[str, set[str]]) -> dict[str, Any]:
    wanted = elements.get("*", set()) | elements.get(str(resource.get("resourceType")), set())
    if not wanted:
        return resource
    kept = {k: v for k, v in resource.items() if k in wanted or k in ("resourceType", "id", "meta")}
    meta = dict(kept.get("meta") or {})
    meta["tag"] = [*meta.get("tag", []), SUBSETTED]
    kept["meta"] = meta
    return kept


def _lines(paths: list[Path]) -> Iterator[bytes]:
    for path in paths:
        with path.open("rb") as handle:
            for line in handle:
                if line.strip():
                    yield line


def _tombstones(data_dir: Path) -> dict[str, dt.datetime]:
    path = data_dir / TOMBSTONES
    tombs: dict[str, dt.datetime] = {}
    if not path.is_file():
        return tombs
    for line in _lines([path]):
        entry = json.loads(line)
        when = parse_instant(entry["meta"]["lastUpdated"])
        key = f"{entry['resourceType']}/{entry['id']}"
        tombs[key] = max(when, tombs.get(key, when))
    return tombs


def _updated(resource: dict[str, Any]) -> dt.datetime | None:
    value = (resource.get("meta") or {}).get("lastUpdated")
    try:
        return parse_instant(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _build_export(
    state: _State, selection: _Selection, folder: Path, file_url: Callable[[str], str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """Filter the source into ``folder``; returns (output items, deleted items, problems)."""
    since = selection.since
    if since is not None and state.faults.since_slack_seconds:
        since -= dt.timedelta(seconds=state.faults.since_slack_seconds)
    tombs = _tombstones(state.data_dir)
    outputs: list[dict[str, Any]] = []
    problems: list[str] = []
    needs_parse = bool(
        since or tombs or selection.compartment or selection.elements or selection.type_filters
    )
    for resource_type in selection.types:
        writer = _SplitWriter(folder, resource_type, state.max_lines_per_file)
        filters = selection.type_filters.get(resource_type)
        for path in state.source_files(resource_type):
            with path.open("rb") as lines:
                for number, line in enumerate(lines, start=1):
                    if not line.strip():
                        continue
                    if not needs_parse:
                        writer.write(line)
                        continue
                    try:
                        resource = json.loads(line)
                    except json.JSONDecodeError:
                        problems.append(f"{path.name} line {number} is not valid JSON; skipped")
                        continue
                    updated = _updated(resource)
                    if since is not None and (updated is None or updated <= since):
                        continue
                    tomb = tombs.get(f"{resource_type}/{resource.get('id')}")
                    if tomb is not None and (updated is None or tomb >= updated):
                        continue
                    if selection.compartment:
                        patient = _patient_of(resource)
                        if patient is None or (
                            selection.patients is not None and patient not in selection.patients
                        ):
                            continue
                    if filters and not _matches_filters(resource, filters):
                        continue
                    if selection.elements:
                        resource = _subset(resource, selection.elements)
                        writer.write(json.dumps(resource, separators=(",", ":")).encode() + b"\n")
                    else:
                        writer.write(line)
        for name, count in writer.close():
            outputs.append({"type": resource_type, "url": file_url(name), "count": count})
    deleted: list[dict[str, Any]] = []
    if selection.since is not None:
        bundles = [
            {
                "resourceType": "Bundle",
                "type": "transaction",
                "meta": {"lastUpdated": _format_instant(when)},
                "entry": [{"request": {"method": "DELETE", "url": key}}],
            }
            for key, when in sorted(tombs.items())
            if when > selection.since and key.split("/")[0] in selection.types
        ]
        if bundles:
            with (folder / "_deleted.ndjson").open("w") as handle:
                for bundle in bundles:
                    handle.write(json.dumps(bundle) + "\n")
            deleted.append(
                {"type": "Bundle", "url": file_url("_deleted.ndjson"), "count": len(bundles)}
            )
    return outputs, deleted, problems


class _SplitWriter:
    """Writes ``<Type>.<n>.ndjson`` files of at most ``limit`` lines; drops empty files."""

    def __init__(self, folder: Path, resource_type: str, limit: int | None) -> None:
        self._folder = folder
        self._type = resource_type
        self._limit = limit
        self._files: list[tuple[str, int]] = []
        self._handle: BinaryIO | None = None
        self._count = 0

    def write(self, line: bytes) -> None:
        if self._handle is None or (self._limit and self._count >= self._limit):
            self._roll()
        assert self._handle is not None
        self._handle.write(line if line.endswith(b"\n") else line + b"\n")
        self._count += 1

    def _roll(self) -> None:
        self._finish()
        name = f"{self._type}.{len(self._files) + 1}.ndjson"
        self._handle = (self._folder / name).open("wb")
        self._files.append((name, 0))
        self._count = 0

    def _finish(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._files[-1] = (self._files[-1][0], self._count)
            self._handle = None

    def close(self) -> list[tuple[str, int]]:
        self._finish()
        return [(name, count) for name, count in self._files if count]


def _filter_into(sources: list[Path], target: Path | None, since: dt.datetime | None) -> int:
    """Copy (or only count) the lines updated after ``since``; returns the count."""
    count = 0
    handle = target.open("wb") if target else None
    try:
        for line in _lines(sources):
            if since is not None:
                updated = json.loads(line).get("meta", {}).get("lastUpdated")
                if updated is None or parse_instant(updated) <= since:
                    continue
            count += 1
            if handle:
                handle.write(line if line.endswith(b"\n") else line + b"\n")
    finally:
        if handle:
            handle.close()
    return count


def _capability_statement() -> dict[str, Any]:
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "kind": "instance",
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "instantiates": ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"],
        "rest": [
            {
                "mode": "server",
                "operation": [
                    {
                        "name": "export",
                        "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export",
                    },
                    {
                        "name": "patient-export",
                        "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export",
                    },
                    {
                        "name": "group-export",
                        "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export",
                    },
                ],
            }
        ],
    }


class _HTTPServer(ThreadingHTTPServer):
    # The default backlog of 5 drops connections under parallel downloads and token
    # requests; the kernel then retries the SYN only after a second.
    request_queue_size = 64
    daemon_threads = True


class BulkDataServer:
    """The server. Auth is off by default; ``access_token`` turns on one fixed bearer token,
    ``oauth_clients`` the OAuth2 token endpoint (``/oauth2/token``) and SMART discovery, its
    tokens living ``token_lifetime`` seconds (None: no ``expires_in``, no expiry by time).
    ``faults`` and paging are off by default too."""

    def __init__(
        self,
        data_dir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        polls_before_ready: int = 1,
        retry_after_seconds: int = 1,
        max_lines_per_file: int | None = None,
        manifest_page_size: int | None = None,
        expires_seconds: float = 3600.0,
        access_token: str | None = None,
        oauth_clients: Iterable[OAuthClient] | None = None,
        token_lifetime: int | None = 300,
        signing_algs: tuple[str, ...] = ("RS384", "ES384"),
        token_clock: Callable[[], float] = time.monotonic,
        requires_access_token: bool = True,
        faults: Faults | None = None,
    ) -> None:
        if access_token is not None and oauth_clients is not None:
            raise ValueError("choose a fixed access_token or oauth_clients, not both")
        tokens = (
            TokenService(
                list(oauth_clients),
                token_lifetime=token_lifetime,
                signing_algs=signing_algs,
                clock=token_clock,
            )
            if oauth_clients is not None
            else None
        )
        self._work = Path(tempfile.mkdtemp(prefix="starvit-bulk-"))
        self._state = _State(
            data_dir=Path(data_dir),
            work_dir=self._work,
            polls_before_ready=polls_before_ready,
            retry_after_seconds=retry_after_seconds,
            max_lines_per_file=max_lines_per_file,
            manifest_page_size=manifest_page_size,
            expires_seconds=expires_seconds,
            access_token=access_token,
            tokens=tokens,
            requires_access_token=requires_access_token,
            faults=faults or Faults(),
        )
        handler: type[_Handler] = type(
            "Handler", (_Handler,), {"state": self._state, "base_url": ""}
        )
        self._httpd = _HTTPServer((host, port), handler)
        bound_host, bound_port = self._httpd.server_address[:2]
        handler.base_url = f"http://{bound_host!s}:{bound_port}{BASE_PATH}"
        self._handler = handler
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return str(self._handler.base_url)

    @property
    def token_url(self) -> str:
        return self.base_url.removesuffix(BASE_PATH) + TOKEN_PATH

    @property
    def auth_mode(self) -> str:
        if self._state.tokens is not None:
            return "oauth"
        return "bearer" if self._state.access_token else "none"

    def _token_service(self) -> TokenService:
        if self._state.tokens is None:
            raise ValueError("this server was started without oauth_clients")
        return self._state.tokens

    def add_client(self, client: OAuthClient) -> None:
        self._token_service().add_client(client)

    def revoke_tokens(self) -> None:
        """Forget every issued token, as a server restart or a key rotation does."""
        self._token_service().revoke_all()

    @property
    def token_requests(self) -> list[ServerRequest]:
        return [r for r in self.requests if r.path == TOKEN_PATH]

    @property
    def faults(self) -> Faults:
        return self._state.faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        self._state.faults = faults

    @property
    def requests(self) -> list[ServerRequest]:
        with self._state.lock:
            return list(self._state.requests)

    def clear_requests(self) -> None:
        with self._state.lock:
            self._state.requests.clear()

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},  # a quick stop() keeps test teardown short
            name="bulk-data-server",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread:
            self._thread.join(timeout=5)
        shutil.rmtree(self._work, ignore_errors=True)

    def serve_forever(self, on_ready: Callable[[str], None] | None = None) -> None:
        if on_ready:
            on_ready(self.base_url)
        try:
            self._httpd.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self._httpd.server_close()
            shutil.rmtree(self._work, ignore_errors=True)

    def __enter__(self) -> BulkDataServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
