"""Research opt-outs from FHIR Consent resources, and the record filter holding them back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from starvit_assets.deid.engine import LocalDeidEngine, pseudonym
from starvit_assets.deid.policy import load_policy
from starvit_assets.lake.consent import (
    CONSENT_SCOPE_SYSTEM,
    ConsentError,
    read_research_opt_outs,
    research_opt_outs,
    update_consent_ledger,
)
from starvit_assets.lake.filters import RESEARCH_OPT_OUT, load_filters
from starvit_assets.lake.gate import build_gate
from starvit_assets.views.runner import shipped_views
from starvit_assets_tests.unit.test_gate import EXPORT_DATE, KEY, encode, observation


def consent(
    patient: str,
    decision: str = "deny",
    *,
    status: str = "active",
    scope: str = "research",
    when: str | None = "2025-01-01",
    period: dict[str, str] | None = None,
) -> dict[str, Any]:
    provision: dict[str, Any] = {"type": decision}
    if period is not None:
        provision["period"] = period
    resource: dict[str, Any] = {
        "resourceType": "Consent",
        "id": f"c-{patient}-{decision}",
        "status": status,
        "scope": {"coding": [{"system": CONSENT_SCOPE_SYSTEM, "code": scope}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{patient}"},
        "provision": provision,
    }
    if when is not None:
        resource["dateTime"] = when
    return resource


def opted_out(*resources: dict[str, Any]) -> frozenset[str]:
    return research_opt_outs(resources, EXPORT_DATE).patients


def test_an_active_research_deny_opts_the_patient_out() -> None:
    assert opted_out(consent("p1")) == {"p1"}
    assert opted_out(consent("p1", "permit")) == frozenset()


@pytest.mark.parametrize(
    "status", ["draft", "proposed", "rejected", "inactive", "entered-in-error"]
)
def test_only_an_active_consent_counts(status: str) -> None:
    assert opted_out(consent("p1", status=status)) == frozenset()


@pytest.mark.parametrize("scope", ["treatment", "patient-privacy", "adr"])
def test_only_the_research_scope_counts(scope: str) -> None:
    assert opted_out(consent("p1", scope=scope)) == frozenset()


def test_the_latest_directive_decides_and_deny_wins_a_tie() -> None:
    later_permit = consent("p1", "permit", when="2025-06-01")
    assert opted_out(consent("p1"), later_permit) == frozenset()
    assert opted_out(later_permit, consent("p1", when="2025-07-01T08:00:00Z")) == {"p1"}
    assert opted_out(consent("p1", "permit"), consent("p1")) == {"p1"}
    assert opted_out(consent("p1", "permit", when=None), consent("p1", when=None)) == {"p1"}


def test_a_provision_period_must_cover_the_export_date() -> None:
    assert opted_out(consent("p1", period={"start": "2026-07-01"})) == frozenset()
    assert opted_out(consent("p1", period={"end": "2026-05-31"})) == frozenset()
    assert opted_out(consent("p1", period={"start": "2026-01-01", "end": "2026"})) == {"p1"}


def test_directives_without_a_patient_or_a_decision_are_ignored() -> None:
    no_patient = consent("p1") | {"patient": {"reference": "Group/g1"}}
    no_decision = consent("p2") | {"provision": {"period": {"start": "2020-01-01"}}}
    result = research_opt_outs([no_patient, no_decision, consent("p3")], EXPORT_DATE)
    assert result.patients == {"p3"}
    assert (result.consents_read, result.research_directives) == (3, 1)


def test_unreadable_consent_lines_fail_naming_the_line_not_the_content(tmp_path: Path) -> None:
    path = tmp_path / "Consent.ndjson"
    path.write_bytes(encode(consent("p1")) + b"\n\n" + b'{"patient": "Patient/secret-7"')
    with pytest.raises(ConsentError) as error:
        read_research_opt_outs([path], EXPORT_DATE)
    assert str(error.value) == "Consent.ndjson line 3: not valid JSON"
    assert read_research_opt_outs([], EXPORT_DATE).patients == frozenset()


def test_the_gate_holds_back_every_record_of_an_opted_out_patient(tmp_path: Path) -> None:
    source = tmp_path / "Observation.ndjson"
    lines = [
        encode(observation(f"o{i}", subject={"reference": f"Patient/p{i % 3}"})) for i in range(9)
    ]
    source.write_bytes(b"\n".join(lines) + b"\n")
    policy = load_policy()
    gate = build_gate(
        table_name="observation",
        view=shipped_views()["observation"],
        backend=LocalDeidEngine(KEY, policy, reference_date=EXPORT_DATE),
        policy=policy,
        key=KEY,
        export_date=EXPORT_DATE,
        research_opt_outs=opted_out(consent("p1"), consent("p2", "permit")),
    )
    result = gate.run([source], "e", tmp_path / "out.parquet", tmp_path / "q.parquet")
    assert result.held_back == {RESEARCH_OPT_OUT: 3}
    assert result.rows == 6
    assert pseudonym(KEY, "Patient", "p1") not in result.table.column("patient_id").to_pylist()
    assert result.quarantine.num_rows == 0
    assert result.reconciles()


def test_every_shipped_table_matches_opt_outs_on_a_view_column() -> None:
    config = load_filters()
    for table, view in shipped_views().items():
        columns = [column["name"] for select in view["select"] for column in select["column"]]
        rules = config.tables.get(table)
        column = (rules and rules.consent_patient_column) or config.defaults.consent_patient_column
        assert column in columns, table


def test_consent_is_counted_before_security_labels(tmp_path: Path) -> None:
    source = tmp_path / "Observation.ndjson"
    restricted = observation("o1", meta={"security": [{"code": "R"}]})
    source.write_bytes(encode(restricted) + b"\n")
    policy = load_policy()
    gate = build_gate(
        table_name="observation",
        view=shipped_views()["observation"],
        backend=LocalDeidEngine(KEY, policy, reference_date=EXPORT_DATE),
        policy=policy,
        key=KEY,
        export_date=EXPORT_DATE,
        research_opt_outs=frozenset({"p1"}),
    )
    result = gate.run([source], "e", tmp_path / "out.parquet", tmp_path / "q.parquet")
    assert result.held_back == {RESEARCH_OPT_OUT: 1}


def test_staged_consent_files_go_with_the_exports_last_resource_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from starvit_assets.defs.deid_raw import _purge_staged
    from starvit_assets.exports import StagedExport, staging_dir
    from starvit_assets.settings import load_settings

    monkeypatch.setenv("STARVIT_HOME", str(tmp_path))
    settings = load_settings()
    folder = staging_dir(settings, "e1")
    folder.mkdir(parents=True)
    for name in ("Patient.ndjson", "Observation.ndjson", "Consent.ndjson"):
        (folder / name).write_bytes(b"{}\n")

    def staged(resource_type: str) -> StagedExport:
        return StagedExport(
            "e1", resource_type, "2026-06-01T00:00:00Z", (f"{resource_type}.ndjson",), 1
        )

    _purge_staged(settings, staged("Patient"))
    assert sorted(path.name for path in folder.iterdir()) == [
        "Consent.ndjson",
        "Observation.ndjson",
    ]
    _purge_staged(settings, staged("Observation"))
    assert not folder.exists()


def _ndjson(path: Path, *resources: dict[str, Any]) -> Path:
    path.write_bytes(b"".join(encode(resource) + b"\n" for resource in resources))
    return path


def test_the_ledger_keeps_every_consent_across_incremental_exports(tmp_path: Path) -> None:
    ledger = tmp_path / "phi" / "consent" / "Consent.ndjson"
    first = _ndjson(tmp_path / "first.ndjson", consent("p1"), consent("p2"), consent("p3"))
    assert update_consent_ledger(ledger, [first], [], full=True) == 3
    # An incremental export: p2's Consent withdrawn (a new version, same id), p3's deleted.
    withdrawn = consent("p2") | {"status": "inactive"}
    changed = _ndjson(tmp_path / "changed.ndjson", withdrawn, consent("p4", "permit"))
    deleted = ["Consent/c-p3-deny", "Patient/p3"]
    assert update_consent_ledger(ledger, [changed], deleted, full=False) == 3
    assert read_research_opt_outs([ledger], EXPORT_DATE).patients == {"p1"}
    # The same Consents staged again beside the ledger count once, the staged version last.
    result = read_research_opt_outs([ledger, changed], EXPORT_DATE)
    assert (result.patients, result.consents_read) == ({"p1"}, 3)
    # A full export starts the ledger again from what it holds.
    assert update_consent_ledger(ledger, [changed], [], full=True) == 2
    assert read_research_opt_outs([ledger], EXPORT_DATE).patients == frozenset()
    assert not list(ledger.parent.glob("*.tmp"))


def test_an_unreadable_consent_leaves_the_ledger_as_it_was(tmp_path: Path) -> None:
    ledger = tmp_path / "Consent.ndjson"
    update_consent_ledger(ledger, [_ndjson(tmp_path / "a.ndjson", consent("p1"))], [], full=True)
    before = ledger.read_bytes()
    broken = tmp_path / "b.ndjson"
    broken.write_bytes(b'{"resourceType": "Patient", "id": "x"}\n')
    with pytest.raises(ConsentError, match=r"b\.ndjson line 1: not a Consent resource"):
        update_consent_ledger(ledger, [broken], [], full=False)
    assert ledger.read_bytes() == before
