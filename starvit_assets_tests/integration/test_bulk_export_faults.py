"""The client against the local server's injected faults, over real HTTP.

Every fault a production Bulk Data server shows (throttling, transient errors at kick-off and
while polling, odd Retry-After values, dropped, stalled, slow, expired or short files, partial
``error[]``, expiring access tokens, a failing token endpoint) must end either in a complete
export whose files match the manifest counts, or in one clear ExportError naming the step and
the status; an interrupted run must resume the same export without downloading finished files
again.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from starvit_assets.cli import EXIT_USER_ERROR, main
from starvit_assets.fhir.auth import (
    ClientCredentialsAuth,
    PrivateKey,
    SmartBackendAuth,
    TokenAuthMethod,
)
from starvit_assets.fhir.client import BulkDataClient, ExportConfig, ExportProgress, ExportRequest
from starvit_assets.fhir.errors import ExportError
from starvit_assets.fhir.server import BulkDataServer, Faults, ServerRequest
from starvit_assets.fhir.server_auth import OAuthClient
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
    "kickoff_transient",
    "status_429",
    "status_transient",
    "drop_connection",
    "gone",
    "truncate",
    "expired_exports",
    "file_503",
    "slow_files",
    "stall_files",
    "token_failures",
}
# Settings of a fault rather than faults: they shape one named in the same row.
FAULT_SETTINGS = {
    "healthy_files",
    "slow_chunk_bytes",
    "slow_chunk_delay",
    "stall_seconds",
    "token_failure_status",
}
CLIENT_ID = "bulk-client"
SECRET = "cli3nt:secret/with+odd&chars"
KEY_ID = "kid-1"
SINCE = "2025-06-01T00:00:00Z"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    folder = tmp_path_factory.mktemp("source")
    return folder, generate(folder, patients=8, seed=11)


@pytest.fixture(scope="module")
def keys() -> dict[str, PrivateKey]:
    return {
        "RS384": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES384": ec.generate_private_key(ec.SECP384R1()),
    }


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


@dataclasses.dataclass(frozen=True)
class Case:
    """One row of the CLI matrix: the faults, server arguments, client auth and environment."""

    faults: dict[str, Any]
    server: dict[str, Any] = dataclasses.field(default_factory=dict)
    auth: str | None = None  # client_secret_basic, client_secret_post, RS384 or ES384
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    args: tuple[str, ...] = ()


TOKEN_EXPIRY = {"tokens_expire_after": 4}
FAULTS: dict[str, Case] = {
    "429 at kick-off": Case({"kickoff_429": 2}),
    "transient 503 at kick-off": Case({"kickoff_transient": 2}),
    "429 while polling": Case({"status_429": 3}),
    "transient 503 while polling": Case({"status_transient": 3}),
    "absurd Retry-After": Case({"retry_after": "99999999999"}, {"polls_before_ready": 2}),
    "Retry-After as an HTTP date": Case({"retry_after_date_in": 3600}, {"polls_before_ready": 2}),
    "slow polling with X-Progress": Case({}, {"polls_before_ready": 6, "retry_after_seconds": 0}),
    "connection dropped mid-download": Case({"drop_connection": 3}),
    "slow downloads within the read timeout": Case(
        {"slow_files": 3, "slow_chunk_bytes": 4096, "slow_chunk_delay": 0.2},
        env={"STARVIT_FHIR_READ_TIMEOUT": "2"},
    ),
    "a download stalls past the read timeout": Case(
        {"stall_files": 1, "stall_seconds": 3.0, "healthy_files": 2},
        env={"STARVIT_FHIR_READ_TIMEOUT": "1"},
    ),
    "410 on a file the first time": Case({"gone": 1}),
    "manifest already expired": Case({"expired_exports": 1}),
    "wrong line count": Case({"truncate": 3}),
    "503 on files": Case({"file_503": 3}),
    "partial error[]": Case({"error_codes": ("processing", "not-found")}),
    "resources re-sent from before _since": Case(
        {"since_slack_seconds": 86_400 * 30}, args=("--since", SINCE)
    ),
    "token expiry, client_secret_basic": Case(
        TOKEN_EXPIRY, {"token_lifetime": 2}, auth="client_secret_basic"
    ),
    "token expiry, client_secret_post": Case(TOKEN_EXPIRY, auth="client_secret_post"),
    "token expiry, SMART RS384": Case(TOKEN_EXPIRY, auth="RS384"),
    "token expiry, SMART ES384, slow token endpoint": Case(
        {**TOKEN_EXPIRY, "token_delay": 0.2}, auth="ES384"
    ),
    "token endpoint 503": Case(
        {"token_failures": 2, "token_failure_status": 503}, auth="client_secret_basic"
    ),
    "everything at once": Case(
        {
            "kickoff_429": 1,
            "kickoff_transient": 1,
            "status_429": 1,
            "status_transient": 1,
            "retry_after": "99999999999",
            "drop_connection": 1,
            "truncate": 1,
            "file_503": 1,
            "gone": 1,
            "slow_files": 1,
            "error_codes": ("processing",),
            "tokens_expire_after": 5,
        },
        {"polls_before_ready": 2},
        auth="client_secret_post",
    ),
}
# Faults no client can ride out: each must end in one clear line naming the step and status.
FATAL: dict[str, tuple[Case, str]] = {
    "kick-off fails for good": (
        Case({"kickoff_fatal": True}),
        r"kick-off failed: HTTP 500 \(OperationOutcome issue codes: processing\)",
    ),
    "the export fails": (
        Case({"status_fatal": True}),
        r"status failed: HTTP 500 \(OperationOutcome issue codes: processing\)",
    ),
    "a download stalls every time": (
        Case(
            {"stall_files": 1000, "stall_seconds": 2.0},
            env={"STARVIT_FHIR_READ_TIMEOUT": "1", "STARVIT_FHIR_DOWNLOAD_ATTEMPTS": "2"},
        ),
        r"download of \S+ \(\w+\) failed after 2 attempt\(s\): ReadTimeout",
    ),
    "every token is refused": (
        Case({"tokens_expire_after": 0}, auth="client_secret_basic"),
        r"kick-off failed: HTTP 401 \(OperationOutcome issue codes: login\)",
    ),
    "the token endpoint stays down": (
        Case({"token_failures": 1000, "token_failure_status": 502}, auth="client_secret_post"),
        r"token request \(client_credentials, client_secret_post\): POST \S+/oauth2/token "
        r"returned HTTP 502",
    ),
    "discovery without a token endpoint": (
        Case({"discovery_without_token_endpoint": True}, auth="ES384"),
        r"SMART discovery: \S+/\.well-known/smart-configuration has no absolute token_endpoint",
    ),
}


def _serve(source: Path, case: Case, keys: dict[str, PrivateKey]) -> BulkDataServer:
    server_args: dict[str, Any] = {"max_lines_per_file": LINES_PER_FILE, **case.server}
    if case.auth is not None:
        public = {KEY_ID: keys[case.auth].public_key()} if case.auth in keys else {}
        server_args["oauth_clients"] = [OAuthClient(CLIENT_ID, secret=SECRET, keys=public)]
    return BulkDataServer(source, faults=Faults(**case.faults), **server_args)


def _auth_env(
    case: Case, server: BulkDataServer, keys: dict[str, PrivateKey], folder: Path
) -> dict[str, str]:
    """What `starvit fhir export` reads: the STARVIT_FHIR_* auth settings, secrets in files."""
    if case.auth is None:
        return {}
    if case.auth.startswith("client_secret"):
        secret_file = folder / "client_secret"
        secret_file.write_text(SECRET)
        return {
            "STARVIT_FHIR_AUTH": "client_credentials",
            "STARVIT_FHIR_CLIENT_ID": CLIENT_ID,
            "STARVIT_FHIR_CLIENT_SECRET_FILE": str(secret_file),
            "STARVIT_FHIR_TOKEN_URL": server.token_url,
            "STARVIT_FHIR_TOKEN_AUTH_METHOD": case.auth,
        }
    key_file = folder / "key.pem"
    key_file.write_bytes(
        keys[case.auth].private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return {
        "STARVIT_FHIR_AUTH": "smart_backend",
        "STARVIT_FHIR_CLIENT_ID": CLIENT_ID,
        "STARVIT_FHIR_PRIVATE_KEY_FILE": str(key_file),
        "STARVIT_FHIR_KEY_ID": KEY_ID,
        "STARVIT_FHIR_SIGNING_ALG": case.auth,
    }


def _run_cli(
    source: Path,
    case: Case,
    keys: dict[str, PrivateKey],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[int, BulkDataServer, Path]:
    out = tmp_path / "out"
    with _serve(source, case, keys) as server:
        for name, value in {**case.env, **_auth_env(case, server, keys, tmp_path)}.items():
            monkeypatch.setenv(name, value)
        code = main(
            ["fhir", "export", "--base-url", server.base_url, "--out", str(out), *case.args]
        )
    return code, server, out


def _changed_counts(source: Path, since: dt.datetime) -> dict[str, int]:
    """Resources per type updated after ``since``: what a fault-free _since export holds."""
    counts: dict[str, int] = {}
    for path in source.glob("*.ndjson"):
        for line in path.read_text().splitlines():
            resource = json.loads(line)
            updated = dt.datetime.fromisoformat(resource["meta"]["lastUpdated"])
            if updated > since:
                counts[resource["resourceType"]] = counts.get(resource["resourceType"], 0) + 1
    return counts


def test_every_fault_is_in_the_cli_matrix() -> None:
    rows = [*FAULTS.values(), *(case for case, _ in FATAL.values())]
    covered = {name for case in rows for name in case.faults}
    every = {f.name for f in dataclasses.fields(Faults)}
    assert every - FAULT_SETTINGS - covered == set()


@pytest.mark.parametrize("fault", list(FAULTS), ids=list(FAULTS))
def test_cli_export_matches_every_manifest_count_under_fault(
    source: tuple[Path, dict[str, int]],
    keys: dict[str, PrivateKey],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fault: str,
) -> None:
    case = FAULTS[fault]
    started = time.monotonic()
    code, server, out = _run_cli(source[0], case, keys, tmp_path, monkeypatch)
    err = capsys.readouterr().err
    assert code == 0, err
    expected = source[1]
    if "--since" in case.args:
        since = dt.datetime.fromisoformat(SINCE)
        slack = dt.timedelta(seconds=case.faults["since_slack_seconds"])
        expected = _changed_counts(source[0], since - slack)
        assert expected != _changed_counts(source[0], since)  # the slack re-sent something
    _assert_manifest_matches_disk(out, expected)
    # Every injected fault fired (counters at zero): the test exercised what it names.
    assert all(getattr(server.faults, name) == 0 for name in case.faults if name in COUNTERS)
    seen = server.requests
    if "tokens_expire_after" in case.faults:
        assert any(r.status == 401 for r in seen)  # a token ran out mid-export ...
        assert len(server.token_requests) >= 2  # ... and a fresh one carried on
        assert all(r.authorized for r in seen if "$export-file" in r.path)
    if "error_codes" in case.faults:
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["error"] and (out / "_error.1.ndjson").is_file()
    if "stall_files" in case.faults:
        fetched = _file_gets(seen)
        assert len(fetched) > len(set(fetched))  # the stalled file was fetched again
    assert SECRET not in err and "Traceback" not in err
    assert time.monotonic() - started < 30  # capped waits, not the server's absurd hints


@pytest.mark.parametrize("fault", list(FATAL), ids=list(FATAL))
def test_cli_export_fails_clearly_under_fatal_fault(
    source: tuple[Path, dict[str, int]],
    keys: dict[str, PrivateKey],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fault: str,
) -> None:
    case, message = FATAL[fault]
    code, _server, out = _run_cli(source[0], case, keys, tmp_path, monkeypatch)
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR
    last = err.strip().splitlines()[-1]
    assert last.startswith("starvit: error: ") and re.search(message, last), last
    assert "Traceback" not in err and SECRET not in err
    assert not list(out.glob("*.part"))


@pytest.mark.parametrize(
    "auth_kind", ["client_secret_basic", "client_secret_post", "RS384", "ES384"]
)
def test_client_export_refreshes_expiring_tokens_during_polls_and_downloads(
    source: tuple[Path, dict[str, int]],
    keys: dict[str, PrivateKey],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    auth_kind: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    # Two-second tokens over a poll of about three seconds, each good for three requests (more
    # than the other download threads can use at once): the token is replaced while polling
    # (by the clock or after a 401) and after 401s while downloading.
    case = Case(
        {"tokens_expire_after": 3},
        {"polls_before_ready": 4, "retry_after_seconds": 1, "token_lifetime": 2},
        auth=auth_kind,
    )
    config = dataclasses.replace(FAST, max_retry_after=0.7)
    with _serve(source[0], case, keys) as server:
        auth: ClientCredentialsAuth | SmartBackendAuth
        if auth_kind in keys:
            auth = SmartBackendAuth(server.base_url, CLIENT_ID, keys[auth_kind], KEY_ID)
        else:
            method: TokenAuthMethod = (
                "client_secret_basic"
                if auth_kind == "client_secret_basic"
                else "client_secret_post"
            )
            auth = ClientCredentialsAuth(server.token_url, CLIENT_ID, SECRET, method=method)
        with auth, BulkDataClient(server.base_url, config=config, auth=auth) as client:
            result = client.export(tmp_path / "out")
        seen = server.requests
    assert result.counts == source[1]
    _assert_manifest_matches_disk(tmp_path / "out", source[1])
    assert result.manifest["requiresAccessToken"] is True
    assert all(r.authorized for r in seen if "$export-file" in r.path)
    tokens = [r for r in seen if r.path == "/oauth2/token"]
    assert len(tokens) >= 3 and all(r.status == 200 for r in tokens)
    assert any(r.status == 401 and "$export-file" in r.path for r in seen)
    polls = [i for i, r in enumerate(seen) if "$export-status" in r.path and r.method == "GET"]
    assert any(seen[i].path == "/oauth2/token" for i in range(polls[0], polls[-1]))
    bearers = {r.headers["authorization"] for r in seen if "authorization" in r.headers}
    secrets = [SECRET, *(value.split(" ", 1)[1] for value in bearers)]
    secrets += [r.form["client_assertion"] for r in tokens if "client_assertion" in r.form]
    for secret in secrets:
        assert secret not in caplog.text


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
