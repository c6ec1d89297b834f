"""Alerts from real Dagster runs to a real HTTP webhook receiver and a real SMTP receiver, both
listening on 127.0.0.1; and proof that no value from the data reaches them."""

from __future__ import annotations

import email
import json
import socketserver
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import dagster as dg
import pytest

from starvit_assets import platform
from starvit_assets.defs.alerting import (
    ALERTING_SENSORS,
    ASSET_ALERTS,
    RUN_FAILURE_ALERT,
    AlertCursor,
    alert_on_asset_health,
    alert_on_run_failure,
)
from starvit_assets.ops import notify
from starvit_assets.ops.notify import (
    REDACTED,
    Alert,
    AlertConfigError,
    CheckFailure,
    NotifyError,
    SlackWebhookNotifier,
    SmtpNotifier,
    notifiers_from_env,
    scrub,
    send_alert,
)
from starvit_assets.settings import load_settings
from starvit_assets_tests.conftest import PlatformEnv

pytestmark = pytest.mark.integration

PHI_TEXT = "Jane Roe, MRN 4711-0815, born 1961-07-03"
PHI_FRAGMENTS = ("Jane", "Roe", "4711", "0815", "1961")


# --- receivers -------------------------------------------------------------------------------


@dataclass
class WebhookReceiver:
    """Answers with ``statuses`` in turn (then 200) and keeps every request."""

    statuses: list[int] = field(default_factory=list)
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.requests.append((self.path, dict(self.headers), body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T000/B000"

    def payloads(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, _, body in self.requests]

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


class _SmtpHandler(socketserver.StreamRequestHandler):
    """Just enough SMTP (RFC 5321) for smtplib: EHLO, MAIL, RCPT, DATA, RSET, NOOP, QUIT."""

    server: SmtpReceiver

    def _reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")

    def handle(self) -> None:
        self._reply("220 127.0.0.1 test SMTP receiver")
        sender, recipients = "", []
        while line := self.rfile.readline():
            command = line.decode().rstrip("\r\n")
            verb = command.split(" ", 1)[0].upper()
            if verb in ("EHLO", "HELO"):
                self._reply("250-127.0.0.1")
                self._reply("250 8BITMIME")
            elif verb == "MAIL":
                sender, recipients = command.split(":", 1)[1].strip().strip("<>"), []
                self._reply("250 OK")
            elif verb == "RCPT":
                recipients.append(command.split(":", 1)[1].strip().strip("<>"))
                self._reply("250 OK")
            elif verb == "DATA":
                self._reply("354 End data with <CR><LF>.<CR><LF>")
                data = []
                while (chunk := self.rfile.readline()) not in (b".\r\n", b""):
                    data.append(chunk[1:] if chunk.startswith(b"..") else chunk)
                self.server.messages.append((sender, recipients, b"".join(data)))
                self._reply("250 OK: queued")
            elif verb in ("RSET", "NOOP"):
                self._reply("250 OK")
            elif verb == "QUIT":
                self._reply("221 Bye")
                return
            else:
                self._reply("502 Command not implemented")


class SmtpReceiver(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _SmtpHandler)
        self.messages: list[tuple[str, list[str], bytes]] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def parsed(self) -> list[Message]:
        return [email.message_from_bytes(raw) for _, _, raw in self.messages]


@pytest.fixture()
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture()
def smtp() -> Iterator[SmtpReceiver]:
    receiver = SmtpReceiver()
    yield receiver
    receiver.shutdown()
    receiver.server_close()


@pytest.fixture()
def alert_env(
    monkeypatch: pytest.MonkeyPatch, webhook: WebhookReceiver, smtp: SmtpReceiver
) -> None:
    monkeypatch.setenv("STARVIT_ALERT_WEBHOOK_URL", webhook.url)
    monkeypatch.setenv("STARVIT_ALERT_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("STARVIT_ALERT_SMTP_PORT", str(smtp.port))
    monkeypatch.setenv("STARVIT_ALERT_SMTP_FROM", "starvit@example.org")
    monkeypatch.setenv("STARVIT_ALERT_SMTP_TO", "oncall@example.org, privacy@example.org")
    monkeypatch.setenv("STARVIT_ALERT_SMTP_STARTTLS", "false")
    monkeypatch.setenv("STARVIT_DAGSTER_URL", "http://dagster.internal:3000/")


@pytest.fixture()
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notify, "time", SimpleNamespace(sleep=lambda seconds: None))


# --- assets ----------------------------------------------------------------------------------


@dg.asset(key=["alert_test", "ok"])
def ok_asset() -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"rows": 1, "note": PHI_TEXT})


@dg.asset(key=["alert_test", "crashes"], deps=[ok_asset])
def crashes() -> None:
    raise ValueError(f"could not parse birthDate for {PHI_TEXT}")


@dg.asset(key=["alert_test", "refuses"], deps=[ok_asset])
def refuses() -> None:
    raise dg.Failure(description=f"quarantined {PHI_TEXT}", metadata={"patient": PHI_TEXT})


@dg.asset(key=["alert_test", "downstream"], deps=[crashes])
def downstream() -> None:
    pass


@dg.asset(
    key=["alert_test", "checked"],
    check_specs=[
        dg.AssetCheckSpec("contract", asset=["alert_test", "checked"]),
        dg.AssetCheckSpec("k_anonymity", asset=["alert_test", "checked"]),
        dg.AssetCheckSpec("reconcile", asset=["alert_test", "checked"]),
    ],
)
def checked() -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    yield dg.AssetCheckResult(check_name="contract", passed=False, metadata={"row": PHI_TEXT})
    yield dg.AssetCheckResult(
        check_name="k_anonymity",
        passed=False,
        severity=dg.AssetCheckSeverity.WARN,
        description=PHI_TEXT,
    )
    yield dg.AssetCheckResult(check_name="reconcile", passed=True)
    yield dg.MaterializeResult()


def _assert_no_phi(text: str) -> None:
    for fragment in PHI_FRAGMENTS:
        assert fragment not in text


# --- run failures ----------------------------------------------------------------------------


@pytest.mark.usefixtures("alert_env")
def test_run_failure_alert_reaches_webhook_and_mail(
    webhook: WebhookReceiver, smtp: SmtpReceiver
) -> None:
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [ok_asset, crashes, refuses, downstream], instance=instance, raise_on_error=False
    )
    assert not result.success
    context = dg.build_run_status_sensor_context(
        sensor_name=RUN_FAILURE_ALERT,
        dagster_event=result.get_run_failure_event(),
        dagster_instance=instance,
        dagster_run=result.dagster_run,
    ).for_run_failure()

    alert_on_run_failure(context)

    [payload] = webhook.payloads()
    assert webhook.requests[0][0] == "/hooks/T000/B000"
    assert payload["blocks"][0]["text"]["text"] == f"Run failed: {result.dagster_run.job_name}"
    text = payload["text"]
    assert result.run_id in text
    assert "failed assets: alert_test/crashes, alert_test/refuses" in text
    assert "error types: ValueError, Failure" in text
    assert "assets_not_run: 1" in text  # alert_test/downstream
    assert "assets_materialized: 1" in text
    assert f"http://dagster.internal:3000/runs/{result.run_id}" in text

    [(sender, recipients, raw)] = smtp.messages
    assert sender == "starvit@example.org"
    assert recipients == ["oncall@example.org", "privacy@example.org"]
    [mail] = smtp.parsed()
    assert mail["Subject"] == f"[Starvit] Run failed: {result.dagster_run.job_name}"
    body = mail.get_payload(decode=True)
    assert isinstance(body, bytes)
    assert result.run_id in body.decode()

    # The exception messages held PHI; only their classes went out.
    _assert_no_phi(json.dumps(payload))
    _assert_no_phi(raw.decode())


def test_run_failure_sensor_skips_without_notifiers(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("STARVIT_ALERT_WEBHOOK_URL", "STARVIT_ALERT_SMTP_HOST"):
        monkeypatch.delenv(name, raising=False)
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([ok_asset, crashes], instance=instance, raise_on_error=False)
    context = dg.build_run_status_sensor_context(
        sensor_name=RUN_FAILURE_ALERT,
        dagster_event=result.get_run_failure_event(),
        dagster_instance=instance,
        dagster_run=result.dagster_run,
    ).for_run_failure()
    skipped = alert_on_run_failure(context)
    assert isinstance(skipped, dg.SkipReason)


# --- delivery --------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_backoff")
def test_webhook_retries_transient_errors_only(webhook: WebhookReceiver) -> None:
    alert = Alert(kind="check_failure", asset_keys=("deid_raw/patient",))
    webhook.statuses = [503, 429]
    SlackWebhookNotifier(webhook.url).send(alert)
    assert len(webhook.requests) == 3

    webhook.requests.clear()
    webhook.statuses = [400]
    with pytest.raises(NotifyError, match=r"HTTP 400") as raised:
        SlackWebhookNotifier(webhook.url).send(alert)
    assert len(webhook.requests) == 1
    assert "hooks" not in str(raised.value)  # the webhook URL is a secret


@pytest.mark.usefixtures("no_backoff")
def test_one_notifier_down_does_not_silence_the_other(smtp: SmtpReceiver) -> None:
    closed = WebhookReceiver().start()
    dead_url = closed.url
    closed.stop()
    alert = Alert(kind="freshness", asset_keys=("warehouse_raw/patient",))
    mail = SmtpNotifier("127.0.0.1", smtp.port, "a@example.org", ["b@example.org"], starttls=False)

    report = send_alert(alert, [SlackWebhookNotifier(dead_url), mail])
    assert report.delivered == ("smtp",)
    assert len(report.failed) == 1 and report.failed[0].startswith("webhook:")
    assert not report.nothing_delivered
    assert len(smtp.messages) == 1

    report = send_alert(alert, [SlackWebhookNotifier(dead_url)])
    assert report.nothing_delivered


# --- scrubbing and configuration -------------------------------------------------------------


def test_scrubber_keeps_allowlisted_identifiers_only() -> None:
    safe = scrub(
        {
            "kind": "run_failure",
            "run_id": "2ff92c09-9777-4dc1-a6e9-daeb0badb13e",
            "job_name": "full_lineage",
            "asset_keys": ["deid_raw/patient", PHI_TEXT],
            "error_types": ["ValueError", f"ValueError: {PHI_TEXT}"],
            "failed_checks": [
                {"asset_key": "deid_raw/patient", "check_name": "leak", "severity": "ERROR"},
                {"asset_key": "deid_raw/patient", "check_name": "Jane Roe", "severity": "x"},
            ],
            "counts": {"failed_steps": 1, "Jane Roe": 3, "rows": "4711"},
            "link": f"http://dagster:3000/runs/x?patient={PHI_TEXT}",
            "message": PHI_TEXT,
            "metadata": {"patient": PHI_TEXT},
        }
    )
    assert set(safe) == {
        "kind",
        "run_id",
        "job_name",
        "asset_keys",
        "error_types",
        "failed_checks",
        "counts",
        "link",
    }
    assert safe["asset_keys"] == ["deid_raw/patient", REDACTED]
    assert safe["error_types"] == ["ValueError", REDACTED]
    assert safe["failed_checks"][1] == {
        "asset_key": "deid_raw/patient",
        "check_name": REDACTED,
        "severity": REDACTED,
    }
    assert safe["counts"] == {"failed_steps": 1}
    assert safe["link"] == REDACTED
    _assert_no_phi(json.dumps(safe))


def test_long_lists_are_cut() -> None:
    alert = Alert(
        kind="check_failure",
        failed_checks=tuple(CheckFailure(f"a/t{i}", "contract", "ERROR") for i in range(25)),
    )
    safe = alert.safe_fields()
    assert len(safe["failed_checks"]) == notify.MAX_ITEMS
    assert safe["omitted"] == {"failed_checks": 5}
    assert alert.title == "Asset checks failed: 25"


def test_notifier_configuration(tmp_path: Any) -> None:
    assert notifiers_from_env({}) == []
    secret = tmp_path / "webhook"
    secret.write_text("https://hooks.example.org/services/T/B/X\n")
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    notifiers = notifiers_from_env(
        {
            "STARVIT_ALERT_WEBHOOK_URL_FILE": str(secret),
            "STARVIT_ALERT_SMTP_HOST": "smtp.example.org",
            "STARVIT_ALERT_SMTP_FROM": "starvit@example.org",
            "STARVIT_ALERT_SMTP_TO": "oncall@example.org",
            "STARVIT_ALERT_SMTP_USERNAME": "starvit",
            "STARVIT_ALERT_SMTP_PASSWORD_FILE": str(password),
        }
    )
    assert [n.name for n in notifiers] == ["webhook", "smtp"]
    assert "hooks.example.org" not in repr(notifiers[0])
    smtp_notifier = notifiers[1]
    assert isinstance(smtp_notifier, SmtpNotifier)
    assert (smtp_notifier.port, smtp_notifier.starttls) == (587, True)

    with pytest.raises(AlertConfigError, match="STARVIT_ALERT_SMTP_FROM"):
        notifiers_from_env({"STARVIT_ALERT_SMTP_HOST": "smtp.example.org"})
    with pytest.raises(AlertConfigError, match="clear text"):
        SmtpNotifier("smtp.example.org", 25, "a@x.org", ["b@x.org"], starttls=False, username="u")


# --- asset checks and freshness, on the PostgreSQL-backed instance ---------------------------


@pytest.fixture(scope="module")
def pg_instance(platform_env: PlatformEnv) -> Iterator[dg.DagsterInstance]:
    settings = load_settings()
    platform.ensure_dirs(settings)
    url = platform.sqlalchemy_psycopg2_url(platform.activate(settings).dagster_dsn)
    with dg.instance_for_test(overrides={"storage": {"postgres": {"postgres_url": url}}}) as inst:
        yield inst


def _evaluate(instance: dg.DagsterInstance, cursor: str | None) -> dg.SensorResult:
    context = dg.build_sensor_context(instance=instance, cursor=cursor, sensor_name=ASSET_ALERTS)
    result = alert_on_asset_health(context)
    assert isinstance(result, dg.SensorResult)
    return result


def _report_freshness(instance: dg.DagsterInstance, key: list[str], old: str, new: str) -> None:
    # What the freshness daemon does on a state change; it has no public counterpart.
    from dagster._core.definitions.freshness import FreshnessState, FreshnessStateChange

    instance._report_runless_asset_event(
        FreshnessStateChange(
            key=dg.AssetKey(key),
            previous_state=FreshnessState(old),
            new_state=FreshnessState(new),
            state_change_timestamp=time.time(),
        )
    )


@pytest.mark.usefixtures("alert_env")
def test_check_failures_and_freshness_changes_are_alerted(
    pg_instance: dg.DagsterInstance, webhook: WebhookReceiver, smtp: SmtpReceiver
) -> None:
    # A failure from before the sensor's first tick is history: not alerted.
    dg.materialize([checked], instance=pg_instance)
    first = _evaluate(pg_instance, None)
    assert webhook.requests == []
    assert AlertCursor.parse(first.cursor) is not None

    result = dg.materialize([checked], instance=pg_instance)
    second = _evaluate(pg_instance, first.cursor)
    [payload] = webhook.payloads()
    text = payload["text"]
    assert text.startswith("Asset checks failed: 2")
    assert "check failed: alert_test/checked contract (ERROR)" in text
    assert "check failed: alert_test/checked k_anonymity (WARN)" in text
    assert "reconcile" not in text
    assert f"/runs/{result.run_id}" in text
    _assert_no_phi(json.dumps(payload))
    assert len(smtp.messages) == 1

    _report_freshness(pg_instance, ["alert_test", "checked"], "UNKNOWN", "PASS")  # noise
    _report_freshness(pg_instance, ["alert_test", "checked"], "PASS", "FAIL")
    _report_freshness(pg_instance, ["alert_test", "ok"], "WARN", "PASS")
    third = _evaluate(pg_instance, second.cursor)
    freshness = webhook.payloads()[1]["text"]
    assert freshness.startswith("Freshness changed: 2 asset(s)")
    assert "freshness: alert_test/checked PASS -> FAIL" in freshness
    assert "freshness: alert_test/ok WARN -> PASS" in freshness
    assert "failing: 1" in freshness and "recovered: 1" in freshness
    assert len(smtp.messages) == 2

    _evaluate(pg_instance, third.cursor)
    assert len(webhook.requests) == 2


def test_asset_health_sensor_only_moves_its_cursor_without_notifiers(
    pg_instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("STARVIT_ALERT_WEBHOOK_URL", "STARVIT_ALERT_SMTP_HOST"):
        monkeypatch.delenv(name, raising=False)
    dg.materialize([checked], instance=pg_instance)
    result = _evaluate(pg_instance, AlertCursor(check=0, freshness=0).dumps())
    assert result.skip_reason is not None
    cursor = AlertCursor.parse(result.cursor)
    assert cursor is not None and cursor.check > 0


def test_sensors_are_exported() -> None:
    assert [sensor.name for sensor in ALERTING_SENSORS] == [RUN_FAILURE_ALERT, ASSET_ALERTS]
