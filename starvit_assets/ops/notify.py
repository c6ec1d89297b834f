"""Alerts for failed runs, failed asset checks and freshness changes, sent to Slack-compatible
webhooks and over SMTP.

An alert can leave the platform (a chat workspace, a mail relay), so it must never carry PHI.
Exception messages, check metadata and log lines may hold values from the data, so an alert is
built only from structural identifiers (run ids, asset keys, check names, exception *types*,
counts) and every field passes :func:`scrub` on its way out: fields outside the allowlist are
dropped and values that do not match their field's pattern are replaced by ``[redacted]``.
"""

from __future__ import annotations

import json
import os
import re
import smtplib
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Final, Literal, Protocol
from urllib.parse import quote, urlsplit

import httpx

from starvit_assets.ops.delivery import post_json

AlertKind = Literal["run_failure", "check_failure", "freshness"]
ALERT_KINDS: Final = ("run_failure", "check_failure", "freshness")

REDACTED: Final = "[redacted]"
# Enough to act on; the Dagster UI link has the rest.
MAX_ITEMS: Final = 20

_RUN_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")
_ASSET_KEY = re.compile(
    r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}(/[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}){0,9}"
)
_ERROR_TYPE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}(\.[A-Za-z_][A-Za-z0-9_]{0,99}){0,9}")
_URL_PATH = re.compile(r"[A-Za-z0-9_.\-/~%]{0,500}")
_SEVERITIES: Final = frozenset({"ERROR", "WARN"})
_FRESHNESS_STATES: Final = frozenset({"PASS", "WARN", "FAIL", "UNKNOWN", "NOT_APPLICABLE"})


class NotifyError(Exception):
    """An alert could not be delivered; the message names the notifier, never the payload."""


class AlertConfigError(Exception):
    """Alerting is misconfigured; the message names the variable to fix."""


@dataclass(frozen=True)
class CheckFailure:
    asset_key: str
    check_name: str
    severity: str


@dataclass(frozen=True)
class FreshnessChange:
    asset_key: str
    previous_state: str
    new_state: str


@dataclass(frozen=True)
class Alert:
    """What happened, by identifiers only. ``title`` and ``text`` are derived from the
    scrubbed fields, so there is no free-text field through which PHI could travel."""

    kind: AlertKind
    run_id: str | None = None
    job_name: str | None = None
    asset_keys: tuple[str, ...] = ()
    failed_checks: tuple[CheckFailure, ...] = ()
    freshness_changes: tuple[FreshnessChange, ...] = ()
    error_types: tuple[str, ...] = ()
    counts: Mapping[str, int] = field(default_factory=dict)
    link: str | None = None

    def fields(self) -> dict[str, Any]:
        """The raw fields, before scrubbing."""
        raw: dict[str, Any] = {
            "kind": self.kind,
            "run_id": self.run_id,
            "job_name": self.job_name,
            "asset_keys": list(self.asset_keys),
            "failed_checks": [vars(check) for check in self.failed_checks],
            "freshness_changes": [vars(change) for change in self.freshness_changes],
            "error_types": list(self.error_types),
            "counts": dict(self.counts),
            "link": self.link,
        }
        return {name: value for name, value in raw.items() if value not in (None, [], {})}

    def safe_fields(self) -> dict[str, Any]:
        return scrub(self.fields())

    @property
    def title(self) -> str:
        return render_title(self.safe_fields())

    @property
    def text(self) -> str:
        return render_text(self.safe_fields())


# --- scrubbing -------------------------------------------------------------------------------


def _pattern(regex: re.Pattern[str]) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        return value if isinstance(value, str) and regex.fullmatch(value) else REDACTED

    return check


def _one_of(allowed: frozenset[str] | tuple[str, ...]) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        return value if isinstance(value, str) and value in allowed else REDACTED

    return check


def _record(rules: Mapping[str, Callable[[Any], Any]]) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if not isinstance(value, Mapping):
            return REDACTED
        return {name: rule(value.get(name)) for name, rule in rules.items()}

    return check


def _counts(value: Any) -> Any:
    if not isinstance(value, Mapping):
        return REDACTED
    return {
        name: number
        for name, number in value.items()
        if isinstance(name, str)
        and _NAME.fullmatch(name)
        and isinstance(number, int)
        and not isinstance(number, bool)
    }


def _link(value: Any) -> Any:
    """Only an http(s) URL without credentials or query whose path is made of identifiers."""
    if not isinstance(value, str):
        return REDACTED
    parts = urlsplit(value)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username
        or parts.password
        or parts.query
        or parts.fragment
        or not _URL_PATH.fullmatch(parts.path)
    ):
        return REDACTED
    return value


_SCALAR_RULES: Final[dict[str, Callable[[Any], Any]]] = {
    "kind": _one_of(ALERT_KINDS),
    "run_id": _pattern(_RUN_ID),
    "job_name": _pattern(_NAME),
    "link": _link,
    "counts": _counts,
}
_LIST_RULES: Final[dict[str, Callable[[Any], Any]]] = {
    "asset_keys": _pattern(_ASSET_KEY),
    "error_types": _pattern(_ERROR_TYPE),
    "failed_checks": _record(
        {
            "asset_key": _pattern(_ASSET_KEY),
            "check_name": _pattern(_NAME),
            "severity": _one_of(_SEVERITIES),
        }
    ),
    "freshness_changes": _record(
        {
            "asset_key": _pattern(_ASSET_KEY),
            "previous_state": _one_of(_FRESHNESS_STATES),
            "new_state": _one_of(_FRESHNESS_STATES),
        }
    ),
}
ALLOWED_FIELDS: Final = frozenset(_SCALAR_RULES) | frozenset(_LIST_RULES)


def scrub(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Keep allowlisted fields whose values match their pattern; drop every other field.

    Lists are cut to ``MAX_ITEMS``; how many were left out is kept under ``omitted``.
    """
    safe: dict[str, Any] = {}
    omitted: dict[str, int] = {}
    for name, value in fields.items():
        if name in _SCALAR_RULES:
            safe[name] = _SCALAR_RULES[name](value)
        elif name in _LIST_RULES:
            items = list(value) if isinstance(value, list | tuple) else [value]
            safe[name] = [_LIST_RULES[name](item) for item in items[:MAX_ITEMS]]
            if len(items) > MAX_ITEMS:
                omitted[name] = len(items) - MAX_ITEMS
    if omitted:
        safe["omitted"] = omitted
    return safe


# --- rendering -------------------------------------------------------------------------------


def render_title(safe: Mapping[str, Any]) -> str:
    kind = safe.get("kind")
    if kind == "run_failure":
        return f"Run failed: {safe.get('job_name', 'unknown job')}"
    if kind == "check_failure":
        return f"Asset checks failed: {_total(safe, 'failed_checks')}"
    if kind == "freshness":
        return f"Freshness changed: {_total(safe, 'freshness_changes')} asset(s)"
    return "Starvit alert"


def _total(safe: Mapping[str, Any], name: str) -> int:
    return len(safe.get(name, [])) + int(safe.get("omitted", {}).get(name, 0))


def _detail_lines(safe: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    if "run_id" in safe:
        lines.append(f"run: {safe['run_id']}")
    if "job_name" in safe:
        lines.append(f"job: {safe['job_name']}")
    if safe.get("asset_keys"):
        label = "failed assets" if safe.get("kind") == "run_failure" else "assets"
        lines.append(f"{label}: " + ", ".join(safe["asset_keys"]))
    for check in safe.get("failed_checks", []):
        lines.append(
            f"check failed: {check['asset_key']} {check['check_name']} ({check['severity']})"
        )
    for change in safe.get("freshness_changes", []):
        lines.append(
            f"freshness: {change['asset_key']} {change['previous_state']} -> {change['new_state']}"
        )
    if safe.get("error_types"):
        lines.append("error types: " + ", ".join(safe["error_types"]))
    for name, number in sorted(safe.get("counts", {}).items()):
        lines.append(f"{name}: {number}")
    for name, number in sorted(safe.get("omitted", {}).items()):
        lines.append(f"{name} not shown: {number}")
    return lines


def render_text(safe: Mapping[str, Any]) -> str:
    lines = [render_title(safe), *_detail_lines(safe)]
    if "link" in safe:
        lines.append(f"dagster: {safe['link']}")
    return "\n".join(lines)


def slack_payload(alert: Alert) -> dict[str, Any]:
    """Slack's incoming-webhook shape; Mattermost, Rocket.Chat and Teams workflows accept it."""
    safe = alert.safe_fields()
    title = render_title(safe)
    details = "\n".join(_detail_lines(safe))
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": title[:150]}},
    ]
    if details:
        blocks.append(
            {"type": "section", "text": {"type": "mrkdwn", "text": _mrkdwn_escape(details)[:3000]}}
        )
    if "link" in safe and safe["link"] != REDACTED:
        blocks.append(
            {
                "type": "context",
                "elements": [{"type": "mrkdwn", "text": f"<{safe['link']}|Open in Dagster>"}],
            }
        )
    return {"text": render_text(safe), "blocks": blocks}


def _mrkdwn_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# --- links -----------------------------------------------------------------------------------


def dagster_url(environ: Mapping[str, str] | None = None) -> str | None:
    value = (environ if environ is not None else os.environ).get("STARVIT_DAGSTER_URL", "")
    return value.rstrip("/") or None


def run_link(run_id: str, environ: Mapping[str, str] | None = None) -> str | None:
    base = dagster_url(environ)
    return f"{base}/runs/{quote(run_id, safe='')}" if base else None


def asset_link(asset_key: str, environ: Mapping[str, str] | None = None) -> str | None:
    base = dagster_url(environ)
    return f"{base}/assets/{quote(asset_key, safe='/')}" if base else None


# --- notifiers -------------------------------------------------------------------------------


class Notifier(Protocol):
    @property
    def name(self) -> str: ...

    def send(self, alert: Alert) -> None: ...


class SlackWebhookNotifier:
    """POSTs the alert to a Slack-compatible incoming webhook, retrying transient failures."""

    name = "webhook"

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        attempts: int = 3,
        backoff_seconds: float = 1.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._url = url
        self._timeout = timeout
        self._attempts = max(1, attempts)
        self._backoff = backoff_seconds
        self._transport = transport

    def __repr__(self) -> str:
        # The webhook URL is a credential.
        return "SlackWebhookNotifier(url=***)"

    def send(self, alert: Alert) -> None:
        failure = post_json(
            self._url,
            slack_payload(alert),
            timeout=self._timeout,
            attempts=self._attempts,
            backoff_seconds=self._backoff,
            transport=self._transport,
        )
        if failure is None:
            return
        raise NotifyError(f"webhook: delivery failed ({failure})")


class SmtpNotifier:
    """Sends the alert as a plain-text mail. Credentials are sent only over STARTTLS, except to
    a relay on the loopback interface."""

    name = "smtp"

    def __init__(
        self,
        host: str,
        port: int,
        sender: str,
        recipients: Sequence[str],
        *,
        starttls: bool = True,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 10.0,
        attempts: int = 3,
        backoff_seconds: float = 1.0,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        if not recipients:
            raise AlertConfigError("SMTP alerts need at least one recipient")
        if username and not starttls and not _is_loopback(host):
            raise AlertConfigError(
                "SMTP login without STARTTLS would send the password in clear text: "
                "set STARVIT_ALERT_SMTP_STARTTLS=true"
            )
        self.host = host
        self.port = port
        self.sender = sender
        self.recipients = list(recipients)
        self.starttls = starttls
        self._username = username
        self._password = password
        self._timeout = timeout
        self._attempts = max(1, attempts)
        self._backoff = backoff_seconds
        self._tls_context = tls_context

    def __repr__(self) -> str:
        return (
            f"SmtpNotifier(host={self.host!r}, port={self.port}, recipients={len(self.recipients)})"
        )

    def message(self, alert: Alert) -> EmailMessage:
        safe = alert.safe_fields()
        message = EmailMessage()
        message["Subject"] = f"[Starvit] {render_title(safe)}"
        message["From"] = self.sender
        message["To"] = ", ".join(self.recipients)
        message.set_content(render_text(safe) + "\n")
        return message

    def send(self, alert: Alert) -> None:
        message = self.message(alert)
        failure = "no attempt made"
        for attempt in range(self._attempts):
            if attempt:
                time.sleep(self._backoff * 2 ** (attempt - 1))
            try:
                self._deliver(message)
                return
            except smtplib.SMTPResponseException as error:
                failure = f"SMTP {error.smtp_code}"
                if not 400 <= error.smtp_code < 500:
                    break
            except (smtplib.SMTPException, OSError) as error:
                failure = type(error).__name__
        raise NotifyError(f"smtp: delivery failed ({failure})")

    def _deliver(self, message: EmailMessage) -> None:
        with smtplib.SMTP(self.host, self.port, timeout=self._timeout) as smtp:
            smtp.ehlo()
            if self.starttls:
                smtp.starttls(context=self._tls_context or ssl.create_default_context())
                smtp.ehlo()
            if self._username:
                smtp.login(self._username, self._password or "")
            smtp.send_message(message, from_addr=self.sender, to_addrs=self.recipients)


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "127.0.0.1", "::1")


# --- configuration ---------------------------------------------------------------------------


def _secret(environ: Mapping[str, str], name: str) -> str | None:
    """``NAME`` or the contents of the file named by ``NAME_FILE`` (mounted secrets)."""
    value = environ.get(name)
    if value:
        return value
    path = environ.get(f"{name}_FILE")
    if not path:
        return None
    try:
        return Path(path).read_text().strip() or None
    except OSError as error:
        raise AlertConfigError(f"{name}_FILE cannot be read ({type(error).__name__})") from None


def _flag(environ: Mapping[str, str], name: str, default: bool) -> bool:
    value = environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise AlertConfigError(f"{name} must be true or false")


def notifiers_from_env(environ: Mapping[str, str] | None = None) -> list[Notifier]:
    """The notifiers configured by ``STARVIT_ALERT_*`` variables; empty when none is set."""
    env = environ if environ is not None else os.environ
    notifiers: list[Notifier] = []
    webhook = _secret(env, "STARVIT_ALERT_WEBHOOK_URL")
    if webhook:
        if urlsplit(webhook).scheme not in ("http", "https"):
            raise AlertConfigError("STARVIT_ALERT_WEBHOOK_URL must be an http(s) URL")
        notifiers.append(SlackWebhookNotifier(webhook))
    host = env.get("STARVIT_ALERT_SMTP_HOST")
    if host:
        sender = env.get("STARVIT_ALERT_SMTP_FROM")
        recipients = [
            address.strip()
            for address in env.get("STARVIT_ALERT_SMTP_TO", "").split(",")
            if address.strip()
        ]
        if not sender or not recipients:
            raise AlertConfigError(
                "STARVIT_ALERT_SMTP_HOST is set: also set STARVIT_ALERT_SMTP_FROM and "
                "STARVIT_ALERT_SMTP_TO (comma-separated)"
            )
        try:
            port = int(env.get("STARVIT_ALERT_SMTP_PORT") or 587)
        except ValueError:
            raise AlertConfigError("STARVIT_ALERT_SMTP_PORT must be a number") from None
        notifiers.append(
            SmtpNotifier(
                host,
                port,
                sender,
                recipients,
                starttls=_flag(env, "STARVIT_ALERT_SMTP_STARTTLS", True),
                username=_secret(env, "STARVIT_ALERT_SMTP_USERNAME"),
                password=_secret(env, "STARVIT_ALERT_SMTP_PASSWORD"),
            )
        )
    return notifiers


@dataclass(frozen=True)
class DeliveryReport:
    delivered: tuple[str, ...]
    failed: tuple[str, ...]

    @property
    def nothing_delivered(self) -> bool:
        return bool(self.failed) and not self.delivered


def send_alert(alert: Alert, notifiers: Sequence[Notifier]) -> DeliveryReport:
    """Try every notifier; one being down must not silence the others."""
    delivered: list[str] = []
    failed: list[str] = []
    for notifier in notifiers:
        try:
            notifier.send(alert)
        except NotifyError as error:
            failed.append(str(error))
        else:
            delivered.append(notifier.name)
    return DeliveryReport(delivered=tuple(delivered), failed=tuple(failed))


def dumps(alert: Alert) -> str:
    """The scrubbed alert as JSON, for logs and tests."""
    return json.dumps(alert.safe_fields(), sort_keys=True)
