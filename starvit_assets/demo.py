"""``starvit demo``: the whole lineage, headless, on synthetic or a user's own NDJSON.

Materializes every asset into the persistent Dagster instance (so the run shows in the UI
afterwards) and prints what was built, row counts, check outcomes and where outputs are.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from starvit_assets import platform
from starvit_assets.settings import DBT_PROJECT_DIR, StarvitSettings, load_settings

if TYPE_CHECKING:
    from dagster import AssetKey, DagsterInstance

SOURCE_MARKER = ".starvit-synth.json"


@dataclass
class RunSummary:
    success: bool
    run_id: str = ""
    materialized: list[str] = field(default_factory=list)
    checks_passed: list[str] = field(default_factory=list)
    checks_failed: list[str] = field(default_factory=list)
    # Non-blocking checks that did not pass (severity WARN): reported, not a failed run.
    checks_warned: list[str] = field(default_factory=list)
    failed_steps: list[str] = field(default_factory=list)
    # The last materialization metadata of each asset, and evaluation metadata of each check,
    # as plain values (counts and shares: the assets put no identifying value there).
    asset_metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    check_metadata: dict[str, dict[str, Any]] = field(default_factory=dict)


# Share of synthetic persons given a second, unlinked Patient record (docs/linkage.md): the
# demo's person linkage has duplicates to find; persons.json beside the data has the truth.
DEMO_DUPLICATE_RATE = 0.1
# The only faults planted in the demo data (truth.json): a linked duplicate record (Patient.link,
# replaced-by or seealso) for one person in ten, and a few unknown LOINC codes for the
# terminology check (a handful among thousands of coded rows: docs/terminology.md).
DEMO_FAULT_RATES = {"duplicate_person": 0.1, "unknown_code": 0.002}
LINKAGE_ASSET = "linkage/person_patient_map"
TERMINOLOGY_CHECK = "terminology/code_validation:valid_code_share"


def ensure_source_data(settings: StarvitSettings, *, patients: int, seed: int) -> Path:
    """Synthetic NDJSON in the embedded source folder, regenerated only when asked for other data."""
    from starvit_assets.fhir.synth import generate

    folder = settings.embedded_source_dir
    # "consents": data generated before synth wrote Consent resources is regenerated.
    wanted = {
        "patients": patients,
        "seed": seed,
        "duplicate_rate": DEMO_DUPLICATE_RATE,
        "fault_rates": DEMO_FAULT_RATES,
        "consents": True,
    }
    marker = folder / SOURCE_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    generate(
        folder,
        patients=patients,
        seed=seed,
        fault_rates=DEMO_FAULT_RATES,
        duplicate_rate=DEMO_DUPLICATE_RATE,
    )
    marker.write_text(json.dumps(wanted))
    return folder


def materialize_all(
    settings: StarvitSettings,
    log_path: Path | None = None,
    asset_keys: Sequence[AssetKey] | None = None,
    incremental: bool = False,
    instance: DagsterInstance | None = None,
) -> RunSummary:
    """Run the ``full_lineage`` job in process against the persistent instance.

    The exports run as a full refresh into today's partition, so every run sees the whole
    source folder, whatever its resources' ``meta.lastUpdated``; with ``incremental``, the
    export asks only for what changed since the last one (and gets the deletions since
    then). With ``log_path``, the run's console output (Dagster's and dbt's) goes to that
    file; with ``asset_keys``, only those assets (and their checks) run; with ``instance``,
    the run is recorded there instead of in the persistent instance.
    """
    from dagster import AssetCheckSeverity, DagsterEventType, DagsterInstance

    from starvit_assets.definitions import defs
    from starvit_assets.defs.extract import (
        FULL_REFRESH_EXPORT,
        INCREMENTAL_EXPORT,
        current_partition_key,
    )

    job = defs.resolve_job_def("full_lineage")
    run_config: dict[str, object] = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
    if asset_keys is None or any(key.path[0] == "fhir" for key in asset_keys):
        run_config.update(INCREMENTAL_EXPORT if incremental else FULL_REFRESH_EXPORT)
    with ExitStack() as stack:
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_file = stack.enter_context(log_path.open("w"))
            stack.enter_context(redirect_stdout(log_file))
            stack.enter_context(redirect_stderr(log_file))
            stack.enter_context(_root_logging_to(log_file))
        if instance is None:
            instance = stack.enter_context(DagsterInstance.get())
        result = job.execute_in_process(
            instance=instance,
            raise_on_error=False,
            run_config=run_config,
            partition_key=current_partition_key(),
            asset_selection=list(asset_keys) if asset_keys else None,
        )
    summary = RunSummary(success=result.success, run_id=result.run_id)
    for event in result.all_events:
        if event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            materialization = event.step_materialization_data.materialization
            name = materialization.asset_key.to_user_string()
            summary.materialized.append(name)
            summary.asset_metadata[name] = _plain(materialization.metadata)
        elif event.event_type == DagsterEventType.ASSET_CHECK_EVALUATION:
            evaluation = event.asset_check_evaluation_data
            name = f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}"
            summary.check_metadata[name] = _plain(evaluation.metadata)
            if evaluation.passed:
                summary.checks_passed.append(name)
            elif evaluation.severity == AssetCheckSeverity.WARN:
                summary.checks_warned.append(name)
            else:
                summary.checks_failed.append(name)
        elif event.event_type == DagsterEventType.STEP_FAILURE and event.step_key:
            summary.failed_steps.append(event.step_key)
    return summary


def _plain(metadata: Mapping[str, Any]) -> dict[str, Any]:
    return {key: getattr(value, "value", value) for key, value in metadata.items()}


@contextmanager
def _root_logging_to(stream: IO[str]) -> Iterator[None]:
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = [logging.StreamHandler(stream)]
    try:
        yield
    finally:
        root.handlers = saved


def warehouse_row_counts(dsn: str, schemas: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    with psycopg.connect(dsn) as connection:
        tables = connection.execute(
            "select table_schema, table_name from information_schema.tables "
            "where table_schema = any(%s) order by 1, 2",
            (schemas,),
        ).fetchall()
        for schema, table in tables:
            row = connection.execute(
                sql.SQL("select count(*) from {}").format(sql.Identifier(schema, table))
            ).fetchone()
            counts[f"{schema}.{table}"] = int(row[0]) if row else 0
    return counts


def run_demo(*, data: Path | None, patients: int, seed: int) -> int:
    from starvit_assets.fhir.server import BulkDataServer

    if data is not None:
        os.environ["STARVIT_SOURCE_DIR"] = str(data)
    settings = load_settings()
    platform.ensure_dirs(settings)
    print(f"starvit demo: state folder {settings.home}")
    endpoints = platform.activate(settings)
    print("  embedded PostgreSQL ready" if not settings.warehouse_dsn else "  warehouse reachable")
    if data is None:
        source = ensure_source_data(settings, patients=patients, seed=seed)
        from starvit_assets.fhir.synth import OPTED_OUT_CASE, load_consent_cases

        opted_out = sum(case == OPTED_OUT_CASE for case in load_consent_cases(source).values())
        print(
            f"  synthetic FHIR data: {patients} patients (seed {seed}); {opted_out} opted out "
            "of research in a Consent: the gate holds their records back"
        )
    else:
        source = data
        print(f"  your FHIR data: {source}")

    with BulkDataServer(source) as server:
        os.environ["STARVIT_FHIR_BASE_URL"] = server.base_url
        print(f"  local Bulk Data server at {server.base_url}")
        log_path = settings.home / "logs" / f"demo-{time.strftime('%Y%m%dT%H%M%S')}.log"
        print(f"  materializing the whole asset graph (run log: {log_path}) ...")
        summary = materialize_all(load_settings(), log_path)

    counts = warehouse_row_counts(
        endpoints.warehouse_dsn,
        [settings.schema_name(layer) for layer in ("raw", "refined", "derived")],
    )
    _print_summary(settings, summary, counts, endpoints.warehouse_dsn)
    return 0 if summary.success and not summary.checks_failed else 1


def _print_summary(
    settings: StarvitSettings, summary: RunSummary, counts: dict[str, int], dsn: str
) -> None:
    by_zone = Counter(key.split("/")[0] for key in summary.materialized)
    print()
    print(f"Run {summary.run_id} {'succeeded' if summary.success else 'FAILED'}")
    print(
        f"Assets materialized: {len(set(summary.materialized))}  ({', '.join(f'{z} {n}' for z, n in sorted(by_zone.items()))})"
    )
    print(
        f"Checks passed: {len(summary.checks_passed)}   warned: {len(summary.checks_warned)}"
        f"   failed: {len(summary.checks_failed)}"
    )
    for name in summary.checks_warned:
        print(f"  warning from check {name} (non-blocking; see its metadata in the UI)")
    for name in summary.checks_failed:
        print(f"  FAILED check {name}")
    for step in summary.failed_steps:
        print(f"  FAILED step {step}")
    for line in linkage_summary(summary.asset_metadata.get(LINKAGE_ASSET, {})):
        print(line)
    for line in terminology_summary(summary.check_metadata.get(TERMINOLOGY_CHECK, {})):
        print(line)
    print("Rows per table:")
    for table, count in counts.items():
        print(f"  {table:<45} {count:>9}")
    print("Outputs:")
    print(f"  raw Parquet lake      {settings.lake_root}")
    print(f"  graph loading files   {settings.graph_dir / 'load'}")
    print(f"  dbt project           {DBT_PROJECT_DIR}")
    print(f"  warehouse DSN         {dsn}")
    print("Open the UI: make dev   (then http://127.0.0.1:3000)")


def linkage_summary(metadata: Mapping[str, Any]) -> list[str]:
    """The linkage rates of the person map's materialization, as summary lines."""
    if "patients" not in metadata:
        return []
    lines = [
        f"Record linkage: {metadata['patients']} patient records -> {metadata['persons']} "
        f"persons; {metadata['patients_linked']} records linked "
        f"({metadata['share_linked']:.1%}), {metadata['sources']} source(s)"
    ]
    rules = [
        f"{name.removeprefix('linked_by_')} {count}"
        for name, count in metadata.items()
        if name.startswith("linked_by_")
    ]
    lines.append(f"  linked by rule: {', '.join(rules)}")
    return lines


def terminology_summary(metadata: Mapping[str, Any]) -> list[str]:
    """The valid-code share per code system of the terminology check, as summary lines."""
    by_system = metadata.get("by_code_system")
    if not by_system:
        return []
    lines = ["Valid codes per code system (terminology check):"]
    for system, share in by_system.items():
        known = "" if share["system_known"] else "  (unknown system)"
        lines.append(
            f"  {system:<45} {share['valid_share']:>7.2%} of {share['coded_rows']} coded rows"
            f"{known}"
        )
    return lines
