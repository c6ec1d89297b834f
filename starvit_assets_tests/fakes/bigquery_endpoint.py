"""A local BigQuery REST v2 endpoint, with just enough Cloud Storage and OAuth around it.

The real ``google.cloud.bigquery.Client`` and ``google.cloud.storage.Client`` (pointed here
with ``client_options={"api_endpoint": url}``) and dbt-bigquery (profile field
``api_endpoint``) talk to it over HTTP, so tests see the request shapes those libraries really
send. Served on 127.0.0.1 and a random port:

BigQuery (``/bigquery/v2/projects/{project}/...``):

- ``datasets`` (POST: insert, 409 if it exists), ``datasets/{d}`` (GET, 404 if unknown);
- ``datasets/{d}/tables`` (GET: list; POST: insert), ``datasets/{d}/routines`` (GET: always
  empty), ``datasets/{d}/tables/{t}`` (GET, PATCH
  with ``If-Match`` etag and BigQuery's rule that a schema may only gain NULLABLE or REPEATED
  columns, DELETE);
- ``jobs`` (POST: insert), ``jobs/{id}`` (GET), ``queries/{id}`` (GET: getQueryResults),
  ``queries`` (POST: jobs.query). Jobs finish at once (state DONE).

  A *load* job reads its ``gs://`` sources from the fake's Cloud Storage, derives the table
  schema from the Parquet file the way BigQuery documents the Parquet conversion (list
  inference, decimal target types, legacy type names), and writes the destination table's
  schema and row count according to its write and create dispositions. It stores no rows.
  Sources that are missing fail the job with ``notFound``; an explicit ``schema``, a wildcard
  URI or a non-Parquet format fail it as not implemented, so code that passes here does not
  rely on something the fake only pretends to do.

  A *query* job is recorded, not executed: its SQL and parameters are kept, its result is
  empty unless :meth:`FakeBigQueryEndpoint.answer_queries` registered rows for it.
  :meth:`FakeBigQueryEndpoint.fail_jobs` makes chosen jobs finish with an error.

Cloud Storage: ``POST /upload/storage/v1/b/{bucket}/o`` (``uploadType=multipart`` and
``resumable``, then ``PUT`` of the chunks), ``ifGenerationMatch``, ``crc32c`` checked when the
client sends one; ``GET /storage/v1/b/{bucket}/o/{name}`` (metadata).

OAuth: ``POST /token`` (the ``token_uri`` of a service-account key file) answers the JWT
bearer grant with a random access token. The assertion is decoded and recorded, not verified.
A request that carries a bearer token the fake did not issue gets 401; with
``require_token=True`` a request without one does too.

Every request is recorded (:attr:`FakeBigQueryEndpoint.requests`).
"""

from __future__ import annotations

import base64
import copy
import io
import itertools
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import google_crc32c
import pyarrow as pa
import pyarrow.parquet as pq

Json = dict[str, Any]

TOKEN_PATH = "/token"
_BQ = "/bigquery/v2/projects/"
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    412: "FAILED_PRECONDITION",
    501: "NOT_IMPLEMENTED",
}
_REASONS = {
    400: "invalid",
    401: "authError",
    404: "notFound",
    409: "duplicate",
    412: "conditionNotMet",
    501: "notImplemented",
}
# Numeric precision limits (BigQuery data types): NUMERIC holds 29 integer digits and 9
# decimals, BIGNUMERIC 38 and 38.
_DECIMAL_LIMITS = {"NUMERIC": (29, 9), "BIGNUMERIC": (38, 38), "STRING": (10**6, 10**6)}


class ApiError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def body(self) -> bytes:
        reason = _REASONS.get(self.code, "backendError")
        error = {
            "code": self.code,
            "message": self.message,
            "errors": [{"reason": reason, "message": self.message, "domain": "global"}],
            "status": _STATUS_NAMES.get(self.code, "UNKNOWN"),
        }
        return json.dumps({"error": error}).encode()


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class _Upload:
    bucket: str
    metadata: Json
    if_generation_match: str | None
    total: int | None
    data: bytearray = field(default_factory=bytearray)


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def write_service_account_key(path: Path, token_uri: str, project: str) -> None:
    """A throw-away service-account key file whose ``token_uri`` is the fake's token endpoint:
    the real google-auth fetches its tokens there (``GOOGLE_APPLICATION_CREDENTIALS``, or
    dbt-bigquery's keyfile)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    info = {
        "type": "service_account",
        "project_id": project,
        "private_key_id": "local-test-key",
        "private_key": pem,
        "client_email": f"dbt-ci@{project}.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": token_uri,
    }
    path.write_text(json.dumps(info), encoding="utf-8")


def _ok(payload: Json | None, status: int = 200) -> _Response:
    return _Response(status, b"" if payload is None else json.dumps(payload).encode())


def _now_ms() -> str:
    return str(int(time.time() * 1000))


def _legacy_type(name: str) -> str:
    return {"INT64": "INTEGER", "FLOAT64": "FLOAT", "BOOL": "BOOLEAN", "STRUCT": "RECORD"}.get(
        name.upper(), name.upper()
    )


def bigquery_fields(
    schema: pa.Schema, *, list_inference: bool = False, decimal_targets: Iterable[str] = ()
) -> list[Json]:
    """The table schema BigQuery documents for a Parquet load of ``schema`` (legacy names)."""
    targets = [t.upper() for t in decimal_targets] or ["NUMERIC"]
    return [_field(f.name, f.type, f.nullable, list_inference, targets) for f in schema]


def _field(
    name: str, arrow_type: pa.DataType, nullable: bool, list_inference: bool, targets: list[str]
) -> Json:
    mode = "NULLABLE" if nullable else "REQUIRED"
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        # Parquet's three-level list: <name>.list.element
        element = _field("element", arrow_type.value_type, True, list_inference, targets)
        if list_inference:
            return {**element, "name": name, "mode": "REPEATED"}
        inner = {"name": "list", "type": "RECORD", "mode": "REPEATED", "fields": [element]}
        return {"name": name, "type": "RECORD", "mode": mode, "fields": [inner]}
    if pa.types.is_struct(arrow_type):
        children = [
            _field(child.name, child.type, child.nullable, list_inference, targets)
            for child in arrow_type
        ]
        return {"name": name, "type": "RECORD", "mode": mode, "fields": children}
    if pa.types.is_dictionary(arrow_type):
        return _field(name, arrow_type.value_type, nullable, list_inference, targets)
    return {"name": name, "type": _scalar_type(name, arrow_type, targets), "mode": mode}


def _scalar_type(name: str, arrow_type: pa.DataType, targets: list[str]) -> str:
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "STRING"
    if pa.types.is_boolean(arrow_type):
        return "BOOLEAN"
    if pa.types.is_uint64(arrow_type):
        raise ApiError(400, f"Unsupported unsigned 64-bit integer column {name}")
    if pa.types.is_integer(arrow_type):
        return "INTEGER"
    if pa.types.is_floating(arrow_type):
        return "FLOAT"
    if pa.types.is_binary(arrow_type) or pa.types.is_fixed_size_binary(arrow_type):
        return "BYTES"
    if pa.types.is_date(arrow_type):
        return "DATE"
    if pa.types.is_time(arrow_type):
        return "TIME"
    if pa.types.is_timestamp(arrow_type):
        return "TIMESTAMP" if arrow_type.tz is not None else "DATETIME"
    if pa.types.is_decimal(arrow_type):
        integer_digits = arrow_type.precision - arrow_type.scale
        for candidate in ("NUMERIC", "BIGNUMERIC", "STRING"):
            max_integer, max_scale = _DECIMAL_LIMITS[candidate]
            if (
                candidate in targets
                and integer_digits <= max_integer
                and arrow_type.scale <= max_scale
            ):
                return candidate
        raise ApiError(400, f"Decimal column {name} does not fit any of {targets}")
    raise ApiError(501, f"the fake maps no BigQuery type to Arrow {arrow_type} ({name})")


def _decode_jwt_claims(assertion: str) -> Json:
    try:
        payload = assertion.split(".")[1]
        return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))
    except (IndexError, ValueError):
        raise ApiError(400, "invalid_grant: malformed assertion") from None


class FakeBigQueryEndpoint:
    def __init__(
        self, *, location: str = "US", require_token: bool = False, host: str = "127.0.0.1"
    ) -> None:
        self.location = location
        self._require_token = require_token
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._datasets: dict[tuple[str, str], Json] = {}
        self._tables: dict[tuple[str, str, str], Json] = {}
        self._jobs: dict[tuple[str, str], Json] = {}
        self._objects: dict[tuple[str, str], tuple[bytes, Json]] = {}
        self._uploads: dict[str, _Upload] = {}
        self._tokens: set[str] = set()
        self._assertions: list[Json] = []
        self._answers: list[tuple[Callable[[str], bool], list[Json], list[list[Any]]]] = []
        self._job_failures: list[tuple[Callable[[Json], bool], Json]] = []
        self._ids = itertools.count(1)
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in separate writes; with Nagle on, each keep-alive
            # response waits ~40 ms for the client's delayed ACK.
            disable_nagle_algorithm = True

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                response = endpoint._dispatch(self.command, self.path, dict(self.headers), body)
                self.send_response(response.status)
                if response.body:
                    self.send_header("Content-Type", "application/json; charset=UTF-8")
                for name, value in response.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(response.body)))
                self.end_headers()
                self.wfile.write(response.body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer((host, 0), Handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        bound_host, bound_port = self._httpd.server_address[:2]
        return f"http://{bound_host!s}:{bound_port}"

    @property
    def token_uri(self) -> str:
        return self.url + TOKEN_PATH

    def start(self) -> None:
        self._thread = threading.Thread(
            # A short poll keeps stop() quick; the fixtures start one endpoint per test.
            target=lambda: self._httpd.serve_forever(poll_interval=0.05),
            name="fake-bigquery",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeBigQueryEndpoint:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test controls -----------------------------------------------------------------------

    def add_dataset(self, project: str, dataset: str) -> None:
        with self._lock:
            self._datasets[(project, dataset)] = self._dataset_resource(project, dataset, {})

    def add_table(
        self,
        project: str,
        dataset: str,
        table: str,
        fields: list[Json],
        *,
        table_type: str = "TABLE",
        num_rows: int = 0,
    ) -> None:
        """A table (and its dataset) as if it existed; ``fields`` in the REST schema shape."""
        with self._lock:
            if (project, dataset) not in self._datasets:
                self._datasets[(project, dataset)] = self._dataset_resource(project, dataset, {})
            resource = {"schema": {"fields": copy.deepcopy(fields)}, "type": table_type}
            self._tables[(project, dataset, table)] = self._table_resource(
                project, dataset, table, resource, num_rows
            )

    def add_object(self, bucket: str, name: str, data: bytes) -> None:
        with self._lock:
            self._store_object(bucket, name, data, {})

    def answer_queries(
        self, matches: Callable[[str], bool], fields: list[Json], rows: list[list[Any]]
    ) -> None:
        """Queries whose SQL ``matches`` return these rows (values as the REST API's strings)."""
        with self._lock:
            self._answers.append((matches, fields, rows))

    def fail_jobs(self, matches: Callable[[Json], bool], reason: str, message: str) -> None:
        """Jobs whose configuration ``matches`` finish with this error, as a failed job does."""
        with self._lock:
            self._job_failures.append((matches, {"reason": reason, "message": message}))

    def table(self, project: str, dataset: str, table: str) -> Json | None:
        with self._lock:
            found = self._tables.get((project, dataset, table))
            return copy.deepcopy(found) if found else None

    def table_names(self, project: str, dataset: str) -> list[str]:
        with self._lock:
            return sorted(t for (p, d, t) in self._tables if (p, d) == (project, dataset))

    def dataset(self, project: str, dataset: str) -> Json | None:
        with self._lock:
            found = self._datasets.get((project, dataset))
            return copy.deepcopy(found) if found else None

    def object(self, bucket: str, name: str) -> bytes | None:
        with self._lock:
            found = self._objects.get((bucket, name))
            return found[0] if found else None

    def object_resource(self, bucket: str, name: str) -> Json | None:
        with self._lock:
            found = self._objects.get((bucket, name))
            return copy.deepcopy(found[1]) if found else None

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def token_assertions(self) -> list[Json]:
        """Claims of every JWT assertion presented at the token endpoint."""
        with self._lock:
            return list(self._assertions)

    def jobs(self, kind: str | None = None) -> list[Json]:
        """Configurations of the inserted jobs (``load``, ``query``...), in arrival order."""
        found = []
        for request in self.requests:
            if request.method != "POST" or request.status >= 400:
                continue
            if re.fullmatch(_BQ + r"[^/]+/jobs", request.path):
                configuration = request.json.get("configuration", {})
            elif re.fullmatch(_BQ + r"[^/]+/queries", request.path):
                configuration = {"query": request.json}
            else:
                continue
            if kind is None or kind in configuration:
                found.append(configuration)
        return found

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    # -- dispatch ----------------------------------------------------------------------------

    def _dispatch(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> _Response:
        split = urlsplit(target)
        query = dict(parse_qsl(split.query))
        segments = [unquote(segment) for segment in split.path.split("/")]
        try:
            self._authorise(split.path, headers)
            response = self._route(method, split.path, segments, query, headers, body)
        except ApiError as error:
            response = _Response(error.code, error.body())
        with self._lock:
            self._requests.append(
                RecordedRequest(method, split.path, query, headers, body, response.status)
            )
        return response

    def _authorise(self, path: str, headers: Mapping[str, str]) -> None:
        if path == TOKEN_PATH:
            return
        authorization = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
        if authorization.startswith("Bearer "):
            with self._lock:
                known = authorization.removeprefix("Bearer ") in self._tokens
            if not known:
                raise ApiError(401, "Request had invalid authentication credentials.")
        elif self._require_token:
            raise ApiError(401, "Request is missing required authentication credential.")

    def _route(
        self,
        method: str,
        path: str,
        segments: list[str],
        query: dict[str, str],
        headers: dict[str, str],
        body: bytes,
    ) -> _Response:
        if path == TOKEN_PATH and method == "POST":
            return self._token(body)
        if path.startswith("/upload/storage/v1/b/"):
            return self._gcs_upload(method, segments, query, headers, body)
        if path.startswith("/storage/v1/b/") and method == "GET":
            return self._gcs_get(segments)
        if not path.startswith(_BQ):
            raise ApiError(404, f"no method at {path}")
        rest = segments[4:]  # after "", "bigquery", "v2", "projects"
        project, route = rest[0], rest[1:]
        payload = json.loads(body) if body else {}
        with self._lock:
            return self._bigquery(method, project, route, query, headers, payload)

    def _bigquery(
        self,
        method: str,
        project: str,
        route: list[str],
        query: dict[str, str],
        headers: Mapping[str, str],
        payload: Json,
    ) -> _Response:
        match route, method:
            case ["datasets"], "POST":
                return _ok(self._insert_dataset(project, payload))
            case ["datasets", dataset], "GET":
                return _ok(self._get_dataset(project, dataset))
            case ["datasets", dataset, "tables"], "GET":
                return _ok(self._list_tables(project, dataset))
            case ["datasets", dataset, "routines"], "GET":
                # dbt lists functions next to tables; a 404 here empties its whole listing.
                self._get_dataset(project, dataset)
                return _ok({"routines": []})
            case ["datasets", dataset, "tables"], "POST":
                return _ok(self._insert_table(project, dataset, payload))
            case ["datasets", dataset, "tables", table], "GET":
                return _ok(self._get_table(project, dataset, table))
            case ["datasets", dataset, "tables", table], "PATCH" | "PUT":
                if_match = next((v for k, v in headers.items() if k.lower() == "if-match"), None)
                return _ok(self._patch_table(project, dataset, table, payload, if_match))
            case ["datasets", dataset, "tables", table], "DELETE":
                self._get_table(project, dataset, table)
                del self._tables[(project, dataset, table)]
                return _Response(204)
            case ["jobs"], "POST":
                return _ok(self._insert_job(project, payload))
            case ["jobs", job_id], "GET":
                return _ok(self._get_job(project, job_id))
            case ["queries"], "POST":
                job = self._insert_job(project, {"configuration": {"query": payload}})
                return _ok(self._query_results(job))
            case ["queries", job_id], "GET":
                return _ok(self._query_results(self._get_job(project, job_id)))
        raise ApiError(404, f"no method {method} {'/'.join(route)}")

    # -- OAuth -------------------------------------------------------------------------------

    def _token(self, body: bytes) -> _Response:
        form = dict(parse_qsl(body.decode()))
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            raise ApiError(400, "unsupported_grant_type")
        claims = _decode_jwt_claims(form.get("assertion", ""))
        token = "fake-" + secrets.token_urlsafe(16)
        with self._lock:
            self._assertions.append(claims)
            self._tokens.add(token)
        return _ok({"access_token": token, "expires_in": 3600, "token_type": "Bearer"})

    # -- datasets and tables -----------------------------------------------------------------

    def _dataset_resource(self, project: str, dataset: str, payload: Json) -> Json:
        return {
            **payload,
            "kind": "bigquery#dataset",
            "id": f"{project}:{dataset}",
            "datasetReference": {"projectId": project, "datasetId": dataset},
            "location": payload.get("location") or self.location,
            "etag": secrets.token_hex(8),
            "creationTime": _now_ms(),
            "lastModifiedTime": _now_ms(),
        }

    def _insert_dataset(self, project: str, payload: Json) -> Json:
        dataset = payload.get("datasetReference", {}).get("datasetId")
        if not dataset:
            raise ApiError(400, "Dataset reference is missing")
        if (project, dataset) in self._datasets:
            raise ApiError(409, f"Already Exists: Dataset {project}:{dataset}")
        resource = self._dataset_resource(project, dataset, payload)
        self._datasets[(project, dataset)] = resource
        return resource

    def _get_dataset(self, project: str, dataset: str) -> Json:
        found = self._datasets.get((project, dataset))
        if found is None:
            raise ApiError(404, f"Not found: Dataset {project}:{dataset}")
        return found

    def _list_tables(self, project: str, dataset: str) -> Json:
        self._get_dataset(project, dataset)
        tables = [
            {
                "kind": "bigquery#table",
                "id": resource["id"],
                "tableReference": resource["tableReference"],
                "type": resource["type"],
                "creationTime": resource["creationTime"],
            }
            for (p, d, _), resource in sorted(self._tables.items())
            if (p, d) == (project, dataset)
        ]
        return {"kind": "bigquery#tableList", "tables": tables, "totalItems": len(tables)}

    def _table_resource(
        self, project: str, dataset: str, table: str, payload: Json, num_rows: int = 0
    ) -> Json:
        return {
            **payload,
            "kind": "bigquery#table",
            "id": f"{project}:{dataset}.{table}",
            "tableReference": {"projectId": project, "datasetId": dataset, "tableId": table},
            "type": payload.get("type", "TABLE"),
            "schema": payload.get("schema", {"fields": []}),
            "numRows": str(num_rows),
            "numBytes": "0",
            "location": self._datasets[(project, dataset)]["location"],
            "etag": secrets.token_hex(8),
            "creationTime": _now_ms(),
            "lastModifiedTime": _now_ms(),
        }

    def _insert_table(self, project: str, dataset: str, payload: Json) -> Json:
        self._get_dataset(project, dataset)
        table = payload.get("tableReference", {}).get("tableId")
        if not table:
            raise ApiError(400, "Table reference is missing")
        if (project, dataset, table) in self._tables:
            raise ApiError(409, f"Already Exists: Table {project}:{dataset}.{table}")
        resource = self._table_resource(project, dataset, table, payload)
        self._tables[(project, dataset, table)] = resource
        return resource

    def _get_table(self, project: str, dataset: str, table: str) -> Json:
        found = self._tables.get((project, dataset, table))
        if found is None:
            raise ApiError(404, f"Not found: Table {project}:{dataset}.{table}")
        return found

    def _patch_table(
        self, project: str, dataset: str, table: str, payload: Json, if_match: str | None
    ) -> Json:
        resource = self._get_table(project, dataset, table)
        if if_match is not None and if_match != resource["etag"]:
            raise ApiError(412, "Precondition check failed.")
        if "schema" in payload:
            _check_schema_update(
                resource["schema"].get("fields", []), payload["schema"].get("fields", [])
            )
        resource.update(
            {k: v for k, v in payload.items() if k not in ("tableReference", "id", "etag")}
        )
        resource["etag"] = secrets.token_hex(8)
        resource["lastModifiedTime"] = _now_ms()
        return resource

    # -- jobs --------------------------------------------------------------------------------

    def _insert_job(self, project: str, payload: Json) -> Json:
        reference = dict(payload.get("jobReference") or {})
        job_id = reference.get("jobId") or f"job_{next(self._ids):06d}"
        if (project, job_id) in self._jobs:
            raise ApiError(409, f"Already Exists: Job {project}:{job_id}")
        reference.update(
            {
                "projectId": project,
                "jobId": job_id,
                "location": reference.get("location") or self.location,
            }
        )
        configuration = copy.deepcopy(payload.get("configuration", {}))
        job: Json = {
            "kind": "bigquery#job",
            "id": f"{project}:{reference['location']}.{job_id}",
            "jobReference": reference,
            "configuration": configuration,
            "status": {"state": "DONE"},
            "statistics": {"creationTime": _now_ms(), "startTime": _now_ms()},
        }
        injected = next((e for match, e in self._job_failures if match(configuration)), None)
        try:
            if injected is not None:
                raise ApiError(400, injected["message"])
            if "load" in configuration:
                job["statistics"]["load"] = self._run_load(configuration["load"])
            elif "query" in configuration:
                job["statistics"]["query"] = {"statementType": _statement_type(configuration)}
        except ApiError as error:
            reason = injected["reason"] if injected else _REASONS.get(error.code, "backendError")
            failure = {"reason": reason, "message": error.message}
            job["status"] = {"state": "DONE", "errorResult": failure, "errors": [failure]}
        job["statistics"]["endTime"] = _now_ms()
        self._jobs[(project, job_id)] = job
        return job

    def _get_job(self, project: str, job_id: str) -> Json:
        found = self._jobs.get((project, job_id))
        if found is None:
            raise ApiError(404, f"Not found: Job {project}:{job_id}")
        return found

    def _query_results(self, job: Json) -> Json:
        sql = job["configuration"].get("query", {}).get("query", "")
        fields: list[Json] = []
        rows: list[list[Any]] = []
        for matches, answer_fields, answer_rows in self._answers:
            if matches(sql):
                fields, rows = answer_fields, answer_rows
                break
        result: Json = {
            "kind": "bigquery#getQueryResultsResponse",
            "jobReference": job["jobReference"],
            "jobComplete": True,
            "totalRows": str(len(rows)),
            "rows": [{"f": [{"v": value} for value in row]} for row in rows],
            "schema": {"fields": fields},
        }
        if "errorResult" in job["status"]:
            result["errors"] = job["status"]["errors"]
        return result

    def _run_load(self, load: Json) -> Json:
        if load.get("sourceFormat") != "PARQUET":
            raise ApiError(501, "the fake loads only PARQUET")
        if load.get("schema"):
            raise ApiError(501, "the fake does not check an explicit schema against Parquet")
        options = load.get("parquetOptions") or {}
        schemas: list[list[Json]] = []
        rows = 0
        size = 0
        for uri in load.get("sourceUris", []):
            bucket, _, name = uri.removeprefix("gs://").partition("/")
            if not uri.startswith("gs://") or "*" in uri:
                raise ApiError(501, f"the fake reads single gs:// objects only: {uri}")
            stored = self._objects.get((bucket, name))
            if stored is None:
                raise ApiError(404, f"Not found: URI {uri}")
            parquet = pq.ParquetFile(io.BytesIO(stored[0]))
            schemas.append(
                bigquery_fields(
                    parquet.schema_arrow,
                    list_inference=bool(options.get("enableListInference")),
                    decimal_targets=load.get("decimalTargetTypes", []),
                )
            )
            rows += parquet.metadata.num_rows
            size += len(stored[0])
        if not schemas:
            raise ApiError(400, "No source URIs")
        if any(schema != schemas[0] for schema in schemas):
            raise ApiError(400, "Source files have different schemas")
        self._write_destination(load, schemas[0], rows)
        return {
            "inputFiles": str(len(schemas)),
            "inputFileBytes": str(size),
            "outputRows": str(rows),
            "outputBytes": str(size),
            "badRecords": "0",
        }

    def _write_destination(self, load: Json, fields: list[Json], rows: int) -> None:
        destination = load["destinationTable"]
        key = (destination["projectId"], destination["datasetId"], destination["tableId"])
        self._get_dataset(key[0], key[1])
        existing = self._tables.get(key)
        write = load.get("writeDisposition", "WRITE_APPEND")
        if existing is None:
            if load.get("createDisposition", "CREATE_IF_NEEDED") == "CREATE_NEVER":
                raise ApiError(404, f"Not found: Table {key[0]}:{key[1]}.{key[2]}")
            self._tables[key] = self._table_resource(*key, {"schema": {"fields": fields}}, rows)
            return
        if write == "WRITE_TRUNCATE":
            existing["schema"] = {"fields": fields}
            existing["numRows"] = str(rows)
        elif write == "WRITE_EMPTY" and int(existing["numRows"]):
            raise ApiError(409, f"Already Exists: Table {key[0]}:{key[1]}.{key[2]}")
        else:
            current = existing["schema"].get("fields", [])
            known = {f["name"].lower(): _legacy_type(f["type"]) for f in current}
            if any(
                known.get(f["name"].lower(), _legacy_type(f["type"])) != _legacy_type(f["type"])
                for f in fields
            ):
                raise ApiError(400, "Provided Schema does not match Table: a field changed type")
            if "ALLOW_FIELD_ADDITION" in load.get("schemaUpdateOptions", []):
                existing["schema"] = {"fields": _relaxed_union(current, fields)}
            elif _without_modes(current) != _without_modes(fields):
                raise ApiError(400, "Provided Schema does not match Table")
            existing["numRows"] = str(int(existing["numRows"]) + rows)
        existing["etag"] = secrets.token_hex(8)
        existing["lastModifiedTime"] = _now_ms()

    # -- Cloud Storage -----------------------------------------------------------------------

    def _store_object(self, bucket: str, name: str, data: bytes, metadata: Json) -> Json:
        checksum = google_crc32c.Checksum(data).digest()
        resource = {
            **metadata,
            "kind": "storage#object",
            "id": f"{bucket}/{name}",
            "bucket": bucket,
            "name": name,
            "size": str(len(data)),
            "crc32c": base64.b64encode(checksum).decode(),
            "generation": _now_ms(),
            "metageneration": "1",
            "contentType": metadata.get("contentType", "application/octet-stream"),
            "timeCreated": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        }
        self._objects[(bucket, name)] = (data, resource)
        return resource

    def _finish_upload(self, upload: _Upload) -> _Response:
        data = bytes(upload.data)
        name = upload.metadata.get("name", "")
        sent = upload.metadata.get("crc32c")
        actual = base64.b64encode(google_crc32c.Checksum(data).digest()).decode()
        if sent is not None and sent != actual:
            raise ApiError(400, "Provided CRC32C does not match the data")
        with self._lock:
            exists = (upload.bucket, name) in self._objects
            if upload.if_generation_match == "0" and exists:
                raise ApiError(
                    412, "At least one of the pre-conditions you specified did not hold."
                )
            return _ok(self._store_object(upload.bucket, name, data, upload.metadata))

    def _gcs_upload(
        self,
        method: str,
        segments: list[str],
        query: dict[str, str],
        headers: dict[str, str],
        body: bytes,
    ) -> _Response:
        lower = {k.lower(): v for k, v in headers.items()}
        if method == "PUT" and "upload_id" in query:
            with self._lock:
                upload = self._uploads.get(query["upload_id"])
            if upload is None:
                raise ApiError(404, "No such upload session")
            match = re.fullmatch(
                r"bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)", lower.get("content-range", "")
            )
            if match is None:
                raise ApiError(400, "Invalid Content-Range")
            if match.group(1) is not None:
                if int(match.group(1)) != len(upload.data):
                    raise ApiError(400, "Chunk does not start where the last one ended")
                upload.data.extend(body)
            if match.group(3) != "*" and len(upload.data) >= int(match.group(3)):
                with self._lock:
                    self._uploads.pop(query["upload_id"], None)
                return self._finish_upload(upload)
            return _Response(308, headers={"Range": f"bytes=0-{len(upload.data) - 1}"})
        if method != "POST" or len(segments) < 6:
            raise ApiError(404, "no such upload method")
        bucket = segments[5]
        kind = query.get("uploadType")
        if kind == "multipart":
            metadata, media_type, data = _parse_multipart(lower.get("content-type", ""), body)
            metadata.setdefault("contentType", media_type)
            upload = _Upload(bucket, metadata, query.get("ifGenerationMatch"), len(data))
            upload.data.extend(data)
            return self._finish_upload(upload)
        if kind == "resumable":
            metadata = json.loads(body) if body else {}
            if "name" in query:
                metadata["name"] = query["name"]
            if "x-upload-content-type" in lower:
                metadata.setdefault("contentType", lower["x-upload-content-type"])
            total = lower.get("x-upload-content-length")
            upload = _Upload(
                bucket, metadata, query.get("ifGenerationMatch"), int(total) if total else None
            )
            upload_id = secrets.token_hex(8)
            with self._lock:
                self._uploads[upload_id] = upload
            location = f"{self.url}/upload/storage/v1/b/{quote(bucket)}/o?uploadType=resumable&upload_id={upload_id}"
            return _Response(200, headers={"Location": location})
        raise ApiError(400, f"unsupported uploadType {kind}")

    def _gcs_get(self, segments: list[str]) -> _Response:
        # /storage/v1/b/{bucket}/o/{name}: the name arrives percent-encoded, slashes included.
        if len(segments) != 7 or segments[5] != "o":
            raise ApiError(404, "no such storage method")
        with self._lock:
            stored = self._objects.get((segments[4], segments[6]))
        if stored is None:
            raise ApiError(404, "No such object")
        return _ok(stored[1])


def _parse_multipart(content_type: str, body: bytes) -> tuple[Json, str, bytes]:
    """(metadata, media content type, media) of a ``multipart/related`` upload."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if match is None:
        raise ApiError(400, "multipart upload without a boundary")
    separator = b"--" + match.group(1).encode()
    parts = body.split(separator)
    # ['', metadata part, media part, '--']: each part is CRLF, headers, CRLF CRLF, data, CRLF.
    if len(parts) != 4 or parts[3].strip() != b"--":
        raise ApiError(400, "malformed multipart upload")
    contents = []
    for part in parts[1:3]:
        head, _, content = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        contents.append((head.decode(), content.removesuffix(b"\r\n")))
    media_type = re.search(r"(?im)^content-type:\s*(.+)$", contents[1][0])
    return (
        json.loads(contents[0][1]),
        media_type.group(1).strip() if media_type else "application/octet-stream",
        contents[1][1],
    )


def _statement_type(configuration: Json) -> str:
    sql = configuration["query"].get("query", "")
    statements = [s for s in sql.split(";") if s.strip()]
    if len(statements) > 1:
        return "SCRIPT"
    words = sql.strip().split(None, 1)
    return words[0].upper() if words else "SELECT"


def _without_modes(fields: list[Json]) -> list[tuple[str, str]]:
    return [(f["name"].lower(), _legacy_type(f["type"])) for f in fields]


def _relaxed_union(current: list[Json], incoming: list[Json]) -> list[Json]:
    names = {f["name"].lower() for f in current}
    added = [
        {**f, "mode": f.get("mode") if f.get("mode") == "REPEATED" else "NULLABLE"}
        for f in incoming
        if f["name"].lower() not in names
    ]
    return current + added


def _check_schema_update(current: list[Json], proposed: list[Json]) -> None:
    """BigQuery's rule: existing columns keep name, type and mode; new ones are not REQUIRED."""
    by_name = {f["name"].lower(): f for f in proposed}
    for existing in current:
        new = by_name.get(existing["name"].lower())
        if new is None:
            raise ApiError(
                400,
                f"Provided Schema does not match Table. Field {existing['name']} is missing in new schema",
            )
        if _legacy_type(new["type"]) != _legacy_type(existing["type"]):
            raise ApiError(
                400,
                f"Provided Schema does not match Table. Field {existing['name']} has changed type "
                f"from {_legacy_type(existing['type'])} to {_legacy_type(new['type'])}",
            )
    known = {f["name"].lower() for f in current}
    for new in proposed:
        if new["name"].lower() not in known and new.get("mode", "NULLABLE") == "REQUIRED":
            raise ApiError(
                400,
                f"Provided Schema does not match Table. Cannot add required field {new['name']}",
            )
