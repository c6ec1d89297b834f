"""The client against the local server's injected faults, over real HTTP.

Every fault a production Bulk Data server shows (throttling, transient errors, odd
Retry-After values, dropped connections, expired or short files) must end either in a
complete export whose files match the manifest counts, or in one clear ExportError; an
interrupted run must resume the same export without downloading finished files again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from starvit_assets.cli import EXIT_USER_ERROR, main
from starvit_assets.fhir.client import BulkDataClient, ExportConfig, ExportProgress, ExportRequest
from starvit_assets.fhir.errors import ExportError
from starvit_assets.fhir.server import BulkDataServer, Faults, ServerRequest
from starvit_assets.fhir.synth import generate

FAST = ExportConfig(
    poll_interval=0.01,
    max_poll_interval=0.05,
    max_retry_after=0.05,
    network_attempts=2,
    download_attempts=3,
    download_concurrency=3,
)
FAST_ENV = {
    "STARVIT_FHIR_POLL_INTERVAL": "0.01",
    "STARVIT_FHIR_MAX_POLL_INTERVAL": "0.05",
    "STARVIT_FHIR_MAX_RETRY_AFTER": "0.05",
    "STARVIT_FHIR_DOWNLOAD_ATTEMPTS": "4",
    "STARVIT_FHIR_DOWNLOAD_CONCURRENCY": "3",
}
LINES_PER_FILE = 20
COUNTERS = {
    "kickoff_429",
    "status_429",
    "status_transient",
    "drop_connection",
    "gone",
    "truncate",
    "expired_exports",
    "file_503",
}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    folder = tmp_path_factory.mktemp("source")
    return folder, generate(folder, patients=8, seed=11)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    for name in [n for n in os.environ if n.startswith("STARVIT_FHIR_")]:
        monkeypatch.delenv(name)
    for name, value in FAST_ENV.items():
        monkeypatch.setenv(name, value)
    state = tmp_path / "state"
    monkeypatch.setenv("STARVIT_FHIR_STATE_DIR", str(state))
    yield state


def _lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def _local_names(manifest: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The client's documented naming: <Type>.ndjson, or <Type>.<n>.ndjson when split."""
    per_type: dict[str, int] = {}
    for item in manifest["output"]:
        per_type[item["type"]] = per_type.get(item["type"], 0) + 1
    seen: dict[str, int] = {}
    named = []
    for item in manifest["output"]:
        seen[item["type"]] = seen.get(item["type"], 0) + 1
        many = per_type[item["type"]] > 1
        named.append(
            (
                f"{item['type']}.{seen[item['type']]}.ndjson" if many else f"{item['type']}.ndjson",
                item,
            )
        )
    for kind in ("deleted", "error"):
        named += [(f"_{kind}.{i + 1}.ndjson", item) for i, item in enumerate(manifest[kind])]
    return named


def _assert_manifest_matches_disk(out: Path, counts: dict[str, int]) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    totals: dict[str, int] = {}
    for name, item in _local_names(manifest):
        assert _lines(out / name) == item["count"], name
        if item in manifest["output"]:
            totals[item["type"]] = totals.get(item["type"], 0) + item["count"]
    assert totals == counts
    assert not list(out.glob("*.part"))


def _file_gets(requests: list[ServerRequest]) -> list[str]:
    return [r.path for r in requests if r.method == "GET" and "$export-file" in r.path]


def _kick_offs(requests: list[ServerRequest]) -> list[ServerRequest]:
    return [r for r in requests if r.path.endswith("/$export")]


FAULTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # name: (Faults fields, BulkDataServer arguments)
    "429 at kick-off": ({"kickoff_429": 2}, {}),
    "429 while polling": ({"status_429": 3}, {}),
    "transient 503 while polling": ({"status_transient": 3}, {}),
    "absurd Retry-After": ({"retry_after": "99999999999"}, {"polls_before_ready": 2}),
    "Retry-After as an HTTP date": ({"retry_after_date_in": 3600}, {"polls_before_ready": 2}),
    "slow polling with X-Progress": ({}, {"polls_before_ready": 6, "retry_after_seconds": 0}),
    "connection dropped mid-download": ({"drop_connection": 3}, {}),
    "410 on a file the first time": ({"gone": 1}, {}),
    "manifest already expired": ({"expired_exports": 1}, {}),
    "wrong line count": ({"truncate": 3}, {}),
    "503 on files": ({"file_503": 3}, {}),
    "everything at once": (
        {
            "kickoff_429": 1,
            "status_429": 1,
            "status_transient": 1,
            "retry_after": "99999999999",
            "drop_connection": 1,
            "truncate": 1,
            "file_503": 1,
            "gone": 1,
        },
        {"polls_before_ready": 2},
    ),
}


@pytest.mark.parametrize("fault", list(FAULTS), ids=list(FAULTS))
def test_cli_export_matches_every_manifest_count_under_fault(
    source: tuple[Path, dict[str, int]], tmp_path: Path, fault: str
) -> None:
    fields, server_args = FAULTS[fault]
    out = tmp_path / "out"
    started = time.monotonic()
    with BulkDataServer(
        source[0], max_lines_per_file=LINES_PER_FILE, faults=Faults(**fields), **server_args
    ) as server:
        code = main(["fhir", "export", "--base-url", server.base_url, "--out", str(out)])
        left = server.faults
    assert code == 0
    _assert_manifest_matches_disk(out, source[1])
    # Every injected fault fired (counters at zero): the test exercised what it names.
    assert all(getattr(left, name) == 0 for name in fields if name in COUNTERS)
    assert time.monotonic() - started < 20  # capped waits, not the server's absurd hints


def test_gone_files_re_kick_the_export_and_cancel_the_old_one(
    source: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    with BulkDataServer(source[0], retry_after_seconds=0, faults=Faults(gone=1)) as server:
        result = BulkDataClient(server.base_url, config=FAST).export(tmp_path)
        seen = server.requests
    assert result.rekicks == 1 and result.counts == source[1]
    assert len(_kick_offs(seen)) == 2
    deletes = [r for r in seen if r.method == "DELETE"]
    assert len(deletes) == 2  # the expired export, then the finished one


def test_persistent_gone_gives_up_after_max_rekicks(
    source: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    with BulkDataServer(source[0], retry_after_seconds=0, faults=Faults(gone=1000)) as server:
        client = BulkDataClient(server.base_url, config=FAST)
        with pytest.raises(
            ExportError, match=r"download failed: .* is gone \(HTTP 410\); gave up after 2"
        ):
            client.export(tmp_path)
        kick_offs = _kick_offs(server.requests)
    assert len(kick_offs) == 3


def test_status_failure_is_reported_with_issue_codes_only(
    source: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    with (
        BulkDataServer(source[0], faults=Faults(status_fatal=True)) as server,
        pytest.raises(ExportError) as caught,
    ):
        BulkDataClient(server.base_url, config=FAST).export(tmp_path)
    assert str(caught.value) == (
        "status failed: HTTP 500 (OperationOutcome issue codes: processing)"
    )
    assert caught.value.step == "status" and caught.value.status == 500
    assert "export failed" not in str(caught.value)  # the diagnostics text stays out


def test_transient_errors_are_bounded(source: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    config = dataclasses.replace(FAST, max_transient_failures=3)
    with (
        BulkDataServer(source[0], faults=Faults(status_transient=100)) as server,
        pytest.raises(ExportError, match=r"HTTP 503 .*transient\) 4 times in a row"),
    ):
        BulkDataClient(server.base_url, config=config).export(tmp_path)


def test_kick_off_429_is_bounded_by_its_own_timeout(
    source: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    config = dataclasses.replace(FAST, max_kickoff_seconds=0.3)
    with (
        BulkDataServer(source[0], faults=Faults(kickoff_429=1000)) as server,
        pytest.raises(ExportError, match=r"kick-off failed: HTTP 429 still after 0 s"),
    ):
        BulkDataClient(server.base_url, config=config).export(tmp_path)


def test_overall_poll_timeout(source: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    config = dataclasses.replace(FAST, max_poll_seconds=0.3)
    with (
        BulkDataServer(source[0], polls_before_ready=10_000) as server,
        pytest.raises(ExportError, match="status failed: export not complete after 0 s"),
    ):
        BulkDataClient(server.base_url, config=config).export(tmp_path)


def test_a_file_that_stays_short_fails_clearly(
    source: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    with (
        BulkDataServer(source[0], retry_after_seconds=0, faults=Faults(truncate=1000)) as server,
        pytest.raises(
            ExportError,
            match=r"download of \w+\.ndjson \(\w+\) failed after 3 attempt\(s\): "
            r"\d+ resources, the manifest says \d+",
        ),
    ):
        BulkDataClient(server.base_url, config=FAST).export(tmp_path)
    assert not list(tmp_path.glob("*.part"))


def test_interrupted_run_resumes_without_downloading_finished_files(
    source: tuple[Path, dict[str, int]], tmp_path: Path, _isolated_env: Path
) -> None:
    config = dataclasses.replace(FAST, download_concurrency=1)

    def crash_after_first_file(event: ExportProgress) -> None:
        if event.event == "file-done":
            raise KeyboardInterrupt  # what Ctrl-C or a killed worker looks like to the run

    out = tmp_path / "out"
    with BulkDataServer(
        source[0], retry_after_seconds=0, max_lines_per_file=LINES_PER_FILE
    ) as server:
        with pytest.raises(KeyboardInterrupt):
            BulkDataClient(
                server.base_url,
                config=config,
                state_dir=_isolated_env,
                progress=crash_after_first_file,
            ).export(out)
        first_run = _file_gets(server.requests)
        job = json.loads(next((_isolated_env / "jobs").glob("*.json")).read_text())
        server.clear_requests()
        result = BulkDataClient(server.base_url, config=config, state_dir=_isolated_env).export(out)
        second_run = _file_gets(server.requests)
        kick_offs = _kick_offs(server.requests)
    # The worker may have fetched more files before it saw the stop, but only the file the
    # run finished recording counts as done.
    assert first_run and len(job["files"]) == 1
    assert set(job) >= {"status_url", "kicked_off_at", "request", "files"}
    record = next(iter(job["files"].values()))
    assert set(record) == {"name", "kind", "resource_type", "count", "bytes"}  # no content
    assert result.resumed and result.skipped_files == 1 and not kick_offs
    assert first_run[0] not in second_run
    assert result.counts == source[1]
    _assert_manifest_matches_disk(out, source[1])


def test_cli_crash_then_resume_downloads_only_what_is_missing(
    source: tuple[Path, dict[str, int]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("STARVIT_FHIR_DOWNLOAD_CONCURRENCY", "1")
    monkeypatch.setenv("STARVIT_FHIR_DOWNLOAD_ATTEMPTS", "2")
    out = tmp_path / "out"
    args = ["fhir", "export", "--base-url", "", "--out", str(out)]
    with BulkDataServer(
        source[0],
        retry_after_seconds=0,
        max_lines_per_file=LINES_PER_FILE,
        faults=Faults(healthy_files=2, drop_connection=1000),
    ) as server:
        args[3] = server.base_url
        assert main(args) == EXIT_USER_ERROR
        err = capsys.readouterr().err
        first_run = _file_gets(server.requests)
        server.faults = Faults()
        server.clear_requests()
        assert main(args) == 0
        second_run = _file_gets(server.requests)
        kick_offs = _kick_offs(server.requests)
    assert re.search(
        r"download of \S+ \(\w+\) failed after 2 attempt\(s\): (RemoteProtocolError|ReadError)", err
    )
    assert "Traceback" not in err
    finished = first_run[:2]
    assert not set(finished) & set(second_run)
    assert not kick_offs  # the saved status URL was polled instead
    _assert_manifest_matches_disk(out, source[1])


def test_abandoned_export_is_cancelled_before_a_new_one(
    source: tuple[Path, dict[str, int]], tmp_path: Path, _isolated_env: Path
) -> None:
    config = dataclasses.replace(FAST, state_dir=_isolated_env)

    def stop_at_first_file(event: ExportProgress) -> None:
        if event.event == "file-done":
            raise RuntimeError("stop")

    with BulkDataServer(source[0], retry_after_seconds=0) as server:
        stopping = BulkDataClient(server.base_url, config=config, progress=stop_at_first_file)
        with pytest.raises(RuntimeError):
            stopping.export(tmp_path / "a", types=["Patient", "Condition"])
        old_status = next(r.path for r in server.requests if "$export-status" in r.path)
        server.clear_requests()
        client = BulkDataClient(server.base_url, config=config)
        assert client.can_resume(ExportRequest(types=("Patient", "Condition")))
        assert not client.can_resume(ExportRequest(types=("Observation",)))
        result = client.export(tmp_path / "b", types=["Observation"])
        seen = server.requests
    assert not result.resumed
    assert seen[0].method == "DELETE" and seen[0].path == old_status
    assert len(_kick_offs(seen)) == 1


def test_cancel_saved_export(
    source: tuple[Path, dict[str, int]], tmp_path: Path, _isolated_env: Path
) -> None:
    config = dataclasses.replace(FAST, state_dir=_isolated_env)

    def stop_at_first_file(event: ExportProgress) -> None:
        if event.event == "file-done":
            raise RuntimeError("stop")

    with BulkDataServer(source[0], retry_after_seconds=0) as server:
        stopping = BulkDataClient(server.base_url, config=config, progress=stop_at_first_file)
        with pytest.raises(RuntimeError):
            stopping.export(tmp_path)
        client = BulkDataClient(server.base_url, config=config)
        assert client.cancel_saved_export() is True
        assert client.cancel_saved_export() is False
        deletes = [r for r in server.requests if r.method == "DELETE"]
    assert [r.status for r in deletes] == [202]
