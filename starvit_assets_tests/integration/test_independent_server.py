"""The client against an independent FHIR server from PyPI: SEKMET (``sekmet-fhir``), a
FastAPI R4 server with Bulk Data ``$export``, written by others.

The server never enters the project's virtualenv (it pins FastAPI, uvicorn and
fhir.resources): the test installs it into a venv of its own, cached under pytest's cache
folder by version, starts it on a free port, loads synthetic resources through its REST API
and exports them with ``BulkDataClient``. It skips, saying why, when the package cannot be
installed, the server does not start, or it does not support ``$export``.
Set ``STARVIT_INDEPENDENT_SERVER_TEST=0`` to skip it; ``STARVIT_INDEPENDENT_SERVER_CACHE``
moves the venv cache.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from starvit_assets.fhir.client import BulkDataClient, ExportProgress, ExportRequest
from starvit_assets.fhir.synth import generate

pytestmark = pytest.mark.integration

PACKAGE = "sekmet-fhir"
VERSION = "0.1.1"
INSTALL_TIMEOUT = 300
START_TIMEOUT = 60
PATIENTS = 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _venv_with_server(cache: Path) -> Path:
    """The cached venv's ``sekmet`` script, installing it first when needed."""
    folder = cache / f"{PACKAGE}-{VERSION}-py{sys.version_info[0]}{sys.version_info[1]}"
    script = folder / "bin" / "sekmet"
    marker = folder / ".installed"
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("a") as lock:
        # Two test sessions at once install once.
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if marker.is_file() and script.is_file():
            return script
        shutil.rmtree(folder, ignore_errors=True)
        steps = [
            [sys.executable, "-m", "venv", str(folder)],
            [
                str(folder / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--timeout",
                "30",
                "--retries",
                "1",
                f"{PACKAGE}=={VERSION}",
            ],
        ]
        for step in steps:
            try:
                done = subprocess.run(
                    step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False
                )
            except subprocess.TimeoutExpired:
                pytest.skip(f"{PACKAGE}=={VERSION} did not install within {INSTALL_TIMEOUT} s")
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
                pytest.skip(f"{PACKAGE}=={VERSION} could not be installed: {last}")
        if not script.is_file():
            pytest.skip(f"{PACKAGE}=={VERSION} installed no `sekmet` command")
        marker.write_text(VERSION)
    return script


@dataclass(frozen=True)
class Server:
    base_url: str
    log: Path


@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    if os.environ.get("STARVIT_INDEPENDENT_SERVER_TEST", "1") == "0":
        pytest.skip("STARVIT_INDEPENDENT_SERVER_TEST=0")
    configured = os.environ.get("STARVIT_INDEPENDENT_SERVER_CACHE")
    cache = Path(configured) if configured else request.config.cache.mkdir("independent-fhir")
    script = _venv_with_server(cache)

    folder = tmp_path_factory.mktemp("sekmet")
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}/fhir"
    settings = folder / "settings.yaml"
    # JSON is YAML; no auth (server_auth defaults to "none"), no simulated workflows.
    settings.write_text(
        json.dumps(
            {
                "base_url": base_url,
                "host": "127.0.0.1",
                "port": port,
                "data_dir": str(folder / "data"),
                "own_private_key_path": str(folder / "keys" / "sekmet.pem"),
                "simulator": {"enabled": False, "delay_seconds": 0.2},
                "log_inbound": False,
            }
        )
    )
    log = folder / "server.log"
    environment = {key: value for key, value in os.environ.items() if not key.startswith("SEKMET_")}
    with log.open("w") as output:
        process = subprocess.Popen(
            [str(script), "serve", "--config", str(settings)],
            cwd=folder,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=environment,
        )
    try:
        _wait_until_serving(process, base_url)
        yield Server(base_url=base_url, log=log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_serving(process: subprocess.Popen[bytes], base_url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.skip(f"the {PACKAGE} server exited with status {process.returncode} at start")
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.get(f"{base_url}/metadata", timeout=2)
            if response.status_code == 200:
                operations = {
                    str(operation.get("name", "")).lstrip("$")
                    for rest in response.json().get("rest", [])
                    for operation in rest.get("operation", [])
                }
                if "export" not in operations:
                    pytest.skip(f"the {PACKAGE} CapabilityStatement declares no $export")
                return
        time.sleep(0.3)
    pytest.skip(f"the {PACKAGE} server did not answer within {START_TIMEOUT} s")


@dataclass(frozen=True)
class Loaded:
    ids: dict[str, set[str]]
    """Resource ids per type, as loaded."""
    compartment: dict[str, set[str]]
    """Resource ids per type in the first patient's compartment (subject or patient)."""
    patient_id: str


@pytest.fixture(scope="module")
def loaded(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    source = tmp_path_factory.mktemp("synthetic")
    generate(source, patients=PATIENTS, seed=21, fault_rate=0.0)
    ids: dict[str, set[str]] = collections.defaultdict(set)
    resources = []
    with httpx.Client(timeout=30) as client:
        for path in sorted(source.glob("*.ndjson")):
            for line in path.read_text().splitlines():
                resource = json.loads(line)
                response = client.put(
                    f"{server.base_url}/{resource['resourceType']}/{resource['id']}",
                    content=line,
                    headers={"Content-Type": "application/fhir+json"},
                )
                assert response.status_code in (200, 201), (
                    f"{PACKAGE} refused a synthetic {resource['resourceType']}: "
                    f"HTTP {response.status_code}"
                )
                ids[resource["resourceType"]].add(resource["id"])
                resources.append(resource)
    patient_id = sorted(ids["Patient"])[0]
    compartment: dict[str, set[str]] = collections.defaultdict(set)
    compartment["Patient"].add(patient_id)
    for resource in resources:
        for field in ("subject", "patient"):
            if resource.get(field, {}).get("reference") == f"Patient/{patient_id}":
                compartment[resource["resourceType"]].add(resource["id"])
    return Loaded(ids=dict(ids), compartment=dict(compartment), patient_id=patient_id)


def _ids(paths: list[Path]) -> set[str]:
    return {json.loads(line)["id"] for path in paths for line in path.read_text().splitlines()}


def test_a_full_system_export_returns_every_loaded_resource(
    server: Server, loaded: Loaded, tmp_path: Path
) -> None:
    events: list[ExportProgress] = []
    types = tuple(sorted(loaded.ids))
    with BulkDataClient(
        server.base_url, state_dir=tmp_path / "state", progress=events.append
    ) as client:
        result = client.export(tmp_path / "out", request=ExportRequest(types=types))
    assert result.counts == {t: len(ids) for t, ids in loaded.ids.items()}
    for resource_type, ids in loaded.ids.items():
        assert _ids(result.files[resource_type]) == ids
    assert result.transaction_time and not result.errors
    # Done, the client DELETEs the export; SEKMET then forgets it.
    accepted = next(event.detail for event in events if event.event == "accepted")
    assert httpx.get(accepted, timeout=10).status_code == 404


def test_incremental_exports_fetch_only_what_changed(
    server: Server, loaded: Loaded, tmp_path: Path
) -> None:
    request = ExportRequest(types=("Patient", "Observation"))
    with BulkDataClient(server.base_url, state_dir=tmp_path / "state") as client:
        full = client.export(tmp_path / "full", request=request)
        unchanged = client.export(tmp_path / "unchanged", request=request, incremental=True)
        patient = json.loads(next(iter(full.files["Patient"])).read_text().splitlines()[0])
        patient["gender"] = "other" if patient.get("gender") != "other" else "unknown"
        response = httpx.put(
            f"{server.base_url}/Patient/{patient['id']}",
            json=patient,
            headers={"Content-Type": "application/fhir+json"},
            timeout=30,
        )
        assert response.status_code in (200, 201)
        changed = client.export(tmp_path / "changed", request=request, incremental=True)
    assert full.counts["Patient"] == len(loaded.ids["Patient"])
    assert unchanged.since == full.transaction_time
    assert sum(unchanged.counts.values()) == 0
    assert changed.since == unchanged.transaction_time
    assert changed.counts.get("Patient") == 1 and changed.counts.get("Observation", 0) == 0
    assert _ids(changed.files["Patient"]) == {patient["id"]}


def test_patient_and_group_level_exports_by_get_and_post(
    server: Server, loaded: Loaded, tmp_path: Path
) -> None:
    group = {
        "resourceType": "Group",
        "id": "starvit-cohort",
        "type": "person",
        "actual": True,
        "member": [{"entity": {"reference": f"Patient/{loaded.patient_id}"}}],
    }
    response = httpx.put(
        f"{server.base_url}/Group/{group['id']}",
        json=group,
        headers={"Content-Type": "application/fhir+json"},
        timeout=30,
    )
    assert response.status_code in (200, 201)
    types = ("Patient", "Observation", "Encounter")
    with BulkDataClient(server.base_url) as client:
        patients = client.export(
            tmp_path / "patients", request=ExportRequest(level="patient", types=types)
        )
        cohort = client.export(
            tmp_path / "group",
            request=ExportRequest(level="group", group_id=group["id"], types=types, method="POST"),
        )
    for resource_type in types:
        assert patients.counts[resource_type] == len(loaded.ids[resource_type])
        assert _ids(cohort.files[resource_type]) == loaded.compartment[resource_type]


def test_an_unsupported_parameter_is_a_warning_in_error_not_a_failure(
    server: Server, tmp_path: Path
) -> None:
    request = ExportRequest(types=("Patient",), elements=("Patient.gender",), lenient=True)
    with BulkDataClient(server.base_url) as client:
        result = client.export(tmp_path / "out", request=request, fail_on_errors=True)
    assert result.error_issue_counts == {"not-supported": 1}
    assert result.counts["Patient"] == PATIENTS
