"""The FHIR Bulk Data client (httpx): kick-off, status polling, paged manifests, parallel
verified downloads, resume and incremental `_since` watermarks.

Follows the async request pattern of the Bulk Data Access IG v2.0.0 (plus the STU3
``allowPartialManifests`` paging, which is harmless to a v2 server). Every failure raises
``ExportError`` naming the step and the HTTP status (or the network error class); response
bodies are never echoed except the issue codes of an OperationOutcome, and URLs are logged
without their query string (signed download URLs carry credentials there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import email.utils
import hashlib
import json
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import httpx
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from starvit_assets.fhir.errors import (
    TRANSIENT_ISSUE_CODES,
    ExportError,
    describe_codes,
    outcome_issue_codes,
)
from starvit_assets.fhir.export_state import (
    ALL_TYPES,
    ExportStateStore,
    FileRecord,
    JobState,
)

logger = logging.getLogger("starvit.fhir.client")

FHIR_JSON = "application/fhir+json"
FHIR_NDJSON = "application/fhir+ndjson"
_CHUNK = 64 * 1024
_MAX_ERROR_BODY = 64 * 1024
_MAX_MANIFEST_PAGES = 10_000
# Without an OperationOutcome these usually come from a proxy or load balancer, not from the
# export job, so they are worth another try; a FHIR-aware error names its own issue code.
_RETRY_WITHOUT_OUTCOME = {500, 502, 503, 504}
_TYPE_FILTER_SPLIT = re.compile(r",(?=[A-Z][A-Za-z]+\?)")

Level = Literal["system", "patient", "group"]
Method = Literal["GET", "POST"]


# --- configuration ------------------------------------------------------------------------
def _env_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("not a boolean")


_ENV: dict[str, tuple[str, Callable[[str], Any]]] = {
    "state_dir": ("STARVIT_FHIR_STATE_DIR", lambda v: Path(v).expanduser()),
    "connect_timeout": ("STARVIT_FHIR_CONNECT_TIMEOUT", float),
    "read_timeout": ("STARVIT_FHIR_READ_TIMEOUT", float),
    "max_kickoff_seconds": ("STARVIT_FHIR_MAX_KICKOFF_SECONDS", float),
    "max_poll_seconds": ("STARVIT_FHIR_MAX_POLL_SECONDS", float),
    "poll_interval": ("STARVIT_FHIR_POLL_INTERVAL", float),
    "max_poll_interval": ("STARVIT_FHIR_MAX_POLL_INTERVAL", float),
    "max_retry_after": ("STARVIT_FHIR_MAX_RETRY_AFTER", float),
    "max_transient_failures": ("STARVIT_FHIR_MAX_TRANSIENT_FAILURES", int),
    "network_attempts": ("STARVIT_FHIR_NETWORK_ATTEMPTS", int),
    "download_concurrency": ("STARVIT_FHIR_DOWNLOAD_CONCURRENCY", int),
    "download_attempts": ("STARVIT_FHIR_DOWNLOAD_ATTEMPTS", int),
    "max_rekicks": ("STARVIT_FHIR_MAX_REKICKS", int),
    "fail_on_errors": ("STARVIT_FHIR_FAIL_ON_ERRORS", _env_bool),
    "delete_after_download": ("STARVIT_FHIR_DELETE_AFTER_DOWNLOAD", _env_bool),
    "abandon_after_seconds": ("STARVIT_FHIR_ABANDON_AFTER_SECONDS", float),
}


@dataclass(frozen=True)
class ExportConfig:
    """Client tuning; ``from_env`` reads the ``STARVIT_FHIR_*`` variables listed in _ENV."""

    state_dir: Path | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    max_kickoff_seconds: float = 600.0
    max_poll_seconds: float = 3600.0
    poll_interval: float = 1.0
    max_poll_interval: float = 60.0
    max_retry_after: float = 120.0
    max_transient_failures: int = 8
    network_attempts: int = 3
    download_concurrency: int = 4
    download_attempts: int = 4
    max_rekicks: int = 2
    fail_on_errors: bool = False
    delete_after_download: bool = True
    abandon_after_seconds: float = 86_400.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ExportConfig:
        source = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, (variable, parse) in _ENV.items():
            raw = source.get(variable)
            if raw is None or raw == "":
                continue
            try:
                values[name] = parse(raw)
            except ValueError:
                raise ExportError(
                    f"configuration failed: {variable} has an invalid value", step="configuration"
                ) from None
        return cls(**values)


# --- request ------------------------------------------------------------------------------
def _as_tuple(values: Sequence[str] | str | None) -> tuple[str, ...]:
    if values is None:
        return ()
    if isinstance(values, str):
        return (values,)
    return tuple(values)


@dataclass(frozen=True)
class ExportRequest:
    """One kick-off: level, parameters and transport (GET query or POST Parameters body)."""

    level: Level = "system"
    group_id: str | None = None
    types: tuple[str, ...] = ()
    since: str | None = None
    type_filters: tuple[str, ...] = ()
    elements: tuple[str, ...] = ()
    patients: tuple[str, ...] = ()
    include_associated_data: tuple[str, ...] = ()
    output_format: str | None = None
    method: Method = "GET"
    lenient: bool = False
    allow_partial_manifests: bool = False

    def __post_init__(self) -> None:
        # Accept lists from callers while keeping the frozen value hashable and comparable.
        for name in ("types", "type_filters", "elements", "include_associated_data"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name)))
        patients = tuple(
            ref if ref.startswith("Patient/") else f"Patient/{ref}"
            for ref in _as_tuple(self.patients)
        )
        object.__setattr__(self, "patients", patients)
        if self.level not in ("system", "patient", "group"):
            raise ValueError(f"unknown export level {self.level!r}")
        if (self.level == "group") != bool(self.group_id):
            raise ValueError("a group_id is needed for, and only for, a group-level export")
        if self.method not in ("GET", "POST"):
            raise ValueError("method must be GET or POST")
        if self.patients and self.method != "POST":
            raise ValueError("the patient parameter is only defined for POST kick-offs")
        if self.patients and self.level == "system":
            raise ValueError("the patient parameter does not apply to a system-level export")

    # --- addressing ---
    def kick_off_path(self) -> str:
        if self.level == "patient":
            return "/Patient/$export"
        if self.level == "group":
            return f"/Group/{quote(str(self.group_id), safe='')}/$export"
        return "/$export"

    def source(self, base_url: str) -> str:
        """The key of watermarks and resumable jobs: base URL plus the level's path."""
        return base_url.rstrip("/") + self.kick_off_path().removesuffix("/$export")

    @property
    def narrows_content(self) -> bool:
        """Filters that return less than every changed resource must not advance watermarks."""
        return bool(self.type_filters or self.elements or self.patients)

    def with_since(self, since: str | None) -> ExportRequest:
        return dataclasses.replace(self, since=since)

    # --- encodings ---
    def query_params(self) -> list[tuple[str, str]]:
        params: list[tuple[str, str]] = []
        if self.output_format:
            params.append(("_outputFormat", self.output_format))
        if self.since:
            params.append(("_since", self.since))
        if self.types:
            params.append(("_type", ",".join(self.types)))
        if self.elements:
            params.append(("_elements", ",".join(self.elements)))
        if self.include_associated_data:
            params.append(("includeAssociatedData", ",".join(self.include_associated_data)))
        # One parameter per filter: a filter may itself hold commas (FHIR "or" values).
        params.extend(("_typeFilter", value) for value in self.type_filters)
        if self.allow_partial_manifests:
            params.append(("allowPartialManifests", "true"))
        return params

    def parameters_resource(self) -> dict[str, Any]:
        parameters: list[dict[str, Any]] = []
        if self.output_format:
            parameters.append({"name": "_outputFormat", "valueString": self.output_format})
        if self.since:
            parameters.append({"name": "_since", "valueInstant": self.since})
        parameters.extend({"name": "_type", "valueString": name} for name in self.types)
        parameters.extend({"name": "_elements", "valueString": name} for name in self.elements)
        parameters.extend(
            {"name": "patient", "valueReference": {"reference": ref}} for ref in self.patients
        )
        parameters.extend(
            {"name": "includeAssociatedData", "valueCode": code}
            for code in self.include_associated_data
        )
        parameters.extend({"name": "_typeFilter", "valueString": f} for f in self.type_filters)
        if self.allow_partial_manifests:
            parameters.append({"name": "allowPartialManifests", "valueBoolean": True})
        return {"resourceType": "Parameters", "parameter": parameters}

    # --- bookkeeping (no PHI) ---
    def fingerprint(self) -> str:
        canonical = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        """What the state file keeps: filters and patient references only as counts."""
        return {
            "level": self.level,
            "group_id": self.group_id,
            "types": list(self.types),
            "since": self.since,
            "elements": list(self.elements),
            "include_associated_data": list(self.include_associated_data),
            "output_format": self.output_format,
            "method": self.method,
            "lenient": self.lenient,
            "allow_partial_manifests": self.allow_partial_manifests,
            "type_filter_count": len(self.type_filters),
            "patient_count": len(self.patients),
        }


# --- progress and results -----------------------------------------------------------------
@dataclass(frozen=True)
class ExportProgress:
    """A step of an export, for a progress callback. ``detail`` never holds resource content:
    it is a server's X-Progress text (printable, at most 100 characters), an HTTP status, or a
    local file name such as ``Observation.2.ndjson``."""

    event: str
    detail: str = ""
    files_done: int = 0
    files_total: int = 0


@dataclass(frozen=True)
class ExportResult:
    transaction_time: str
    request: str
    files: dict[str, list[Path]]
    counts: dict[str, int]
    manifest: dict[str, Any]
    errors: list[dict[str, Any]]
    deleted_files: list[Path] = field(default_factory=list)
    deleted_count: int = 0
    error_files: list[Path] = field(default_factory=list)
    error_outcomes: int = 0
    error_issue_counts: dict[str, int] = field(default_factory=dict)
    since: str | None = None
    resumed: bool = False
    rekicks: int = 0
    skipped_files: int = 0
    severe_error_outcomes: int = 0
    watermark_held_back: tuple[str, ...] = ()


@dataclass(frozen=True)
class _FileItem:
    key: str
    kind: str
    resource_type: str
    url: str
    count: int | None
    name: str


class _ExportGone(Exception):
    """The export or one of its files no longer exists: only a new kick-off can help."""

    def __init__(self, step: str, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.step = step
        self.status = status


class _RetryableDownload(Exception):
    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class _Stopped(Exception):
    """Another download failed or the run was interrupted; this one gives up quietly."""


# --- helpers ------------------------------------------------------------------------------
def _http_date(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def retry_after_seconds(
    value: str | None, server_date: str | None = None, now: dt.datetime | None = None
) -> float | None:
    """Seconds to wait for a ``Retry-After`` value (delta-seconds or HTTP-date), uncapped.

    An HTTP-date is measured against the response's own ``Date`` header when there is one, so
    a skewed local clock cannot turn "in 2 minutes" into "in 3 hours" or "already past".
    None means the header is absent or unusable and the caller falls back to its backoff.
    """
    if not value:
        return None
    text = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds = float(text)
        return seconds if math.isfinite(seconds) else math.inf
    when = _http_date(text)
    if when is None:
        return None
    reference = _http_date(server_date) or now or dt.datetime.now(dt.UTC)
    return max(0.0, (when - reference).total_seconds())


def _printable(text: str, limit: int = 100) -> str:
    return "".join(ch for ch in text if ch.isprintable())[:limit]


def _safe_url(url: str) -> str:
    """Scheme, host, port and path only: queries of signed URLs are credentials."""
    parts = httpx.URL(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.host}{port}{parts.path}"


class BulkDataClient:
    """A Bulk Data export client for one FHIR server.

    ``auth`` (any ``httpx.Auth``, e.g. SMART Backend Services) is used for kick-off, status,
    manifest pages and DELETE, and for downloads only when the manifest says
    ``requiresAccessToken: true``; otherwise downloads go through a second client that has
    never seen the token (files are often on a third-party object store).

    ``source_name`` names the server in the state folder (watermarks, saved jobs) in place of
    ``base_url``: a server on an ephemeral port (the embedded one) keeps its watermarks that way.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float | None = None,
        max_poll_seconds: float | None = None,
        max_retry_after: float | None = None,
        http_client: httpx.Client | None = None,
        download_client: httpx.Client | None = None,
        auth: httpx.Auth | None = None,
        config: ExportConfig | None = None,
        state_dir: Path | None = None,
        progress: Callable[[ExportProgress], None] | None = None,
        source_name: str | None = None,
    ) -> None:
        config = config or ExportConfig.from_env()
        overrides: dict[str, Any] = {}
        if timeout is not None:
            overrides["read_timeout"] = timeout
        if max_poll_seconds is not None:
            overrides["max_poll_seconds"] = max_poll_seconds
        if max_retry_after is not None:
            overrides["max_retry_after"] = max_retry_after
        if state_dir is not None:
            overrides["state_dir"] = Path(state_dir).expanduser()
        self.config = dataclasses.replace(config, **overrides) if overrides else config
        self.base_url = base_url.rstrip("/")
        self.source_name = (source_name or base_url).rstrip("/")
        self._auth = auth
        self._progress = progress
        timeouts = httpx.Timeout(self.config.read_timeout, connect=self.config.connect_timeout)
        concurrency = max(1, self.config.download_concurrency)
        limits = httpx.Limits(
            max_connections=concurrency + 4, max_keepalive_connections=concurrency + 2
        )
        self._owned: list[httpx.Client] = []
        if http_client is None:
            http_client = httpx.Client(
                timeout=timeouts, limits=limits, follow_redirects=True, auth=auth
            )
            self._owned.append(http_client)
        self._http = http_client
        if download_client is None:
            download_client = httpx.Client(timeout=timeouts, limits=limits, follow_redirects=True)
            self._owned.append(download_client)
        self._plain = download_client

    def close(self) -> None:
        for client in self._owned:
            client.close()

    def __enter__(self) -> BulkDataClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- public ----------------------------------------------------------------------------
    def export(
        self,
        out_dir: Path,
        *,
        types: Sequence[str] | None = None,
        since: str | None = None,
        request: ExportRequest | None = None,
        incremental: bool = False,
        fail_on_errors: bool | None = None,
    ) -> ExportResult:
        """Run (or resume) an export into ``out_dir`` and return what was downloaded.

        ``types``/``since`` are the short form of a system-level GET ``request``.
        ``incremental`` takes `_since` from the stored watermark when none is given.
        """
        if request is None:
            request = ExportRequest(types=tuple(types or ()), since=since)
        elif types is not None or since is not None:
            raise ValueError("give types and since inside the ExportRequest")
        fail = self.config.fail_on_errors if fail_on_errors is None else fail_on_errors
        source = request.source(self.source_name)
        store = ExportStateStore(self.config.state_dir) if self.config.state_dir else None
        if incremental and request.since is None:
            if store is None:
                raise ValueError(
                    "an incremental export needs a state folder "
                    "(state_dir= or STARVIT_FHIR_STATE_DIR)"
                )
            request = request.with_since(store.watermark(source, request.types or None))
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        guard = store.lock(source) if store else contextlib.nullcontext()
        with guard:
            return self._run(out_dir, request, source, store, fail)

    def has_saved_export(self, request: ExportRequest | None = None) -> bool:
        """Whether an unfinished export of this request's source is saved for resuming."""
        if not self.config.state_dir:
            return False
        source = (request or ExportRequest()).source(self.source_name)
        return ExportStateStore(self.config.state_dir).load_job(source) is not None

    def can_resume(self, request: ExportRequest | None = None) -> bool:
        """Whether ``export(request=request)`` would resume a saved export (same request, not
        too old) rather than abandon it and start again."""
        if not self.config.state_dir:
            return False
        request = request or ExportRequest()
        job = ExportStateStore(self.config.state_dir).load_job(request.source(self.source_name))
        return job is not None and self._abandon_reason(job, request) is None

    def watermark(self, request: ExportRequest | None = None) -> str | None:
        """The stored `_since` watermark an incremental export of ``request`` would use."""
        if not self.config.state_dir:
            return None
        request = request or ExportRequest()
        store = ExportStateStore(self.config.state_dir)
        return store.watermark(request.source(self.source_name), request.types or None)

    def cancel_saved_export(self, request: ExportRequest | None = None) -> bool:
        """Abandon the saved, unfinished export of this request's source: DELETE and forget it."""
        if not self.config.state_dir:
            return False
        store = ExportStateStore(self.config.state_dir)
        source = (request or ExportRequest()).source(self.source_name)
        with store.lock(source):
            job = store.load_job(source)
            if job is None:
                return False
            self._cancel(job.status_url)
            store.clear_job(source)
            return True

    def count_changed_since(self, types: Sequence[str], since: str) -> int:
        total = 0
        for resource_type in types:
            response = self._send(
                "search",
                "GET",
                f"{self.base_url}/{resource_type}",
                params={"_lastUpdated": f"gt{since}", "_summary": "count"},
                headers={"Accept": FHIR_JSON},
            )
            if response.status_code != 200:
                raise ExportError(
                    f"search failed: HTTP {response.status_code}"
                    f"{describe_codes(outcome_issue_codes(response.content))}",
                    step="search",
                    status=response.status_code,
                )
            total += int(response.json().get("total", 0))
        return total

    # --- orchestration ---------------------------------------------------------------------
    def _run(
        self,
        out_dir: Path,
        request: ExportRequest,
        source: str,
        store: ExportStateStore | None,
        fail_on_errors: bool,
    ) -> ExportResult:
        job = self._resume_or_abandon(store, source, request)
        resumed = job is not None
        rekicks = 0
        while True:
            if job is None:
                job = self._start(request, source)
                if store:
                    store.save_job(job)
            try:
                manifest, expires_at = self._manifest(job.status_url, restartable=resumed)
                result = self._fetch(out_dir, request, job, manifest, expires_at, store)
            except _ExportGone as gone:
                if rekicks >= self.config.max_rekicks:
                    raise ExportError(
                        f"{gone.step} failed: {gone}; gave up after {rekicks} new kick-off(s)",
                        step=gone.step,
                        status=gone.status,
                    ) from None
                rekicks += 1
                logger.warning("%s: %s; starting the export again", gone.step, gone)
                self._emit("re-kick", str(gone))
                self._cancel(job.status_url)
                if store:
                    store.clear_job(source)
                job, resumed = None, False
                continue
            break
        result = dataclasses.replace(result, resumed=resumed, rekicks=rekicks)
        return self._finish(out_dir, request, source, job, store, result, fail_on_errors)

    def _resume_or_abandon(
        self, store: ExportStateStore | None, source: str, request: ExportRequest
    ) -> JobState | None:
        if store is None:
            return None
        job = store.load_job(source)
        if job is None:
            return None
        reason = self._abandon_reason(job, request)
        if reason:
            logger.info("abandoning the saved export (%s): cancelling it", reason)
            self._emit("abandon", reason)
            self._cancel(job.status_url)
            store.clear_job(source)
            return None
        logger.info(
            "resuming the export kicked off at %s (%d file(s) already downloaded)",
            job.kicked_off_at,
            len(job.files),
        )
        self._emit("resume", job.kicked_off_at, len(job.files))
        return job

    def _abandon_reason(self, job: JobState, request: ExportRequest) -> str | None:
        if job.fingerprint != request.fingerprint():
            return "a different request was made"
        if job.age_seconds() > self.config.abandon_after_seconds:
            return f"it is older than {self.config.abandon_after_seconds:.0f} s"
        return None

    def _finish(
        self,
        out_dir: Path,
        request: ExportRequest,
        source: str,
        job: JobState,
        store: ExportStateStore | None,
        result: ExportResult,
        fail_on_errors: bool,
    ) -> ExportResult:
        for stale in out_dir.glob("*.ndjson.part"):
            stale.unlink(missing_ok=True)
        severe = _severe_outcomes(result.error_files)
        failed = fail_on_errors and severe.outcomes > 0
        held_back: tuple[str, ...] = ()
        if store and not failed:
            if request.narrows_content:
                logger.info("filtered export: the _since watermark is left unchanged")
            else:
                types = list(request.types) or [ALL_TYPES, *result.files]
                held_back = severe.types_to_hold_back(types)
                if held_back:
                    # Resources the server failed to export would otherwise never be fetched
                    # again by an incremental export: their types keep the previous watermark.
                    logger.warning(
                        "the server reported %d OperationOutcome(s) of severity error or fatal; "
                        "the _since watermark of %s stays where it was",
                        severe.outcomes,
                        ", ".join(held_back),
                    )
                advanced = [name for name in types if name not in held_back]
                store.advance_watermarks(source, advanced, result.transaction_time)
        if store:
            store.clear_job(source)
        if self.config.delete_after_download:
            # The IG lets a server read DELETE after completion as "done, free the files".
            self._cancel(job.status_url)
        self._emit("complete", result.transaction_time)
        if failed:
            codes = ", ".join(f"{k}={v}" for k, v in sorted(result.error_issue_counts.items()))
            raise ExportError(
                f"export failed: the server reported {severe.outcomes} OperationOutcome(s) of "
                f"severity error or fatal (issue codes: {codes})",
                step="export",
                issue_codes=result.error_issue_counts,
            )
        return dataclasses.replace(
            result, severe_error_outcomes=severe.outcomes, watermark_held_back=held_back
        )

    # --- HTTP plumbing ---------------------------------------------------------------------
    def _send(
        self,
        step: str,
        method: str,
        url: str,
        *,
        client: httpx.Client | None = None,
        idempotent: bool = True,
        **kwargs: Any,
    ) -> httpx.Response:
        """One request, with network errors retried (tenacity).

        A non-idempotent kick-off is retried only when the connection was never made:
        after a read timeout the server may already have started an export.
        """
        client = client or self._http
        if client is self._http and self._auth is not None:
            kwargs.setdefault("auth", self._auth)
        retry_on: tuple[type[BaseException], ...] = (
            (httpx.TransportError,) if idempotent else (httpx.ConnectError, httpx.ConnectTimeout)
        )
        retrying = Retrying(
            stop=stop_after_attempt(max(1, self.config.network_attempts)),
            wait=wait_exponential_jitter(initial=0.25, max=10.0, jitter=0.25),
            retry=retry_if_exception_type(retry_on),
            reraise=True,
            before_sleep=lambda state: logger.warning(
                "%s: %s talking to %s; retrying",
                step,
                type(state.outcome.exception()).__name__ if state.outcome else "error",
                _safe_url(url),
            ),
        )
        try:
            response: httpx.Response = retrying(client.request, method, url, **kwargs)
        except httpx.TimeoutException as error:
            raise ExportError(
                f"{step} failed: timed out talking to {_safe_url(url)} ({type(error).__name__})",
                step=step,
            ) from None
        except httpx.HTTPError as error:
            raise ExportError(
                f"{step} failed: cannot reach {_safe_url(url)} ({type(error).__name__})",
                step=step,
            ) from None
        return response

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.config.max_poll_interval, self.config.poll_interval * (2**attempt))
        return ceiling * random.uniform(0.5, 1.0)

    def _wait_for(self, response: httpx.Response, attempt: int) -> float:
        hint = retry_after_seconds(
            response.headers.get("Retry-After"), response.headers.get("Date")
        )
        if hint is None:
            return self._backoff(attempt)
        if hint > self.config.max_retry_after:
            logger.info("Retry-After of %s s capped at %s s", hint, self.config.max_retry_after)
        return min(hint, self.config.max_retry_after)

    @staticmethod
    def _retryable(response: httpx.Response) -> bool:
        if response.status_code == 429:
            return True
        if response.status_code < 400:
            return False
        codes = outcome_issue_codes(response.content)
        if codes:
            return any(code in TRANSIENT_ISSUE_CODES for code in codes)
        return response.status_code in _RETRY_WITHOUT_OUTCOME

    def _emit(self, event: str, detail: str = "", done: int = 0, total: int = 0) -> None:
        if self._progress:
            self._progress(ExportProgress(event, detail, done, total))

    def _cancel(self, status_url: str) -> bool:
        """Best-effort DELETE of an export; failure only logs (the server will expire it)."""
        try:
            response = self._send("cancel", "DELETE", status_url, headers={"Accept": FHIR_JSON})
        except ExportError as error:
            logger.warning("%s", error)
            return False
        if response.status_code in (200, 202, 204, 404, 410):
            return True
        logger.warning("cancel of the export answered HTTP %s", response.status_code)
        return False

    # --- kick-off and status ---------------------------------------------------------------
    def _start(self, request: ExportRequest, source: str) -> JobState:
        kicked_off_at = dt.datetime.now(dt.UTC).isoformat()
        status_url = self._kick_off(request)
        self._emit("accepted", _safe_url(status_url))
        return JobState(
            source=source,
            status_url=status_url,
            kicked_off_at=kicked_off_at,
            fingerprint=request.fingerprint(),
            request=request.describe(),
        )

    def _kick_off(self, request: ExportRequest) -> str:
        url = self.base_url + request.kick_off_path()
        prefer = "respond-async" + (", handling=lenient" if request.lenient else "")
        headers = {"Accept": FHIR_JSON, "Prefer": prefer}
        kwargs: dict[str, Any] = {"headers": headers}
        if request.method == "POST":
            headers["Content-Type"] = FHIR_JSON
            kwargs["content"] = json.dumps(request.parameters_resource()).encode()
        else:
            kwargs["params"] = request.query_params()
        deadline = time.monotonic() + self.config.max_kickoff_seconds
        attempt = transient = 0
        self._emit("kick-off", request.method)
        while True:
            response = self._send("kick-off", request.method, url, idempotent=False, **kwargs)
            if response.status_code == 202:
                location = response.headers.get("Content-Location")
                if not location:
                    raise ExportError(
                        "kick-off failed: HTTP 202 without a Content-Location status URL",
                        step="kick-off",
                        status=202,
                    )
                return str(response.url.join(location))
            if not self._retryable(response):
                raise ExportError(
                    f"kick-off failed: HTTP {response.status_code}"
                    f"{describe_codes(outcome_issue_codes(response.content))}",
                    step="kick-off",
                    status=response.status_code,
                    issue_codes=outcome_issue_codes(response.content),
                )
            if response.status_code != 429:
                transient += 1
                self._check_transient_budget("kick-off", response, transient)
            wait = self._wait_for(response, attempt)
            attempt += 1
            logger.info("kick-off answered HTTP %s; retrying in %.1f s", response.status_code, wait)
            self._emit("waiting", f"kick-off HTTP {response.status_code}")
            if time.monotonic() + wait > deadline:
                raise ExportError(
                    f"kick-off failed: HTTP {response.status_code} still after "
                    f"{self.config.max_kickoff_seconds:.0f} s",
                    step="kick-off",
                    status=response.status_code,
                )
            time.sleep(wait)

    def _check_transient_budget(self, step: str, response: httpx.Response, failures: int) -> None:
        if failures > self.config.max_transient_failures:
            raise ExportError(
                f"{step} failed: HTTP {response.status_code}"
                f"{describe_codes(outcome_issue_codes(response.content))} "
                f"{failures} times in a row",
                step=step,
                status=response.status_code,
                issue_codes=outcome_issue_codes(response.content),
            )

    def _poll(self, url: str, step: str, *, restartable: bool) -> httpx.Response:
        """GET ``url`` until it answers 200; 202, 429 and transient errors wait and retry."""
        deadline = time.monotonic() + self.config.max_poll_seconds
        attempt = transient = 0
        while True:
            response = self._send(step, "GET", url, headers={"Accept": "application/json"})
            status = response.status_code
            if status == 200:
                return response
            if status == 202:
                transient = 0
                progress = _printable(response.headers.get("X-Progress", ""))
                if progress:
                    logger.info("export in progress: %s", progress)
                self._emit("waiting", progress or "in progress")
            elif status in (404, 410) and restartable:
                raise _ExportGone(step, f"the saved export is gone (HTTP {status})", status)
            elif self._retryable(response):
                if status != 429:
                    transient += 1
                    self._check_transient_budget(step, response, transient)
                logger.warning("%s answered HTTP %s; retrying", step, status)
                self._emit("waiting", f"HTTP {status}")
            else:
                codes = outcome_issue_codes(response.content)
                raise ExportError(
                    f"{step} failed: HTTP {status}{describe_codes(codes)}",
                    step=step,
                    status=status,
                    issue_codes=codes,
                )
            wait = self._wait_for(response, attempt)
            attempt += 1
            if time.monotonic() + wait > deadline:
                raise ExportError(
                    f"{step} failed: export not complete after "
                    f"{self.config.max_poll_seconds:.0f} s (it stays resumable)",
                    step=step,
                    status=status,
                )
            time.sleep(wait)

    def _manifest(
        self, status_url: str, *, restartable: bool
    ) -> tuple[dict[str, Any], float | None]:
        """The complete manifest (every ``next`` page merged) and its expiry (monotonic)."""
        response = self._poll(status_url, "status", restartable=restartable)
        manifest = self._parse_manifest(response, "status")
        expires_at = self._expiry(response)
        seen = {status_url}
        page = manifest
        pages = 1
        while next_url := self._next_link(page):
            next_url = str(response.url.join(next_url))
            if next_url in seen or pages >= _MAX_MANIFEST_PAGES:
                raise ExportError("manifest page failed: the next links loop", step="manifest page")
            seen.add(next_url)
            response = self._poll(next_url, "manifest page", restartable=True)
            page = self._parse_manifest(response, "manifest page")
            pages += 1
            if page["transactionTime"] != manifest["transactionTime"]:
                raise ExportError(
                    "manifest page failed: a page has another transactionTime",
                    step="manifest page",
                )
            manifest["output"].extend(page["output"])
            manifest.setdefault("deleted", []).extend(page.get("deleted", []))
            # error[] is repeated on every page (all fields but output/deleted/link are).
            known = {item.get("url") for item in manifest["error"]}
            manifest["error"].extend(i for i in page["error"] if i.get("url") not in known)
            page_expiry = self._expiry(response)
            if page_expiry is not None:
                expires_at = page_expiry if expires_at is None else min(expires_at, page_expiry)
        manifest.pop("link", None)
        if pages > 1:
            logger.info("manifest spread over %d pages", pages)
        self._emit("manifest", f"{len(manifest['output'])} output file(s), {pages} page(s)")
        return manifest, expires_at

    @staticmethod
    def _next_link(page: Mapping[str, Any]) -> str | None:
        for link in page.get("link") or []:
            if isinstance(link, dict) and link.get("relation") == "next" and link.get("url"):
                return str(link["url"])
        return None

    @staticmethod
    def _expiry(response: httpx.Response) -> float | None:
        expires = _http_date(response.headers.get("Expires"))
        if expires is None:
            return None
        reference = _http_date(response.headers.get("Date")) or dt.datetime.now(dt.UTC)
        return time.monotonic() + (expires - reference).total_seconds()

    @staticmethod
    def _parse_manifest(response: httpx.Response, step: str) -> dict[str, Any]:
        try:
            manifest = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ExportError(
                f"{step} failed: HTTP 200 with a manifest that is not JSON", step=step, status=200
            ) from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("transactionTime"), str):
            raise ExportError(f"{step} failed: the manifest lacks transactionTime", step=step)
        for key in ("output", "error", "deleted"):
            items = manifest.setdefault(key, [])
            if not isinstance(items, list) or not all(
                isinstance(i, dict)
                and isinstance(i.get("url"), str)
                and isinstance(i.get("type"), str)
                for i in items
            ):
                raise ExportError(
                    f"{step} failed: the manifest's {key} is not a list of files with type and url",
                    step=step,
                )
        return manifest

    # --- downloads -------------------------------------------------------------------------
    def _fetch(
        self,
        out_dir: Path,
        request: ExportRequest,
        job: JobState,
        manifest: dict[str, Any],
        expires_at: float | None,
        store: ExportStateStore | None,
    ) -> ExportResult:
        if job.transaction_time != manifest["transactionTime"]:
            job.transaction_time = manifest["transactionTime"]
            if store:
                store.save_job(job)
        items = _plan_files(manifest)
        # The IG: send the token to file URLs only when the manifest asks for it.
        needs_token = manifest.get("requiresAccessToken", True) is not False
        client = self._http if needs_token else self._plain
        todo: list[_FileItem] = []
        skipped = 0
        for item in items:
            record = job.files.get(item.key)
            target = out_dir / item.name
            if (
                record is not None
                and record.name == item.name
                and target.is_file()
                and target.stat().st_size == record.bytes
                and (item.count is None or item.count == record.count)
            ):
                skipped += 1
                self._emit("file-skipped", item.name, skipped, len(items))
            else:
                todo.append(item)
        if skipped:
            logger.info("resume: %d file(s) already downloaded, %d to go", skipped, len(todo))
        self._download_all(todo, out_dir, client, expires_at, job, store, len(items) - len(todo))
        return self._summarise(out_dir, request, manifest, items, job, skipped)

    def _download_all(
        self,
        todo: list[_FileItem],
        out_dir: Path,
        client: httpx.Client,
        expires_at: float | None,
        job: JobState,
        store: ExportStateStore | None,
        already: int,
    ) -> None:
        if not todo:
            return
        total = already + len(todo)
        done = already
        stop = threading.Event()
        workers = max(1, min(self.config.download_concurrency, len(todo)))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fhir-download")
        try:
            futures = {
                pool.submit(self._download, item, out_dir, client, expires_at, stop): item
                for item in todo
            }
            for future in as_completed(futures):
                item = futures[future]
                job.files[item.key] = future.result()
                # State is written by this thread only, so workers need no lock.
                if store:
                    store.save_job(job)
                done += 1
                self._emit("file-done", item.name, done, total)
        except BaseException:
            stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _download(
        self,
        item: _FileItem,
        out_dir: Path,
        client: httpx.Client,
        expires_at: float | None,
        stop: threading.Event,
    ) -> FileRecord:
        target = out_dir / item.name
        partial = target.with_name(target.name + ".part")
        attempts = max(1, self.config.download_attempts)
        problem = ""
        for attempt in range(attempts):
            if stop.is_set():
                raise _Stopped
            if expires_at is not None and time.monotonic() >= expires_at:
                raise _ExportGone("download", "the manifest's Expires time has passed")
            wait: float | None = None
            try:
                lines, size = self._stream(item, partial, client, stop)
            except _RetryableDownload as retryable:
                problem, wait = str(retryable), retryable.retry_after
            else:
                if item.count is None or item.count == lines:
                    os.replace(partial, target)
                    return FileRecord(item.name, item.kind, item.resource_type, lines, size)
                partial.unlink(missing_ok=True)
                problem = f"{lines} resources, the manifest says {item.count}"
            logger.warning(
                "download of %s (attempt %d/%d): %s", item.name, attempt + 1, attempts, problem
            )
            if attempt + 1 < attempts:
                delay = self._backoff(attempt) if wait is None else wait
                stop.wait(min(delay, self.config.max_retry_after))
        raise ExportError(
            f"download of {item.name} ({item.resource_type}) failed after {attempts} "
            f"attempt(s): {problem}",
            step="download",
        )

    def _stream(
        self, item: _FileItem, partial: Path, client: httpx.Client, stop: threading.Event
    ) -> tuple[int, int]:
        """Stream one file to ``partial``; returns (non-blank lines, bytes). Memory: one chunk."""
        lines = size = 0
        open_line = False  # the current, not yet terminated line has content
        try:
            with client.stream(
                "GET", item.url, headers={"Accept": FHIR_NDJSON}, **self._auth_for(client)
            ) as response:
                status = response.status_code
                if status != 200:
                    codes = describe_codes(outcome_issue_codes(_bounded_body(response)))
                    if status in (404, 410):
                        raise _ExportGone(
                            "download", f"{item.name} is gone (HTTP {status})", status
                        )
                    if status == 429 or status >= 500:
                        raise _RetryableDownload(
                            f"HTTP {status}{codes}",
                            retry_after=retry_after_seconds(
                                response.headers.get("Retry-After"), response.headers.get("Date")
                            ),
                        )
                    raise ExportError(
                        f"download of {item.name} failed: HTTP {status}{codes}",
                        step="download",
                        status=status,
                    )
                with partial.open("wb") as handle:
                    for chunk in response.iter_bytes(_CHUNK):
                        if stop.is_set():
                            raise _Stopped
                        handle.write(chunk)
                        size += len(chunk)
                        *complete, tail = chunk.split(b"\n")
                        for segment in complete:
                            if open_line or segment.strip():
                                lines += 1
                            open_line = False
                        open_line = open_line or bool(tail.strip())
                    handle.flush()
                    os.fsync(handle.fileno())
        except httpx.TransportError as error:
            partial.unlink(missing_ok=True)
            raise _RetryableDownload(type(error).__name__) from None
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return lines + (1 if open_line else 0), size

    def _auth_for(self, client: httpx.Client) -> dict[str, Any]:
        return {"auth": self._auth} if client is self._http and self._auth is not None else {}

    # --- results ---------------------------------------------------------------------------
    def _summarise(
        self,
        out_dir: Path,
        request: ExportRequest,
        manifest: dict[str, Any],
        items: list[_FileItem],
        job: JobState,
        skipped: int,
    ) -> ExportResult:
        files: dict[str, list[Path]] = {}
        counts: dict[str, int] = {}
        deleted_files: list[Path] = []
        error_files: list[Path] = []
        for item in items:
            path = (out_dir / item.name).resolve()
            if item.kind == "output":
                files.setdefault(item.resource_type, []).append(path)
                lines = job.files[item.key].count
                counts[item.resource_type] = counts.get(item.resource_type, 0) + lines
            elif item.kind == "deleted":
                deleted_files.append(path)
            else:
                error_files.append(path)
        for resource_type in request.types:
            counts.setdefault(resource_type, 0)
        outcomes, issue_counts = _outcome_summary(error_files)
        if outcomes:
            logger.warning(
                "the export reported %d OperationOutcome(s); issue codes: %s",
                outcomes,
                ", ".join(f"{k}={v}" for k, v in sorted(issue_counts.items())),
            )
        _write_json(out_dir / "manifest.json", manifest)
        return ExportResult(
            transaction_time=str(manifest["transactionTime"]),
            request=str(manifest.get("request", "")),
            files=files,
            counts=counts,
            manifest=manifest,
            errors=list(manifest.get("error", [])),
            deleted_files=deleted_files,
            deleted_count=sum(1 for _ in iter_deleted_references(deleted_files)),
            error_files=error_files,
            error_outcomes=outcomes,
            error_issue_counts=issue_counts,
            since=request.since,
            skipped_files=skipped,
        )


def _plan_files(manifest: Mapping[str, Any]) -> list[_FileItem]:
    """Every manifest file with its local name: ``<Type>.ndjson`` when a type has one output
    file, else ``<Type>.1.ndjson``, ``<Type>.2.ndjson``, ... in manifest order; then
    ``_deleted.<n>.ndjson`` and ``_error.<n>.ndjson``."""
    items: list[_FileItem] = []
    outputs = manifest["output"]
    per_type: dict[str, int] = {}
    for output in outputs:
        per_type[output["type"]] = per_type.get(output["type"], 0) + 1
    seen: dict[str, int] = {}
    for index, output in enumerate(outputs):
        resource_type = str(output["type"])
        seen[resource_type] = seen.get(resource_type, 0) + 1
        name = (
            f"{resource_type}.ndjson"
            if per_type[resource_type] == 1
            else f"{resource_type}.{seen[resource_type]}.ndjson"
        )
        items.append(_file_item("output", index, output, name))
    for kind in ("deleted", "error"):
        for index, entry in enumerate(manifest.get(kind, [])):
            items.append(_file_item(kind, index, entry, f"_{kind}.{index + 1}.ndjson"))
    return items


@dataclass(frozen=True)
class ManifestComparison:
    """The lines staged for one resource type against the counts its manifest states.

    ``manifest_count`` sums ``output[].count`` over the type's files that state one (None: no
    file does; the IG makes ``count`` optional); ``staged_lines`` counts the non-blank lines of
    all the type's files on disk; ``mismatched_files`` are the local names of files whose lines
    differ from their stated count (a missing file has 0 lines)."""

    manifest_count: int | None
    staged_lines: int
    files: int
    files_without_count: int
    mismatched_files: tuple[str, ...]

    @property
    def matches(self) -> bool:
        return not self.mismatched_files


def compare_with_manifest(
    manifest: Mapping[str, Any], folder: Path, resource_type: str
) -> ManifestComparison:
    """Re-count the staged files of ``resource_type`` in ``folder`` against ``manifest``."""
    stated: int | None = None
    staged = without_count = 0
    mismatched: list[str] = []
    outputs = [i for i in _plan_files(manifest) if i.kind == "output"]
    mine = [item for item in outputs if item.resource_type == resource_type]
    for item in mine:
        path = folder / item.name
        lines = sum(1 for _ in _iter_lines([path])) if path.is_file() else 0
        staged += lines
        if item.count is None:
            without_count += 1
            continue
        stated = (stated or 0) + item.count
        if lines != item.count:
            mismatched.append(item.name)
    return ManifestComparison(
        manifest_count=stated,
        staged_lines=staged,
        files=len(mine),
        files_without_count=without_count,
        mismatched_files=tuple(mismatched),
    )


@dataclass(frozen=True)
class _SevereOutcomes:
    """OperationOutcomes of severity error or fatal in error[], and the resource types their
    issues name (``expression``/``location``); diagnostics are never read: they may hold PHI."""

    outcomes: int = 0
    types: frozenset[str] = frozenset()
    unattributed: int = 0

    def types_to_hold_back(self, types: Sequence[str]) -> tuple[str, ...]:
        """Which of ``types`` (a request's types, ``*`` for all) keep their watermark: those
        an outcome names, or every one when an outcome names none of them, since nothing says
        which resources it lost. ``*`` is held whenever any type is, or a system export
        without ``_type`` would skip what that type failed to deliver."""
        if not self.outcomes:
            return ()
        named = [name for name in types if name in self.types]
        if self.unattributed or not named:
            return tuple(types)
        held = set(named) | ({ALL_TYPES} & set(types))
        return tuple(name for name in types if name in held)


_RESOURCE_TYPE_PREFIX = re.compile(r"[A-Z][A-Za-z]+")


def _severe_outcomes(error_files: Sequence[Path]) -> _SevereOutcomes:
    outcomes = unattributed = 0
    types: set[str] = set()
    for line in _iter_lines(error_files):
        try:
            outcome = json.loads(line)
        except json.JSONDecodeError:
            outcomes += 1
            unattributed += 1
            continue
        issues = outcome.get("issue", []) if isinstance(outcome, dict) else []
        severe = [
            issue
            for issue in (issues if isinstance(issues, list) else [])
            if isinstance(issue, dict) and issue.get("severity") in ("error", "fatal")
        ]
        if not severe:
            continue
        outcomes += 1
        named = {
            match.group()
            for issue in severe
            for path in [*_strings(issue.get("expression")), *_strings(issue.get("location"))]
            if (match := _RESOURCE_TYPE_PREFIX.match(path))
        }
        types |= named
        unattributed += 0 if named else 1
    return _SevereOutcomes(outcomes=outcomes, types=frozenset(types), unattributed=unattributed)


def _strings(value: Any) -> list[str]:
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []


def _file_item(kind: str, index: int, entry: Mapping[str, Any], name: str) -> _FileItem:
    count = entry.get("count")
    return _FileItem(
        key=f"{kind}:{index}:{entry['type']}",
        kind=kind,
        resource_type=str(entry["type"]),
        url=str(entry["url"]),
        count=int(count)
        if isinstance(count, int | float) and not isinstance(count, bool)
        else None,
        name=name,
    )


def _bounded_body(response: httpx.Response) -> bytes:
    body = b""
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) >= _MAX_ERROR_BODY:
            break
    return body


def _write_json(path: Path, body: Any) -> None:
    partial = path.with_name(path.name + ".part")
    partial.write_text(json.dumps(body, indent=2))
    os.replace(partial, path)


def _iter_lines(paths: Sequence[Path]) -> Iterator[bytes]:
    for path in paths:
        with path.open("rb") as handle:
            for line in handle:
                if line.strip():
                    yield line


def _outcome_summary(error_files: Sequence[Path]) -> tuple[int, dict[str, int]]:
    """(OperationOutcomes, issues per code). Diagnostics are never read out: they may hold PHI."""
    outcomes = 0
    counts: dict[str, int] = {}
    for line in _iter_lines(error_files):
        outcomes += 1
        try:
            outcome = json.loads(line)
        except json.JSONDecodeError:
            counts["unparseable"] = counts.get("unparseable", 0) + 1
            continue
        issues = outcome.get("issue", []) if isinstance(outcome, dict) else []
        for issue in issues if isinstance(issues, list) else []:
            code = issue.get("code") if isinstance(issue, dict) else None
            key = code if isinstance(code, str) else "unknown"
            counts[key] = counts.get(key, 0) + 1
    return outcomes, counts


# --- downstream helpers: deletions ---------------------------------------
def iter_deleted_references(paths: Sequence[Path]) -> Iterator[str]:
    """``Type/id`` of every DELETE entry in the manifest's deleted[] transaction Bundles."""
    for line in _iter_lines(paths):
        yield from deleted_references_in_line(line)


def deleted_references_in_line(line: bytes | str) -> list[str]:
    """``Type/id`` of the DELETE entries of one deleted[] Bundle line (none if it is no Bundle)."""
    try:
        bundle = json.loads(line)
    except json.JSONDecodeError:
        return []
    references = []
    for entry in bundle.get("entry", []) if isinstance(bundle, dict) else []:
        request = entry.get("request", {}) if isinstance(entry, dict) else {}
        if isinstance(request, dict) and request.get("method") == "DELETE":
            url = str(request.get("url", ""))
            # Entries may be absolute ([base]/Type/id); keep the Type/id tail.
            parts = url.rstrip("/").split("/")
            if len(parts) >= 2:
                references.append(f"{parts[-2]}/{parts[-1]}")
    return references


__all__ = [
    "BulkDataClient",
    "ExportConfig",
    "ExportProgress",
    "ExportRequest",
    "ExportResult",
    "ManifestComparison",
    "compare_with_manifest",
    "deleted_references_in_line",
    "iter_deleted_references",
    "retry_after_seconds",
]
