"""The Cloud DLP backend: the policy of ``policy.yaml`` applied by ``content:deidentify``.

Same contract as :class:`~starvit_assets.deid.engine.LocalDeidEngine`: same columns, types and
semantics, and the same pseudonyms for the same key (DLP's CryptoHash is HMAC-SHA256, which we
re-encode as the local engine's 32 hex characters), so the two backends can replace each other
without breaking joins. Date-shift offsets differ: DLP derives them its own way.

Each step sends DLP a small table of *distinct* values rather than the view's rows:
identifiers and dates repeat heavily, nulls need no request, and ``keep``, ``drop`` and
``redact`` columns never leave the process, because their output does not depend on DLP.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc
from google.api_core import exceptions as api_exceptions
from google.auth.credentials import Credentials
from google.cloud import dlp_v2
from google.type import date_pb2

from starvit_assets.deid.engine import (
    _FHIR_TEMPORAL,
    AGE_CEILING,
    TOKEN_HEX_CHARS,
    DeidError,
    shift_fhir_temporal,
    zip3,
)
from starvit_assets.deid.policy import ColumnRule, Policy

_LOG = logging.getLogger(__name__)

# Quota and availability errors are worth waiting for; anything else (a malformed request, a
# transformation error, a permission) fails the same way on every attempt. Over gRPC these
# arrive as ResourceExhausted, ServiceUnavailable and DeadlineExceeded; the REST transport maps
# HTTP statuses instead, to their parents TooManyRequests (429) and GatewayTimeout (504).
RETRYABLE_ERRORS: tuple[type[Exception], ...] = (
    api_exceptions.TooManyRequests,
    api_exceptions.ServiceUnavailable,
    api_exceptions.GatewayTimeout,
)

_REQUEST_MARGIN_BYTES = 1024


@dataclass(frozen=True)
class _WireSizes:
    """Upper bounds of what one cell and one row add to a request in one encoding."""

    string: int  # plus the encoded string itself
    date: int
    integer: int
    row: int


# The REST transport sends ``MessageToJson`` with indent=2: nesting costs more than the data.
_JSON_SIZES = _WireSizes(string=64, date=192, integer=96, row=64)
# gRPC sends the binary protobuf: tags and length prefixes only.
_PROTO_SIZES = _WireSizes(string=8, date=16, integer=16, row=8)

Cell = str | int | dt.date


@dataclass(frozen=True)
class UnwrappedKey:
    """A raw 256-bit key sent with every request: for development and tests only."""

    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        # CryptoHash takes 32 or 64 bytes, an unwrapped DLP key 16, 24 or 32: only 32 fits both.
        if len(self.key) != 32:
            raise ValueError("an unwrapped Cloud DLP key must be exactly 32 bytes")


@dataclass(frozen=True)
class KmsWrappedKey:
    """A data key wrapped by Cloud KMS; DLP unwraps it, so the key never exists here."""

    wrapped_key: bytes = field(repr=False)
    crypto_key_name: str

    def __post_init__(self) -> None:
        if not self.wrapped_key or not self.crypto_key_name:
            raise ValueError("a KMS-wrapped key needs the wrapped key and the KMS key name")


DlpKey = UnwrappedKey | KmsWrappedKey


@dataclass(frozen=True)
class DlpLimits:
    """Request limits: DLP's own (values, size), our rate limit and the retry schedule."""

    max_values: int = 50_000
    max_request_bytes: int = 500_000
    requests_per_minute: float = 600.0
    max_attempts: int = 6
    initial_backoff_seconds: float = 1.0
    max_backoff_seconds: float = 32.0
    timeout_seconds: float = 300.0

    def __post_init__(self) -> None:
        if self.max_values < 2 or self.max_request_bytes < 4 * _REQUEST_MARGIN_BYTES:
            raise ValueError("DLP request limits are too small to hold a row")
        if self.requests_per_minute <= 0 or self.max_attempts < 1:
            raise ValueError("requests_per_minute and max_attempts must be positive")


class DeidentifyClient(Protocol):
    """The one call we need of ``DlpServiceClient``; tests may inject anything that has it."""

    def deidentify_content(
        self, request: dlp_v2.DeidentifyContentRequest, *, retry: Any, timeout: float
    ) -> dlp_v2.DeidentifyContentResponse: ...


class RateLimiter:
    """Spaces request starts evenly: at most ``per_minute`` in any minute, no bursts.

    It counts the requests of one backend in one process only. DLP's quota is per project, so
    the deid_raw steps that share it run one at a time: they are in the ``cloud_dlp``
    concurrency pool, which dagster.yaml limits to 1 (defs/deid_raw.py, docs/gate.md).
    """

    def __init__(
        self,
        per_minute: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._interval = 60.0 / per_minute
        self._clock = clock
        self._sleep = sleep
        self._next = float("-inf")
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self._interval
        if start > now:
            self._sleep(start - now)


@dataclass(frozen=True)
class _FhirDate:
    """A parsed FHIR date/dateTime: its calendar date (first day for partial dates)."""

    value: str
    date: dt.date


def _parse_fhir_date(value: str) -> _FhirDate:
    match = _FHIR_TEMPORAL.match(value)
    if match is None:
        raise ValueError("not a FHIR date, dateTime or instant")
    date = dt.date(int(match["year"]), int(match["month"] or 1), int(match["day"] or 1))
    return _FhirDate(value, date)


class DlpDeidBackend:
    """The policy applied by Cloud DLP; a drop-in for ``LocalDeidEngine`` (``DeidBackend``)."""

    def __init__(
        self,
        client: DeidentifyClient,
        *,
        project: str,
        location: str = "global",
        key: DlpKey,
        policy: Policy,
        reference_date: dt.date,
        limits: DlpLimits | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not project or not location or "/" in project or "/" in location:
            raise ValueError("project and location must be plain Cloud resource ids")
        self._client = client
        self._parent = f"projects/{project}/locations/{location}"
        self._key = key
        self._policy = policy
        self._reference_date = reference_date
        self._limits = limits or DlpLimits()
        self._sleep = sleep
        self._limiter = RateLimiter(self._limits.requests_per_minute, clock=clock, sleep=sleep)
        # Batches are sized in the encoding that goes on the wire; a client we cannot place is
        # sized as JSON, the larger of the two.
        kind = str(getattr(getattr(client, "transport", None), "kind", ""))
        self._proto_wire = kind.startswith("grpc")
        _cap_client_payload_logging()

    def __repr__(self) -> str:
        return f"DlpDeidBackend(parent={self._parent!r}, policy_version={self.policy_version!r})"

    @property
    def policy_version(self) -> str:
        return self._policy.version

    def deidentify(self, table_name: str, rows: pa.Table) -> pa.Table:
        table_policy = self._policy.table(table_name)
        table_policy.check_covers(rows.column_names, table_name)
        rules = {name: table_policy.columns[name] for name in rows.column_names}
        context = rows.column(table_policy.date_shift_context).cast(pa.string()).to_pylist()
        columns = {name: rows.column(name).combine_chunks() for name in rows.column_names}

        def named(method: str, kind: str | None = None) -> list[str]:
            return [n for n, r in rules.items() if r.method == method and r.kind == kind]

        # Everything that can fail locally is parsed before the first request: a bad value
        # costs no quota and sends nothing.
        shifts = _plan_date_shift(table_name, columns, named("date_shift"), context)
        births = _plan_birth_year(table_name, columns, named("generalise", "birth_year"))
        results: dict[str, pa.Array] = {}
        results |= self._pseudonymise(table_name, rules, columns, named("pseudonymise"))
        results |= self._date_shift(table_name, shifts)
        results |= self._birth_year(table_name, births)
        for name, rule in rules.items():
            if name in results or rule.method == "drop":
                continue
            results[name] = self._local_column(table_name, name, rule, columns[name])
        fields = [
            pa.field(name, results[name].type) for name in rows.column_names if name in results
        ]
        return pa.Table.from_arrays([results[f.name] for f in fields], schema=pa.schema(fields))

    # -- methods that need no request -----------------------------------------------------

    def _local_column(
        self, table_name: str, name: str, rule: ColumnRule, column: pa.Array
    ) -> pa.Array:
        if rule.method == "keep":
            return column
        if rule.method == "redact":
            # The output never depends on the input, so the value is not sent anywhere.
            return pa.nulls(len(column), pa.string())
        if rule.method == "generalise" and rule.kind == "zip3":
            # DLP has no primitive for the Safe Harbor list of restricted ZIP3 prefixes; the
            # shared function keeps both backends identical.
            return _map_distinct(column, zip3, pa.string())
        raise DeidError(f"{table_name}.{name}: unsupported method {rule.method}")

    # -- pseudonymise: CryptoHash ---------------------------------------------------------

    def _pseudonymise(
        self,
        table_name: str,
        rules: Mapping[str, ColumnRule],
        columns: Mapping[str, pa.Array],
        names: Sequence[str],
    ) -> dict[str, pa.Array]:
        if not names:
            return {}
        encoded = {name: pc.dictionary_encode(columns[name].cast(pa.string())) for name in names}
        # The resource type is part of the hashed value, exactly as in the local engine: a
        # resource's own id and every reference to it hash alike in every table.
        inputs: dict[str, None] = {}
        for name in names:
            prefix = f"{rules[name].resource_type}/"
            for value in encoded[name].dictionary.to_pylist():
                inputs[prefix + value] = None
        where = _where(table_name, names)
        transformation = dlp_v2.FieldTransformation(
            fields=[dlp_v2.FieldId(name="id")],
            primitive_transformation=dlp_v2.PrimitiveTransformation(
                crypto_hash_config=dlp_v2.CryptoHashConfig(crypto_key=self._crypto_key())
            ),
        )
        hashed = self._transform(
            where, "pseudonymise", ["id"], [(v,) for v in inputs], [transformation], 0
        )
        tokens: dict[str, str] = {}
        for value, cell in zip(inputs, hashed, strict=True):
            tokens[value] = _token(where, cell)
        results: dict[str, pa.Array] = {}
        for name in names:
            prefix = f"{rules[name].resource_type}/"
            dictionary = encoded[name].dictionary.to_pylist()
            mapped = pa.array([tokens[prefix + value] for value in dictionary], pa.string())
            results[name] = mapped.take(encoded[name].indices)
        return results

    # -- date_shift: DateShift with the patient as context ---------------------------------

    def _date_shift(self, table_name: str, plan: _ShiftPlan) -> dict[str, pa.Array]:
        names, pairs = list(plan.cells), plan.pairs
        if not pairs:
            return {name: pa.nulls(len(cells), pa.string()) for name, cells in plan.cells.items()}
        max_days = self._policy.date_shift_max_days
        where = _where(table_name, names)
        transformation = dlp_v2.FieldTransformation(
            fields=[dlp_v2.FieldId(name="date")],
            primitive_transformation=dlp_v2.PrimitiveTransformation(
                date_shift_config=dlp_v2.DateShiftConfig(
                    upper_bound_days=max_days,
                    lower_bound_days=-max_days,
                    context=dlp_v2.FieldId(name="context"),
                    crypto_key=self._crypto_key(),
                )
            ),
        )
        shifted = self._transform(
            where, "date_shift", ["context", "date"], list(pairs), [transformation], 1
        )
        offsets: dict[tuple[str, dt.date], int] = {}
        for pair, cell in zip(pairs, shifted, strict=True):
            days = (_date(where, "date_shift", cell) - pair[1]).days
            if abs(days) > max_days:
                raise DeidError(f"{where}: date_shift: Cloud DLP returned a shift out of bounds")
            offsets[pair] = days
        results: dict[str, pa.Array] = {}
        for name in names:
            # DLP shifted the calendar date; the local engine's function puts back the precision
            # (year, month) and the time and offset suffix, identically for both backends.
            results[name] = pa.array(
                [
                    None
                    if cell is None
                    else shift_fhir_temporal(cell[1].value, offsets[(cell[0], cell[1].date)])
                    for cell in plan.cells[name]
                ],
                pa.string(),
            )
        return results

    # -- generalise birth_year: TimePart(YEAR), then Bucketing for the 90+ collapse --------

    def _birth_year(self, table_name: str, plan: _BirthPlan) -> dict[str, pa.Array]:
        names, encoded, dates = list(plan.encoded), plan.encoded, plan.dates
        if not names:
            return {}
        where = _where(table_name, names)
        distinct_dates = list(dict.fromkeys(dates.values()))
        years: dict[dt.date, int] = {}
        if distinct_dates:
            extract = dlp_v2.FieldTransformation(
                fields=[dlp_v2.FieldId(name="birth_date")],
                primitive_transformation=dlp_v2.PrimitiveTransformation(
                    time_part_config=dlp_v2.TimePartConfig(
                        part_to_extract=dlp_v2.TimePartConfig.TimePart.YEAR
                    )
                ),
            )
            extracted = self._transform(
                where,
                "birth_year (time part)",
                ["birth_date"],
                [(d,) for d in distinct_dates],
                [extract],
                0,
            )
            years = {
                d: _integer(where, "birth_year (time part)", cell)
                for d, cell in zip(distinct_dates, extracted, strict=True)
            }
        collapsed = self._collapse_years(where, sorted(set(years.values())))
        results: dict[str, pa.Array] = {}
        for name in names:
            dictionary = encoded[name].dictionary.to_pylist()
            mapped = pa.array([collapsed[years[dates[v]]] for v in dictionary], pa.int64())
            results[name] = mapped.take(encoded[name].indices)
        return results

    def _collapse_years(self, where: str, years: Sequence[int]) -> dict[int, int]:
        """Everyone 90 or over on the reference date is born in ``reference year - 90``.

        Equivalent to the local engine's age test: whoever is 90 or over was born in that year
        or before, and whoever was born in that year but is 89 keeps that year anyway.
        """
        if not years:
            return {}
        ceiling = self._reference_date.year - AGE_CEILING
        # Every plausible year has a bucket (identity above the ceiling), so nothing depends
        # on what DLP does with a value outside all buckets.
        buckets = [
            dlp_v2.BucketingConfig.Bucket(
                min_=dlp_v2.Value(integer_value=0),
                max_=dlp_v2.Value(integer_value=ceiling + 1),
                replacement_value=dlp_v2.Value(integer_value=ceiling),
            )
        ] + [
            dlp_v2.BucketingConfig.Bucket(
                min_=dlp_v2.Value(integer_value=year),
                max_=dlp_v2.Value(integer_value=year + 1),
                replacement_value=dlp_v2.Value(integer_value=year),
            )
            for year in range(ceiling + 1, self._reference_date.year + 1)
        ]
        transformation = dlp_v2.FieldTransformation(
            fields=[dlp_v2.FieldId(name="birth_year")],
            primitive_transformation=dlp_v2.PrimitiveTransformation(
                bucketing_config=dlp_v2.BucketingConfig(buckets=buckets)
            ),
        )
        bucketed = self._transform(
            where,
            "birth_year (bucketing)",
            ["birth_year"],
            [(y,) for y in years],
            [transformation],
            0,
        )
        collapsed = {
            year: _integer(where, "birth_year (bucketing)", cell)
            for year, cell in zip(years, bucketed, strict=True)
        }
        # Fail closed: a misapplied bucket must never let a 90+ birth year through.
        if any(value < ceiling for value in collapsed.values()):
            raise DeidError(f"{where}: birth_year (bucketing): a year below the 90+ ceiling")
        return collapsed

    # -- requests ---------------------------------------------------------------------------

    def _crypto_key(self) -> dlp_v2.CryptoKey:
        if isinstance(self._key, UnwrappedKey):
            return dlp_v2.CryptoKey(unwrapped=dlp_v2.UnwrappedCryptoKey(key=self._key.key))
        return dlp_v2.CryptoKey(
            kms_wrapped=dlp_v2.KmsWrappedCryptoKey(
                wrapped_key=self._key.wrapped_key, crypto_key_name=self._key.crypto_key_name
            )
        )

    def _transform(
        self,
        where: str,
        step: str,
        headers: Sequence[str],
        rows: Sequence[tuple[Cell, ...]],
        transformations: Sequence[dlp_v2.FieldTransformation],
        output: int,
    ) -> list[Any]:
        """Send ``rows`` in batches within DLP's limits; the ``output`` cell of every row back.

        Cells come back as raw protobuf ``Value`` messages, in request order.
        """
        config = dlp_v2.DeidentifyConfig(
            record_transformations=dlp_v2.RecordTransformations(
                field_transformations=list(transformations)
            ),
            # Never pass a value through untransformed because DLP could not transform it.
            transformation_error_handling=dlp_v2.TransformationErrorHandling(
                throw_error=dlp_v2.TransformationErrorHandling.ThrowError()
            ),
        )
        table_pb = dlp_v2.Table.pb()
        header_pbs = [dlp_v2.FieldId.pb()(name=name) for name in headers]
        empty = dlp_v2.DeidentifyContentRequest(
            parent=self._parent,
            deidentify_config=config,
            item=dlp_v2.ContentItem(table=table_pb(headers=header_pbs)),
        )
        if self._proto_wire:
            overhead = dlp_v2.DeidentifyContentRequest.pb(empty).ByteSize()
        else:
            overhead = len(dlp_v2.DeidentifyContentRequest.to_json(empty).encode())
        overhead += _REQUEST_MARGIN_BYTES
        out: list[Any] = []
        requests = 0
        for batch in self._batches(where, step, rows, len(headers), overhead):
            request = dlp_v2.DeidentifyContentRequest(
                parent=self._parent,
                deidentify_config=config,
                item=dlp_v2.ContentItem(
                    table=table_pb(headers=header_pbs, rows=[_row_pb(row) for row in batch])
                ),
            )
            response = self._call(where, step, request)
            returned = dlp_v2.DeidentifyContentResponse.pb(response).item.table.rows
            if len(returned) != len(batch) or any(
                len(row.values) != len(headers) for row in returned
            ):
                raise DeidError(f"{where}: {step}: Cloud DLP returned a table of another shape")
            out.extend(row.values[output] for row in returned)
            requests += 1
        _LOG.debug("%s: %s: %d values in %d requests", where, step, len(rows), requests)
        return out

    def _batches(
        self,
        where: str,
        step: str,
        rows: Sequence[tuple[Cell, ...]],
        width: int,
        overhead: int,
    ) -> Iterator[Sequence[tuple[Cell, ...]]]:
        max_rows = self._limits.max_values // width
        budget = self._limits.max_request_bytes
        sizes = _PROTO_SIZES if self._proto_wire else _JSON_SIZES
        start, size = 0, overhead
        for index, row in enumerate(rows):
            row_size = sizes.row + sum(_cell_bytes(cell, sizes) for cell in row)
            if overhead + row_size > budget:
                raise DeidError(f"{where}: {step}: a value exceeds Cloud DLP's request size")
            if index > start and (index - start >= max_rows or size + row_size > budget):
                yield rows[start:index]
                start, size = index, overhead
            size += row_size
        if start < len(rows):
            yield rows[start:]

    def _call(
        self, where: str, step: str, request: dlp_v2.DeidentifyContentRequest
    ) -> dlp_v2.DeidentifyContentResponse:
        limits = self._limits
        for attempt in range(1, limits.max_attempts + 1):
            self._limiter.acquire()
            try:
                # retry=None: our loop retries, so that every attempt passes the rate limiter.
                return self._client.deidentify_content(
                    request=request, retry=None, timeout=limits.timeout_seconds
                )
            except RETRYABLE_ERRORS as error:
                reason = f"{type(error).__name__} (HTTP {getattr(error, 'code', '?')})"
                if attempt == limits.max_attempts:
                    raise DeidError(
                        f"{where}: {step} via Cloud DLP failed: {reason} after {attempt} attempts"
                    ) from None
                delay = min(
                    limits.max_backoff_seconds,
                    limits.initial_backoff_seconds * 2 ** (attempt - 1),
                ) * random.uniform(0.5, 1.0)
                _LOG.warning(
                    "%s: %s: %s from Cloud DLP; attempt %d of %d in %.2fs",
                    where,
                    step,
                    reason,
                    attempt + 1,
                    limits.max_attempts,
                    delay,
                )
                self._sleep(delay)
            except api_exceptions.GoogleAPICallError as error:
                # DLP's messages may quote content; only the status crosses into our errors.
                raise DeidError(
                    f"{where}: {step} via Cloud DLP failed: {type(error).__name__} "
                    f"(HTTP {error.code})"
                ) from None
        raise AssertionError("unreachable")


def create_dlp_client(
    *, credentials: Credentials | None = None, api_endpoint: str | None = None
) -> dlp_v2.DlpServiceClient:
    """The real client: Application Default Credentials unless ``credentials`` are given."""
    options = {"api_endpoint": api_endpoint} if api_endpoint else None
    return dlp_v2.DlpServiceClient(credentials=credentials, client_options=options)


def create_dlp_backend(
    *,
    project: str,
    location: str,
    key: DlpKey,
    policy: Policy,
    reference_date: dt.date,
    limits: DlpLimits | None = None,
    credentials: Credentials | None = None,
    api_endpoint: str | None = None,
) -> DlpDeidBackend:
    client = create_dlp_client(credentials=credentials, api_endpoint=api_endpoint)
    return DlpDeidBackend(
        client,
        project=project,
        location=location,
        key=key,
        policy=policy,
        reference_date=reference_date,
        limits=limits,
    )


def _cap_client_payload_logging() -> None:
    # At DEBUG the generated transports log whole request payloads: PHI and the unwrapped key.
    logger = logging.getLogger("google.cloud.dlp_v2")
    if logger.getEffectiveLevel() < logging.INFO:
        logger.setLevel(logging.INFO)


@dataclass(frozen=True)
class _ShiftPlan:
    """Per date column, per row: (DLP context, parsed date), or None for a null result."""

    cells: dict[str, list[tuple[str, _FhirDate] | None]]
    pairs: dict[tuple[str, dt.date], None]  # distinct (context, date), in first-seen order


def _plan_date_shift(
    table_name: str,
    columns: Mapping[str, pa.Array],
    names: Sequence[str],
    context: Sequence[str | None],
) -> _ShiftPlan:
    plan = _ShiftPlan({}, {})
    for name in names:
        cells: list[tuple[str, _FhirDate] | None] = []
        for value, patient in zip(columns[name].to_pylist(), context, strict=True):
            # A date without a patient gets null, never an unshifted date.
            if value is None or patient is None:
                cells.append(None)
                continue
            try:
                fhir_date = _parse_fhir_date(value)
            except ValueError as error:
                raise DeidError(f"{table_name}.{name}: date_shift failed: {error}") from None
            # Domain-separated like the local engine's offsets, so the context DLP keys the
            # shift with never equals a value we hash for a pseudonym.
            shift_context = f"date-shift/Patient/{patient}"
            cells.append((shift_context, fhir_date))
            plan.pairs[(shift_context, fhir_date.date)] = None
        plan.cells[name] = cells
    return plan


@dataclass(frozen=True)
class _BirthPlan:
    encoded: dict[str, pa.DictionaryArray]  # per column: distinct values and row indices
    dates: dict[str, dt.date]  # distinct value -> its calendar date


def _plan_birth_year(
    table_name: str, columns: Mapping[str, pa.Array], names: Sequence[str]
) -> _BirthPlan:
    plan = _BirthPlan({}, {})
    for name in names:
        plan.encoded[name] = pc.dictionary_encode(columns[name].cast(pa.string()))
        for value in plan.encoded[name].dictionary.to_pylist():
            try:
                plan.dates[value] = _parse_fhir_date(value).date
            except ValueError as error:
                raise DeidError(f"{table_name}.{name}: generalise failed: {error}") from None
    return plan


def _where(table_name: str, names: Sequence[str]) -> str:
    return ", ".join(f"{table_name}.{name}" for name in names)


def _cell_bytes(cell: Cell, sizes: _WireSizes) -> int:
    if isinstance(cell, str):
        # JSON escapes (ASCII-only, the longest form) bound both encodings' string bytes.
        return sizes.string + len(json.dumps(cell))
    if isinstance(cell, dt.date):
        return sizes.date
    return sizes.integer


def _row_pb(row: tuple[Cell, ...]) -> Any:
    value_pb = dlp_v2.Value.pb()
    values = []
    for cell in row:
        if isinstance(cell, str):
            values.append(value_pb(string_value=cell))
        elif isinstance(cell, dt.date):
            date = date_pb2.Date(year=cell.year, month=cell.month, day=cell.day)
            values.append(value_pb(date_value=date))
        else:
            values.append(value_pb(integer_value=cell))
    return dlp_v2.Table.Row.pb()(values=values)


def _token(where: str, cell: Any) -> str:
    """DLP's base64 HMAC-SHA256 as the local engine's token: the first 32 hex characters."""
    try:
        digest = base64.b64decode(cell.string_value, validate=True)
    except ValueError:
        digest = b""
    if cell.WhichOneof("type") != "string_value" or len(digest) != 32:
        raise DeidError(f"{where}: pseudonymise: Cloud DLP returned no SHA-256 hash")
    return digest.hex()[:TOKEN_HEX_CHARS]


def _date(where: str, step: str, cell: Any) -> dt.date:
    if cell.WhichOneof("type") != "date_value":
        raise DeidError(f"{where}: {step}: Cloud DLP returned no date")
    try:
        return dt.date(cell.date_value.year, cell.date_value.month, cell.date_value.day)
    except ValueError:
        raise DeidError(f"{where}: {step}: Cloud DLP returned an invalid date") from None


def _integer(where: str, step: str, cell: Any) -> int:
    if cell.WhichOneof("type") != "integer_value":
        raise DeidError(f"{where}: {step}: Cloud DLP returned no integer")
    return int(cell.integer_value)


def _map_distinct(
    column: pa.Array, function: Callable[[str], object], result_type: pa.DataType
) -> pa.Array:
    encoded = pc.dictionary_encode(column.cast(pa.string()))
    mapped = pa.array([function(value) for value in encoded.dictionary.to_pylist()], result_type)
    return mapped.take(encoded.indices)
