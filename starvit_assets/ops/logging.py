"""Structured JSON logs with identifiers scrubbed, and secrets read only from env or files.

PHI must never reach a log line. The code already avoids logging content, so the scrubber is
the second line of defence: it replaces anything that looks like a direct identifier (email,
phone, SSN, full date, IPv4, resource id, token, URL query) before any handler sees it.

Python's logging filters run only for the logger a record was created on, and Dagster builds a
fresh ``DagsterLogManager`` per run (the path into the event log and the UI), so a filter on a
named logger would miss most records. ``configure_logging`` therefore also wraps the global
``LogRecord`` factory, through which every logger, Dagster's included, creates its records.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

SCRUBBED_ATTR: Final = "starvit_scrubbed"
_HANDLER_ATTR: Final = "starvit_handler"
_FACTORY_ATTR: Final = "starvit_factory"
_MIN_SECRET_LENGTH: Final = 6


@dataclass(frozen=True)
class ScrubRule:
    name: str
    pattern: re.Pattern[str]
    replacement: str


def _rule(name: str, pattern: str, replacement: str, flags: int = 0) -> ScrubRule:
    return ScrubRule(name, re.compile(pattern, flags), replacement)


_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"

# Order matters: credentials inside URLs go before emails (user@host looks like one), and
# IPv4 before phone numbers and dates (their digit groups overlap).
DEFAULT_RULES: tuple[ScrubRule, ...] = (
    _rule(
        "secret_assignment",
        r"\b(password|passwd|pwd|secret|client_secret|api[_-]?key|access[_-]?token|"
        r"refresh[_-]?token|private[_-]?key)(\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|[^\s,;&]+)",
        r"\1\2[SECRET]",
        re.IGNORECASE,
    ),
    _rule("bearer_token", r"\b([Bb]earer|Basic)\s+[A-Za-z0-9\-._~+/]{8,}=*", r"\1 [TOKEN]"),
    _rule("jwt", r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*", "[TOKEN]"),
    _rule(
        "url_credentials",
        r"\b([a-z][a-z0-9+.-]*://)[^\s/@:]+(?::[^\s/@]*)?@",
        r"\1[CREDENTIALS]@",
        re.IGNORECASE,
    ),
    _rule("url_query", r"\b([a-z][a-z0-9+.-]*://[^\s?#]*)\?[^\s#]*", r"\1?[QUERY]", re.IGNORECASE),
    _rule("email", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}", "[EMAIL]"),
    _rule(
        "uuid",
        r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b",
        "[ID]",
    ),
    _rule("hex_id", r"\b[0-9a-fA-F]{16,}\b", "[ID]"),
    _rule("ipv4", rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\d.])", "[IP]"),
    _rule("ssn", r"(?<![\d-])\d{3}-\d{2}-\d{4}(?![\d-])", "[SSN]"),
    _rule(
        "phone",
        r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?!\w)"
        r"|(?<![\w+])\+\d{10,15}(?!\w)",
        "[PHONE]",
    ),
    _rule(
        "date",
        r"\b\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?"
        r"|\b\d{1,2}[/.]\d{1,2}[/.]\d{4}\b",
        "[DATE]",
    ),
)
RULE_NAMES: tuple[str, ...] = tuple(rule.name for rule in DEFAULT_RULES)

_known_secrets: set[str] = set()
_secrets_lock = threading.Lock()


class SecretError(Exception):
    """A secret is missing or unreadable; the message names the variable, never the value."""


def register_secret(value: str) -> None:
    """Redact this exact value wherever it appears in a log line from now on."""
    if len(value) >= _MIN_SECRET_LENGTH:
        with _secrets_lock:
            _known_secrets.add(value)


def read_secret(name: str) -> str:
    """The secret from ``NAME``, or from the file ``NAME_FILE`` points to (Docker and
    Kubernetes secrets mount as files), never both: two sources would hide which one is live."""
    direct = os.environ.get(name)
    file_variable = f"{name}_FILE"
    file_name = os.environ.get(file_variable)
    if direct is not None and file_name is not None:
        raise SecretError(f"set only one of {name} and {file_variable}")
    if direct is not None:
        value = direct
    elif file_name is not None:
        path = Path(file_name)
        try:
            value = path.read_text().strip()
        except OSError as error:
            raise SecretError(
                f"{file_variable} points to {path}, which cannot be read ({type(error).__name__})"
            ) from None
    else:
        raise SecretError(f"secret {name} is not set: set {name} or {file_variable}")
    if not value:
        raise SecretError(f"secret {name} is empty")
    register_secret(value)
    return value


class Scrubber:
    """Applies the scrub rules, plus exact-match redaction of registered secrets."""

    def __init__(
        self,
        rules: Sequence[ScrubRule] = DEFAULT_RULES,
        *,
        disable: Iterable[str] = (),
        extra_rules: Iterable[ScrubRule] = (),
    ) -> None:
        disabled = set(disable)
        unknown = disabled - {rule.name for rule in (*rules, *extra_rules)}
        if unknown:
            raise ValueError(f"unknown scrub rules: {', '.join(sorted(unknown))}")
        self.rules: tuple[ScrubRule, ...] = tuple(
            rule for rule in (*rules, *extra_rules) if rule.name not in disabled
        )

    def scrub(self, text: str) -> str:
        with _secrets_lock:
            secrets = sorted(_known_secrets, key=len, reverse=True)
        for secret in secrets:
            text = text.replace(secret, "[SECRET]")
        for rule in self.rules:
            text = rule.pattern.sub(rule.replacement, text)
        return text

    def scrub_record(self, record: logging.LogRecord) -> None:
        """Scrub the message, its arguments and any traceback in place, once."""
        if getattr(record, SCRUBBED_ATTR, False):
            return
        try:
            message = record.getMessage()
        except Exception:
            # A broken format string must not leak its raw arguments through the error path.
            message = f"{record.msg} [unformattable log arguments dropped]"
        record.msg = self.scrub(message)
        record.args = None
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = self.scrub(logging.Formatter().formatException(record.exc_info))
            # Formatters would otherwise re-render the raw traceback from exc_info.
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self.scrub(record.stack_info)
        setattr(record, SCRUBBED_ATTR, True)


class ScrubFilter(logging.Filter):
    """A filter that rewrites the record (it never drops one); attach it to handlers, which see
    records from every logger below them, unlike a filter on a logger."""

    def __init__(self, scrubber: Scrubber | None = None) -> None:
        super().__init__()
        self.scrubber = scrubber or Scrubber()

    def filter(self, record: logging.LogRecord) -> bool:
        self.scrubber.scrub_record(record)
        return True


_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    SCRUBBED_ATTR,
    "dagster_meta",
    "dagster_event",
    "dagster_event_batch_metadata",
}
_DAGSTER_FIELDS = ("run_id", "job_name", "step_key", "op_name", "resource_name")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, Dagster context and scalar extras.

    It scrubs too, so that a handler configured without the filter still cannot emit an
    identifier.
    """

    def __init__(self, scrubber: Scrubber | None = None) -> None:
        super().__init__()
        self.scrubber = scrubber or Scrubber()

    def format(self, record: logging.LogRecord) -> str:
        self.scrubber.scrub_record(record)
        payload: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        meta = getattr(record, "dagster_meta", None)
        if isinstance(meta, Mapping):
            # Run ids are Dagster's, not a patient's: kept as fields, while the message keeps
            # only the scrubbed text the user logged.
            payload["message"] = self.scrubber.scrub(str(meta.get("orig_message", "")))
            for field in _DAGSTER_FIELDS:
                if meta.get(field) is not None:
                    payload[field] = meta[field]
        for key, value in record.__dict__.items():
            if key in _STANDARD_ATTRS or key.startswith("_") or key in payload:
                continue
            if isinstance(value, str):
                payload[key] = self.scrubber.scrub(value)
            elif isinstance(value, bool | int | float) or value is None:
                payload[key] = value
        if record.exc_text:
            payload["exc"] = record.exc_text
        if record.stack_info:
            payload["stack"] = record.stack_info
        return json.dumps(payload, ensure_ascii=False, default=str)


def _scrubbing_factory(
    previous: Callable[..., logging.LogRecord], scrubber: Scrubber
) -> Callable[..., logging.LogRecord]:
    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        scrubber.scrub_record(record)
        return record

    setattr(factory, _FACTORY_ATTR, previous)
    return factory


def configure_logging(
    *,
    json_output: bool = True,
    level: int | str = logging.INFO,
    disable: Iterable[str] = (),
    extra_rules: Iterable[ScrubRule] = (),
    stream: Any = None,
) -> Scrubber:
    """Install scrubbing everywhere and one stderr handler on the root logger (JSON by default).

    Safe to call more than once: the previous Starvit handler and record factory are replaced,
    not stacked. ``disable`` names rules to switch off (see ``RULE_NAMES``).
    """
    scrubber = Scrubber(disable=disable, extra_rules=extra_rules)

    current = logging.getLogRecordFactory()
    original = getattr(current, _FACTORY_ATTR, current)
    logging.setLogRecordFactory(_scrubbing_factory(original, scrubber))

    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_ATTR, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        JsonFormatter(scrubber)
        if json_output
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler.addFilter(ScrubFilter(scrubber))
    setattr(handler, _HANDLER_ATTR, True)
    root.addHandler(handler)
    root.setLevel(level)

    # Dagster's own loggers may carry handlers that do not propagate to the root.
    for name in ("dagster", "dagster.builtin", "dagster.code_server", "dagster.daemon"):
        for existing in logging.getLogger(name).handlers:
            for old in [f for f in existing.filters if isinstance(f, ScrubFilter)]:
                existing.removeFilter(old)
            existing.addFilter(ScrubFilter(scrubber))
            if json_output:
                existing.setFormatter(JsonFormatter(scrubber))
    return scrubber


def reset_logging() -> None:
    """Undo ``configure_logging`` (tests, and tools that need the stock logging back)."""
    current = logging.getLogRecordFactory()
    original = getattr(current, _FACTORY_ATTR, None)
    if original is not None:
        logging.setLogRecordFactory(original)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_ATTR, False):
            root.removeHandler(handler)


def configure_logging_from_env() -> Scrubber | None:
    """``configure_logging`` driven by the environment, for process entry points.

    ``STARVIT_LOG_FORMAT`` (``json`` or ``text``) switches it on; unset leaves logging alone,
    so importing the code location in tests or notebooks does not rewire their logging.
    ``STARVIT_LOG_LEVEL`` (default INFO) and ``STARVIT_LOG_SCRUB_DISABLE`` (comma-separated
    rule names) refine it.
    """
    output = os.environ.get("STARVIT_LOG_FORMAT", "").strip().lower()
    if not output:
        return None
    if output not in ("json", "text"):
        raise ValueError("STARVIT_LOG_FORMAT must be json or text")
    disable = [
        name.strip()
        for name in os.environ.get("STARVIT_LOG_SCRUB_DISABLE", "").split(",")
        if name.strip()
    ]
    return configure_logging(
        json_output=output == "json",
        level=os.environ.get("STARVIT_LOG_LEVEL", "INFO").upper(),
        disable=disable,
    )
