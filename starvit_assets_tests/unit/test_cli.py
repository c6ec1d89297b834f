"""User mistakes end in one clear line and exit status 2, never a stack trace."""

from __future__ import annotations

from pathlib import Path

import pytest

from starvit_assets.cli import EXIT_USER_ERROR, main


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
