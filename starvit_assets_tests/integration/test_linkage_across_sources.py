"""Record linkage across two sources, each its own Starvit deployment.

Source A and source B each have their own home (PHI zone), pseudonymisation key and lake, and
share one linkage key (one tokenisation domain). Each generates its data with
`starvit fhir synth` (B with `--source-name B --overlap`), exports it over real HTTP from its
own Bulk Data server and runs it through its own gate in Dagster. A's linkage asset then reads
its lake and B's (`STARVIT_LINKAGE_PEER_LAKES`: only B's de-identified Parquet), in Dagster,
and its persons are scored against the generator's truth (persons.json) by pairwise
precision and recall.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from starvit_assets_tests.conftest import PlatformEnv

pytestmark = pytest.mark.integration

PATIENTS = 80
SEED = 21
OVERLAP = 0.4
DUPLICATE_RATE = 0.1
# A schema of its own (env "stage"), so the e2e lineage's sv_dev_raw is never touched.
ENV = "stage"
LINKAGE_KEY = "7a" * 32
# Per deployment: a pseudonymisation key of its own, so the sources' pseudonyms differ.
PSEUDONYMISATION_KEYS = {"A": "a1" * 32, "B": "b2" * 32}
# On this data (docs/linkage.md, "Across two deployments"): precision 1.000, recall 0.96.
MIN_PRECISION = 0.99
MIN_RECALL = 0.90

RecordKey = tuple[str, str]


@pytest.fixture
def restored_environ() -> Iterator[None]:
    """Every variable as it was: each deployment's run points STARVIT_HOME, DAGSTER_HOME and
    the keys elsewhere, and the session's other tests must not see that."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _deploy(source: str, home: Path, endpoints: object) -> None:
    """This source's deployment: its own home, its own pseudonymisation key, the domain's
    linkage key, the session's PostgreSQL for the warehouse and Dagster storage."""
    for name in ("STARVIT_LAKE_DIR", "STARVIT_SOURCE_DIR", "STARVIT_LINKAGE_PEER_LAKES"):
        os.environ.pop(name, None)
    os.environ.update(
        {
            "STARVIT_HOME": str(home),
            "STARVIT_ENV": ENV,
            "STARVIT_SOURCE_NAME": source,
            "STARVIT_PSEUDONYMISATION_KEY": PSEUDONYMISATION_KEYS[source],
            "STARVIT_LINKAGE_KEY": LINKAGE_KEY,
            "STARVIT_WAREHOUSE_DSN": endpoints.warehouse_dsn,  # type: ignore[attr-defined]
            "STARVIT_DAGSTER_DSN": endpoints.dagster_dsn,  # type: ignore[attr-defined]
        }
    )


def _synthesise(source: str, out: Path) -> None:
    from starvit_assets.cli import main

    arguments = ["fhir", "synth", "--patients", str(PATIENTS), "--seed", str(SEED)]
    arguments += ["--out", str(out), "--duplicate-rate", str(DUPLICATE_RATE)]
    if source != "A":
        arguments += ["--source-name", source, "--overlap", str(OVERLAP)]
    assert main(arguments) == 0


def _run(asset_keys: list[dg.AssetKey]) -> dict[str, dict]:
    from starvit_assets.demo import materialize_all
    from starvit_assets.settings import load_settings

    # An ephemeral instance: these runs stay out of the session's Dagster storage, where the
    # e2e reads the latest materializations of the same assets.
    with dg.DagsterInstance.ephemeral() as instance:
        summary = materialize_all(load_settings(), asset_keys=asset_keys, instance=instance)
    assert summary.success, summary.failed_steps
    assert summary.checks_failed == []
    return summary.asset_metadata | {
        name: metadata for name, metadata in summary.check_metadata.items()
    }


def _gate(source: str, home: Path) -> Path:
    """Generate the source's data in its PHI zone, export it and run it through its gate."""
    from starvit_assets.defs.deid_raw import deid_asset_key
    from starvit_assets.defs.extract import fhir_asset_key
    from starvit_assets.fhir.server import BulkDataServer
    from starvit_assets.settings import load_settings

    settings = load_settings()
    data = settings.phi_dir / "source"
    _synthesise(source, data)
    with BulkDataServer(data) as server:
        os.environ["STARVIT_FHIR_BASE_URL"] = server.base_url
        try:
            _run([fhir_asset_key("Patient"), fhir_asset_key("Consent"), deid_asset_key("patient")])
        finally:
            del os.environ["STARVIT_FHIR_BASE_URL"]
    return data


def _published_truth(folders: dict[str, Path]) -> dict[str, set[RecordKey]]:
    """The true persons over the records each gate published, by (source, pseudonymised id):
    a record whose research Consent denies never crosses its gate."""
    from starvit_assets.deid.engine import pseudonym
    from starvit_assets.fhir.synth import OPTED_OUT_CASE, load_consent_cases, load_person_clusters

    held_back = {
        (source, patient)
        for source, folder in folders.items()
        for patient, case in load_consent_cases(folder).items()
        if case == OPTED_OUT_CASE
    }
    keys = {source: bytes.fromhex(PSEUDONYMISATION_KEYS[source]) for source in folders}
    truth: dict[str, set[RecordKey]] = {}
    for person, records in load_person_clusters(*folders.values()).items():
        published = {
            (source, pseudonym(keys[source], "Patient", patient))
            for source, patient in records
            if (source, patient) not in held_back
        }
        if published:
            truth[person] = published
    return truth


@pytest.mark.usefixtures("restored_environ")
def test_two_deployments_link_in_the_research_zone(
    platform_env: PlatformEnv, warehouse_dsn: str, tmp_path: Path
) -> None:
    from starvit_assets import platform
    from starvit_assets.defs.linkage import MAP_TABLE, ROWS_CHECK, linkage_asset_key
    from starvit_assets.lake.partitions import PART_FILE
    from starvit_assets.linkage.match import pairwise_score
    from starvit_assets.settings import load_settings

    endpoints = platform.resolve_endpoints(load_settings())
    homes = {source: tmp_path / source for source in ("B", "A")}
    folders: dict[str, Path] = {}
    for source, home in homes.items():
        _deploy(source, home, endpoints)
        folders[source] = _gate(source, home)
    lake_b = homes["B"] / "lake"
    assert list((lake_b / "deid_raw" / "patient").glob(f"export_id=*/{PART_FILE}"))

    # The research zone is source A's deployment, with B's de-identified lake as a peer.
    _deploy("A", homes["A"], endpoints)
    os.environ["STARVIT_LINKAGE_PEER_LAKES"] = f"B={lake_b}"
    metadata = _run([linkage_asset_key()])
    rates = metadata[linkage_asset_key().to_user_string()]
    check = metadata[f"{linkage_asset_key().to_user_string()}:{ROWS_CHECK}"]

    schema = load_settings().raw_schema
    try:
        with psycopg.connect(warehouse_dsn) as connection:
            rows = connection.execute(
                sql.SQL("select person_key, source, patient_id, match_rule from {}").format(
                    sql.Identifier(schema, MAP_TABLE)
                )
            ).fetchall()
    finally:
        with psycopg.connect(warehouse_dsn) as connection:
            connection.execute(
                sql.SQL("drop table if exists {}").format(sql.Identifier(schema, MAP_TABLE))
            )

    truth = _published_truth(folders)
    predicted: dict[str, set[RecordKey]] = defaultdict(set)
    for person_key, source, patient_id, _ in rows:
        predicted[person_key].add((source, patient_id))
    # Every record each gate published has exactly one person, and nothing else does.
    mapped = [(source, patient_id) for _, source, patient_id, _ in rows]
    assert len(mapped) == len(set(mapped))
    assert set(mapped) == set().union(*truth.values())
    # Different pseudonymisation keys: no pseudonym of A is one of B's.
    by_source = Counter(source for source, _ in mapped)
    assert not {p for s, p in mapped if s == "A"} & {p for s, p in mapped if s == "B"}

    score = pairwise_score(predicted, truth)
    print(f"\nsources A and B through their gates: {score}")
    assert score.true_pairs > 20, "too few planted duplicates and shared persons to measure"
    assert score.precision >= MIN_PRECISION
    assert score.recall >= MIN_RECALL

    # The linkage rates in the materialization metadata describe this very map.
    several = sum(1 for members in predicted.values() if len({s for s, _ in members}) > 1)
    truly_several = sum(1 for members in truth.values() if len({s for s, _ in members}) > 1)
    assert (rates["patients"], rates["persons"], rates["sources"]) == (
        len(mapped),
        len(predicted),
        2,
    )
    assert rates["patients_by_source"] == dict(sorted(by_source.items()))
    assert rates["peer_lakes"] == {"B": str(lake_b.resolve())}
    assert rates["persons_in_several_sources"] == several
    assert several >= MIN_RECALL * truly_several > 0
    linked = sum(1 for _, _, _, rule in rows if rule != "none")
    assert rates["patients_linked"] == linked
    assert rates["share_linked"] == pytest.approx(linked / len(mapped), abs=1e-4)
    assert rates["linked_by_patient_link"] == 0  # the CLI plants no Patient.link
    token_rules = ("token_1", "token_2", "token_4", "token_3")
    assert sum(rates[f"linked_by_{rule}"] for rule in token_rules) == linked
    assert check["patients"] == check["rows"] == check["loaded"] == len(mapped)
