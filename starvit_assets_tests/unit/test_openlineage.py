"""OpenLineage events: their shape against the 2-0-2 RunEvent's required fields, the NDJSON file
transport, the HTTP transport against a local receiver, and emission from real Dagster runs."""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from starvit_assets.defs.alerting import OPENLINEAGE_SENSORS, LineageCursor, emit_lineage
from starvit_assets.ops import openlineage
from starvit_assets.ops.openlineage import (
    COLUMN_LINEAGE_FACET_URL,
    SCHEMA_FACET_URL,
    SCHEMA_URL,
    Column,
    FileTransport,
    HttpTransport,
    InputField,
    LineageError,
    build_run_event,
    lineage_run_id,
    transport_from_env,
    validate_run_event,
)

RUN_ID = "2ff92c09-9777-4dc1-a6e9-daeb0badb13e"
PHI_TEXT = "Jane Roe, MRN 4711-0815"


def _event(**overrides: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "event_type": "COMPLETE",
        "dagster_run_id": RUN_ID,
        "asset_key": "deid_raw/patient",
        "event_time": dt.datetime(2024, 3, 1, 2, 0, tzinfo=dt.UTC),
        "inputs": ["fhir/Patient"],
        "parent_job_name": "full_lineage",
    }
    arguments.update(overrides)
    return build_run_event(**arguments)


def test_event_has_the_required_run_event_fields() -> None:
    event = _event(
        columns=[Column("patient_id", "string"), Column("birth_year", "int64")],
        column_lineage={"birth_year": [InputField("fhir/Patient", "birthDate")]},
    )
    assert validate_run_event(event) == []
    assert event["eventType"] == "COMPLETE"
    assert event["eventTime"] == "2024-03-01T02:00:00Z"
    assert event["schemaURL"] == SCHEMA_URL
    assert event["producer"] == openlineage.PRODUCER
    assert event["job"]["namespace"] == "starvit"
    assert event["job"]["name"] == "deid_raw/patient"
    assert event["job"]["facets"]["jobType"]["processingType"] == "BATCH"
    assert uuid.UUID(event["run"]["runId"])
    assert event["run"]["runId"] == lineage_run_id(RUN_ID, "deid_raw/patient")
    assert event["run"]["facets"]["parent"]["run"] == {"runId": RUN_ID}
    assert event["run"]["facets"]["parent"]["job"] == {
        "namespace": "starvit",
        "name": "full_lineage",
    }
    assert event["inputs"] == [{"namespace": "starvit", "name": "fhir/Patient"}]

    [output] = event["outputs"]
    assert output["name"] == "deid_raw/patient"
    schema = output["facets"]["schema"]
    assert schema["_schemaURL"] == SCHEMA_FACET_URL
    assert schema["fields"] == [
        {"name": "patient_id", "type": "string"},
        {"name": "birth_year", "type": "int64"},
    ]
    lineage = output["facets"]["columnLineage"]
    assert lineage["_schemaURL"] == COLUMN_LINEAGE_FACET_URL
    assert lineage["fields"] == {
        "birth_year": {
            "inputFields": [{"namespace": "starvit", "name": "fhir/Patient", "field": "birthDate"}]
        }
    }


def test_facets_are_left_out_when_unknown() -> None:
    event = _event(parent_job_name=None, inputs=[])
    assert validate_run_event(event) == []
    assert event["run"]["facets"] == {}
    assert "facets" not in event["outputs"][0]
    assert event["inputs"] == []


def test_complete_and_fail_of_one_asset_share_a_run_id() -> None:
    complete = _event()
    fail = _event(event_type="FAIL")
    assert complete["run"]["runId"] == fail["run"]["runId"]
    assert _event(asset_key="deid_raw/encounter")["run"]["runId"] != complete["run"]["runId"]


def test_validation_reports_missing_and_malformed_fields() -> None:
    event = _event()
    del event["producer"]
    event["eventType"] = "DONE"
    event["run"]["runId"] = "not-a-uuid"
    event["outputs"][0]["facets"] = {"schema": {"fields": []}}
    problems = validate_run_event(event)
    assert "missing producer" in problems
    assert any("eventType" in problem for problem in problems)
    assert "run.runId is not a UUID" in problems
    assert any("_producer and _schemaURL" in problem for problem in problems)


# --- transports ------------------------------------------------------------------------------


def test_file_transport_appends_ndjson(tmp_path: Path) -> None:
    path = tmp_path / "lineage" / "events.ndjson"
    transport = FileTransport(path)
    transport.emit(_event())
    transport.emit(_event(event_type="FAIL"))
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert [json.loads(line)["eventType"] for line in lines] == ["COMPLETE", "FAIL"]


class _Receiver:
    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.requests: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.requests.append((self.path, dict(self.headers), json.loads(body)))
                self.send_response(receiver.statuses.pop(0) if receiver.statuses else 201)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture()
def receiver() -> Iterator[_Receiver]:
    server = _Receiver([])
    yield server
    server.server.shutdown()
    server.server.server_close()


def test_http_transport_posts_to_the_lineage_endpoint(receiver: _Receiver) -> None:
    receiver.statuses = [503]
    HttpTransport(receiver.url, api_key="token-1", backoff_seconds=0).emit(_event())
    assert len(receiver.requests) == 2  # one retry after the 503
    path, headers, body = receiver.requests[-1]
    assert path == "/api/v1/lineage"
    assert headers["Authorization"] == "Bearer token-1"
    assert headers["Content-Type"] == "application/json"
    assert validate_run_event(body) == []

    receiver.requests.clear()
    receiver.statuses = [422]
    with pytest.raises(LineageError, match="HTTP 422"):
        HttpTransport(receiver.url + "/api/v1/lineage", backoff_seconds=0).emit(_event())
    assert [path for path, _, _ in receiver.requests] == ["/api/v1/lineage"]


def test_transport_from_env(tmp_path: Path) -> None:
    assert transport_from_env({}) is None
    file_transport = transport_from_env({"STARVIT_OPENLINEAGE_FILE": str(tmp_path / "ol.ndjson")})
    assert isinstance(file_transport, FileTransport)
    http = transport_from_env({"STARVIT_OPENLINEAGE_URL": "http://marquez:5000/"})
    assert isinstance(http, HttpTransport)
    assert http.endpoint == "http://marquez:5000/api/v1/lineage"
    with pytest.raises(LineageError):
        transport_from_env({"STARVIT_OPENLINEAGE_URL": "marquez:5000"})


# --- from Dagster runs -----------------------------------------------------------------------


@dg.asset(key=["ol_test", "source"])
def ol_source() -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"note": PHI_TEXT, "rows": 2})


@dg.asset(key=["ol_test", "table"], deps=[ol_source])
def ol_table() -> dg.MaterializeResult:
    return dg.MaterializeResult(
        metadata={
            "dagster/column_schema": dg.TableSchema(
                columns=[dg.TableColumn("id", "string"), dg.TableColumn("year", "int64")]
            ),
            "dagster/column_lineage": dg.TableColumnLineage(
                deps_by_column={"year": [dg.TableColumnDep(["ol_test", "source"], "birthDate")]}
            ),
            "first_row": PHI_TEXT,
        }
    )


@dg.asset(key=["ol_test", "broken"], deps=[ol_source])
def ol_broken() -> None:
    raise ValueError(PHI_TEXT)


def test_emit_lineage_from_runs(tmp_path: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    definitions = dg.Definitions(assets=[ol_source, ol_table, ol_broken])
    repository = definitions.get_repository_def()
    path = tmp_path / "events.ndjson"

    result = dg.materialize(
        [ol_source, ol_table, ol_broken], instance=instance, raise_on_error=False
    )
    tick = emit_lineage(instance, FileTransport(path), LineageCursor(), repository)
    assert tick.error is None and tick.emitted == 3

    raw = path.read_text()
    assert "Jane" not in raw and "4711" not in raw
    events = [json.loads(line) for line in raw.splitlines()]
    assert all(validate_run_event(event) == [] for event in events)
    by_job = {(event["job"]["name"], event["eventType"]): event for event in events}
    assert set(by_job) == {
        ("ol_test/source", "COMPLETE"),
        ("ol_test/table", "COMPLETE"),
        ("ol_test/broken", "FAIL"),
    }
    table = by_job[("ol_test/table", "COMPLETE")]
    assert table["inputs"] == [{"namespace": "starvit", "name": "ol_test/source"}]
    assert [f["name"] for f in table["outputs"][0]["facets"]["schema"]["fields"]] == ["id", "year"]
    assert table["outputs"][0]["facets"]["columnLineage"]["fields"]["year"]["inputFields"] == [
        {"namespace": "starvit", "name": "ol_test/source", "field": "birthDate"}
    ]
    assert table["run"]["facets"]["parent"]["run"]["runId"] == result.run_id
    assert by_job[("ol_test/broken", "FAIL")]["inputs"] == [
        {"namespace": "starvit", "name": "ol_test/source"}
    ]

    # The cursor moved past everything: the next tick emits nothing.
    again = emit_lineage(instance, FileTransport(path), tick.cursor, repository)
    assert again.emitted == 0 and again.cursor == tick.cursor
    assert len(path.read_text().splitlines()) == 3


def test_sensor_is_idle_without_a_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STARVIT_OPENLINEAGE_URL", raising=False)
    monkeypatch.delenv("STARVIT_OPENLINEAGE_FILE", raising=False)
    [sensor] = OPENLINEAGE_SENSORS
    context = dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral())
    assert isinstance(sensor(context), dg.SkipReason)


def test_sensor_writes_to_the_configured_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "ol.ndjson"
    monkeypatch.setenv("STARVIT_OPENLINEAGE_FILE", str(path))
    monkeypatch.delenv("STARVIT_OPENLINEAGE_URL", raising=False)
    instance = dg.DagsterInstance.ephemeral()
    dg.materialize([ol_source], instance=instance)
    [sensor] = OPENLINEAGE_SENSORS
    context = dg.build_sensor_context(
        instance=instance, definitions=dg.Definitions(assets=[ol_source])
    )
    result = sensor(context)
    assert isinstance(result, dg.SensorResult)
    assert LineageCursor.parse(result.cursor).materialization > 0
    [line] = path.read_text().splitlines()
    assert json.loads(line)["job"]["name"] == "ol_test/source"
