"""A local FHIR R4 terminology server over the embedded service (``starvit terminology serve``).

Speaks the wire protocol a terminology client uses: ``GET [base]/metadata``; GET (query
parameters) or POST (a ``Parameters`` resource) of ``CodeSystem/$validate-code``,
``CodeSystem/$lookup``, ``ValueSet/$validate-code``, ``ValueSet/$expand`` and
``ConceptMap/$translate``; POST ``[base]`` of a ``batch`` Bundle of those calls, answered
with a ``batch-response``. Errors are ``OperationOutcome`` with 400 or 404.

``Faults`` are test knobs (off by default): answer the next requests with a status (503, 429,
...), a batch entry with a status, or delay answers to provoke client timeouts. Logs carry
paths and statuses only.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from starvit_assets.terminology.local import LocalTerminology
from starvit_assets.terminology.model import (
    Coding,
    NotFoundError,
    TranslateRequest,
    expansion_resource,
    first,
    lookup_parameters,
    operation_outcome,
    parameter_values,
    translation_parameters,
    validation_parameters,
)

logger = logging.getLogger("starvit.terminology.server")

BASE_PATH = "/fhir"
_MAX_BODY = 4 * 1024 * 1024


class _BadRequest(Exception):
    pass


@dataclass
class Faults:
    """Failures to inject; the lists are consumed front first."""

    statuses: list[int] = field(default_factory=list)  # whole-request answers, e.g. [503, 429]
    entry_statuses: list[int] = field(default_factory=list)  # first batch entry answers
    delay_seconds: float = 0.0  # added before every answer
    retry_after: str | None = None  # Retry-After sent with an injected status

    def take(self, name: str) -> int | None:
        queue: list[int] = getattr(self, name)
        return queue.pop(0) if queue else None


@dataclass(frozen=True)
class ServedRequest:
    method: str
    path: str
    status: int
    entries: int
    """Calls in a batch Bundle (1 for a plain operation call)."""


def _coding_from(values: dict[str, list[Any]], system_name: str) -> Coding:
    coding = first(values, "coding")
    if isinstance(coding, dict):
        system, code, display = coding.get("system"), coding.get("code"), coding.get("display")
    else:
        system, code, display = first(values, system_name), first(values, "code"), None
        display = first(values, "display")
    if not isinstance(system, str) or not isinstance(code, str):
        raise _BadRequest(f"needs a code and a {system_name} (or a coding)")
    return Coding(system, code, display if isinstance(display, str) else None)


class TerminologyOperations:
    """The operations on Parameters in, resource out: what both the HTTP routes and the
    batch entries call. Returns (status, resource)."""

    def __init__(self, service: LocalTerminology) -> None:
        self.service = service

    def call(self, operation: str, values: dict[str, list[Any]]) -> tuple[int, dict[str, Any]]:
        try:
            return 200, self._call(operation, values)
        except _BadRequest as error:
            return 400, operation_outcome("invalid", f"{operation}: {error}")
        except NotFoundError as error:
            return 404, operation_outcome("not-found", str(error))

    def _call(self, operation: str, values: dict[str, list[Any]]) -> dict[str, Any]:
        if operation == "CodeSystem/$validate-code":
            coding = _coding_from(values, "url")
            return validation_parameters(self.service.validate_code(coding), coding.system)
        if operation == "CodeSystem/$lookup":
            return lookup_parameters(self.service.lookup(_coding_from(values, "system")))
        if operation == "ValueSet/$validate-code":
            url = first(values, "url")
            if not isinstance(url, str):
                raise _BadRequest("needs the url of the ValueSet")
            coding = _coding_from(values, "system")
            answer = self.service.validate_in_value_set(url, coding)
            return validation_parameters(answer, coding.system)
        if operation == "ValueSet/$expand":
            url = first(values, "url")
            if not isinstance(url, str):
                raise _BadRequest("needs the url of the ValueSet")
            count = first(values, "count")
            try:
                count_value = None if count is None else int(count)
            except ValueError:
                raise _BadRequest("count must be an integer") from None
            filter_text = first(values, "filter")
            expansion = self.service.expand(url, filter_text=filter_text, count=count_value)
            timestamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            return expansion_resource(expansion, f"urn:uuid:{uuid.uuid4()}", timestamp)
        if operation == "ConceptMap/$translate":
            request = TranslateRequest(
                coding=_coding_from(values, "system"),
                target_system=first(values, "targetsystem"),
                concept_map_url=first(values, "url"),
            )
            return translation_parameters(self.service.translate(request))
        raise NotFoundError(f"operation {operation} is not supported by this server")


OPERATIONS = (
    "CodeSystem/$validate-code",
    "CodeSystem/$lookup",
    "ValueSet/$validate-code",
    "ValueSet/$expand",
    "ConceptMap/$translate",
)


def _capability_statement(base_url: str) -> dict[str, Any]:
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "kind": "instance",
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json"],
        "implementation": {"description": "Starvit embedded terminology", "url": base_url},
        "rest": [
            {
                "mode": "server",
                "interaction": [{"code": "batch"}],
                "resource": [
                    {
                        "type": kind,
                        "operation": [
                            {
                                "name": op.split("$")[1],
                                "definition": f"http://hl7.org/fhir/OperationDefinition/{kind}-{op.split('$')[1]}",
                            }
                            for op in OPERATIONS
                            if op.startswith(kind)
                        ],
                    }
                    for kind in ("CodeSystem", "ValueSet", "ConceptMap")
                ],
            }
        ],
    }


@dataclass
class _State:
    operations: TerminologyOperations
    faults: Faults
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: list[ServedRequest] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    server_version = "StarvitTerminology/1.0"
    state: _State
    base_url: str

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.command, self.path.split("?")[0])

    def _send(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        payload = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test): nothing to answer

    def _record(self, status: int, entries: int) -> None:
        path = urlsplit(self.path).path
        with self.state.lock:
            self.state.requests.append(ServedRequest(self.command, path, status, entries))

    def _route(self) -> str | None:
        path = urlsplit(self.path).path.rstrip("/")
        if path != BASE_PATH and not path.startswith(BASE_PATH + "/"):
            return None
        return path[len(BASE_PATH) :].lstrip("/")

    def _injected(self) -> bool:
        faults = self.state.faults
        if faults.delay_seconds:
            time.sleep(faults.delay_seconds)
        with self.state.lock:
            status = faults.take("statuses")
        if status is None:
            return False
        headers = {"Retry-After": faults.retry_after} if faults.retry_after is not None else {}
        self._record(status, 0)
        self._send(status, operation_outcome("transient", f"injected HTTP {status}"), headers)
        return True

    def _answer(self, handler: Callable[[], tuple[int, dict[str, Any], int]]) -> None:
        if self._injected():
            return
        try:
            status, body, entries = handler()
        except _BadRequest as error:
            status, body, entries = 400, operation_outcome("invalid", str(error)), 0
        # Recorded before answering: once the client has its answer, a test may read the log.
        self._record(status, entries)
        self._send(status, body)

    def do_GET(self) -> None:
        self._answer(self._get)

    def do_POST(self) -> None:
        self._answer(self._post)

    def _get(self) -> tuple[int, dict[str, Any], int]:
        route = self._route()
        if route == "metadata":
            return 200, _capability_statement(self.base_url), 0
        if route not in OPERATIONS:
            return 404, operation_outcome("not-found", f"no route {urlsplit(self.path).path}"), 0
        values: dict[str, list[Any]] = {}
        for name, value in parse_qsl(urlsplit(self.path).query, keep_blank_values=False):
            values.setdefault(name, []).append(value)
        status, body = self.state.operations.call(route, values)
        return status, body, 1

    def _read_json(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            raise _BadRequest("request body too large")
        try:
            return json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _BadRequest("the body is not JSON") from None

    def _post(self) -> tuple[int, dict[str, Any], int]:
        route = self._route()
        body = self._read_json()
        if route == "":
            return self._batch(body)
        if route not in OPERATIONS:
            return 404, operation_outcome("not-found", f"no route {urlsplit(self.path).path}"), 0
        status, resource = self._operation(route, body)
        return status, resource, 1

    def _operation(self, route: str, body: Any) -> tuple[int, dict[str, Any]]:
        try:
            values = parameter_values(body)
        except ValueError as error:
            return 400, operation_outcome("invalid", f"{route}: {error}")
        return self.state.operations.call(route, values)

    def _batch(self, bundle: Any) -> tuple[int, dict[str, Any], int]:
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise _BadRequest("POST to the base needs a Bundle")
        if bundle.get("type") != "batch":
            raise _BadRequest("only batch Bundles are supported")
        entries = bundle.get("entry", [])
        answered = []
        for entry in entries:
            request = entry.get("request", {}) if isinstance(entry, dict) else {}
            route = str(request.get("url", "")).split("?")[0].strip("/")
            with self.state.lock:
                injected = self.state.faults.take("entry_statuses")
            if injected is not None:
                status = injected
                resource = operation_outcome("transient", f"injected HTTP {injected}")
            elif request.get("method") != "POST" or route not in OPERATIONS:
                status = 400
                resource = operation_outcome("not-supported", f"batch entry {route!r} refused")
            else:
                status, resource = self._operation(route, entry.get("resource"))
            phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
            answered.append(
                {"resource": resource, "response": {"status": f"{status} {phrase}".strip()}}
            )
        reply = {"resourceType": "Bundle", "type": "batch-response", "entry": answered}
        return 200, reply, len(entries)


class TerminologyServer:
    """The server on a thread (tests) or in the foreground (``serve_forever``)."""

    def __init__(
        self,
        service: LocalTerminology | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        faults: Faults | None = None,
    ) -> None:
        self._state = _State(
            TerminologyOperations(service or LocalTerminology()), faults or Faults()
        )
        handler: type[_Handler] = type(
            "Handler", (_Handler,), {"state": self._state, "base_url": ""}
        )
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        bound_host, bound_port = self._httpd.server_address[:2]
        handler.base_url = f"http://{bound_host!s}:{bound_port}{BASE_PATH}"
        self._handler = handler
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return str(self._handler.base_url)

    @property
    def faults(self) -> Faults:
        return self._state.faults

    @property
    def requests(self) -> list[ServedRequest]:
        with self._state.lock:
            return list(self._state.requests)

    def clear_requests(self) -> None:
        with self._state.lock:
            self._state.requests.clear()

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="terminology-server", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    def serve_forever(self, on_ready: Callable[[str], None] | None = None) -> None:
        if on_ready:
            on_ready(self.base_url)
        try:
            self._httpd.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self._httpd.server_close()

    def __enter__(self) -> TerminologyServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
