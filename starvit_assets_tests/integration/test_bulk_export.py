"""The real client against the local Bulk Data server, over real HTTP."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from starvit_assets.fhir.client import BulkDataClient
from starvit_assets.fhir.errors import ExportError
from starvit_assets.fhir.server import BulkDataServer
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
