from __future__ import annotations

import multiprocessing
import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from starvit_assets.settings import Environment, SettingsError, StarvitSettings


@pytest.fixture(autouse=True)
def _no_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "STARVIT_PSEUDONYMISATION_KEY",
        "STARVIT_PSEUDONYMISATION_KEY_FILE",
        "STARVIT_ENV",
    ):
        monkeypatch.delenv(name, raising=False)


def test_dev_key_is_generated_once_private_and_reused(tmp_path: Path) -> None:
    settings = StarvitSettings(home=tmp_path)
    key = settings.key
    key_file = tmp_path / "state" / "dev-pseudonymisation.key"

    assert len(key) == 32
    assert key_file.stat().st_mode & 0o077 == 0
    assert StarvitSettings(home=tmp_path).key == key
    assert key.hex() not in repr(settings)


def _key_of_a_process(home: Path, start: Any, keys: Any) -> None:  # runs in a child
    start.wait()
    keys.put(StarvitSettings(home=home).key.hex())


def test_processes_that_create_the_dev_key_at_once_all_get_the_same_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A slow random source holds each process between "the key file is not there" and "the
    # key is written", where the others arrive.
    token_hex = secrets.token_hex

    def slow_token_hex(nbytes: int) -> str:
        time.sleep(0.2)
        return token_hex(nbytes)

    monkeypatch.setattr(secrets, "token_hex", slow_token_hex)
    context = multiprocessing.get_context("fork")
    start, keys = context.Event(), context.Queue()
    children = [
        context.Process(target=_key_of_a_process, args=(tmp_path, start, keys)) for _ in range(8)
    ]
    for child in children:
        child.start()
    start.set()
    for child in children:
        child.join(timeout=60)

    assert [child.exitcode for child in children] == [0] * 8
    assert len({keys.get(timeout=5) for _ in children}) == 1
    assert [path.name for path in (tmp_path / "state").iterdir()] == ["dev-pseudonymisation.key"]


def test_non_dev_environment_requires_a_configured_key(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="needs STARVIT_PSEUDONYMISATION_KEY"):
        _ = StarvitSettings(home=tmp_path, env=Environment.PROD).key


def test_key_from_file_and_short_keys_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("ab" * 32 + "\n")
    assert StarvitSettings(home=tmp_path, pseudonymisation_key_file=key_file).key == bytes(
        [0xAB] * 32
    )
    key_file.write_text("abcd")
    with pytest.raises(SettingsError, match="at least 32 bytes"):
        _ = StarvitSettings(home=tmp_path, pseudonymisation_key_file=key_file).key


def test_schemas_follow_the_naming_convention(tmp_path: Path) -> None:
    settings = StarvitSettings(home=tmp_path, env=Environment.STAGE)
    assert settings.raw_schema == "sv_stage_raw"
    assert settings.schema_name("derived") == "sv_stage_derived"
    assert settings.phi_staging_dir == tmp_path.resolve() / "phi" / "staging"
