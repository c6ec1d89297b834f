"""The client of a remote FHIR R4 terminology server (tx.fhir.org, Ontoserver, Snowstorm, HAPI).

Every operation is a POST of a ``Parameters`` resource to ``[base]/<Type>/$<operation>``.
Many codes at once go as FHIR ``batch`` Bundles of those same operation calls, ``batch_size``
entries a Bundle: one round trip per chunk instead of one per code, and a server that runs
batch entries in parallel does so; every general-purpose terminology server accepts batch
Bundles of operations. Answers are cached (``cache.py``) before anything is sent, so a re-run
asks only for codes it has not seen.

Network errors, timeouts, 429 and 5xx (of the request or of a batch entry) are retried with
exponential back-off (tenacity), honouring a short ``Retry-After``; the operations are
idempotent reads, so a retried batch is safe. Anything else, and a retry budget spent, raises
``TerminologyError`` naming the operation and the HTTP status. Requests carry codes only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
)

from starvit_assets.terminology.cache import ResponseCache, cache_key
from starvit_assets.terminology.model import (
    Coding,
    Expansion,
    Lookup,
    NotFoundError,
    TerminologyError,
    TranslateRequest,
    Translation,
    Validation,
    expansion_from_resource,
    lookup_from_parameters,
    outcome_text,
    parameters,
    translation_from_parameters,
    validation_from_parameters,
)

logger = logging.getLogger("starvit.terminology.client")

FHIR_JSON = "application/fhir+json"
T = TypeVar("T")

VALIDATE_CODE = "CodeSystem/$validate-code"
LOOKUP = "CodeSystem/$lookup"
VALUE_SET_VALIDATE_CODE = "ValueSet/$validate-code"
EXPAND = "ValueSet/$expand"
TRANSLATE = "ConceptMap/$translate"


@dataclass(frozen=True)
class ClientConfig:
    timeout_seconds: float = 30.0
    attempts: int = 4
    backoff_seconds: float = 0.5
    max_wait_seconds: float = 30.0
    batch_size: int = 50


class _Retryable(Exception):
    """A failure worth another attempt: the status (None for a network error) and a hint."""

    def __init__(self, status: int | None, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after


def _is_retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP-date: fall back to the back-off


def _status_code(text: str) -> int:
    """The status of a batch-response entry (``"200 OK"``)."""
    try:
        return int(text.split()[0])
    except (IndexError, ValueError):
        raise ValueError(f"batch-response entry status {text!r} is not an HTTP status") from None


class RemoteTerminology:
    """``TerminologyService`` over HTTP; ``client`` is injectable for tests."""

    def __init__(
        self,
        base_url: str,
        *,
        cache: ResponseCache | None = None,
        config: ClientConfig | None = None,
        client: httpx.Client | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.config = config or ClientConfig()
        if self.config.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._cache = cache
        self._client = client or httpx.Client(
            timeout=self.config.timeout_seconds,
            headers={"Accept": FHIR_JSON, "Content-Type": FHIR_JSON},
        )
        self._sleep = sleep

    @property
    def description(self) -> str:
        return self.base_url

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RemoteTerminology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport ---------------------------------------------------------------------------
    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        backoff = self.config.backoff_seconds * 2 ** (state.attempt_number - 1)
        hint = error.retry_after if isinstance(error, _Retryable) else None
        return min(self.config.max_wait_seconds, max(backoff, hint or 0.0))

    def _retrying(self, operation: str, attempt: Callable[[], T]) -> T:
        retrying_kwargs: dict[str, Any] = {}
        if self._sleep is not None:
            retrying_kwargs["sleep"] = self._sleep
        retrying = Retrying(
            stop=stop_after_attempt(self.config.attempts),
            wait=self._wait,
            retry=retry_if_exception_type(_Retryable),
            reraise=True,
            before_sleep=lambda state: logger.info(
                "terminology %s: attempt %s failed (%s); retrying",
                operation,
                state.attempt_number,
                state.outcome.exception() if state.outcome else "?",
            ),
            **retrying_kwargs,
        )
        try:
            return retrying(attempt)
        except _Retryable as error:
            raise TerminologyError(
                operation,
                f"{error.reason} (gave up after {self.config.attempts} attempts)",
                status=error.status,
            ) from None

    def _post(self, operation: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        """One POST, retried; (status, parsed body) of a final non-retryable answer."""

        def attempt() -> tuple[int, Any]:
            url = f"{self.base_url}/{path}" if path else self.base_url
            try:
                response = self._client.post(url, json=body)
            except httpx.TimeoutException:
                raise _Retryable(
                    None, f"timed out after {self.config.timeout_seconds} s talking to {url}"
                ) from None
            except httpx.TransportError as error:
                raise _Retryable(None, f"network error talking to {url}: {error}") from None
            parsed = _json_or_none(response)
            if _is_retryable_status(response.status_code):
                reason = outcome_text(parsed) or response.reason_phrase or "server error"
                raise _Retryable(
                    response.status_code, reason, _retry_after(response.headers.get("Retry-After"))
                )
            return response.status_code, parsed

        return self._retrying(operation, attempt)

    def _operation(self, operation: str, body: dict[str, Any]) -> Any:
        status, parsed = self._post(operation, operation, body)
        return _checked(operation, status, parsed)

    def _cached(
        self, operation: str, bodies: Sequence[dict[str, Any]], *, batched: bool = True
    ) -> list[Any]:
        """The answer (a resource, or a NotFound OperationOutcome) to each call, from the cache
        when it has it; the rest asked for in batch Bundles and then cached."""
        keys = [cache_key(self.base_url, operation, body) for body in bodies]
        answers: dict[str, Any] = self._cache.get_many(keys) if self._cache else {}
        missing = list(dict.fromkeys(k for k in keys if k not in answers))
        body_of = dict(zip(keys, bodies, strict=True))
        size = self.config.batch_size if batched else 1
        for start in range(0, len(missing), size):
            chunk = missing[start : start + size]
            if len(chunk) == 1:
                fresh = [self._single(operation, body_of[chunk[0]])]
            else:
                fresh = self._batch(operation, [body_of[key] for key in chunk])
            answered = dict(zip(chunk, fresh, strict=True))
            if self._cache is not None:
                self._cache.put_many(answered)
            answers.update(answered)
        return [answers[key] for key in keys]

    def _single(self, operation: str, body: dict[str, Any]) -> Any:
        status, parsed = self._post(operation, operation, body)
        if status == 404:
            return _not_found(parsed)
        return _checked(operation, status, parsed)

    def _batch(self, operation: str, bodies: Sequence[dict[str, Any]]) -> list[Any]:
        bundle = {
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [
                {"request": {"method": "POST", "url": operation}, "resource": body}
                for body in bodies
            ],
        }
        where = f"batch of {len(bodies)} {operation}"

        def attempt() -> list[Any]:
            status, parsed = self._post(where, "", bundle)
            reply = _checked(where, status, parsed)
            entries = reply.get("entry", []) if isinstance(reply, dict) else []
            if reply.get("type") != "batch-response" or len(entries) != len(bodies):
                raise TerminologyError(
                    where,
                    "the answer is not a batch-response with one entry per call",
                    status=status,
                )
            results = []
            for entry in entries:
                entry_status = _status_code(str(entry.get("response", {}).get("status", "")))
                resource = entry.get("resource") or entry.get("response", {}).get("outcome")
                if _is_retryable_status(entry_status):
                    raise _Retryable(entry_status, outcome_text(resource) or "batch entry failed")
                if entry_status == 404:
                    results.append(_not_found(resource))
                else:
                    results.append(_checked(operation, entry_status, resource))
            return results

        # The whole Bundle is retried when an entry failed transiently: every call is a read.
        return self._retrying(where, attempt)

    # --- operations --------------------------------------------------------------------------
    def validate_code(self, coding: Coding) -> Validation:
        return self.validate_codes([coding])[0]

    def validate_codes(self, codings: Sequence[Coding]) -> list[Validation]:
        bodies = [
            parameters(
                ("url", "valueUri", coding.system),
                ("code", "valueCode", coding.code),
                ("display", "valueString", coding.display),
            )
            for coding in codings
        ]
        answers = self._cached(VALIDATE_CODE, bodies)
        return [
            _parse(VALIDATE_CODE, answer, validation_from_parameters)
            if not _is_not_found(answer)
            else Validation(valid=False, system_known=False, message=outcome_text(answer))
            for answer in answers
        ]

    def lookup(self, coding: Coding) -> Lookup:
        body = parameters(("system", "valueUri", coding.system), ("code", "valueCode", coding.code))
        answer = self._cached(LOOKUP, [body])[0]
        if _is_not_found(answer):
            raise NotFoundError(outcome_text(answer) or f"{coding.system}#{coding.code} not found")
        return _parse(LOOKUP, answer, lookup_from_parameters)

    def validate_in_value_set(self, value_set_url: str, coding: Coding) -> Validation:
        body = parameters(
            ("url", "valueUri", value_set_url),
            ("system", "valueUri", coding.system),
            ("code", "valueCode", coding.code),
            ("display", "valueString", coding.display),
        )
        answer = self._cached(VALUE_SET_VALIDATE_CODE, [body])[0]
        if _is_not_found(answer):
            raise NotFoundError(outcome_text(answer) or f"ValueSet {value_set_url} not found")
        return _parse(VALUE_SET_VALIDATE_CODE, answer, validation_from_parameters)

    def expand(
        self, value_set_url: str, *, filter_text: str | None = None, count: int | None = None
    ) -> Expansion:
        body = parameters(
            ("url", "valueUri", value_set_url),
            ("filter", "valueString", filter_text),
            ("count", "valueInteger", count),
        )
        answer = self._cached(EXPAND, [body], batched=False)[0]
        if _is_not_found(answer):
            raise NotFoundError(outcome_text(answer) or f"ValueSet {value_set_url} not found")
        return _parse(EXPAND, answer, expansion_from_resource)

    def translate(self, request: TranslateRequest) -> Translation:
        return self.translate_many([request])[0]

    def translate_many(self, requests: Sequence[TranslateRequest]) -> list[Translation]:
        bodies = [
            parameters(
                ("url", "valueUri", request.concept_map_url),
                ("system", "valueUri", request.coding.system),
                ("code", "valueCode", request.coding.code),
                ("targetsystem", "valueUri", request.target_system),
            )
            for request in requests
        ]
        answers = self._cached(TRANSLATE, bodies)
        translations = []
        for request, answer in zip(requests, answers, strict=True):
            if _is_not_found(answer):
                message = outcome_text(answer) or "not found"
                if request.concept_map_url:
                    raise NotFoundError(message)
                translations.append(Translation(result=False, message=message))
            else:
                translations.append(_parse(TRANSLATE, answer, translation_from_parameters))
        return translations


_NOT_FOUND = "starvit-not-found"


def _not_found(resource: Any) -> dict[str, Any]:
    """A 404 answer, cached like any other: (OperationOutcome text, marked)."""
    return {
        "resourceType": "OperationOutcome",
        "id": _NOT_FOUND,
        "issue": [
            {
                "severity": "error",
                "code": "not-found",
                "diagnostics": outcome_text(resource) or "not found",
            }
        ],
    }


def _is_not_found(answer: Any) -> bool:
    return isinstance(answer, dict) and answer.get("id") == _NOT_FOUND


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _checked(operation: str, status: int, parsed: Any) -> Any:
    if not 200 <= status < 300:
        reason = outcome_text(parsed) or "the server refused the request"
        raise TerminologyError(operation, reason, status=status)
    if not isinstance(parsed, dict):
        raise TerminologyError(operation, "the answer is not a FHIR JSON resource", status=status)
    return parsed


def _parse(operation: str, resource: Any, parse: Callable[[Any], T]) -> T:
    try:
        return parse(resource)
    except (ValueError, KeyError, TypeError) as error:
        raise TerminologyError(operation, f"unexpected answer: {error}", status=200) from None
