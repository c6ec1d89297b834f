"""A local TigerGraph endpoint: the RESTPP upsert and count API and the token API, over HTTP.

The real ``pyTigerGraph.TigerGraphConnection`` talks to it (``host=endpoint.url``): one port
carries RESTPP under ``/restpp`` and the GSQL server's ``/gsql/v1``, as TigerGraph 4 does
behind its nginx on 14240. The graph's schema is read from GSQL DDL (``CREATE VERTEX``,
``CREATE DIRECTED EDGE`` with ``FROM ... TO`` pairs, ``DISCRIMINATOR`` and
``REVERSE_EDGE``), so a payload that does not match the schema file is refused here as it
would be by TigerGraph.

Implemented, with the semantics TigerGraph documents:

- ``POST /restpp/graph/{graph}`` (upsert): vertices by primary id, edges by type, endpoints
  and discriminator values; a new element gets the type defaults for attributes not sent, an
  existing one keeps them. ``vertex_must_exist=true`` skips edges with a missing endpoint
  (``skipped_edges``, ``miss_vertices``); otherwise the missing vertices are created.
  Response ``{"version", "error": false, "message", "results": [{"accepted_vertices",
  "accepted_edges"}]}``. Duplicate JSON keys (pyTigerGraph's encoding of several edges to
  one target) are kept.
- ``GET /restpp/graph/{graph}/vertices/{type}`` (list vertices, ``select`` limits the
  attributes returned): ``results`` is ``[{"v_id", "v_type", "attributes"}]``.
- ``DELETE /restpp/graph/{graph}/vertices/{type}/{id}`` (delete a vertex, what
  pyTigerGraph's ``delVerticesById`` sends per id): the vertex and every edge to or from it
  go; ``results`` is ``{"v_type", "deleted_vertices"}``, 0 for an id that is not there.
- ``POST /restpp/builtins/{graph}`` with ``stat_vertex_number`` / ``stat_edge_number``.
- ``GET /restpp/version`` and ``GET /restpp/echo``.
- ``POST /gsql/v1/tokens`` (TigerGraph 4) with a secret or Basic credentials; with
  ``version="3.x.y"`` that path is 404 and ``POST /restpp/requesttoken`` answers instead.
  With ``require_token=True`` RESTPP calls without an issued Bearer token get 401
  ``REST-10016``.

Strict where TigerGraph's exact behaviour is not documented: an unknown type or attribute,
a value of the wrong JSON type, a DATETIME not in ``%Y-%m-%d[ %H:%M:%S]``, a discriminated
edge without its discriminator, or an attribute operator (``op``) is refused with HTTP 400
and ``{"error": true, "code": "REST-30000"}`` (the fake's own code and wording).

:meth:`FakeTigerGraphEndpoint.fail_next` makes the next RESTPP requests fail (HTTP 503 by
default, with a JSON error body or an HTML one as a proxy would send);
:meth:`FakeTigerGraphEndpoint.stall_next` holds the next RESTPP requests unanswered for a
while (a stalled server); :attr:`requests` records every request.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

Json = dict[str, Any]
Pairs = list[tuple[str, Any]]

_DEFAULTS: dict[str, Any] = {
    "STRING": "",
    "DATETIME": "1970-01-01 00:00:00",
    "DOUBLE": 0.0,
    "FLOAT": 0.0,
    "INT": 0,
    "UINT": 0,
    "BOOL": False,
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str = "REST-30000") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code

    def body(self) -> bytes:
        return json.dumps({"error": True, "message": self.message, "code": self.code}).encode()


# --- schema -------------------------------------------------------------------------------


@dataclass(frozen=True)
class VertexSchema:
    name: str
    primary_id: str
    primary_id_type: str
    attributes: dict[str, str]


@dataclass(frozen=True)
class EdgeSchema:
    name: str
    pairs: tuple[tuple[str, str], ...]
    discriminator: tuple[str, ...]
    attributes: dict[str, str]  # discriminator attributes included
    reverse_edge: str | None


@dataclass(frozen=True)
class GraphSchema:
    vertices: dict[str, VertexSchema]
    edges: dict[str, EdgeSchema]


_VERTEX = re.compile(r"^CREATE VERTEX (\w+) \((.*)\)(?: WITH .*)?$")
_EDGE = re.compile(r'^CREATE DIRECTED EDGE (\w+) \((.*)\)(?: WITH REVERSE_EDGE="(\w+)")?$')
_PAIRS = re.compile(r"^((?:FROM \w+, TO \w+)(?: \| FROM \w+, TO \w+)*)(?:, (.*))?$")
_ATTRIBUTE = re.compile(r"^(\w+) (STRING|DATETIME|DOUBLE|FLOAT|INT|UINT|BOOL)$")


def parse_schema(gsql: str) -> GraphSchema:
    """The vertex and edge types of GSQL DDL; a statement it does not know is an error."""
    vertices: dict[str, VertexSchema] = {}
    edges: dict[str, EdgeSchema] = {}
    for line in (raw.strip() for raw in gsql.splitlines()):
        if not line or line.startswith("//") or line.startswith("CREATE GRAPH"):
            continue
        if match := _VERTEX.match(line):
            name, body = match.group(1), match.group(2)
            first, *rest = _split(body)
            primary = re.match(r"^PRIMARY_ID (\w+) (\w+)$", first)
            if primary is None:
                raise ValueError(f"unsupported vertex definition: {line}")
            vertices[name] = VertexSchema(
                name, primary.group(1), primary.group(2), dict(_attribute(a) for a in rest)
            )
        elif match := _EDGE.match(line):
            name, body, reverse = match.group(1), match.group(2), match.group(3)
            pairs_match = _PAIRS.match(body)
            if pairs_match is None:
                raise ValueError(f"unsupported edge definition: {line}")
            pairs = tuple(re.findall(r"FROM (\w+), TO (\w+)", pairs_match.group(1)))
            discriminator: list[str] = []
            attributes: dict[str, str] = {}
            for part in _split(pairs_match.group(2) or ""):
                if part.startswith("DISCRIMINATOR(") and part.endswith(")"):
                    for inner in _split(part[len("DISCRIMINATOR(") : -1]):
                        attr, kind = _attribute(inner)
                        discriminator.append(attr)
                        attributes[attr] = kind
                else:
                    attr, kind = _attribute(part)
                    attributes[attr] = kind
            edges[name] = EdgeSchema(name, pairs, tuple(discriminator), attributes, reverse)
        else:
            raise ValueError(f"unsupported GSQL statement: {line}")
    for edge in edges.values():
        for source, target in edge.pairs:
            if source not in vertices or target not in vertices:
                raise ValueError(f"edge {edge.name} refers to an undefined vertex type")
    return GraphSchema(vertices, edges)


def _split(text: str) -> list[str]:
    """Comma-separated parts at parenthesis depth 0."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        depth += {"(": 1, ")": -1}.get(char, 0)
        current += char
    if current.strip():
        parts.append(current.strip())
    return parts


def _attribute(text: str) -> tuple[str, str]:
    match = _ATTRIBUTE.match(text)
    if match is None:
        raise ValueError(f"unsupported attribute definition: {text}")
    return match.group(1), match.group(2)


# --- endpoint -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    status: int
    vertices: int = 0  # vertices in an upsert body
    edges: int = 0  # edges in an upsert body


@dataclass
class _Failure:
    status: int
    json_body: bool
    method: str | None = None  # only requests of this method fail; any when None


@dataclass
class _State:
    vertices: dict[str, dict[str, Json]] = field(default_factory=dict)
    edges: dict[tuple[Any, ...], Json] = field(default_factory=dict)


class FakeTigerGraphEndpoint:
    def __init__(
        self,
        schema_gsql: str,
        *,
        graph_name: str = "starvit",
        version: str = "4.1.2",
        secret: str | None = None,
        username: str = "tigergraph",
        password: str = "tigergraph",
        require_token: bool = False,
        host: str = "127.0.0.1",
    ) -> None:
        self.schema = parse_schema(schema_gsql)
        self.graph_name = graph_name
        self.version = version
        self._secret = secret
        self._credentials = (username, password)
        self._require_token = require_token
        self._lock = threading.Lock()
        self._state = _State()
        self._tokens: set[str] = set()
        self._failures: list[_Failure] = []
        self._stalls: list[float] = []
        self._stopping = threading.Event()
        self._requests: list[RecordedRequest] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.path.startswith("/restpp/"):
                    endpoint._stall()
                status, content_type, payload = endpoint._dispatch(
                    self.command, self.path, dict(self.headers), body
                )
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (a stalled request timed out)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

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

    def start(self) -> None:
        self._thread = threading.Thread(
            target=lambda: self._httpd.serve_forever(poll_interval=0.05),
            name="fake-tigergraph",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()  # releases the stalled requests
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeTigerGraphEndpoint:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test controls -------------------------------------------------------------------------

    def fail_next(
        self,
        count: int = 1,
        *,
        status: int = 503,
        json_body: bool = True,
        method: str | None = None,
    ) -> None:
        with self._lock:
            self._failures.extend(_Failure(status, json_body, method) for _ in range(count))

    def stall_next(self, count: int = 1, *, seconds: float = 5.0) -> None:
        """Hold each of the next ``count`` RESTPP requests ``seconds`` before handling it."""
        with self._lock:
            self._stalls.extend(seconds for _ in range(count))

    def _stall(self) -> None:
        with self._lock:
            seconds = self._stalls.pop(0) if self._stalls else 0.0
        if seconds:
            self._stopping.wait(seconds)

    def add_vertex(self, vertex_type: str, vertex_id: str, attributes: Json | None = None) -> None:
        """Put a vertex straight into the graph (one left over from an earlier load)."""
        with self._lock:
            self._put_vertex(vertex_type, vertex_id, attributes or {})

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def vertex_count(self, vertex_type: str) -> int:
        with self._lock:
            return len(self._state.vertices.get(vertex_type, {}))

    def edge_count(self, edge_type: str) -> int:
        with self._lock:
            return sum(1 for key in self._state.edges if key[0] == edge_type)

    def vertex(self, vertex_type: str, vertex_id: str) -> Json | None:
        with self._lock:
            found = self._state.vertices.get(vertex_type, {}).get(vertex_id)
            return dict(found) if found is not None else None

    def edges_of(self, edge_type: str) -> list[tuple[tuple[Any, ...], Json]]:
        with self._lock:
            return [(k, dict(v)) for k, v in self._state.edges.items() if k[0] == edge_type]

    # -- dispatch ------------------------------------------------------------------------------

    def _dispatch(
        self, method: str, raw_path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, str, bytes]:
        split = urlsplit(raw_path)
        path, query = split.path, dict(parse_qsl(split.query))
        counted = (0, 0)
        try:
            if path.startswith("/restpp/"):
                if path != "/restpp/requesttoken":
                    self._authorise(headers)
                failure = self._next_failure(method)
                if failure is not None:
                    raise _InjectedFailure(failure)
            status, payload, counted = 200, *self._route(method, path, query, headers, body)
            content_type, response = "application/json", json.dumps(payload).encode()
        except _InjectedFailure as injected:
            status = injected.failure.status
            if injected.failure.json_body:
                content_type = "application/json"
                response = ApiError(status, "The service is temporarily unavailable.").body()
            else:
                content_type = "text/html"
                response = b"<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>"
        except ApiError as error:
            status, content_type, response = error.status, "application/json", error.body()
        with self._lock:
            self._requests.append(RecordedRequest(method, path, query, status, *counted))
        return status, content_type, response

    def _next_failure(self, method: str) -> _Failure | None:
        with self._lock:
            for index, failure in enumerate(self._failures):
                if failure.method in (None, method):
                    return self._failures.pop(index)
            return None

    def _authorise(self, headers: dict[str, str]) -> None:
        if not self._require_token:
            return
        authorization = _header(headers, "Authorization")
        token = authorization[7:] if authorization.startswith("Bearer ") else ""
        with self._lock:
            known = token in self._tokens
        if not known:
            raise ApiError(
                401,
                f"Access Denied because the input token = '{token[:4]}' is empty or too short.",
                "REST-10016",
            )

    def _route(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: bytes
    ) -> tuple[Json, tuple[int, int]]:
        major = int(self.version.split(".")[0])
        if method == "POST" and path == "/gsql/v1/tokens" and major >= 4:
            return self._token(headers, _json_object(body), tg4=True), (0, 0)
        if method == "POST" and path == "/restpp/requesttoken" and major < 4:
            return self._token(headers, _json_object(body), tg4=False), (0, 0)
        if method == "GET" and path == "/restpp/echo":
            return {"error": False, "message": "Hello GSQL"}, (0, 0)
        if method == "GET" and path == "/restpp/version":
            return {"error": False, "message": self._version_text()}, (0, 0)
        if method == "POST" and path == f"/restpp/graph/{self.graph_name}":
            return self._upsert(query, body)
        if method == "POST" and path == f"/restpp/builtins/{self.graph_name}":
            return self._builtin(_json_object(body)), (0, 0)
        vertices_path = f"/restpp/graph/{self.graph_name}/vertices/"
        if path.startswith(vertices_path):
            vertex_type, _, vertex_id = path[len(vertices_path) :].partition("/")
            if vertex_type not in self.schema.vertices:
                raise ApiError(400, f"Unknown vertex type {vertex_type!r}.")
            if method == "GET" and not vertex_id:
                return self._list_vertices(vertex_type, query), (0, 0)
            if method == "DELETE" and vertex_id:
                return self._delete_vertex(vertex_type, unquote(vertex_id)), (0, 0)
        if path.startswith("/restpp/"):
            raise ApiError(404, f"Endpoint is not found from url = {path[7:]}", "REST-1000")
        raise ApiError(404, "Not Found", "404")

    def _token(self, headers: dict[str, str], request: Json, *, tg4: bool) -> Json:
        secret = request.get("secret")
        if secret is not None:
            if self._secret is None or secret != self._secret:
                raise ApiError(401, "The secret is invalid.", "REST-10004")
        elif not self._basic_ok(headers):
            raise ApiError(401, "Authentication failed.", "REST-10004")
        graph = request.get("graph")
        if graph is not None and graph != self.graph_name:
            raise ApiError(400, f"Graph {graph} does not exist.")
        token = secrets.token_hex(16)
        expiration = int(time.time()) + int(request.get("lifetime", 2_592_000))
        with self._lock:
            self._tokens.add(token)
        if tg4:
            return {
                "error": False,
                "message": "Generate new token successfully.",
                "token": token,
                "expiration": expiration,
            }
        return {
            "code": "REST-0000",
            "error": False,
            "message": "Generate new token successfully.",
            "expiration": expiration,
            "results": {"token": token},
        }

    def _basic_ok(self, headers: dict[str, str]) -> bool:
        authorization = _header(headers, "Authorization")
        if not authorization.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return (user, password) == self._credentials

    def _version_text(self) -> str:
        # The layout pyTigerGraph's getVersion() parses: three header lines, one line per
        # component (name, version, hash, date and time), a last line.
        stamp = "2024-12-01 00:00:00 +0000"
        release = f"release_{self.version}_12-01-2024"
        components = [f"{name} {release} 0123abcd {stamp}" for name in ("product", "gpe", "gse")]
        header = ["TigerGraph RESTPP:", "--- Version ---", f"TigerGraph version: {self.version}"]
        return "\n".join([*header, *components, ""])

    def _envelope(self, results: Any) -> Json:
        return {
            "version": {"edition": "enterprise", "api": "v2", "schema": 0},
            "error": False,
            "message": "",
            "results": results,
        }

    # -- upsert --------------------------------------------------------------------------------

    def _upsert(self, query: dict[str, str], body: bytes) -> tuple[Json, tuple[int, int]]:
        try:
            document = json.loads(body, object_pairs_hook=lambda pairs: pairs)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ApiError(400, "Invalid JSON payload.") from None
        if not isinstance(document, list):
            raise ApiError(400, "The payload must be a JSON object.")
        must_exist = query.get("vertex_must_exist", "false").lower() == "true"
        vertex_items: list[tuple[str, str, Json]] = []
        edge_items: list[tuple[EdgeSchema, str, str, str, str, Json]] = []
        for section, content in document:
            if section == "vertices":
                vertex_items.extend(self._parse_vertices(content))
            elif section == "edges":
                edge_items.extend(self._parse_edges(content))
            else:
                raise ApiError(400, f"Unknown section {section!r} in the payload.")
        skipped, missing = 0, []
        with self._lock:
            for vertex_type, vertex_id, attributes in vertex_items:
                self._put_vertex(vertex_type, vertex_id, attributes)
            accepted_edges = 0
            for edge, source_type, source, target_type, target, attributes in edge_items:
                absent = [
                    {"v_type": kind, "v_id": vid}
                    for kind, vid in ((source_type, source), (target_type, target))
                    if vid not in self._state.vertices.get(kind, {})
                ]
                if absent and must_exist:
                    skipped += 1
                    missing.extend(absent)
                    continue
                for item in absent:
                    self._put_vertex(item["v_type"], item["v_id"], {})
                key = (
                    edge.name,
                    source_type,
                    source,
                    target_type,
                    target,
                    tuple(attributes[name] for name in edge.discriminator),
                )
                stored = self._state.edges.get(key)
                if stored is None:
                    stored = {name: _DEFAULTS[kind] for name, kind in edge.attributes.items()}
                    self._state.edges[key] = stored
                stored.update(attributes)
                accepted_edges += 1
        result: Json = {"accepted_vertices": len(vertex_items), "accepted_edges": accepted_edges}
        if must_exist:
            result["skipped_edges"] = skipped
            result["miss_vertices"] = missing
        return self._envelope([result]), (len(vertex_items), len(edge_items))

    def _put_vertex(self, vertex_type: str, vertex_id: str, attributes: Json) -> None:
        schema = self.schema.vertices[vertex_type]
        stored = self._state.vertices.setdefault(vertex_type, {}).get(vertex_id)
        if stored is None:
            stored = {name: _DEFAULTS[kind] for name, kind in schema.attributes.items()}
            self._state.vertices[vertex_type][vertex_id] = stored
        stored.update(attributes)

    def _parse_vertices(self, content: Any) -> Iterable[tuple[str, str, Json]]:
        for vertex_type, instances in _pairs(content, "vertices"):
            schema = self.schema.vertices.get(vertex_type)
            if schema is None:
                raise ApiError(400, f"Unknown vertex type {vertex_type!r}.")
            for vertex_id, attributes in _pairs(instances, vertex_type):
                yield vertex_type, vertex_id, _values(attributes, schema.attributes, vertex_type)

    def _parse_edges(self, content: Any) -> Iterable[tuple[EdgeSchema, str, str, str, str, Json]]:
        for source_type, sources in _pairs(content, "edges"):
            if source_type not in self.schema.vertices:
                raise ApiError(400, f"Unknown vertex type {source_type!r}.")
            for source, edge_types in _pairs(sources, source_type):
                for edge_type, targets in _pairs(edge_types, source):
                    edge = self.schema.edges.get(edge_type)
                    if edge is None:
                        raise ApiError(400, f"Unknown edge type {edge_type!r}.")
                    for target_type, instances in _pairs(targets, edge_type):
                        if (source_type, target_type) not in edge.pairs:
                            raise ApiError(
                                400,
                                f"Edge type {edge_type} does not go from {source_type} "
                                f"to {target_type}.",
                            )
                        for target, attributes in _pairs(instances, target_type):
                            values = _values(attributes, edge.attributes, edge_type)
                            absent = [name for name in edge.discriminator if name not in values]
                            if absent:
                                raise ApiError(
                                    400,
                                    f"Edge type {edge_type}: discriminator attribute "
                                    f"{absent[0]} is required.",
                                )
                            yield edge, source_type, source, target_type, target, values

    # -- vertices ------------------------------------------------------------------------------

    def _list_vertices(self, vertex_type: str, query: dict[str, str]) -> Json:
        schema = self.schema.vertices[vertex_type]
        selected = [name for name in query.get("select", "").split(",") if name]
        unknown = [
            name for name in selected if name not in schema.attributes | {schema.primary_id: ""}
        ]
        if unknown:
            raise ApiError(400, f"{vertex_type}: unknown attribute {unknown[0]!r}.")
        with self._lock:
            stored = dict(self._state.vertices.get(vertex_type, {}))
        results = []
        for vertex_id, attributes in stored.items():
            # primary_id_as_attribute: the id is an attribute too
            values = {schema.primary_id: vertex_id, **attributes}
            if selected:
                values = {name: values[name] for name in selected}
            results.append({"v_id": vertex_id, "v_type": vertex_type, "attributes": values})
        return self._envelope(results)

    def _delete_vertex(self, vertex_type: str, vertex_id: str) -> Json:
        with self._lock:
            found = self._state.vertices.get(vertex_type, {}).pop(vertex_id, None)
            if found is not None:
                attached = [
                    key
                    for key in self._state.edges
                    if (key[1], key[2]) == (vertex_type, vertex_id)
                    or (key[3], key[4]) == (vertex_type, vertex_id)
                ]
                for key in attached:
                    del self._state.edges[key]
        return self._envelope(
            {"v_type": vertex_type, "deleted_vertices": 0 if found is None else 1}
        )

    # -- builtins ------------------------------------------------------------------------------

    def _builtin(self, request: Json) -> Json:
        function, kind = request.get("function"), request.get("type")
        with self._lock:
            if function == "stat_vertex_number":
                names = list(self.schema.vertices) if kind == "*" else [kind]
                if any(name not in self.schema.vertices for name in names):
                    raise ApiError(400, f"Unknown vertex type {kind!r}.")
                return self._envelope(
                    [
                        {"v_type": name, "count": len(self._state.vertices.get(name, {}))}
                        for name in names
                    ]
                )
            if function == "stat_edge_number":
                forward = {e.name: e.name for e in self.schema.edges.values()}
                forward.update(
                    {e.reverse_edge: e.name for e in self.schema.edges.values() if e.reverse_edge}
                )
                names = list(forward) if kind == "*" else [kind]
                if any(name not in forward for name in names):
                    raise ApiError(400, f"Unknown edge type {kind!r}.")
                source, target = request.get("from_type"), request.get("to_type")

                def count(name: str) -> int:
                    return sum(
                        1
                        for k in self._state.edges
                        if k[0] == forward[name]
                        and source in (None, k[1])
                        and target in (None, k[3])
                    )

                return self._envelope([{"e_type": name, "count": count(name)} for name in names])
        raise ApiError(400, f"Unknown builtin function {function!r}.")


class _InjectedFailure(Exception):
    def __init__(self, failure: _Failure) -> None:
        super().__init__(failure.status)
        self.failure = failure


def _header(headers: dict[str, str], name: str) -> str:
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return ""


def _json_object(body: bytes) -> Json:
    if not body:
        return {}
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ApiError(400, "Invalid JSON payload.") from None
    if not isinstance(parsed, dict):
        raise ApiError(400, "The payload must be a JSON object.")
    return parsed


def _pairs(value: Any, where: str) -> Pairs:
    if not isinstance(value, list) or not all(
        isinstance(item, tuple) and len(item) == 2 for item in value
    ):
        raise ApiError(400, f"{where}: expected a JSON object.")
    return value


def _values(attributes: Any, schema: dict[str, str], where: str) -> Json:
    values: Json = {}
    for name, wrapped in _pairs(attributes, where):
        kind = schema.get(name)
        if kind is None:
            raise ApiError(400, f"{where}: unknown attribute {name!r}.")
        wrapped_pairs = dict(_pairs(wrapped, f"{where}.{name}"))
        if set(wrapped_pairs) != {"value"}:
            raise ApiError(400, f"{where}.{name}: only a plain value is supported by the fake.")
        values[name] = _typed(wrapped_pairs["value"], kind, f"{where}.{name}")
    return values


def _typed(value: Any, kind: str, where: str) -> Any:
    if kind == "STRING" and isinstance(value, str):
        return value
    if (
        kind in {"DOUBLE", "FLOAT"}
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    ):
        return float(value)
    if kind in {"INT", "UINT"} and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "BOOL" and isinstance(value, bool):
        return value
    if kind == "DATETIME" and isinstance(value, str):
        for layout in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
            try:
                return dt.datetime.strptime(value, layout).strftime("%Y-%m-%d %H:%M:%S")
            except ValueError:
                continue
    raise ApiError(400, f"{where}: {json.dumps(value)[:40]} is not a valid {kind}.")
