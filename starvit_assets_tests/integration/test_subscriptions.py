"""Medplum rest-hook notifications over real HTTP to the SubscriptionReceiver, then the
``medplum_subscription_events`` sensor: only resource types and a time cross into the event
files, and the sensor asks once for an incremental export of exactly those types."""

from __future__ import annotations

import hashlib
import hmac
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster._core.test_utils import create_run_for_test

from starvit_assets.defs.automation import INCREMENTAL_EXPORT
from starvit_assets.defs.extract import current_partition_key
from starvit_assets.defs.subscriptions import (
    SENSOR_NAME,
    SubscriptionReceiver,
    events_dir,
    medplum_subscription_events,
    notification_resource_types,
    pending_event_files,
)
from starvit_assets.settings import load_settings

pytestmark = pytest.mark.integration

# What must never reach an event file: names, ids, identifiers, any content.
PHI = (
    "Quillon",
    "Canarywood",
    "canary-patient-0042",
    "MRN-CANARY-0042",
    "1961-07-23",
    "canary-observation-0042",
    "sub-0042",
)

PATIENT = {
    "resourceType": "Patient",
    "id": "canary-patient-0042",
    "meta": {"versionId": "3", "lastUpdated": "2024-05-06T07:08:09.000Z"},
    "identifier": [{"system": "http://hospital.example.org/mrn", "value": "MRN-CANARY-0042"}],
    "name": [{"family": "Canarywood", "given": ["Quillon"], "text": "Quillon Canarywood"}],
    "gender": "female",
    "birthDate": "1961-07-23",
}
OBSERVATION = {
    "resourceType": "Observation",
    "id": "canary-observation-0042",
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
    "subject": {"reference": "Patient/canary-patient-0042", "display": "Quillon Canarywood"},
    "valueQuantity": {"value": 61.2, "unit": "kg", "system": "http://unitsofmeasure.org"},
}
BASE = "https://api.medplum.example/fhir/R4"
# An R4B topic-based notification: a SubscriptionStatus first, then the changed resources.
NOTIFICATION_BUNDLE = {
    "resourceType": "Bundle",
    "id": "notification-0042",
    "type": "subscription-notification",
    "timestamp": "2024-05-06T07:08:10.000Z",
    "entry": [
        {
            "fullUrl": "urn:uuid:9bb5a1f4-5e1a-4c1a-9a3e-0d7d1d9a0042",
            "resource": {
                "resourceType": "SubscriptionStatus",
                "status": "active",
                "type": "event-notification",
                "eventsSinceSubscriptionStart": "42",
                "notificationEvent": [
                    {"eventNumber": "42", "focus": {"reference": "Patient/canary-patient-0042"}}
                ],
                "subscription": {"reference": "Subscription/sub-0042"},
                "topic": "http://example.org/SubscriptionTopic/patient-changes",
            },
        },
        {"fullUrl": f"{BASE}/Patient/canary-patient-0042", "resource": PATIENT},
    ],
}


def _post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/fhir+json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _event_texts(folder: Path) -> list[str]:
    return [path.read_text() for path in sorted(folder.iterdir())] if folder.is_dir() else []


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("STARVIT_HOME", str(tmp_path))
    monkeypatch.setenv("STARVIT_ENV", "dev")
    for name in (
        "STARVIT_FHIR_BASE_URL",
        "STARVIT_SUBSCRIPTION_TOKEN",
        "STARVIT_SUBSCRIPTION_SECRET",
    ):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


@pytest.fixture
def events(home: Path) -> Path:
    return events_dir(load_settings())


@pytest.fixture
def receiver(events: Path) -> Iterator[SubscriptionReceiver]:
    with SubscriptionReceiver(events) as running:
        yield running


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.ephemeral() as ephemeral:
        yield ephemeral


def _tick(instance: dg.DagsterInstance, cursor: str | None) -> dg.SensorResult:
    context = dg.build_sensor_context(instance=instance, cursor=cursor, sensor_name=SENSOR_NAME)
    result = medplum_subscription_events(context)
    assert isinstance(result, dg.SensorResult)
    return result


# --- the receiver ----------------------------------------------------------------------------
def test_a_notification_bundle_leaves_only_its_resource_type(
    receiver: SubscriptionReceiver, events: Path
) -> None:
    body = json.dumps(NOTIFICATION_BUNDLE).encode()
    status, answer = _post(receiver.url, body)

    assert status == 200
    assert answer == {"resource_types": ["Patient"]}
    texts = _event_texts(events)
    assert len(texts) == 1
    event = json.loads(texts[0])
    assert event["resource_types"] == ["Patient"]
    assert set(event) == {"resource_types", "received_at"}
    for fragment in PHI:
        assert fragment not in texts[0]
        assert fragment not in json.dumps(answer)


def test_medplums_bare_resource_payload_and_references_give_types_only(
    receiver: SubscriptionReceiver, events: Path
) -> None:
    status, answer = _post(receiver.url, json.dumps(OBSERVATION).encode())
    assert (status, answer) == (200, {"resource_types": ["Observation"]})
    # An id-only notification: the type comes from the entry's URL, never the id.
    id_only = {
        "resourceType": "Bundle",
        "type": "history",
        "entry": [
            {"fullUrl": f"{BASE}/Encounter/enc-0042/_history/2"},
            {"request": {"method": "PUT", "url": "Condition/cond-0042"}},
        ],
    }
    status, answer = _post(receiver.url, json.dumps(id_only).encode())
    assert (status, answer) == (200, {"resource_types": ["Condition", "Encounter"]})
    texts = "\n".join(_event_texts(events))
    for fragment in (*PHI, "enc-0042", "cond-0042"):
        assert fragment not in texts


def test_types_this_platform_does_not_export_write_no_event(
    receiver: SubscriptionReceiver, events: Path
) -> None:
    practitioner = {"resourceType": "Practitioner", "id": "pr-1", "name": [{"family": "Roe"}]}
    status, answer = _post(receiver.url, json.dumps(practitioner).encode())
    assert (status, answer) == (200, {"resource_types": []})
    assert _event_texts(events) == []


def test_a_body_that_is_not_json_or_not_fhir_is_refused(
    receiver: SubscriptionReceiver, events: Path
) -> None:
    assert _post(receiver.url, b"Quillon Canarywood, MRN-CANARY-0042")[0] == 400
    assert _post(receiver.url, b'["Patient"]')[0] == 400
    assert _post(receiver.url, b"{}", {"Content-Type": "text/plain"})[0] == 415
    wrong_path = receiver.url.rsplit("/", 1)[0] + "/elsewhere"
    assert _post(wrong_path, json.dumps(PATIENT).encode())[0] == 404
    assert _event_texts(events) == []


def test_token_and_medplum_signature_are_checked(events: Path) -> None:
    body = json.dumps(PATIENT).encode()
    signature = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    with SubscriptionReceiver(events, token="t0ken", secret="s3cret") as guarded:
        assert _post(guarded.url, body)[0] == 401
        assert _post(guarded.url, body, {"Authorization": "Bearer t0ken"})[0] == 401
        assert _post(guarded.url, body, {"X-Signature": signature})[0] == 401
        assert _event_texts(events) == []
        status, answer = _post(
            guarded.url, body, {"Authorization": "Bearer t0ken", "X-Signature": signature}
        )
        assert (status, answer) == (200, {"resource_types": ["Patient"]})
    assert len(_event_texts(events)) == 1


def test_an_unauthenticated_receiver_listens_on_loopback_only(events: Path) -> None:
    with pytest.raises(ValueError, match="loopback only"):
        SubscriptionReceiver(events, host="0.0.0.0")


def test_notification_types_from_a_backport_parameters_status() -> None:
    status = {
        "resourceType": "Parameters",
        "parameter": [
            {
                "name": "notification-event",
                "part": [
                    {"name": "event-number", "valueString": "1"},
                    {"name": "focus", "valueReference": {"reference": "MedicationRequest/m-1"}},
                ],
            }
        ],
    }
    assert notification_resource_types(status) == {"MedicationRequest"}
    assert notification_resource_types({"resourceType": "Bundle", "entry": "nonsense"}) == set()


# --- the sensor ------------------------------------------------------------------------------
def test_the_sensor_requests_one_export_of_the_notified_types_and_no_duplicate(
    receiver: SubscriptionReceiver, events: Path, instance: dg.DagsterInstance
) -> None:
    _post(receiver.url, json.dumps(NOTIFICATION_BUNDLE).encode())
    _post(receiver.url, json.dumps(OBSERVATION).encode())
    _post(receiver.url, json.dumps(PATIENT).encode())
    assert len(pending_event_files(events)) == 3

    first = _tick(instance, cursor=None)
    assert first.run_requests is not None and len(first.run_requests) == 1
    request = first.run_requests[0]
    assert request.asset_selection == [
        dg.AssetKey(["fhir", "Patient"]),
        dg.AssetKey(["fhir", "Observation"]),
    ]
    assert request.run_key and request.run_key.startswith("medplum-")
    assert request.run_config == INCREMENTAL_EXPORT
    assert request.partition_key == current_partition_key()
    assert request.tags["starvit/trigger"] == "medplum-subscription"
    for fragment in PHI:
        assert fragment not in json.dumps([request.run_key, dict(request.tags), first.cursor])

    # The next tick deletes what the first one claimed and asks for nothing more.
    second = _tick(instance, cursor=first.cursor)
    assert not second.run_requests
    assert pending_event_files(events) == []
    third = _tick(instance, cursor=second.cursor)
    assert not third.run_requests
    assert third.skip_reason is not None


def test_a_tick_that_never_completed_asks_again_under_the_same_run_key(
    receiver: SubscriptionReceiver, instance: dg.DagsterInstance
) -> None:
    _post(receiver.url, json.dumps(PATIENT).encode())
    first = _tick(instance, cursor=None)
    # Its cursor was never stored: the next tick sees the same files and the same run key,
    # which Dagster runs once.
    again = _tick(instance, cursor=None)
    assert first.run_requests and again.run_requests
    assert again.run_requests[0].run_key == first.run_requests[0].run_key


def test_events_wait_while_an_export_is_running(
    receiver: SubscriptionReceiver, events: Path, instance: dg.DagsterInstance
) -> None:
    _post(receiver.url, json.dumps(PATIENT).encode())
    running = create_run_for_test(
        instance, job_name="fhir_exports", status=dg.DagsterRunStatus.STARTED
    )
    waiting = _tick(instance, cursor=None)
    assert not waiting.run_requests
    assert len(pending_event_files(events)) == 1

    instance.report_run_failed(running)
    after = _tick(instance, cursor=waiting.cursor)
    assert after.run_requests
    assert after.run_requests[0].asset_selection == [dg.AssetKey(["fhir", "Patient"])]


def test_the_requested_assets_belong_to_the_exports_job() -> None:
    from starvit_assets.definitions import defs

    job = defs.resolve_job_def("fhir_exports")
    assert {dg.AssetKey(["fhir", "Patient"]), dg.AssetKey(["fhir", "Observation"])} <= set(
        job.asset_layer.selected_asset_keys
    )
    sensor = defs.get_repository_def().get_sensor_def(SENSOR_NAME)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
