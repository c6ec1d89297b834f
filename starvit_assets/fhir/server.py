"""A local FHIR Bulk Data server (IG v2.0.0, async pattern) over a folder of NDJSON files.

Kick-off (`[base]/$export`, `[base]/Patient/$export`, `[base]/Group/<id>/$export`) with
`Prefer: respond-async` answers 202 with a status URL; the status URL answers 202 with
`Retry-After` and `X-Progress` until the export is ready, then the manifest; files are
streamed as `application/fhir+ndjson`. Output is filtered by `_type` and `_since` into a
per-export folder at kick-off, so manifest counts equal the lines served. Logs carry paths
and statuses only, never resource content.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

logger = logging.getLogger("starvit.fhir.server")

BASE_PATH = "/fhir"
NDJSON_FORMATS = {"application/fhir+ndjson", "application/ndjson", "ndjson"}
_INSTANT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
_TYPE_NAME = re.compile(r"^[A-Z][A-Za-z]+$")
_CHUNK = 64 * 1024


def parse_instant(value: str) -> dt.datetime:
    if not _INSTANT.match(value):
        raise ValueError("not a FHIR instant")
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass
class _Export:
    folder: Path
    request: str
    transaction_time: str
    outputs: list[dict[str, Any]]
    polls_left: int
    cancelled: bool = False


@dataclass
class _State:
    data_dir: Path
    work_dir: Path
    polls_before_ready: int
    retry_after_seconds: int
    exports: dict[str, _Export] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def source_files(self, resource_type: str) -> list[Path]:
        return sorted(self.data_dir.glob(f"{resource_type}.ndjson")) + sorted(
            self.data_dir.glob(f"{resource_type}.*.ndjson")
        )

    def available_types(self) -> list[str]:
        names = {path.name.split(".")[0] for path in self.data_dir.glob("*.ndjson")}
        return sorted(name for name in names if _TYPE_NAME.match(name))


def _operation_outcome(code: str, diagnostics: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }


class _Handler(BaseHTTPRequestHandler):
    server_version = "StarvitBulkData/1.0"
    state: _State
    base_url: str

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.command, self.path.split("?")[0])

    # --- responses ---
    def _json(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _error(self, status: int, code: str, diagnostics: str) -> None:
        self._json(status, _operation_outcome(code, diagnostics))

    # --- routing ---
    def do_GET(self) -> None:
        url = urlsplit(self.path)
        path = url.path
        if not path.startswith(BASE_PATH):
            self._error(404, "not-found", "unknown path")
            return
        route = path[len(BASE_PATH) :]
        query = parse_qs(url.query, keep_blank_values=True)
        if route == "/metadata":
            self._json(200, _capability_statement())
        elif route in ("/$export", "/Patient/$export") or re.fullmatch(
            r"/Group/[^/]+/\$export", route
        ):
            self._kick_off(route, url.query, query)
        elif route.startswith("/$export-status/"):
            self._status(route.removeprefix("/$export-status/"))
        elif route.startswith("/$export-file/"):
            self._file(route.removeprefix("/$export-file/"))
        elif _TYPE_NAME.match(route.lstrip("/")):
            self._search_count(route.lstrip("/"), query)
        else:
            self._error(404, "not-found", "unknown path")

    def do_DELETE(self) -> None:
        route = urlsplit(self.path).path[len(BASE_PATH) :]
        export_id = route.removeprefix("/$export-status/")
        with self.state.lock:
            export = self.state.exports.get(export_id)
            if export is None or export.cancelled:
                self._error(404, "not-found", "no such export")
                return
            export.cancelled = True
        shutil.rmtree(export.folder, ignore_errors=True)
        self._json(202, _operation_outcome("informational", "export cancelled"))

    # --- operations ---
    def _kick_off(self, route: str, raw_query: str, query: dict[str, list[str]]) -> None:
        if "respond-async" not in self.headers.get("Prefer", ""):
            self._error(400, "invalid", "the Prefer header must include respond-async")
            return
        if route.startswith("/Group/") and route.split("/")[2] != "all":
            self._error(404, "not-found", "unknown group")
            return
        output_format = query.get("_outputFormat", ["application/fhir+ndjson"])[0]
        if output_format not in NDJSON_FORMATS:
            self._error(400, "not-supported", "only ndjson output is supported")
            return
        available = self.state.available_types()
        types = available
        if "_type" in query:
            types = [name for value in query["_type"] for name in value.split(",") if name]
            unknown = [name for name in types if not _TYPE_NAME.match(name)]
            if unknown:
                self._error(400, "invalid", "invalid _type")
                return
        since = None
        if "_since" in query:
            try:
                since = parse_instant(query["_since"][0])
            except ValueError:
                self._error(400, "invalid", "_since must be a FHIR instant")
                return
        transaction_time = dt.datetime.now(dt.UTC)
        export_id = uuid.uuid4().hex
        folder = self.state.work_dir / export_id
        folder.mkdir(parents=True)
        outputs = []
        for resource_type in types:
            count = _filter_into(
                self.state.source_files(resource_type), folder / f"{resource_type}.ndjson", since
            )
            if count:
                outputs.append(
                    {
                        "type": resource_type,
                        "url": f"{self.base_url}/$export-file/{export_id}/{resource_type}.ndjson",
                        "count": count,
                    }
                )
            else:
                (folder / f"{resource_type}.ndjson").unlink()
        request = f"{self.base_url}{route}" + (f"?{raw_query}" if raw_query else "")
        with self.state.lock:
            self.state.exports[export_id] = _Export(
                folder=folder,
                request=request,
                transaction_time=transaction_time.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
                outputs=outputs,
                polls_left=self.state.polls_before_ready,
            )
        self.send_response(HTTPStatus.ACCEPTED)
        self.send_header("Content-Location", f"{self.base_url}/$export-status/{export_id}")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _status(self, export_id: str) -> None:
        with self.state.lock:
            export = self.state.exports.get(export_id)
            if export is None or export.cancelled:
                self._error(404, "not-found", "no such export")
                return
            if export.polls_left > 0:
                done = self.state.polls_before_ready - export.polls_left
                export.polls_left -= 1
                progress = f"{int(100 * done / max(1, self.state.polls_before_ready))}% complete"
                self.send_response(HTTPStatus.ACCEPTED)
                self.send_header("Retry-After", str(self.state.retry_after_seconds))
                self.send_header("X-Progress", progress)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        manifest = {
            "transactionTime": export.transaction_time,
            "request": export.request,
            "requiresAccessToken": False,
            "output": export.outputs,
            "error": [],
        }
        self._json(
            200, manifest, {"Expires": _http_date(dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))}
        )

    def _file(self, tail: str) -> None:
        export_id, _, name = tail.partition("/")
        with self.state.lock:
            export = self.state.exports.get(export_id)
        if export is None or export.cancelled or "/" in name or not name.endswith(".ndjson"):
            self._error(404, "not-found", "no such file")
            return
        path = export.folder / name
        if not path.is_file():
            self._error(404, "not-found", "no such file")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/fhir+ndjson")
        self.send_header("Content-Length", str(path.stat().st_size))
        self.end_headers()
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                self.wfile.write(chunk)

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


def _filter_into(sources: list[Path], target: Path | None, since: dt.datetime | None) -> int:
    """Copy (or only count) the lines updated after ``since``; returns the count."""
    count = 0
    handle = target.open("wb") if target else None
    try:
        for source in sources:
            with source.open("rb") as lines:
                for line in lines:
                    if not line.strip():
                        continue
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


def _http_date(moment: dt.datetime) -> str:
    return moment.strftime("%a, %d %b %Y %H:%M:%S GMT")


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


class BulkDataServer:
    def __init__(
        self,
        data_dir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        polls_before_ready: int = 1,
        retry_after_seconds: int = 1,
    ) -> None:
        self._work = Path(tempfile.mkdtemp(prefix="starvit-bulk-"))
        self._state = _State(
            data_dir=Path(data_dir),
            work_dir=self._work,
            polls_before_ready=polls_before_ready,
            retry_after_seconds=retry_after_seconds,
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

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="bulk-data-server", daemon=True
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
