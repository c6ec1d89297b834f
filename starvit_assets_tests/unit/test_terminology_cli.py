"""``starvit terminology``: one code validated by the configured service; clear user errors."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from starvit_assets.cli import EXIT_USER_ERROR, main


@pytest.fixture(autouse=True)
def _private_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STARVIT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("STARVIT_TERMINOLOGY_URL", raising=False)


def test_a_valid_snomed_code_is_valid_and_shows_its_icd10_map(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["terminology", "validate", "http://snomed.info/sct", "38341003"]) == 0
    out = capsys.readouterr().out
    assert "http://snomed.info/sct#38341003: valid (embedded)" in out
    assert "maps to http://hl7.org/fhir/sid/icd-10-cm#I10 (equivalent)" in out


def test_a_planted_unknown_code_is_invalid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["terminology", "validate", "http://loinc.org", "99999-9"]) == 1
    out = capsys.readouterr().out
    assert "INVALID" in out and "Unknown code '99999-9'" in out


def test_an_unreachable_terminology_server_is_one_clear_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("STARVIT_TERMINOLOGY_URL", f"http://127.0.0.1:{port}/fhir")
    assert main(["terminology", "validate", "http://loinc.org", "8302-2"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("starvit: error: terminology CodeSystem/$validate-code failed")
    assert "Traceback" not in err and err.count("\n") == 1


def test_serving_a_missing_content_folder_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["terminology", "serve", "--content", "/no/such/folder"]) == EXIT_USER_ERROR
    assert "does not exist" in capsys.readouterr().err
