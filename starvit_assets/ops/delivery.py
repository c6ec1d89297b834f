"""Delivery of small JSON messages (alerts, lineage events) to HTTP endpoints, with retries."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import httpx


def post_json(
    url: str,
    payload: Any,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float,
    attempts: int,
    backoff_seconds: float,
    transport: httpx.BaseTransport | None = None,
) -> str | None:
    """POST ``payload``; retries network errors, 429 and 5xx with exponential backoff.

    Returns None once delivered, else the last failure as a short reason (the exception class
    or the HTTP status, never a response body, which could echo what was sent).
    """
    failure = "no attempt made"
    with httpx.Client(timeout=timeout, transport=transport) as client:
        for attempt in range(max(1, attempts)):
            if attempt:
                time.sleep(backoff_seconds * 2 ** (attempt - 1))
            try:
                response = client.post(url, json=payload, headers=dict(headers or {}))
            except httpx.TransportError as error:
                failure = type(error).__name__
                continue
            if response.is_success:
                return None
            failure = f"HTTP {response.status_code}"
            if response.status_code != 429 and response.status_code < 500:
                break
    return failure
