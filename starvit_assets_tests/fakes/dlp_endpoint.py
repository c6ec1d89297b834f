"""A local Cloud DLP v2 endpoint: ``content:deidentify`` over the REST JSON API.

The real ``DlpServiceClient`` talks to it through its REST transport (see :meth:`client`), so
tests exercise the request shapes the library really sends: proto3 JSON, camelCase field
names, int64 as strings, enums as numbers (``$alt=json;enum-encoding=int``).

Implemented, with the semantics DLP documents for record transformations on a table:

- ``cryptoHashConfig``: HMAC-SHA256 of the UTF-8 string with the key, base64 (strings only);
- ``dateShiftConfig``: a shift within ``[lowerBoundDays, upperBoundDays]``, deterministic per
  context value and key when both are given, random otherwise; on ``dateValue`` and
  ``timestampValue``;
- ``timePartConfig``: YEAR, MONTH, DAY_OF_MONTH, DAY_OF_WEEK, WEEK_OF_YEAR of a date/timestamp;
- ``bucketingConfig``: ``min`` inclusive, ``max`` exclusive, first match wins; a value in no
  bucket is left as it is;
- ``redactConfig`` (an empty value) and ``replaceConfig``.

Where the real service's behaviour is not documented the fake is strict, so code that passes
here does not rely on leniency: a field transformed twice, a condition, an unknown key or
transformation, or an empty context are rejected. How DLP derives its shift from the key and
its limits accounting are its own; the fake's only promise is the documented contract.

Errors are ``google.rpc.Status`` JSON (``{"error": {"code", "message", "status"}}``), which
the client library turns into ``google.api_core.exceptions``. :meth:`fail_next` makes the next
requests fail (429 RESOURCE_EXHAUSTED by default); :attr:`requests` records what arrived.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import itertools
import json
import random
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from google.auth.credentials import AnonymousCredentials
from google.cloud import dlp_v2
from google.cloud.dlp_v2.services.dlp_service.transports.rest import DlpServiceRestTransport

DLP_MAX_VALUES = 50_000
DLP_MAX_REQUEST_BYTES = 500_000

_PATH = re.compile(r"^/v2/projects/[^/]+(?:/locations/[^/]+)?/content:deidentify$")
_TIME_PARTS = {
    1: "YEAR",
    2: "MONTH",
    3: "DAY_OF_MONTH",
    4: "DAY_OF_WEEK",
    5: "WEEK_OF_YEAR",
    6: "HOUR_OF_DAY",
}
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

Json = dict[str, Any]


class RpcError(Exception):
    def __init__(self, code: int, message: str, details: list[Json] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or []

    def body(self) -> bytes:
        status = _STATUS_NAMES.get(self.code, "UNKNOWN")
        error = {"code": self.code, "message": self.message, "status": status}
        if self.details:
            error["details"] = self.details
        return json.dumps({"error": error}).encode()


def _invalid(message: str) -> RpcError:
    return RpcError(400, message)


def _injected(code: int) -> RpcError:
    if code != 429:
        return RpcError(code, "The service is currently unavailable.")
    error_info = {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "RATE_LIMIT_EXCEEDED",
        "domain": "googleapis.com",
        "metadata": {
            "service": "dlp.googleapis.com",
            "quota_metric": "dlp.googleapis.com/requests",
        },
    }
    return RpcError(429, "Quota exceeded for quota metric 'Requests'.", [error_info])


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    body_bytes: int
    status: int
    payload: Json | None

    @property
    def rows(self) -> int:
        return len(_table(self.payload).get("rows", [])) if self.payload else 0

    @property
    def values(self) -> int:
        """Table values, as DLP counts them for its 50,000 limit."""
        if not self.payload:
            return 0
        return sum(len(row.get("values", [])) for row in _table(self.payload).get("rows", []))


def _table(payload: Json) -> Json:
    item = payload.get("item")
    table = item.get("table") if isinstance(item, dict) else None
    return table if isinstance(table, dict) else {}


class FakeDlpEndpoint:
    def __init__(
        self,
        *,
        kms_keys: Mapping[tuple[str, bytes], bytes] | None = None,
        max_values: int = DLP_MAX_VALUES,
        max_request_bytes: int = DLP_MAX_REQUEST_BYTES,
        host: str = "127.0.0.1",
    ) -> None:
        """``kms_keys`` plays Cloud KMS: (crypto key name, wrapped key) -> the data key."""
        self._kms_keys = dict(kms_keys or {})
        self._max_values = max_values
        self._max_request_bytes = max_request_bytes
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._failures: list[int] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                status, response = endpoint._handle(self.path.split("?", 1)[0], body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(response)))
                self.end_headers()
                self.wfile.write(response)

            def do_GET(self) -> None:
                response = RpcError(404, "not found").body()
                self.send_response(404)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(response)))
                self.end_headers()
                self.wfile.write(response)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer((host, 0), Handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def host(self) -> str:
        bound_host, bound_port = self._httpd.server_address[:2]
        return f"{bound_host!s}:{bound_port}"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="fake-dlp", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeDlpEndpoint:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self) -> dlp_v2.DlpServiceClient:
        """The real client library, over its REST transport, pointed here."""
        transport = DlpServiceRestTransport(
            host=self.host, url_scheme="http", credentials=AnonymousCredentials()
        )
        return dlp_v2.DlpServiceClient(transport=transport)

    # -- test controls -----------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()
            self._failures.clear()

    def fail_next(self, count: int, status: int = 429) -> None:
        with self._lock:
            self._failures.extend([status] * count)

    # -- the API -----------------------------------------------------------------------------

    def _handle(self, path: str, body: bytes) -> tuple[int, bytes]:
        payload: Json | None = None
        try:
            with self._lock:
                failure = self._failures.pop(0) if self._failures else None
            if not _PATH.match(path):
                raise RpcError(404, f"no method at {path}")
            try:
                parsed = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise _invalid("Invalid JSON payload received.") from None
            if not isinstance(parsed, dict):
                raise _invalid("Invalid JSON payload received: not an object.")
            payload = parsed
            if failure is not None:
                raise _injected(failure)
            if len(body) > self._max_request_bytes:
                raise _invalid("Request payload size exceeds the limit.")
            try:
                result = self._deidentify(payload)
            except (AttributeError, KeyError, TypeError, ValueError, _TransformationError):
                # A field of the wrong JSON type somewhere in the request.
                raise _invalid("Invalid JSON payload received.") from None
            status, response = 200, json.dumps(result).encode()
        except RpcError as error:
            status, response = error.code, error.body()
        with self._lock:
            self._requests.append(RecordedRequest(path, len(body), status, payload))
        return status, response

    def _deidentify(self, payload: Json) -> Json:
        _only_keys(payload, {"deidentifyConfig", "item", "inspectConfig", "parent"}, "request")
        config = _object(payload, "deidentifyConfig")
        _only_keys(
            config, {"recordTransformations", "transformationErrorHandling"}, "deidentifyConfig"
        )
        handling = config.get("transformationErrorHandling", {})
        leave_untransformed = isinstance(handling, dict) and "leaveUntransformed" in handling
        transformations = _object(config, "recordTransformations").get("fieldTransformations")
        if not isinstance(transformations, list) or not transformations:
            raise _invalid("recordTransformations.fieldTransformations is required.")
        table = _object(_object(payload, "item"), "table")
        names = [h.get("name") if isinstance(h, dict) else None for h in table.get("headers", [])]
        headers = [name for name in names if isinstance(name, str) and name]
        if not headers or len(headers) != len(names):
            raise _invalid("item.table.headers: every header needs a name.")
        if len(set(headers)) != len(headers):
            raise _invalid("item.table.headers: duplicate header.")
        rows = table.get("rows", [])
        if not isinstance(rows, list):
            raise _invalid("item.table.rows must be a list.")
        cells: list[list[Json]] = []
        for index, row in enumerate(rows):
            values = row.get("values") if isinstance(row, dict) else None
            if not isinstance(values, list) or len(values) != len(headers):
                raise _invalid(f"item.table.rows[{index}] does not match the headers.")
            if not all(isinstance(v, dict) and len(v) <= 1 for v in values):
                raise _invalid(f"item.table.rows[{index}]: a value holds more than one type.")
            cells.append([dict(v) for v in values])
        if len(headers) * len(rows) > self._max_values:
            raise _invalid(f"Too many values in the request; the maximum is {self._max_values}.")

        column = {name: index for index, name in enumerate(headers)}
        transformed: set[str] = set()
        summaries = []
        for index, transformation in enumerate(transformations):
            where = f"fieldTransformations[{index}]"
            if not isinstance(transformation, dict):
                raise _invalid(f"{where} must be an object.")
            if "condition" in transformation or "infoTypeTransformations" in transformation:
                raise _invalid(f"{where}: not supported by the fake endpoint.")
            _only_keys(transformation, {"fields", "primitiveTransformation"}, where)
            fields = [f.get("name") for f in transformation.get("fields", [])]
            if not fields:
                raise _invalid(f"{where}.fields is required.")
            for name in fields:
                if name not in column:
                    raise _invalid(f"{where}: field {name!r} is not a table header.")
                if name in transformed:
                    raise _invalid(f"{where}: field {name!r} is transformed more than once.")
                transformed.add(name)
            function = self._primitive(_object(transformation, "primitiveTransformation"), where)
            count = 0
            for row in cells:
                context = {name: row[i] for name, i in column.items()}
                for name in fields:
                    value = row[column[name]]
                    if not value:
                        continue
                    try:
                        row[column[name]] = function(value, context)
                        count += 1
                    except _TransformationError as error:
                        if not leave_untransformed:
                            raise _invalid(
                                "Could not de-identify all content due to transformation "
                                f"errors: {where}: {error}"
                            ) from None
            summaries.append(
                {
                    "field": {"name": fields[0]},
                    "fieldTransformations": [transformation],
                    "results": [{"count": str(count), "code": "SUCCESS"}],
                }
            )
        return {
            "item": {
                "table": {
                    "headers": [{"name": h} for h in headers],
                    "rows": [{"values": row} for row in cells],
                }
            },
            "overview": {
                "transformedBytes": str(sum(len(json.dumps(r)) for r in cells)),
                "transformationSummaries": summaries,
            },
        }

    # -- primitives --------------------------------------------------------------------------

    def _primitive(self, primitive: Json, where: str) -> _Function:
        if len(primitive) != 1:
            raise _invalid(f"{where}.primitiveTransformation needs exactly one transformation.")
        ((kind, spec),) = primitive.items()
        if not isinstance(spec, dict):
            raise _invalid(f"{where}.{kind} must be an object.")
        if kind == "cryptoHashConfig":
            return self._crypto_hash(spec, where)
        if kind == "dateShiftConfig":
            return self._date_shift(spec, where)
        if kind == "timePartConfig":
            return _time_part(spec, where)
        if kind == "bucketingConfig":
            return _bucketing(spec, where)
        if kind == "redactConfig":
            return lambda value, context: {}
        if kind == "replaceConfig":
            replacement = _object(spec, "newValue")
            return lambda value, context: dict(replacement)
        raise _invalid(f"{where}: transformation {kind} is not supported by the fake endpoint.")

    def _crypto_key(self, spec: Json, where: str) -> bytes:
        if len(spec) != 1:
            raise _invalid(f"{where}.cryptoKey needs exactly one key source.")
        ((source, key_spec),) = spec.items()
        if source == "unwrapped":
            key = _bytes(key_spec.get("key"), f"{where}.cryptoKey.unwrapped.key")
        elif source == "kmsWrapped":
            name = key_spec.get("cryptoKeyName", "")
            wrapped = _bytes(key_spec.get("wrappedKey"), f"{where}.cryptoKey.kmsWrapped")
            if (name, wrapped) not in self._kms_keys:
                raise _invalid(f"{where}: the KMS-wrapped key could not be unwrapped.")
            key = self._kms_keys[(name, wrapped)]
        else:
            raise _invalid(f"{where}: cryptoKey source {source} is not supported by the fake.")
        if len(key) not in (16, 24, 32):
            raise _invalid(f"{where}: the key must be 128, 192 or 256 bits.")
        return key

    def _crypto_hash(self, spec: Json, where: str) -> _Function:
        key = self._crypto_key(_object(spec, "cryptoKey"), where)
        if len(key) not in (32, 64):
            raise _invalid(f"{where}: cryptoHashConfig needs a 32 or 64 byte key.")

        def apply(value: Json, context: Mapping[str, Json]) -> Json:
            if "stringValue" not in value:
                raise _TransformationError("only string values are hashed by the fake")
            digest = hmac.new(key, value["stringValue"].encode(), hashlib.sha256).digest()
            return {"stringValue": base64.b64encode(digest).decode()}

        return apply

    def _date_shift(self, spec: Json, where: str) -> _Function:
        _only_keys(spec, {"upperBoundDays", "lowerBoundDays", "context", "cryptoKey"}, where)
        upper, lower = spec.get("upperBoundDays"), spec.get("lowerBoundDays")
        if not isinstance(upper, int) or not isinstance(lower, int):
            raise _invalid(f"{where}: upperBoundDays and lowerBoundDays are required.")
        if not -365_250 <= lower <= upper <= 365_250:
            raise _invalid(f"{where}: the shift range is invalid.")
        context_field = spec.get("context", {}).get("name")
        if ("cryptoKey" in spec) != (context_field is not None):
            raise _invalid(f"{where}: context and cryptoKey must be set together.")
        key = self._crypto_key(spec["cryptoKey"], where) if "cryptoKey" in spec else None

        def apply(value: Json, context: Mapping[str, Json]) -> Json:
            if key is None or context_field is None:
                days = random.randint(lower, upper)
            else:
                entity = context.get(context_field)
                if entity is None:
                    raise _invalid(f"{where}: context field {context_field!r} is not a header.")
                scalar = entity.get("stringValue", entity.get("integerValue"))
                if scalar is None:
                    raise _TransformationError("the context value is empty")
                digest = hmac.new(key, str(scalar).encode(), hashlib.sha256).digest()
                days = lower + int.from_bytes(digest[:8], "big") % (upper - lower + 1)
            if "dateValue" in value:
                date = _date(value["dateValue"]) + dt.timedelta(days=days)
                return {"dateValue": {"year": date.year, "month": date.month, "day": date.day}}
            if "timestampValue" in value:
                shifted = _timestamp(value["timestampValue"]) + dt.timedelta(days=days)
                return {"timestampValue": shifted.isoformat().replace("+00:00", "Z")}
            raise _TransformationError("only dates and timestamps are shifted")

        return apply


_Function = Callable[[Json, Mapping[str, Json]], Json]


class _TransformationError(Exception):
    pass


def _time_part(spec: Json, where: str) -> _Function:
    part = spec.get("partToExtract")
    name = _TIME_PARTS.get(part, "") if isinstance(part, int) else str(part)
    if name not in _TIME_PARTS.values() or name == "HOUR_OF_DAY":
        raise _invalid(f"{where}: partToExtract {part!r} is not supported by the fake.")

    def apply(value: Json, context: Mapping[str, Json]) -> Json:
        if "dateValue" in value:
            moment = _date(value["dateValue"])
        elif "timestampValue" in value:
            moment = _timestamp(value["timestampValue"]).date()
        else:
            raise _TransformationError("only dates and timestamps have time parts")
        extracted = {
            "YEAR": moment.year,
            "MONTH": moment.month,
            "DAY_OF_MONTH": moment.day,
            "DAY_OF_WEEK": moment.isoweekday(),
            "WEEK_OF_YEAR": moment.isocalendar().week,
        }[name]
        return {"integerValue": str(extracted)}

    return apply


def _bucketing(spec: Json, where: str) -> _Function:
    buckets = spec.get("buckets")
    if not isinstance(buckets, list) or not buckets:
        raise _invalid(f"{where}: bucketingConfig.buckets is required.")
    ranges: list[tuple[float | None, float | None, Json]] = []
    for bucket in buckets:
        replacement = bucket.get("replacementValue")
        if not isinstance(replacement, dict) or not replacement:
            raise _invalid(f"{where}: every bucket needs a replacementValue.")
        try:
            low = _number(bucket["min"]) if "min" in bucket else None
            high = _number(bucket["max"]) if "max" in bucket else None
        except _TransformationError:
            raise _invalid(f"{where}: the fake buckets numbers only.") from None
        if low is not None and high is not None and low >= high:
            raise _invalid(f"{where}: a bucket's min must be below its max.")
        ranges.append((low, high, replacement))
    ordered = sorted(ranges, key=lambda r: float("-inf") if r[0] is None else r[0])
    for (_, high, _), (low, _, _) in itertools.pairwise(ordered):
        if high is None or low is None or low < high:
            raise _invalid(f"{where}: buckets overlap.")

    def apply(value: Json, context: Mapping[str, Json]) -> Json:
        number = _number(value)
        for low, high, replacement in ranges:
            if (low is None or number >= low) and (high is None or number < high):
                return dict(replacement)
        return value

    return apply


def _number(value: Json) -> float:
    if "integerValue" in value:
        return float(int(value["integerValue"]))
    if "floatValue" in value:
        return float(value["floatValue"])
    raise _TransformationError("only numbers are bucketed by the fake")


def _date(value: Json) -> dt.date:
    try:
        return dt.date(int(value["year"]), int(value["month"]), int(value["day"]))
    except (KeyError, TypeError, ValueError):
        raise _TransformationError("not a complete date") from None


def _timestamp(value: str) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (AttributeError, ValueError):
        raise _TransformationError("not an RFC 3339 timestamp") from None


def _bytes(value: object, where: str) -> bytes:
    if not isinstance(value, str):
        raise _invalid(f"{where} is required.")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise _invalid(f"{where} is not base64.") from None


def _object(parent: Json, name: str) -> Json:
    value = parent.get(name)
    if not isinstance(value, dict):
        raise _invalid(f"{name} is required.")
    return value


def _only_keys(value: Json, allowed: set[str], where: str) -> None:
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise _invalid(f"Invalid JSON payload received. Unknown name {unknown[0]!r} at {where}.")
