"""Peer lakes of the linkage (STARVIT_LINKAGE_PEER_LAKES): parsed and checked before anything
is read, and record keys qualified by source so that equal pseudonyms of two sources stay two
records."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from starvit_assets.defs.linkage import source_lakes
from starvit_assets.linkage.match import LinkageRecord, link_persons
from starvit_assets.settings import SettingsError, StarvitSettings


def _settings(home: Path, peers: str, source: str = "A") -> StarvitSettings:
    return StarvitSettings(home=home, linkage_peer_lakes=peers, source_name=source)


def _lake(root: Path) -> Path:
    (root / "deid_raw" / "patient").mkdir(parents=True)
    return root


def test_peer_lakes_are_name_equals_path_pairs(tmp_path: Path) -> None:
    settings = _settings(tmp_path, f" B = {tmp_path}/b ,C={tmp_path}/c/../c2,")
    assert settings.peer_lakes == {"B": tmp_path / "b", "C": tmp_path / "c2"}
    assert _settings(tmp_path, "").peer_lakes == {}


@pytest.mark.parametrize(
    ("peers", "message"),
    [
        ("/srv/b/lake", "is not name=path"),
        ("B=", "is not name=path"),
        ("B/1=/srv/b", "must be 1-64 letters"),
        ("A=/srv/a", "named twice"),
        ("B=/srv/b,B=/srv/b2", "named twice"),
    ],
)
def test_a_malformed_peer_setting_is_a_clear_error(
    tmp_path: Path, peers: str, message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        _ = _settings(tmp_path, peers).peer_lakes


def test_the_linkage_reads_its_own_lake_and_the_peers(tmp_path: Path) -> None:
    peer = _lake(tmp_path / "b" / "lake")
    lakes = source_lakes(_settings(tmp_path / "a", f"B={peer}"))
    assert {name: lake.root for name, lake in lakes.items()} == {
        "A": (tmp_path / "a" / "lake").resolve(),
        "B": peer.resolve(),
    }


@pytest.mark.parametrize(
    ("peer", "message"),
    [
        # Anything of this deployment's PHI zone is refused, even if it looks like a lake.
        ("a/phi/source", "overlaps this deployment's PHI zone"),
        ("a", "overlaps this deployment's PHI zone"),
        ("a/lake", "names the lake of source A"),
        ("b/not-a-lake", "holds no deid_raw/patient"),
    ],
)
def test_a_peer_lake_that_is_no_other_de_identified_lake_is_refused(
    tmp_path: Path, peer: str, message: str
) -> None:
    _lake(tmp_path / "a" / "phi" / "source")
    _lake(tmp_path / "a" / "lake")
    (tmp_path / "b" / "not-a-lake").mkdir(parents=True)
    with pytest.raises(dg.Failure, match=message):
        source_lakes(_settings(tmp_path / "a", f"B={tmp_path / peer}"))


def test_a_bad_peer_setting_fails_the_asset_with_the_settings_message(tmp_path: Path) -> None:
    with pytest.raises(dg.Failure, match="is not name=path"):
        source_lakes(_settings(tmp_path, "just-a-path"))


def test_equal_pseudonyms_of_two_sources_are_two_records_and_two_persons() -> None:
    # Two deployments that share a pseudonymisation key give equal raw ids equal pseudonyms.
    result = link_persons([LinkageRecord("A", "p1"), LinkageRecord("B", "p1")])
    assert len({a.person_key for a in result.assignments}) == 2
    assert {(a.source, a.patient_id) for a in result.assignments} == {("A", "p1"), ("B", "p1")}
