"""Where the graph goes: loading-job files (the embedded default) or TigerGraph over RESTPP.

Both loaders take the same :class:`GraphData` and return a :class:`LoadReport` with what was
loaded and what the target holds afterwards, per vertex and edge type, so that one
reconciliation (:func:`reconcile`) covers both.

The RESTPP loader upserts through pyTigerGraph in batches. Upserts are idempotent (a vertex
by its primary id, an edge by its endpoints and discriminator), which is what makes retrying
a batch after a transient error, and re-running a whole load, safe. After the upserts it
deletes the vertices the source rows no longer hold (a deleted or purged patient, its
encounters, a code nobody uses any more), and with them their edges; deleting an id that is
already gone deletes nothing, so that step is idempotent too. Every request has a timeout
(``TigerGraphConfig.timeout_seconds``): pyTigerGraph itself would wait forever.

The file loader needs no deletion step: every load replaces the whole folder.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import requests
from pydantic import SecretStr
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from starvit_assets.graph.files import count_csv_rows, write_loading_files
from starvit_assets.graph.schema import (
    EDGE_SEGMENTS,
    GRAPH_NAME,
    TYPE_DEFAULTS,
    VERTEX_TYPES,
    Attribute,
    EdgeSegment,
    GraphData,
    Row,
    VertexType,
    per_type,
)
from starvit_assets.settings import StarvitSettings

logger = logging.getLogger("starvit.graph")

DEFAULT_BATCH_SIZE = 500
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# pyTigerGraph's default response cap (32 MB), sent as an integer: its
# customizeHeader would send the float default as "32000000.0".
RESPONSE_LIMIT_BYTES = 32_000_000
_MAX_MESSAGE = 300

T = TypeVar("T")


class GraphLoadError(Exception):
    """A load failed; the message names the step, the HTTP status and TigerGraph's error."""


@dataclass(frozen=True)
class LoadReport:
    target: str  # "files" or "tigergraph"
    location: str  # folder, or host and graph (never credentials)
    loaded: dict[str, int]  # per type: rows written, or upserts accepted
    in_target: dict[str, int]  # per type: rows read back, or the graph's own count
    deleted: dict[str, int] = field(default_factory=dict)  # stale vertices removed, per type
    batches: int = 0
    attempts: int = 0  # requests sent, retries included
    segments: dict[str, int] = field(default_factory=dict)  # loaded per edge (FROM, TO) pair


class GraphLoader(Protocol):
    def load(self, graph: GraphData) -> LoadReport: ...


def reconcile(expected: dict[str, int], report: LoadReport) -> list[str]:
    """Every way the load differs from the source rows; empty when it reconciles."""
    problems = []
    for name, want in expected.items():
        loaded, held = report.loaded.get(name, 0), report.in_target.get(name, 0)
        if loaded != want:
            problems.append(f"{name}: {want} source rows, {loaded} loaded")
        if held != want:
            problems.append(f"{name}: {want} source rows, {held} in the {report.target} target")
    return problems


class FileGraphLoader:
    def __init__(self, out_dir: Path, graph_name: str = GRAPH_NAME) -> None:
        self.out_dir = out_dir
        self.graph_name = graph_name

    def load(self, graph: GraphData) -> LoadReport:
        written = write_loading_files(graph, self.out_dir, self.graph_name)
        on_disk = count_csv_rows(self.out_dir)
        return LoadReport(
            target="files",
            location=str(self.out_dir),
            loaded=_per_type(written),
            in_target=_per_type(on_disk),
            segments={segment.name: on_disk[segment.name] for segment in EDGE_SEGMENTS},
        )


def _per_type(file_counts: dict[str, int]) -> dict[str, int]:
    vertices = {vertex.name: file_counts.get(vertex.name, 0) for vertex in VERTEX_TYPES}
    return {**vertices, **per_type(file_counts)}


@dataclass(frozen=True)
class TigerGraphConfig:
    host: str  # with scheme and, unless the default ports, the port: http://tg:14240
    graph_name: str = GRAPH_NAME
    username: str = "tigergraph"
    # Kept out of repr, so that no log line or error shows them.
    password: str = field(default="", repr=False)
    secret: str = field(default="", repr=False)  # a GSQL secret: a token is requested with it
    api_token: str = field(default="", repr=False)  # a RESTPP token already issued
    batch_size: int = DEFAULT_BATCH_SIZE
    max_attempts: int = 5
    retry_wait_seconds: float = 1.0
    timeout_seconds: float = 60.0  # per HTTP request; a stalled one is abandoned and retried

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise GraphLoadError("the TigerGraph batch size must be at least 1")
        if self.timeout_seconds <= 0:
            raise GraphLoadError("the TigerGraph request timeout must be more than 0 seconds")


class RestppGraphLoader:
    """Upserts through pyTigerGraph: vertices first, then edges with vertex_must_exist; then
    deletes the vertices (and so their edges) whose ids the source rows no longer hold."""

    def __init__(self, config: TigerGraphConfig) -> None:
        self.config = config
        self._attempts = 0
        self._last_status: int | None = None

    def load(self, graph: GraphData) -> LoadReport:
        self._attempts = 0
        connection = self._connect()
        try:
            loaded: dict[str, int] = {}
            batches = 0
            for vertex in VERTEX_TYPES:
                loaded[vertex.name] = 0
                for number, batch in _batches(graph.vertex_rows(vertex), self.config.batch_size):
                    vertices = [_vertex_upsert(vertex, row) for row in batch]
                    loaded[vertex.name] += self._call(
                        f"upsert of {vertex.name} vertices (batch {number})",
                        partial(connection.upsertVertices, vertex.name, vertices),
                    )
                    batches += 1
            segments: dict[str, int] = {}
            for segment in EDGE_SEGMENTS:
                segments[segment.name] = 0
                for number, batch in _batches(graph.segment_rows(segment), self.config.batch_size):
                    edges = [_edge_upsert(segment, row) for row in batch]
                    segments[segment.name] += self._call(
                        f"upsert of {segment.name} edges (batch {number})",
                        partial(
                            connection.upsertEdges,
                            segment.from_vertex,
                            segment.edge.name,
                            segment.to_vertex,
                            edges,
                            vertexMustExist=True,
                        ),
                    )
                    batches += 1
            loaded.update(per_type(segments))
            deleted: dict[str, int] = {}
            for vertex in VERTEX_TYPES:
                deleted[vertex.name], deletion_batches = self._delete_stale(
                    connection, vertex, graph.vertex_rows(vertex)
                )
                batches += deletion_batches
            in_target = self._counts(connection)
        finally:
            connection.close()
        return LoadReport(
            target="tigergraph",
            location=f"{self.config.host} graph {self.config.graph_name}",
            loaded=loaded,
            in_target=in_target,
            deleted=deleted,
            batches=batches,
            attempts=self._attempts,
            segments=segments,
        )

    def _delete_stale(
        self, connection: Any, vertex: VertexType, rows: Sequence[Row]
    ) -> tuple[int, int]:
        """Delete the vertices of one type whose ids are not among the source rows, in batches
        (pyTigerGraph's delVerticesById sends one DELETE /graph/{graph}/vertices/{type}/{id}
        per id). Returns the vertices deleted and the batches sent."""
        # Only the primary id is selected (the schema declares it an attribute too), to keep
        # the listing small.
        listed = self._call(
            f"listing of {vertex.name} vertices",
            partial(connection.getVertices, vertex.name, select=vertex.primary_id.name),
        )
        wanted = {str(row[0]) for row in rows}
        stale = sorted({str(item["v_id"]) for item in listed} - wanted)
        batches = 0
        for number, batch in _batches(stale, self.config.batch_size):
            # A retried batch deletes again what an interrupted attempt already deleted:
            # TigerGraph answers deleted_vertices 0 for those, nothing fails.
            self._call(
                f"deletion of stale {vertex.name} vertices (batch {number})",
                partial(connection.delVerticesById, vertex.name, list(batch)),
            )
            batches += 1
        if stale:
            logger.info("TigerGraph: deleted %d stale %s vertices", len(stale), vertex.name)
        return len(stale), batches

    def _counts(self, connection: Any) -> dict[str, int]:
        """The graph's own counts (RESTPP builtins stat_vertex_number / stat_edge_number),
        edges per (FROM, TO) pair."""
        vertex_counts = self._call(
            "vertex count", partial(connection.getVertexCount, "*", realtime=True)
        )
        counts = {vertex.name: int(vertex_counts.get(vertex.name, 0)) for vertex in VERTEX_TYPES}
        segments = {}
        for segment in EDGE_SEGMENTS:
            result = self._call(
                f"{segment.name} edge count",
                partial(
                    connection.getEdgeCount,
                    segment.edge.name,
                    segment.from_vertex,
                    segment.to_vertex,
                ),
            )
            # pyTigerGraph returns a bare number for one result row, a dict for several.
            if isinstance(result, dict):
                result = result.get(segment.edge.name, 0)
            segments[segment.name] = int(result)
        return counts | per_type(segments)

    def _connect(self) -> Any:
        from pyTigerGraph import TigerGraphConnection

        recorder = self
        timeout_seconds = self.config.timeout_seconds

        class StatusRecordingConnection(TigerGraphConnection):
            # pyTigerGraph turns a JSON error body into TigerGraphException without the HTTP
            # status; the status decides whether a retry can help, so note it per response.
            # Its own HTTP timeout is None (wait forever) unless customizeHeader was called,
            # and then the GSQL-TIMEOUT plus 30 s, on every path but its port failover: each
            # request gets the configured timeout here instead.
            # The parameter names are pyTigerGraph's, so a call by keyword works too.
            def _do_request(
                self,
                method: str,
                url: str,
                _headers: dict[str, str],
                _data: Any,
                jsonData: bool,
                params: Any,
                timeout: float | None,
            ) -> requests.Response:
                response: requests.Response = super()._do_request(
                    method, url, _headers, _data, jsonData, params, timeout_seconds
                )
                recorder._last_status = response.status_code
                return response

        config = self.config
        try:
            with _keeping_excepthook():
                connection = StatusRecordingConnection(
                    host=config.host,
                    graphname=config.graph_name,
                    username=config.username,
                    password=config.password,
                    apiToken=config.api_token,
                )
        except Exception as error:
            raise GraphLoadError(f"TigerGraph connection settings: {_describe(error)}") from None
        # TigerGraph stops a request's work after GSQL-TIMEOUT (ms): no longer than the client
        # waits for it.
        connection.customizeHeader(
            timeout=max(1, round(config.timeout_seconds * 1000)), responseSize=RESPONSE_LIMIT_BYTES
        )
        # pyTigerGraph turns certificate verification off for every https URL; the token and
        # the data go only to a server whose certificate verifies (system CAs, or the bundle
        # in REQUESTS_CA_BUNDLE). Its sessions copy this on first use.
        connection.verify = True
        if config.secret and not config.api_token:
            self._call(
                "token request",
                lambda: connection.getToken(config.secret, is_global=False),
            )
        return connection

    def _call(self, step: str, request: Callable[[], T]) -> T:
        tries = 0

        def attempt() -> T:
            nonlocal tries
            tries += 1
            self._attempts += 1
            self._last_status = None
            return request()

        retrying = Retrying(
            stop=stop_after_attempt(max(1, self.config.max_attempts)),
            wait=wait_exponential(multiplier=self.config.retry_wait_seconds, max=30),
            retry=retry_if_exception(self._is_transient),
            reraise=True,
            before_sleep=lambda state: logger.warning(
                "TigerGraph %s: %s; retrying (attempt %d)",
                step,
                f"HTTP {self._last_status}" if self._last_status else "no HTTP response",
                state.attempt_number,
            ),
        )
        try:
            return retrying(attempt)
        except Exception as error:
            status = self._status(error)
            where = f"HTTP {status}" if status else "no HTTP response"
            raise GraphLoadError(
                f"TigerGraph {step} at {self.config.host} failed ({where}) after "
                f"{tries} attempt(s): {_describe(error)}"
            ) from None

    def _status(self, error: BaseException) -> int | None:
        response = getattr(error, "response", None)
        status = getattr(response, "status_code", None)
        return int(status) if status is not None else self._last_status

    def _is_transient(self, error: BaseException) -> bool:
        if isinstance(error, requests.ConnectionError | requests.Timeout):
            return True
        return self._status(error) in TRANSIENT_STATUSES


def _describe(error: BaseException) -> str:
    """The error's class, TigerGraph's code and message; never a request body."""
    code = getattr(error, "code", None)
    message = getattr(error, "message", None) or str(error)
    if isinstance(error, requests.Timeout):
        message = "timed out"
    elif isinstance(error, requests.ConnectionError):
        message = "could not connect"
    elif isinstance(error, requests.RequestException):
        message = f"HTTP error {getattr(error.response, 'status_code', '')}".strip()
    text = f"{type(error).__name__}" + (f" {code}" if code else "") + f": {message}"
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _batches(rows: Sequence[T], size: int) -> Iterator[tuple[int, Sequence[T]]]:
    for start in range(0, len(rows), size):
        yield start // size + 1, rows[start : start + size]


def _vertex_upsert(vertex: VertexType, row: Row) -> tuple[object, dict[str, object]]:
    primary_id, *values = row
    return primary_id, _attributes(vertex.attributes, values)


def _edge_upsert(segment: EdgeSegment, row: Row) -> tuple[object, object, dict[str, object]]:
    source, target, *values = row
    return source, target, _attributes(segment.edge.edge_attributes, values)


def _attributes(attributes: Sequence[Attribute], values: Sequence[object]) -> dict[str, object]:
    # A missing value is sent as its type's default (what an empty CSV field loads as), not
    # left out: an upsert keeps the attributes it is not sent, so a value that became null
    # in the warehouse would otherwise survive in the graph.
    return {
        attribute.name: TYPE_DEFAULTS[attribute.gsql_type] if value is None else value
        for attribute, value in zip(attributes, values, strict=True)
    }


@contextmanager
def _keeping_excepthook() -> Iterator[None]:
    """pyTigerGraph's constructor replaces sys.excepthook (with one that prints only the
    message) unless debug is set; the platform keeps Python's own."""
    hook = sys.excepthook
    had_limit = hasattr(sys, "tracebacklimit")
    limit = getattr(sys, "tracebacklimit", None)
    try:
        yield
    finally:
        sys.excepthook = hook
        if had_limit:
            sys.tracebacklimit = limit
        elif hasattr(sys, "tracebacklimit"):
            del sys.tracebacklimit


def graph_loader(settings: StarvitSettings) -> GraphLoader:
    """RESTPP when STARVIT_TIGERGRAPH_HOST is set, loading-job files under graph_dir otherwise."""
    if not settings.tigergraph_host:
        return FileGraphLoader(settings.graph_dir / "load", settings.tigergraph_graph)

    def secret(value: SecretStr | None) -> str:
        return value.get_secret_value() if value is not None else ""

    return RestppGraphLoader(
        TigerGraphConfig(
            host=settings.tigergraph_host,
            graph_name=settings.tigergraph_graph,
            username=settings.tigergraph_username,
            password=secret(settings.tigergraph_password),
            secret=secret(settings.tigergraph_secret),
            api_token=secret(settings.tigergraph_token),
            batch_size=settings.tigergraph_batch_size,
            max_attempts=settings.tigergraph_max_attempts,
            timeout_seconds=settings.tigergraph_timeout_seconds,
        )
    )
