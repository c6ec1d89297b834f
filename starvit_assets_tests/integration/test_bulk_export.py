"""The real client against the local Bulk Data server, over real HTTP."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from starvit_assets.cli import main
from starvit_assets.fhir.client import (
    BulkDataClient,
    ExportConfig,
    ExportProgress,
    ExportRequest,
    iter_deleted_references,
    retry_after_seconds,
)
from starvit_assets.fhir.errors import ExportError
from starvit_assets.fhir.server import BulkDataServer, Faults
from starvit_assets.fhir.synth import RESOURCE_TYPES, generate


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    folder = tmp_path_factory.mktemp("source")
    return folder, generate(folder, patients=20, seed=4)


def test_full_export_downloads_every_resource_unchanged(
    source: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    folder, counts = source
    with BulkDataServer(folder, polls_before_ready=3, retry_after_seconds=0) as server:
        result = BulkDataClient(server.base_url).export(tmp_path)
    assert result.counts == counts
    for resource_type in RESOURCE_TYPES:
        assert (tmp_path / f"{resource_type}.ndjson").read_bytes() == (
            folder / f"{resource_type}.ndjson"
        ).read_bytes()
    assert result.transaction_time.endswith("Z")
    assert (tmp_path / "manifest.json").is_file()
    assert not list(tmp_path.glob("*.part"))


def test_type_and_since_narrow_the_export(
    source: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    folder, counts = source
    with BulkDataServer(folder, retry_after_seconds=0) as server:
        client = BulkDataClient(server.base_url)
        only_patients = client.export(tmp_path / "a", types=["Patient"])
        everything_later = client.export(tmp_path / "b", since="2099-01-01T00:00:00Z")
        some_later = client.export(
            tmp_path / "c", types=["Observation"], since="2025-10-01T00:00:00Z"
        )
        changed = client.count_changed_since(["Observation"], "2025-10-01T00:00:00Z")
    assert (
        set(only_patients.files) == {"Patient"}
        and only_patients.counts["Patient"] == counts["Patient"]
    )
    assert sum(everything_later.counts.values()) == 0
    assert 0 < some_later.counts["Observation"] < counts["Observation"]
    assert changed == some_later.counts["Observation"]


def test_kick_off_without_prefer_is_refused_by_the_server(
    source: tuple[Path, dict[str, int]],
) -> None:
    with BulkDataServer(source[0]) as server:
        response = httpx.get(
            f"{server.base_url}/$export", headers={"Accept": "application/fhir+json"}
        )
        bad_since = httpx.get(
            f"{server.base_url}/$export",
            params={"_since": "yesterday"},
            headers={"Prefer": "respond-async"},
        )
    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"
    assert bad_since.status_code == 400


def test_server_errors_become_clear_export_errors(
    source: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    with BulkDataServer(source[0]) as server:
        with pytest.raises(
            ExportError,
            match=r"kick-off failed: HTTP 400 \(OperationOutcome issue codes: invalid\)",
        ):
            BulkDataClient(server.base_url).export(tmp_path, since="not-an-instant")
        with pytest.raises(ExportError, match="kick-off failed: HTTP 404"):
            BulkDataClient(server.base_url + "/nowhere").export(tmp_path)


def test_cancelled_export_is_gone(source: tuple[Path, dict[str, int]]) -> None:
    with BulkDataServer(source[0], polls_before_ready=5) as server:
        kick_off = httpx.get(f"{server.base_url}/$export", headers={"Prefer": "respond-async"})
        status_url = kick_off.headers["Content-Location"]
        assert httpx.get(status_url).status_code == 202
        assert httpx.delete(status_url).status_code == 202
        assert httpx.get(status_url).status_code == 404


# --- protocol paths of the production client --------------------------------------------------
FAST = ExportConfig(
    poll_interval=0.01,
    max_poll_interval=0.05,
    max_retry_after=0.05,
    network_attempts=2,
    download_attempts=3,
)


@pytest.fixture(autouse=True)
def _no_ambient_client_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's STARVIT_FHIR_* variables must not change what these tests see."""
    for name in [n for n in os.environ if n.startswith("STARVIT_FHIR_")]:
        monkeypatch.delenv(name)


class _Bearer(httpx.Auth):
    """A static bearer token: enough to see where the client sends credentials."""

    def __init__(self, token: str) -> None:
        self._token = token

    def auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
        request.headers["Authorization"] = f"Bearer {self._token}"
        yield request


def _compartment_patient(resource: dict[str, Any]) -> str:
    """The patient a resource belongs to: its subject, its patient (Immunization,
    AllergyIntolerance), or itself."""
    owner = resource.get("subject") or resource.get("patient")
    reference = owner["reference"] if owner else f"Patient/{resource['id']}"
    return str(reference).removeprefix("Patient/")


def _resources(path: Path) -> list[dict[str, Any]]:
    with path.open("rb") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _all_resources(paths: list[Path]) -> list[dict[str, Any]]:
    return [resource for path in paths for resource in _resources(path)]


def _copy_source(source: tuple[Path, dict[str, int]], target: Path) -> Path:
    shutil.copytree(source[0], target)
    return target


def test_post_kick_off_with_parameters_matches_get(
    source: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    folder, _ = source
    since = "2025-10-01T00:00:00Z"
    with BulkDataServer(folder, retry_after_seconds=0) as server:
        client = BulkDataClient(server.base_url, config=FAST)
        by_get = client.export(
            tmp_path / "get", request=ExportRequest(types=("Observation", "Condition"), since=since)
        )
        by_post = client.export(
            tmp_path / "post",
            request=ExportRequest(types=("Observation", "Condition"), since=since, method="POST"),
        )
        kick_offs = [r for r in server.requests if r.path.endswith("/$export")]
    assert by_post.counts == by_get.counts and sum(by_get.counts.values()) > 0
    assert [r.method for r in kick_offs] == ["GET", "POST"]
    assert by_post.request.endswith("/fhir/$export")  # a POST's request URL has no parameters
    assert "_since=" in by_get.request


def test_patient_and_group_level_exports(
    source: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    data = _copy_source(source, tmp_path / "data")
    patient_ids = [p["id"] for p in _resources(data / "Patient.ndjson")]
    members, outsider = patient_ids[:2], patient_ids[2]
    group = {
        "resourceType": "Group",
        "id": "cohort-a",
        "type": "person",
        "actual": True,
        "member": [{"entity": {"reference": f"Patient/{pid}"}} for pid in members],
    }
    (data / "Group.ndjson").write_text(json.dumps(group) + "\n")
    with BulkDataServer(data, retry_after_seconds=0) as server:
        client = BulkDataClient(server.base_url, config=FAST)
        group_result = client.export(
            tmp_path / "group", request=ExportRequest(level="group", group_id="cohort-a")
        )
        patient_level = client.export(
            tmp_path / "patients", request=ExportRequest(level="patient", types=("Patient",))
        )
        one_member = client.export(
            tmp_path / "one",
            request=ExportRequest(
                level="group", group_id="cohort-a", method="POST", patients=(members[0],)
            ),
        )
        with pytest.raises(ExportError, match="kick-off failed: HTTP 404"):
            client.export(tmp_path / "x", request=ExportRequest(level="group", group_id="nope"))
        with pytest.raises(
            ExportError, match=r"HTTP 400 \(OperationOutcome issue codes: not-found"
        ):
            client.export(
                tmp_path / "y",
                request=ExportRequest(
                    level="group", group_id="cohort-a", method="POST", patients=(outsider,)
                ),
            )
    group_patients = {
        _compartment_patient(r)
        for paths in group_result.files.values()
        for r in _all_resources(paths)
    }
    assert group_patients == set(members)
    assert "Group" not in group_result.files  # a Group is outside the Patient compartment
    assert patient_level.counts == {"Patient": len(patient_ids)}
    one_patients = {
        _compartment_patient(r)
        for paths in one_member.files.values()
        for r in _all_resources(paths)
    }
    assert one_patients == {members[0]}
    assert group_result.request.endswith("/Group/cohort-a/$export")


def test_type_filter_and_elements(source: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    folder, _ = source
    observations = _resources(folder / "Observation.ndjson")
    codes = {"8302-2", "29463-7"}
    expected = sum(1 for o in observations if any(c["code"] in codes for c in o["code"]["coding"]))
    with BulkDataServer(folder, retry_after_seconds=0) as server:
        client = BulkDataClient(server.base_url, config=FAST)
        filtered = client.export(
            tmp_path / "filtered",
            request=ExportRequest(
                types=("Observation", "Condition"),
                # A comma inside one filter is a FHIR "or", not a second filter.
                type_filters=("Observation?code=8302-2,29463-7",),
            ),
        )
        posted = client.export(
            tmp_path / "posted",
            request=ExportRequest(
                level="patient",
                types=("Observation",),
                type_filters=("Observation?code=http://loinc.org|8302-2",),
                method="POST",
            ),
        )
        subset = client.export(
            tmp_path / "subset",
            request=ExportRequest(types=("Patient",), elements=("Patient.gender",)),
        )
        with pytest.raises(ExportError, match="not-supported"):
            client.export(
                tmp_path / "bad",
                request=ExportRequest(
                    types=("Observation",), type_filters=("Observation?_sort=date",)
                ),
            )
    assert 0 < filtered.counts["Observation"] == expected < len(observations)
    assert filtered.counts["Condition"] == source[1]["Condition"]
    assert 0 < posted.counts["Observation"] < expected
    patients = _all_resources(subset.files["Patient"])
    assert patients and all(set(p) == {"resourceType", "id", "meta", "gender"} for p in patients)
    assert all(any(tag["code"] == "SUBSETTED" for tag in p["meta"]["tag"]) for p in patients)


def test_include_associated_data_is_sent_as_value_code_and_unknown_values_refused(
    source: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    posted = ExportRequest(
        types=("Patient",), include_associated_data=("LatestProvenanceResources",), method="POST"
    )
    custom = dataclasses.replace(posted, include_associated_data=("_CustomBundle",))
    with BulkDataServer(source[0], retry_after_seconds=0) as server:
        client = BulkDataClient(server.base_url, config=FAST)
        # The server refuses any other value[x] than valueCode for includeAssociatedData,
        # so an accepted POST proves the client's encoding.
        by_post = client.export(tmp_path / "post", request=posted)
        by_get = client.export(tmp_path / "get", request=dataclasses.replace(posted, method="GET"))
        with pytest.raises(
            ExportError,
            match=r"kick-off failed: HTTP 400 \(OperationOutcome issue codes: not-supported\)",
        ):
            client.export(tmp_path / "strict", request=custom)
        lenient = client.export(
            tmp_path / "lenient",
            request=dataclasses.replace(custom, lenient=True),
            fail_on_errors=True,  # a warning is not an error
        )
        as_string = httpx.post(
            server.base_url + "/$export",
            json={
                "resourceType": "Parameters",
                "parameter": [
                    {"name": "includeAssociatedData", "valueString": "LatestProvenanceResources"}
                ],
            },
            headers={"Prefer": "respond-async"},
        )
    assert posted.parameters_resource()["parameter"][-1] == {
        "name": "includeAssociatedData",
        "valueCode": "LatestProvenanceResources",
    }
    assert by_post.counts == by_get.counts == {"Patient": source[1]["Patient"]}
    assert by_post.error_outcomes == 0
    assert as_string.status_code == 400
    assert "includeAssociatedData takes valueCode, not valueString" in as_string.text
    assert lenient.counts == {"Patient": source[1]["Patient"]}
    assert lenient.error_outcomes == 1
    assert lenient.error_issue_counts == {"not-supported": 1}
    assert len(lenient.error_files) == 1 and lenient.error_files[0].is_file()


def test_error_files_are_reported_not_fatal_unless_asked(
    source: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    faults = Faults(error_codes=("processing", "processing", "not-found"))
    with BulkDataServer(source[0], retry_after_seconds=0, faults=faults) as server:
        client = BulkDataClient(server.base_url, config=FAST)
        result = client.export(tmp_path / "a", types=["Condition"])
        with pytest.raises(
            ExportError, match=r"3 OperationOutcome\(s\).*not-found=1, processing=2"
        ) as caught:
            client.export(tmp_path / "b", types=["Condition"], fail_on_errors=True)
    assert result.counts == {"Condition": source[1]["Condition"]}
    assert result.error_issue_counts == {"processing": 2, "not-found": 1}
    assert result.error_outcomes == 3 and len(result.errors) == 1
    assert "injected" not in str(caught.value)  # diagnostics text never reaches a message


def test_deleted_resources_are_downloaded_and_kept(
    source: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    data = _copy_source(source, tmp_path / "data")
    gone = [o["id"] for o in _resources(data / "Observation.ndjson")[:2]]
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    (data / "_deleted.ndjson").write_text(
        "".join(
            json.dumps({"resourceType": "Observation", "id": i, "meta": {"lastUpdated": now}})
            + "\n"
            for i in gone
        )
    )
    with BulkDataServer(data, retry_after_seconds=0) as server:
        client = BulkDataClient(server.base_url, config=FAST)
        result = client.export(
            tmp_path / "out", types=["Observation"], since="2020-01-01T00:00:00Z"
        )
    assert result.deleted_count == 2 and len(result.deleted_files) == 1
    assert sorted(iter_deleted_references(result.deleted_files)) == sorted(
        f"Observation/{i}" for i in gone
    )
    exported = {o["id"] for o in _all_resources(result.files["Observation"])}
    assert not exported & set(gone)  # deleted[] and output[] never overlap
    assert result.counts["Observation"] == source[1]["Observation"] - 2


@pytest.mark.parametrize("requires_token", [True, False])
def test_token_goes_to_file_urls_only_when_required(
    source: tuple[Path, dict[str, int]], tmp_path: Path, requires_token: bool
) -> None:
    with BulkDataServer(
        source[0],
        retry_after_seconds=0,
        access_token="s3cret",
        requires_access_token=requires_token,
    ) as server:
        with pytest.raises(ExportError, match="kick-off failed: HTTP 401"):
            BulkDataClient(server.base_url, config=FAST).export(tmp_path / "anon")
        client = BulkDataClient(server.base_url, config=FAST, auth=_Bearer("s3cret"))
        result = client.export(tmp_path / "out", types=["Patient", "Condition"])
        seen = server.requests
    assert result.manifest["requiresAccessToken"] is requires_token
    files = [r for r in seen if "$export-file" in r.path]
    api = [r for r in seen if "$export-status" in r.path or r.path.endswith("/$export")]
    assert files and all(r.status == 200 for r in files)
    assert all(r.authorized is requires_token for r in files)
    assert all(r.authorized for r in api if r.status != 401)


def test_paged_manifests_are_followed(source: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    folder, counts = source
    with BulkDataServer(
        folder,
        polls_before_ready=2,
        retry_after_seconds=0,
        max_lines_per_file=25,
        manifest_page_size=2,
    ) as server:
        client = BulkDataClient(server.base_url, config=FAST)
        result = client.export(
            tmp_path / "out", request=ExportRequest(allow_partial_manifests=True)
        )
        pages = [r for r in server.requests if "$export-manifest" in r.path]
    assert result.counts == counts
    assert len(pages) >= 2 and "link" not in result.manifest
    observation_files = result.files["Observation"]
    assert len(observation_files) > 1
    assert [p.name for p in observation_files][:2] == [
        "Observation.1.ndjson",
        "Observation.2.ndjson",
    ]


def test_progress_callback_sees_x_progress_and_files(
    source: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    events: list[ExportProgress] = []
    with BulkDataServer(source[0], polls_before_ready=3, retry_after_seconds=0) as server:
        BulkDataClient(server.base_url, config=FAST, progress=events.append).export(
            tmp_path, types=["Patient", "Observation"]
        )
    waiting = [e.detail for e in events if e.event == "waiting"]
    assert waiting == ["0% complete", "33% complete", "66% complete"]
    done = [e for e in events if e.event == "file-done"]
    assert {e.detail for e in done} == {"Patient.ndjson", "Observation.ndjson"}
    assert done[-1].files_done == done[-1].files_total == 2
    assert [e.event for e in events][-1] == "complete"


def test_incremental_export_fetches_only_what_changed(
    source: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    data = _copy_source(source, tmp_path / "data")
    state = tmp_path / "state"
    with BulkDataServer(data, retry_after_seconds=0) as server:
        client = BulkDataClient(server.base_url, config=FAST, state_dir=state)
        first = client.export(tmp_path / "one", types=["Observation", "Patient"], incremental=True)
        assert first.since is None and first.counts == {
            "Observation": source[1]["Observation"],
            "Patient": source[1]["Patient"],
        }
        time.sleep(0.01)
        changed = _append_new_versions(data / "Observation.ndjson", 3)
        server.clear_requests()
        second = client.export(tmp_path / "two", types=["Observation", "Patient"], incremental=True)
        third = client.export(
            tmp_path / "three", types=["Observation", "Patient"], incremental=True
        )
    assert second.since == first.transaction_time
    assert second.counts == {"Observation": 3, "Patient": 0}
    assert {o["id"] for o in _all_resources(second.files["Observation"])} == changed
    assert third.since == second.transaction_time and sum(third.counts.values()) == 0
    marks = json.loads((state / "watermarks.json").read_text())["sources"]
    assert marks[server.base_url] == {
        "Observation": third.transaction_time,
        "Patient": third.transaction_time,
    }
    assert not list((state / "jobs").glob("*.json"))  # finished jobs leave no resumable state


def _append_new_versions(path: Path, how_many: int) -> set[str]:
    """Re-save ``how_many`` resources now (versionId + 1), as an EHR edit would."""
    latest: dict[str, dict[str, Any]] = {}
    for resource in _resources(path):
        latest[resource["id"]] = resource  # later lines are later versions
    resources = list(latest.values())[:how_many]
    # Callers sleep a little first, so "now" is strictly after the previous transactionTime;
    # a future stamp would be "modified after" the next export's transactionTime too.
    now = dt.datetime.now(dt.UTC)
    with path.open("a") as handle:
        for resource in resources:
            resource["meta"] = {
                "versionId": str(int(resource["meta"]["versionId"]) + 1),
                "lastUpdated": now.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
            }
            resource["status"] = "amended"
            handle.write(json.dumps(resource) + "\n")
    return {r["id"] for r in resources}


def test_boundary_repeats_are_staged_as_served_for_dbt_to_resolve(
    source: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    """The extract keeps every line the server sends, repeats at the `_since` boundary
    included: each export is staged (and later published) as its own immutable partition,
    and dbt's ``latest_version`` picks each resource's newest version (docs/extract.md)."""
    data = _copy_source(source, tmp_path / "data")
    state = tmp_path / "state"
    # The server re-sends what changed within an hour before _since, as servers whose
    # clocks or transaction boundaries are loose do.
    faults = Faults(since_slack_seconds=3600)
    with BulkDataServer(data, retry_after_seconds=0, faults=faults) as server:
        client = BulkDataClient(server.base_url, config=FAST, state_dir=state)
        recent = _append_new_versions(data / "Observation.ndjson", 2)  # in export 1 and 2
        first = client.export(tmp_path / "one", types=["Observation"], incremental=True)
        time.sleep(0.01)
        newer = _append_new_versions(data / "Observation.ndjson", 1)  # version 3 of one
        second = client.export(tmp_path / "two", types=["Observation"], incremental=True)
    second_versions = [
        (r["id"], r["meta"]["versionId"]) for r in _all_resources(second.files["Observation"])
    ]
    # The repeats (version 2 of both, again) and the new version 3 of one of them.
    assert sorted(second_versions) == sorted([(i, "2") for i in recent] + [(i, "3") for i in newer])
    assert second.counts["Observation"] == len(second_versions)
    first_ids = [r["id"] for r in _all_resources(first.files["Observation"])]
    assert first.counts["Observation"] == len(first_ids) and set(recent) <= set(first_ids)


def test_retry_after_values() -> None:
    server_date = "Tue, 24 Nov 2026 10:00:00 GMT"
    assert retry_after_seconds("120") == 120
    assert retry_after_seconds("Tue, 24 Nov 2026 10:02:00 GMT", server_date) == 120
    assert retry_after_seconds("Tue, 24 Nov 2026 09:00:00 GMT", server_date) == 0
    assert retry_after_seconds("99999999999999999999") == 1e20
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_cli_export_uses_env_configuration(
    source: tuple[Path, dict[str, int]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("STARVIT_FHIR_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("STARVIT_FHIR_DOWNLOAD_CONCURRENCY", "2")
    with BulkDataServer(source[0], retry_after_seconds=0) as server:
        code = main(["fhir", "export", "--base-url", server.base_url, "--out", str(tmp_path / "o")])
    assert code == 0
    out = capsys.readouterr().out
    assert re.search(rf"^Observation\s+{source[1]['Observation']}$", out, re.MULTILINE)
    assert (tmp_path / "state" / "watermarks.json").is_file()


def test_cli_exports_one_patients_compartment_by_post(
    source: tuple[Path, dict[str, int]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    patient_id = _resources(source[0] / "Patient.ndjson")[0]["id"]
    with BulkDataServer(source[0], retry_after_seconds=0) as server:
        code = main(
            [
                "fhir",
                "export",
                "--base-url",
                server.base_url,
                "--out",
                str(tmp_path / "o"),
                "--level",
                "patient",
                "--patient",
                patient_id,
                "--type",
                "Patient,Observation",
                "--state-dir",
                str(tmp_path / "state"),
            ]
        )
        kick_offs = [r for r in server.requests if r.path.endswith("$export")]
    assert code == 0
    assert [r.method for r in kick_offs] == ["POST"]
    patients = _resources(tmp_path / "o" / "Patient.ndjson")
    assert [p["id"] for p in patients] == [patient_id]
    observations = _resources(tmp_path / "o" / "Observation.ndjson")
    assert observations
    assert {o["subject"]["reference"] for o in observations} == {f"Patient/{patient_id}"}
    assert "Observation" in capsys.readouterr().out


def test_cli_refuses_contradictory_export_options(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = main(
        [
            "fhir",
            "export",
            "--base-url",
            "http://127.0.0.1:9",
            "--out",
            str(tmp_path),
            "--incremental",
        ]
    )
    assert code == 2
    assert "--incremental needs --state-dir" in capsys.readouterr().err


def test_cli_sends_associated_data_and_follows_a_paged_manifest(
    source: tuple[Path, dict[str, int]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    common = ["fhir", "export", "--out", str(tmp_path / "o"), "--post", "--base-url"]
    flags = ["--allow-partial-manifests", "--include-associated-data"]
    with BulkDataServer(
        source[0], retry_after_seconds=0, max_lines_per_file=25, manifest_page_size=2
    ) as server:
        # The server takes includeAssociatedData only as valueCode in a POST body.
        code = main([*common, server.base_url, *flags, "LatestProvenanceResources"])
        pages = [r.path for r in server.requests if "$export-manifest" in r.path]
        refused = main([*common, server.base_url, *flags, "_NotAStandardCode"])
    assert code == 0
    assert len(pages) >= 2  # allowPartialManifests=true reached the server: it paged
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert sum(item["count"] for item in manifest["output"]) == sum(source[1].values())
    assert refused == 2
    err = capsys.readouterr().err
    assert "kick-off failed: HTTP 400 (OperationOutcome issue codes: not-supported)" in err


def test_fhir_serve_command_serves_with_oauth_paging_and_faults(
    source: tuple[Path, dict[str, int]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("serve-secret-0dd")
    command = [
        sys.executable, "-m", "starvit_assets.cli", "fhir", "serve", "--data", str(source[0]),
        "--port", "0", "--max-lines-per-file", "30", "--manifest-page-size", "3",
        "--auth", "oauth", "--client-id", "cli-client",
        "--client-secret-file", str(secret_file), "--token-lifetime", "60",
        "--fault", "status_transient=1", "--fault", "tokens_expire_after=4",
        "--fault", "error_codes=processing",
    ]  # fmt: skip
    served = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert served.stdout is not None
        banner = [served.stdout.readline() for _ in range(3)]
        base_url = banner[2].removeprefix("base URL: ").strip()
        token_url = banner[1].removeprefix("token endpoint: ").strip()
        assert "auth: oauth" in banner[0] and token_url.endswith("/oauth2/token")
        for name, value in {
            "STARVIT_FHIR_AUTH": "client_credentials",
            "STARVIT_FHIR_CLIENT_ID": "cli-client",
            "STARVIT_FHIR_CLIENT_SECRET_FILE": str(secret_file),
            "STARVIT_FHIR_TOKEN_URL": token_url,
            "STARVIT_FHIR_STATE_DIR": str(tmp_path / "state"),
            "STARVIT_FHIR_MAX_RETRY_AFTER": "0.1",
        }.items():
            monkeypatch.setenv(name, value)
        out = tmp_path / "o"
        code = main(["fhir", "export", "--base-url", base_url, "--out", str(out),
                     "--allow-partial-manifests"])  # fmt: skip
        unauthorized = httpx.get(base_url + "/Patient")
    finally:
        served.send_signal(signal.SIGINT)  # the server's own Ctrl-C path cleans up
        served.wait(timeout=10)
    assert code == 0, capsys.readouterr().err
    assert unauthorized.status_code == 401
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["requiresAccessToken"] is True and manifest["error"]
    assert len({item["type"] for item in manifest["output"]}) == len(source[1])
    totals: dict[str, int] = {}
    for item in manifest["output"]:
        totals[item["type"]] = totals.get(item["type"], 0) + item["count"]
    assert totals == source[1]
    assert max(item["count"] for item in manifest["output"]) <= 30
    assert served.stderr is not None and "serve-secret-0dd" not in served.stderr.read()
