"""The deid_raw assets in Dagster hold back every record of a patient who opted out of research
in a Consent staged with the export or kept from an earlier one (the consent ledger), and
spread a table over the gate's workers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from starvit_assets_tests.conftest import PlatformEnv
from starvit_assets_tests.unit.test_consent import consent

PATIENTS = 12


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.usefixtures("warehouse_dsn")
def test_an_opted_out_patient_never_crosses_the_gate(
    platform_env: PlatformEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dagster as dg

    import starvit_assets.lake.gate as gate_module
    from starvit_assets.defs.deid_raw import deid_asset_key
    from starvit_assets.defs.extract import RESOURCE_TYPES, fhir_asset_key
    from starvit_assets.deid.engine import pseudonym
    from starvit_assets.demo import ensure_source_data, materialize_all
    from starvit_assets.exports import latest_staged_export, staging_dir
    from starvit_assets.fhir.server import BulkDataServer
    from starvit_assets.fhir.synth import OPTED_OUT_CASE, load_consent_cases
    from starvit_assets.lake.filters import RESEARCH_OPT_OUT
    from starvit_assets.lake.partitions import PART_FILE, RawLake
    from starvit_assets.settings import load_settings

    # Many small batches over two forked workers, inside a Dagster run.
    monkeypatch.setenv("STARVIT_GATE_WORKERS", "2")
    monkeypatch.setattr(gate_module, "BATCH_LINES", 50)
    settings = load_settings()
    source = ensure_source_data(settings, patients=PATIENTS, seed=3)
    with BulkDataServer(source) as server:
        monkeypatch.setenv("STARVIT_FHIR_BASE_URL", server.base_url)
        extracted = materialize_all(
            load_settings(), asset_keys=[fhir_asset_key(name) for name in RESOURCE_TYPES]
        )
    assert extracted.success, extracted.failed_steps
    # The synthetic data opts some patients out already (its Consents were exported, and kept
    # in the consent ledger); a patient who permitted research now opts out, in a Consent
    # staged with the export only (dated after every synthetic one, so it decides).
    cases = load_consent_cases(source)
    opted_out = next(patient for patient, case in cases.items() if case == "permit")
    denied = {patient for patient, case in cases.items() if case == OPTED_OUT_CASE}
    denied.add(opted_out)
    observations = [
        resource
        for resource in _lines(source / "Observation.ndjson")
        if resource["subject"]["reference"].removeprefix("Patient/") in denied
    ]
    export = latest_staged_export(settings, "Observation")
    folder = staging_dir(settings, export.export_id)
    (folder / "Consent.ndjson").write_text(
        json.dumps(consent(opted_out)) + "\n" + json.dumps(consent("someone-else", "permit")) + "\n"
    )

    summary = materialize_all(
        load_settings(), asset_keys=[deid_asset_key(name) for name in ("patient", "observation")]
    )
    assert summary.success, summary.failed_steps
    with dg.DagsterInstance.get() as instance:
        metadata = {
            table: instance.get_latest_materialization_event(
                deid_asset_key(table)
            ).asset_materialization.metadata  # type: ignore[union-attr]
            for table in ("patient", "observation")
        }
    assert metadata["patient"]["held_back_by_reason"].value == {RESEARCH_OPT_OUT: len(denied)}
    held = metadata["observation"]["held_back_by_reason"].value
    assert held.get(RESEARCH_OPT_OUT) == len(observations) > 0
    assert metadata["observation"]["research_opt_out_patients"].value == len(denied)
    assert metadata["observation"]["consent_resources_read"].value == 2 + len(
        _lines(source / "Consent.ndjson")
    )
    assert metadata["observation"]["resources_read"].value == len(
        _lines(source / "Observation.ndjson")
    )
    token = pseudonym(
        bytes.fromhex(os.environ["STARVIT_PSEUDONYMISATION_KEY"]), "Patient", opted_out
    )
    lake = RawLake(settings.lake_root)
    for table in ("patient", "observation"):
        import pyarrow.parquet as pq

        published = pq.read_table(lake.published_dir(table, export.export_id) / PART_FILE)
        assert token not in published.column("patient_id").to_pylist()
