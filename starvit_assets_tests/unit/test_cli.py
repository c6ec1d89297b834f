"""User mistakes end in one clear line and exit status 2, never a stack trace."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from starvit_assets.cli import EXIT_USER_ERROR, build_parser, main, serve_options
from starvit_assets.fhir.auth import public_jwk
from starvit_assets.fhir.server import Faults


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fhir", "serve", "--data", "/no/such/folder"], "is not a folder"),
        (["demo", "--data", "/no/such/folder"], "is not a folder"),
        (["fhir", "synth", "--patients", "0", "--out", "x"], "--patients must be at least 1"),
        (["views", "conformance", "/no/such/folder", "--report", "r.json"], "not a folder"),
    ],
)
def test_user_mistakes_get_one_clear_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("starvit: error: ")
    assert message in err
    assert "Traceback" not in err
    assert err.count("\n") == 1


def test_a_folder_without_ndjson_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("not fhir")
    assert main(["demo", "--data", str(tmp_path)]) == EXIT_USER_ERROR
    assert "holds no .ndjson files" in capsys.readouterr().err


def test_unreachable_fhir_server_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["fhir", "export", "--base-url", "http://127.0.0.1:9/fhir", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR
    assert "kick-off" in err
    assert "Traceback" not in err


# --- fhir serve flags ---------------------------------------------------------------------------
def _serve_options(*flags: str) -> dict[str, Any]:
    return serve_options(build_parser().parse_args(["fhir", "serve", "--data", "d", *flags]))


def test_serve_defaults_are_a_plain_server_without_faults() -> None:
    options = _serve_options()
    assert options == {"max_lines_per_file": None, "manifest_page_size": None, "faults": Faults()}


def test_serve_flags_become_server_options_and_faults() -> None:
    options = _serve_options(
        "--max-lines-per-file",
        "50",
        "--manifest-page-size",
        "2",
        "--fault",
        "status_transient=3",
        "--fault",
        "error_codes=processing, not-found",
        "--fault",
        "retry_after_date_in=3600",
        "--fault",
        "kickoff_fatal=true",
        "--fault",
        "retry_after=99999999999",
        "--fault",
        "tokens_expire_after=none",
    )
    assert options["max_lines_per_file"] == 50 and options["manifest_page_size"] == 2
    assert options["faults"] == Faults(
        status_transient=3,
        error_codes=("processing", "not-found"),
        retry_after_date_in=3600.0,
        kickoff_fatal=True,
        retry_after="99999999999",
        tokens_expire_after=None,
    )


def test_serve_bearer_and_oauth_read_secrets_and_keys_from_files(tmp_path: Path) -> None:
    token_file, secret_file = tmp_path / "token", tmp_path / "secret"
    token_file.write_text("fixed-token\n")
    secret_file.write_text("the-secret\n")
    bearer = _serve_options("--auth", "bearer", "--access-token-file", str(token_file))
    assert bearer["access_token"] == "fixed-token"

    key = ec.generate_private_key(ec.SECP384R1())
    jwks_file, pem_file = tmp_path / "jwks.json", tmp_path / "key.pub"
    jwks_file.write_text(json.dumps({"keys": [public_jwk(key, "kid-jwks")]}))
    pem_file.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    by_jwks = _serve_options(
        "--auth", "oauth", "--client-id", "c1", "--client-secret-file", str(secret_file),
        "--client-public-key", str(jwks_file), "--token-lifetime", "60",
    )  # fmt: skip
    (client,) = by_jwks["oauth_clients"]
    assert (client.client_id, client.secret, list(client.keys)) == (
        "c1",
        "the-secret",
        ["kid-jwks"],
    )
    assert by_jwks["token_lifetime"] == 60
    by_pem = _serve_options(
        "--auth", "oauth", "--client-id", "c2", "--client-public-key", str(pem_file),
        "--client-key-id", "kid-pem",
    )  # fmt: skip
    (client,) = by_pem["oauth_clients"]
    assert client.secret is None and list(client.keys) == ["kid-pem"]
    assert client.keys["kid-pem"].public_numbers() == key.public_key().public_numbers()
    assert by_pem["token_lifetime"] == 300


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--fault", "no_such_fault=1"], "unknown fault 'no_such_fault': use NAME=VALUE"),
        (["--fault", "status_transient"], "unknown fault 'status_transient'"),
        (["--fault", "status_transient=many"], "fault status_transient: 'many' is not a valid int"),
        (["--fault", "gone=-1"], "fault gone: must not be negative"),
        (["--fault", "status_fatal=perhaps"], "fault status_fatal: 'perhaps' is not a valid bool"),
        (["--max-lines-per-file", "0"], "--max-lines-per-file must be at least 1"),
        (["--client-id", "c"], "--client-id do(es) not apply to --auth none"),
        (["--auth", "bearer"], "--auth bearer needs --access-token-file"),
        (["--auth", "oauth", "--client-id", "c"], "needs --client-secret-file"),
        (["--auth", "oauth", "--client-secret-file", "s"], "--auth oauth needs --client-id"),
        (
            ["--auth", "oauth", "--client-id", "c", "--client-secret-file", "EMPTY"],
            "--client-secret-file EMPTY is empty",
        ),
        (
            ["--auth", "oauth", "--client-id", "c", "--client-public-key", "NOKID"],
            "is a PEM key: give its kid too",
        ),
        (
            ["--auth", "bearer", "--access-token-file", "ABSENT"],
            "cannot read --access-token-file ABSENT",
        ),
    ],
)
def test_serve_flag_mistakes_get_one_clear_line(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "Patient.ndjson").write_text("")
    (tmp_path / "EMPTY").write_text("  \n")
    (tmp_path / "NOKID").write_text("-----BEGIN PUBLIC KEY-----\n")
    paths = {name: str(tmp_path / name) for name in ("EMPTY", "NOKID", "ABSENT")}
    argv = ["fhir", "serve", "--data", str(tmp_path), *[paths.get(f, f) for f in flags]]
    assert main(argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    expected = message
    for name, path in paths.items():
        expected = expected.replace(name, path)
    assert err.startswith("starvit: error: ") and expected in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
