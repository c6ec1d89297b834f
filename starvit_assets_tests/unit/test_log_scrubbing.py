"""The log scrubber: each identifier class is replaced, ordinary operational text survives, and
the JSON lines have a stable shape."""

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from starvit_assets.ops import logging as starvit_logging
from starvit_assets.ops.logging import (
    RULE_NAMES,
    JsonFormatter,
    Scrubber,
    ScrubFilter,
    SecretError,
    configure_logging,
    configure_logging_from_env,
    read_secret,
    reset_logging,
)


@pytest.fixture
def scrubber() -> Scrubber:
    return Scrubber()


@pytest.mark.parametrize(
    ("text", "identifier", "marker"),
    [
        ("contact jane.doe+test@example.org now", "jane.doe+test@example.org", "[EMAIL]"),
        ("call 555-123-4567 today", "555-123-4567", "[PHONE]"),
        ("call (555) 123-4567 today", "(555) 123-4567", "[PHONE]"),
        ("call +1 555 123 4567 today", "555 123 4567", "[PHONE]"),
        ("call +15551234567 today", "+15551234567", "[PHONE]"),
        ("ssn 123-45-6789 given", "123-45-6789", "[SSN]"),
        ("born 1980-05-17 in", "1980-05-17", "[DATE]"),
        ("born 05/17/1980 in", "05/17/1980", "[DATE]"),
        ("born 17.05.1980 in", "17.05.1980", "[DATE]"),
        ("seen 2024-01-05T12:30:00+02:00 at", "2024-01-05T12:30:00+02:00", "[DATE]"),
        ("from 192.168.10.254 port", "192.168.10.254", "[IP]"),
        (
            "Patient/3f2b8c1e-9a4d-4c1b-8e2f-0123456789ab read",
            "3f2b8c1e-9a4d-4c1b-8e2f-0123456789ab",
            "[ID]",
        ),
        ("resource 0123456789abcdef0123 read", "0123456789abcdef0123", "[ID]"),
        (
            "GET https://fhir.example.org/Patient?name=Smith&birthdate=1980 failed",
            "name=Smith",
            "https://fhir.example.org/Patient?[QUERY]",
        ),
        (
            "dsn postgresql://analyst:hunter22@db.internal:5432/warehouse",
            "hunter22",
            "postgresql://[CREDENTIALS]@db.internal:5432/warehouse",
        ),
        ("Authorization: Bearer abc.DEF-123_xyz~tok", "abc.DEF-123_xyz~tok", "Bearer [TOKEN]"),
        ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA==", "Basic [TOKEN]"),
        (
            "token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjMifQ.c2lnbmF0dXJl end",
            "eyJhbGciOiJIUzI1NiJ9",
            "[TOKEN]",
        ),
        ("login password=s3cret! user", "s3cret!", "password=[SECRET]"),
        ('config client_secret: "a b c"', '"a b c"', "client_secret: [SECRET]"),
    ],
)
def test_identifier_is_scrubbed(
    scrubber: Scrubber, text: str, identifier: str, marker: str
) -> None:
    scrubbed = scrubber.scrub(text)
    assert identifier not in scrubbed
    assert marker in scrubbed


@pytest.mark.parametrize(
    "text",
    [
        "patient: 1200 rows published, 3 quarantined in 0.84 seconds",
        "export 20240105T120000Z staged 5 files for Patient, Observation",
        "dagster 1.13.2 loaded 42 assets; k-anonymity threshold 5",
        "asset deid_raw/patient check no_phi_leak passed",
        "http://127.0.0.1:3000 is the Dagster UI",
        "basic validation passed for staging/stg_fhir__patient",
        "Observation.2.ndjson downloaded (12345 lines)",
    ],
)
def test_operational_text_is_kept(scrubber: Scrubber, text: str) -> None:
    expected = text.replace("127.0.0.1", "[IP]")
    assert scrubber.scrub(text) == expected


def test_rules_can_be_disabled_and_extended() -> None:
    import re

    mrn = starvit_logging.ScrubRule("mrn", re.compile(r"\bMRN\d{6}\b"), "[MRN]")
    scrubber = Scrubber(disable=["date"], extra_rules=[mrn])
    assert scrubber.scrub("on 2024-01-05 MRN123456") == "on 2024-01-05 [MRN]"
    with pytest.raises(ValueError, match="unknown scrub rules"):
        Scrubber(disable=["no_such_rule"])
    assert {"email", "phone", "ssn", "date", "ipv4", "uuid", "hex_id", "bearer_token"} <= set(
        RULE_NAMES
    )


def _record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("starvit.test", logging.WARNING, __file__, 1, message, args, None)
    record.__dict__.update(extra)
    return record


def test_filter_scrubs_arguments_and_keeps_the_record() -> None:
    record = _record("patient %s phoned from %s", "jane@example.org", "555-123-4567")
    assert ScrubFilter().filter(record) is True
    assert record.getMessage() == "patient [EMAIL] phoned from [PHONE]"
    assert record.args is None


def test_traceback_is_scrubbed() -> None:
    try:
        raise ValueError("bad value jane@example.org")
    except ValueError:
        import sys

        record = logging.LogRecord(
            "starvit.test", logging.ERROR, __file__, 1, "failed", None, sys.exc_info()
        )
    ScrubFilter().filter(record)
    assert record.exc_info is None
    assert record.exc_text is not None
    assert "ValueError: bad value [EMAIL]" in record.exc_text
    assert "jane@example.org" not in logging.Formatter().format(record)


def test_json_shape() -> None:
    record = _record("rows %d for %s", 12, "jane@example.org", export_id="e1", secret_ratio=0.5)
    record.__dict__["nested"] = {"not": "scalar"}
    line = JsonFormatter().format(record)
    payload = json.loads(line)
    assert set(payload) == {"ts", "level", "logger", "message", "export_id", "secret_ratio"}
    assert payload["level"] == "WARNING"
    assert payload["logger"] == "starvit.test"
    assert payload["message"] == "rows 12 for [EMAIL]"
    assert payload["ts"].endswith("+00:00")
    assert "\n" not in line


def test_json_keeps_dagster_context_as_fields() -> None:
    run_id = "3f2b8c1e-9a4d-4c1b-8e2f-0123456789ab"
    record = _record(f"starvit - {run_id} - prune - done for jane@example.org")
    record.__dict__["dagster_meta"] = {
        "run_id": run_id,
        "job_name": "retention_prune",
        "step_key": "prune",
        "orig_message": "done for jane@example.org",
    }
    payload = json.loads(JsonFormatter().format(record))
    assert payload["run_id"] == run_id
    assert payload["job_name"] == "retention_prune"
    assert payload["message"] == "done for [EMAIL]"


@pytest.fixture
def configured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    saved = logging.getLogger().level
    configure_logging(stream=stream)
    try:
        yield stream
    finally:
        reset_logging()
        logging.getLogger().setLevel(saved)


def test_configure_logging_scrubs_every_logger(configured: io.StringIO) -> None:
    logging.getLogger("starvit.anything.deep").warning("mail %s", "jane@example.org")
    # A record created through the factory is scrubbed even on a handler without the filter.
    record = logging.getLogger("other").makeRecord(
        "other", logging.INFO, __file__, 1, "ip %s", ("10.0.0.7",), None
    )
    assert record.getMessage() == "ip [IP]"
    lines = [json.loads(line) for line in configured.getvalue().splitlines()]
    assert [line["message"] for line in lines] == ["mail [EMAIL]"]


def test_configure_logging_is_idempotent(configured: io.StringIO) -> None:
    configure_logging(stream=configured)
    starvit_handlers = [
        handler
        for handler in logging.getLogger().handlers
        if getattr(handler, "starvit_handler", False)
    ]
    assert len(starvit_handlers) == 1
    logging.getLogger("starvit.x").warning("once")
    assert len(configured.getvalue().splitlines()) == 1


def test_dagster_log_manager_is_scrubbed(configured: io.StringIO) -> None:
    @dg.op
    def talk(context: dg.OpExecutionContext) -> None:
        context.log.info("patient jane@example.org at 555-123-4567")

    @dg.job
    def chatty() -> None:
        talk()

    instance = dg.DagsterInstance.ephemeral()
    result = chatty.execute_in_process(instance=instance)
    assert result.success
    messages = [
        entry.user_message
        for entry in instance.all_logs(result.run_id)
        if "patient" in entry.user_message
    ]
    assert messages == ["patient [EMAIL] at [PHONE]"]


def test_read_secret_from_env_or_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("STARVIT_TEST_SECRET", raising=False)
    monkeypatch.delenv("STARVIT_TEST_SECRET_FILE", raising=False)
    with pytest.raises(SecretError, match="STARVIT_TEST_SECRET_FILE"):
        read_secret("STARVIT_TEST_SECRET")

    monkeypatch.setenv("STARVIT_TEST_SECRET", "from-env-value")
    assert read_secret("STARVIT_TEST_SECRET") == "from-env-value"

    secret_file = tmp_path / "secret"
    secret_file.write_text("from-file-value\n")
    monkeypatch.setenv("STARVIT_TEST_SECRET_FILE", str(secret_file))
    with pytest.raises(SecretError, match="only one"):
        read_secret("STARVIT_TEST_SECRET")

    monkeypatch.delenv("STARVIT_TEST_SECRET")
    assert read_secret("STARVIT_TEST_SECRET") == "from-file-value"
    # Once read, a secret is redacted from any later log line.
    assert Scrubber().scrub("oops from-file-value leaked") == "oops [SECRET] leaked"

    monkeypatch.setenv("STARVIT_TEST_SECRET_FILE", str(tmp_path / "missing"))
    with pytest.raises(SecretError, match="cannot be read") as raised:
        read_secret("STARVIT_TEST_SECRET")
    assert "from-file-value" not in str(raised.value)


def test_configure_from_env_is_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STARVIT_LOG_FORMAT", raising=False)
    assert configure_logging_from_env() is None
    assert not any(getattr(h, "starvit_handler", False) for h in logging.getLogger().handlers)

    saved = logging.getLogger().level
    monkeypatch.setenv("STARVIT_LOG_FORMAT", "json")
    monkeypatch.setenv("STARVIT_LOG_LEVEL", "warning")
    monkeypatch.setenv("STARVIT_LOG_SCRUB_DISABLE", "date, ipv4")
    try:
        scrubber = configure_logging_from_env()
        assert scrubber is not None
        assert scrubber.scrub("on 2024-01-05 from 10.0.0.1") == "on 2024-01-05 from 10.0.0.1"
        assert logging.getLogger().level == logging.WARNING
    finally:
        reset_logging()
        logging.getLogger().setLevel(saved)

    monkeypatch.setenv("STARVIT_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="json or text"):
        configure_logging_from_env()
