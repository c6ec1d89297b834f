"""The FHIR Bulk Data client (httpx): kick-off, status polling, streamed atomic downloads.

Follows the async request pattern of the Bulk Data Access IG v2.0.0. Every failure raises
``ExportError`` naming the step and the HTTP status (or the network error class); response
bodies are never echoed except the issue codes of an OperationOutcome.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from starvit_assets.fhir.errors import ExportError

logger = logging.getLogger("starvit.fhir.client")

FHIR_JSON = "application/fhir+json"
_TRANSIENT = {429, 500, 502, 503, 504}
_MAX_TRANSIENT_FAILURES = 8


@dataclass(frozen=True)
class ExportResult:
    transaction_time: str
    request: str
    files: dict[str, list[Path]]
    counts: dict[str, int]
    manifest: dict[str, Any]
    errors: list[dict[str, Any]]


def _issue_codes(response: httpx.Response) -> str:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return ""
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return ""
    codes = sorted(
        {str(issue.get("code")) for issue in body.get("issue", []) if isinstance(issue, dict)}
    )
    return f" (OperationOutcome issue codes: {', '.join(codes)})" if codes else ""


class BulkDataClient:
    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        max_poll_seconds: float = 3600.0,
        max_retry_after: float = 120.0,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._max_poll_seconds = max_poll_seconds
        self._max_retry_after = max_retry_after
        self._http = http_client or httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)), follow_redirects=True
        )

    # --- public ------------------------------------------------------------------------
    def export(
        self, out_dir: Path, *, types: Sequence[str] | None = None, since: str | None = None
    ) -> ExportResult:
        params: dict[str, str] = {}
        if types:
            params["_type"] = ",".join(types)
        if since:
            params["_since"] = since
        status_url = self._kick_off(params)
        manifest = self._poll(status_url)
        out_dir.mkdir(parents=True, exist_ok=True)
        files: dict[str, list[Path]] = {}
        counts: dict[str, int] = {}
        outputs = manifest.get("output", [])
        per_type_total = {
            o["type"]: sum(1 for x in outputs if x["type"] == o["type"]) for o in outputs
        }
        for index, output in enumerate(outputs):
            resource_type = str(output["type"])
            sequence = len(files.get(resource_type, []))
            name = (
                f"{resource_type}.ndjson"
                if per_type_total[resource_type] == 1
                else f"{resource_type}.{sequence + 1}.ndjson"
            )
            lines = self._download(str(output["url"]), out_dir / name, index)
            expected = output.get("count")
            if expected is not None and int(expected) != lines:
                raise ExportError(
                    f"download of output {index + 1} ({resource_type}) has {lines} resources, "
                    f"the manifest says {expected}"
                )
            files.setdefault(resource_type, []).append((out_dir / name).resolve())
            counts[resource_type] = counts.get(resource_type, 0) + lines
        for resource_type in types or []:
            counts.setdefault(resource_type, 0)
        (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
        return ExportResult(
            transaction_time=str(manifest["transactionTime"]),
            request=str(manifest.get("request", "")),
            files=files,
            counts=counts,
            manifest=manifest,
            errors=list(manifest.get("error", [])),
        )

    def count_changed_since(self, types: Sequence[str], since: str) -> int:
        total = 0
        for resource_type in types:
            response = self._request(
                "search",
                "GET",
                f"{self.base_url}/{resource_type}",
                params={"_lastUpdated": f"gt{since}", "_summary": "count"},
                headers={"Accept": FHIR_JSON},
            )
            if response.status_code != 200:
                raise ExportError(
                    f"search failed: HTTP {response.status_code}{_issue_codes(response)}"
                )
            total += int(response.json().get("total", 0))
        return total

    # --- steps -------------------------------------------------------------------------
    def _request(self, step: str, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, url, **kwargs)
        except httpx.TimeoutException as error:
            raise ExportError(
                f"{step} failed: timed out talking to {self._origin(url)} ({type(error).__name__})"
            ) from None
        except httpx.HTTPError as error:
            raise ExportError(
                f"{step} failed: cannot reach {self._origin(url)} ({type(error).__name__})"
            ) from None

    def _origin(self, url: str) -> str:
        parts = httpx.URL(url)
        return f"{parts.scheme}://{parts.host}:{parts.port or ''}{parts.path}"

    def _kick_off(self, params: dict[str, str]) -> str:
        response = self._request(
            "kick-off",
            "GET",
            f"{self.base_url}/$export",
            params=params,
            headers={"Accept": FHIR_JSON, "Prefer": "respond-async"},
        )
        if response.status_code != 202:
            raise ExportError(
                f"kick-off failed: HTTP {response.status_code}{_issue_codes(response)}"
            )
        location = response.headers.get("Content-Location")
        if not location:
            raise ExportError("kick-off failed: HTTP 202 without a Content-Location status URL")
        return location

    def _poll(self, status_url: str) -> dict[str, Any]:
        deadline = time.monotonic() + self._max_poll_seconds
        delay = 1.0
        transient_failures = 0
        while True:
            response = self._request(
                "status", "GET", status_url, headers={"Accept": "application/json"}
            )
            if response.status_code == 200:
                try:
                    manifest: dict[str, Any] = response.json()
                except json.JSONDecodeError:
                    raise ExportError(
                        "status failed: HTTP 200 with a manifest that is not JSON"
                    ) from None
                if "transactionTime" not in manifest or "output" not in manifest:
                    raise ExportError("status failed: the manifest lacks transactionTime or output")
                return manifest
            if response.status_code == 202:
                progress = response.headers.get("X-Progress")
                if progress:
                    logger.info("export in progress: %s", progress[:100])
            elif (
                response.status_code in _TRANSIENT and transient_failures < _MAX_TRANSIENT_FAILURES
            ):
                transient_failures += 1
                logger.warning("status poll got HTTP %s; retrying", response.status_code)
            else:
                raise ExportError(
                    f"status failed: HTTP {response.status_code}{_issue_codes(response)}"
                )
            wait = self._retry_after(response.headers.get("Retry-After"), delay)
            delay = min(delay * 1.5, 10.0)
            if time.monotonic() + wait > deadline:
                raise ExportError(
                    f"status failed: export not complete after {self._max_poll_seconds:.0f} s"
                )
            time.sleep(wait)

    def _retry_after(self, header: str | None, default: float) -> float:
        wait = default * random.uniform(0.8, 1.2)
        if header:
            header = header.strip()
            if header.isdigit():
                wait = float(header)
            else:
                parsed = email.utils.parsedate_to_datetime(header) if "," in header else None
                if parsed is not None:
                    wait = parsed.timestamp() - time.time()
        return max(0.0, min(wait, self._max_retry_after))

    def _download(self, url: str, target: Path, index: int) -> int:
        partial = target.with_name(target.name + ".part")
        lines = 0
        try:
            with self._http.stream(
                "GET", url, headers={"Accept": "application/fhir+ndjson"}
            ) as response:
                if response.status_code != 200:
                    raise ExportError(
                        f"download of output {index + 1} failed: HTTP {response.status_code}"
                    )
                with partial.open("wb") as handle:
                    pending = b""
                    for chunk in response.iter_bytes():
                        handle.write(chunk)
                        pending += chunk
                        *complete, pending = pending.split(b"\n")
                        lines += sum(1 for line in complete if line.strip())
                    if pending.strip():
                        lines += 1
        except httpx.HTTPError as error:
            partial.unlink(missing_ok=True)
            raise ExportError(
                f"download of output {index + 1} failed: {type(error).__name__}"
            ) from None
        os.replace(partial, target)
        return lines
