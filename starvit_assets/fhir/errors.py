"""Errors of the FHIR zone. Messages name the step and the HTTP status, never resource content."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

# The IssueType "transient" branch (http://hl7.org/fhir/issue-type): the IG says a server
# signals "retry later" with one of these; any other code means the request or export failed.
TRANSIENT_ISSUE_CODES = frozenset(
    {"transient", "lock-error", "no-store", "exception", "timeout", "incomplete", "throttled"}
)


class ExportError(Exception):
    """A Bulk Data export failed at a named step (kick-off, status, download, search, ...).

    ``step`` and ``status`` let callers branch without parsing the message; ``issue_codes``
    holds the OperationOutcome issue codes the server sent (codes only, never diagnostics).
    """

    def __init__(
        self,
        message: str,
        *,
        step: str | None = None,
        status: int | None = None,
        issue_codes: Iterable[str] = (),
    ) -> None:
        super().__init__(message)
        self.step = step
        self.status = status
        self.issue_codes = tuple(issue_codes)


def outcome_issue_codes(body: bytes | str | dict[str, Any] | None) -> list[str]:
    """The sorted distinct ``issue.code`` values of an OperationOutcome; [] for anything else.

    Only codes are extracted: diagnostics and details text may quote resource content.
    """
    if body is None:
        return []
    parsed: Any = body
    if isinstance(body, bytes | str):
        try:
            parsed = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return []
    if not isinstance(parsed, dict) or parsed.get("resourceType") != "OperationOutcome":
        return []
    issues = parsed.get("issue", [])
    if not isinstance(issues, list):
        return []
    return sorted(
        {
            str(issue["code"])
            for issue in issues
            if isinstance(issue, dict) and isinstance(issue.get("code"), str)
        }
    )


def describe_codes(codes: Iterable[str]) -> str:
    codes = list(codes)
    return f" (OperationOutcome issue codes: {', '.join(codes)})" if codes else ""
