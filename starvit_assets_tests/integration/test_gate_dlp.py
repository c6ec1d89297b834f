"""The whole gate with the Cloud DLP backend: synthetic FHIR through ``Gate.run`` with
``DlpDeidBackend`` (the real client library over REST, against the local DLP endpoint) gives
the partition the local engine gives, apart from DLP's own date offsets, and passes every
blocking check."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow.compute as pc
import pytest

from starvit_assets.deid.dlp import DlpDeidBackend, DlpLimits, UnwrappedKey
from starvit_assets.deid.engine import DeidBackend, LocalDeidEngine
from starvit_assets.deid.leak import LeakHashSet
from starvit_assets.deid.policy import load_policy
from starvit_assets.fhir.synth import generate
from starvit_assets.lake.contracts import CONTRACTS, validate_file
from starvit_assets.lake.gate import GateResult, build_gate, published_schema, reconcile
from starvit_assets.linkage.tokens import with_linkage_tokens
from starvit_assets.views.runner import shipped_views
from starvit_assets_tests.fakes.dlp_endpoint import FakeDlpEndpoint

pytestmark = pytest.mark.integration

KEY = bytes(range(32))
LINKAGE_KEY = b"linkage-key-for-the-gate-dlp-test"
EXPORT_DATE = dt.date(2026, 6, 15)
# The production schedule, shortened: tests must not wait.
FAST = DlpLimits(
    requests_per_minute=60_000, initial_backoff_seconds=0.001, max_backoff_seconds=0.01
)
RESOURCE_TYPES = {"patient": "Patient", "observation": "Observation"}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("source")
    generate(folder, patients=8, seed=21)
    return folder


@pytest.fixture
def dlp() -> Iterator[FakeDlpEndpoint]:
    with FakeDlpEndpoint() as endpoint:
        yield endpoint


def _gate_run(source: Path, out: Path, table: str, backend: DeidBackend) -> GateResult:
    policy = load_policy()
    gate = build_gate(
        table_name=table,
        view=shipped_views()[table],
        backend=with_linkage_tokens(backend, policy, lambda: LINKAGE_KEY),
        policy=policy,
        key=KEY,
        export_date=EXPORT_DATE,
    )
    out.mkdir()
    files = [source / f"{RESOURCE_TYPES[table]}.ndjson"]
    return gate.run(files, "export-dlp", out / "part.parquet", out / "quarantine.parquet")


@pytest.mark.parametrize("table", sorted(RESOURCE_TYPES))
def test_the_gate_with_cloud_dlp_publishes_what_the_local_engine_does(
    source: Path, tmp_path: Path, dlp: FakeDlpEndpoint, table: str
) -> None:
    policy = load_policy()
    cloud_backend = DlpDeidBackend(
        dlp.client(),
        project="starvit-test",
        key=UnwrappedKey(KEY),
        policy=policy,
        reference_date=EXPORT_DATE,
        limits=FAST,
    )
    cloud = _gate_run(source, tmp_path / "dlp", table, cloud_backend)
    local = _gate_run(
        source,
        tmp_path / "local",
        table,
        LocalDeidEngine(KEY, policy, reference_date=EXPORT_DATE),
    )

    assert dlp.requests and {request.status for request in dlp.requests} == {200}
    assert cloud.table.schema == local.table.schema
    assert (cloud.rows, cloud.rows_quarantined, cloud.held_back) == (
        local.rows,
        local.rows_quarantined,
        local.held_back,
    )
    # Pseudonyms, generalisations, kept values, lineage and linkage tokens are the same; only
    # the date offsets are DLP's own.
    shifted = {
        name for name, rule in policy.table(table).columns.items() if rule.method == "date_shift"
    }
    for name in cloud.table.column_names:
        if name not in shifted:
            assert cloud.table.column(name).equals(local.table.column(name)), name
    for name in shifted:
        assert cloud.table.column(name).null_count == local.table.column(name).null_count

    # Every blocking check passes on the DLP partition.
    expected = published_schema(
        table, shipped_views()[table], with_linkage_tokens(cloud_backend, policy, lambda: b"")
    )
    assert validate_file(CONTRACTS[table], cloud.output, expected) == []
    lines = sum(1 for line in (source / f"{RESOURCE_TYPES[table]}.ndjson").open() if line.strip())
    found = reconcile(cloud.counts(), lines, cloud.output, cloud.quarantine_output)
    assert found.passed, found.problems
    leak_hashes = LeakHashSet(KEY)
    patients = (source / "Patient.ndjson").read_text().splitlines()
    for line in patients:
        leak_hashes.add_patient(json.loads(line))
    assert leak_hashes.find_leaks_in_parquet(cloud.output) == []
    assert leak_hashes.find_leaks_in_parquet(cloud.quarantine_output) == []

    # Names feed the linkage tokens in this process; they never go to DLP.
    sent = json.dumps([request.payload for request in dlp.requests])
    family_names = {
        name["family"] for line in patients for name in json.loads(line).get("name", [])
    }
    assert family_names and not any(f'"{family}"' in sent for family in family_names)
    if table == "patient":
        assert pc.count(cloud.table.column("link_token_1")).as_py() > 0
