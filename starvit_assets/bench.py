"""``make bench``: the lineage stage by stage on a larger synthetic set, in its own STARVIT_HOME.

Each stage runs in a child process so that its peak memory (max RSS) is its own. DuckDB reads
the same staged NDJSON into Parquet with the same columns as the shipped views, as a yardstick
for the flatten-plus-de-identify stage.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from queue import Empty
from typing import Any

RESOURCE_TYPES = ("Patient", "Encounter", "Observation", "Condition", "MedicationRequest")

_CODING = '[{"system":"VARCHAR","code":"VARCHAR","display":"VARCHAR"}]'


def _coded(path: str, system: str, field: str) -> str:
    return (
        f"list_filter(from_json(json->'{path}'->'coding', '{_CODING}'), "
        f"lambda c: c.system = '{system}')[1].{field}"
    )


def _ref(path: str, resource_type: str) -> str:
    return f"regexp_extract(json->>'$.{path}.reference', '^{resource_type}/(.+)$', 1)"


_COMMON = "json->>'$.id' as id, json->>'$.meta.versionId' as version_id, json->>'$.meta.lastUpdated' as last_updated"
_SNOMED = "http://snomed.info/sct"
_ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
_RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"

DUCKDB_VIEWS: dict[str, tuple[str, str]] = {
    "patient": (
        "Patient",
        f"""{_COMMON}, json->>'$.gender' as gender, json->>'$.birthDate' as birth_date,
        json->>'$.address[0].postalCode' as postal_code,
        cast(json->'$.deceasedBoolean' as boolean) as deceased""",
    ),
    "encounter": (
        "Encounter",
        f"""{_COMMON}, {_ref("subject", "Patient")} as patient_id, json->>'$.status' as status,
        json->>'$.class.code' as class_code, json->>'$.type[0].coding[0].system' as type_system,
        json->>'$.type[0].coding[0].code' as type_code, json->>'$.period.start' as period_start,
        json->>'$.period.end' as period_end""",
    ),
    "observation": (
        "Observation",
        f"""{_COMMON}, {_ref("subject", "Patient")} as patient_id,
        {_ref("encounter", "Encounter")} as encounter_id, json->>'$.status' as status,
        json->>'$.category[0].coding[0].code' as category_code,
        json->>'$.code.coding[0].system' as code_system, json->>'$.code.coding[0].code' as code,
        json->>'$.code.coding[0].display' as code_display,
        cast(json->'$.valueQuantity.value' as double) as value_quantity,
        json->>'$.valueQuantity.unit' as value_unit, json->>'$.valueQuantity.system' as value_unit_system,
        json->>'$.valueQuantity.code' as value_unit_code,
        json->>'$.effectiveDateTime' as effective_datetime""",
    ),
    "condition": (
        "Condition",
        f"""{_COMMON}, {_ref("subject", "Patient")} as patient_id,
        {_ref("encounter", "Encounter")} as encounter_id,
        json->>'$.clinicalStatus.coding[0].code' as clinical_status,
        json->>'$.verificationStatus.coding[0].code' as verification_status,
        {_coded("code", _SNOMED, "code")} as snomed_code, {_coded("code", _SNOMED, "display")} as snomed_display,
        {_coded("code", _ICD10, "code")} as icd10_code, {_coded("code", _ICD10, "display")} as icd10_display,
        json->>'$.onsetDateTime' as onset_datetime, json->>'$.recordedDate' as recorded_date""",
    ),
    "medication_request": (
        "MedicationRequest",
        f"""{_COMMON}, {_ref("subject", "Patient")} as patient_id,
        {_ref("encounter", "Encounter")} as encounter_id, json->>'$.status' as status,
        json->>'$.intent' as intent,
        {_coded("medicationCodeableConcept", _RXNORM, "code")} as rxnorm_code,
        {_coded("medicationCodeableConcept", _RXNORM, "display")} as medication_display,
        json->>'$.authoredOn' as authored_on""",
    ),
}


@dataclass(frozen=True)
class StageResult:
    stage: str
    seconds: float
    items: int
    items_per_second: float
    peak_rss_mib: float
    # CPU time of the stage and of its workers: on a shared machine, wall time alone says
    # more about the neighbours than about the code.
    cpu_seconds: float


def _in_child(
    stage: str, work: Callable[[], int], queue: multiprocessing.Queue
) -> None:  # pragma: no cover - runs in the child process
    started = time.perf_counter()
    cpu_started = _cpu_seconds()
    try:
        items = work()
    except Exception as error:
        # The parent waits on the queue: a stage that dies must still answer.
        queue.put(f"{type(error).__name__}: {error}")
        raise
    seconds = time.perf_counter() - started
    cpu_seconds = _cpu_seconds() - cpu_started
    # The largest process: the stage itself or one of its workers.
    peak_kib = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    queue.put(
        StageResult(
            stage=stage,
            seconds=round(seconds, 3),
            items=items,
            items_per_second=round(items / seconds, 1) if seconds else 0.0,
            peak_rss_mib=round(peak_kib / 1024, 1),
            cpu_seconds=round(cpu_seconds, 3),
        )
    )


def _cpu_seconds() -> float:
    """User and system time of this process and of its finished children."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _gate_table(name: str, export_dir: Path, settings: Any, workers: int = 1) -> str:
    import datetime as dt

    from starvit_assets.deid.engine import LocalDeidEngine
    from starvit_assets.deid.policy import load_policy
    from starvit_assets.lake.gate import build_gate
    from starvit_assets.lake.partitions import QUARANTINE_LAYER, RawLake
    from starvit_assets.views.runner import shipped_views

    view = shipped_views()[name]
    policy = load_policy()
    gate = build_gate(
        table_name=name,
        view=view,
        backend=LocalDeidEngine(settings.key, policy, reference_date=dt.date.today()),
        policy=policy,
        key=settings.key,
        export_date=dt.date.today(),
        workers=workers,
    )
    lake = RawLake(settings.lake_root)
    quarantine = RawLake(settings.lake_root, layer=QUARANTINE_LAYER)
    result = gate.run(
        sorted(export_dir.glob(f"{view['resource']}*.ndjson")),
        "bench",
        lake.prepare_staging(name, "bench"),
        quarantine.prepare_staging(name, "bench"),
    )
    if not result.reconciles():
        raise RuntimeError(f"{name}: the gate's counts do not reconcile")
    if result.flattened_by != "vectorized":
        raise RuntimeError(f"{name}: flattened by the general evaluator, not the vectorized path")
    quarantine.publish(name, "bench")
    lake.publish(name, "bench")
    return name


def gate_tables(export_dir: Path, settings: Any, counts: dict[str, int]) -> int:
    """Flatten and de-identify the tables DuckDB reads too (the same input); the resources read.

    As Dagster's multiprocess executor runs the deid_raw steps: one process a table, as many at
    once as there are cores, the biggest first; inside each, the gate spreads a table of more
    than one batch over every core too, so the Observation table (most of the data) does not
    leave a core idle while the small tables finish.
    """
    from concurrent.futures import ProcessPoolExecutor

    from starvit_assets.lake.gate import _frozen_heap

    _warm_up()
    cores = os.cpu_count() or 1
    tables = sorted(DUCKDB_VIEWS, key=lambda name: -counts.get(DUCKDB_VIEWS[name][0], 0))
    with (
        _frozen_heap(),
        ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("fork")) as pool,
    ):
        for name in pool.map(
            _gate_table,
            tables,
            [export_dir] * len(tables),
            [settings] * len(tables),
            [cores] * len(tables),
        ):
            print(f"    {name} published", flush=True)
    return sum(counts.get(DUCKDB_VIEWS[name][0], 0) for name in tables)


def _warm_up() -> None:
    """What every process pays once, paid once before the fork instead of once a table: the
    imports, and Arrow's first zstd Parquet writer (about 0.2 s)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import starvit_assets.lake.gate  # noqa: F401

    pq.write_table(pa.table({"warm": [1]}), pa.BufferOutputStream(), compression="zstd")


def run_stage(stage: str, work: Callable[[], int]) -> StageResult:
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue = context.Queue()
    process = context.Process(target=_in_child, args=(stage, work, queue))
    process.start()
    answer: StageResult | str | None = None
    while answer is None:
        try:
            answer = queue.get(timeout=1)
        except Empty:
            if not process.is_alive():
                answer = f"exited with code {process.exitcode} without a result"
    process.join()
    if isinstance(answer, str):
        raise RuntimeError(f"bench stage {stage} failed: {answer}")
    result = answer
    print(
        f"  {stage:<22} {result.seconds:>8.2f} s  {result.items_per_second:>12,.0f} items/s  "
        f"cpu {result.cpu_seconds:>7.2f} s  peak {result.peak_rss_mib:>7.1f} MiB",
        flush=True,
    )
    return result


def run_bench(*, patients: int, out: Path, seed: int, lineage: bool = True) -> int:
    from starvit_assets import platform
    from starvit_assets.settings import REPO_ROOT, load_settings

    home = Path(os.environ.get("STARVIT_BENCH_HOME", REPO_ROOT / ".starvit" / "bench")).resolve()
    os.environ["STARVIT_HOME"] = str(home)
    for variable in ("STARVIT_SOURCE_DIR", "STARVIT_FHIR_BASE_URL", "STARVIT_LAKE_DIR"):
        os.environ.pop(variable, None)
    settings = load_settings()
    for folder in (settings.phi_dir, settings.lake_root, settings.graph_dir):
        shutil.rmtree(folder, ignore_errors=True)
    platform.ensure_dirs(settings)
    endpoints = platform.activate(settings)
    source = settings.embedded_source_dir
    export_dir = settings.phi_staging_dir / "bench"
    duck_dir = settings.home / "duckdb"
    print(f"starvit bench: {patients} patients in {home}")

    from starvit_assets.fhir.synth import generate

    counts: dict[str, int] = {}

    def synth() -> int:
        return sum(generate(source, patients=patients, seed=seed).values())

    def export() -> int:
        from starvit_assets.fhir.client import BulkDataClient
        from starvit_assets.fhir.server import BulkDataServer

        with BulkDataServer(source) as server:
            result = BulkDataClient(server.base_url).export(export_dir)
        return sum(result.counts.values())

    results = [run_stage("synth", synth), run_stage("export", export)]
    for resource_type in RESOURCE_TYPES:
        with (export_dir / f"{resource_type}.ndjson").open("rb") as handle:
            counts[resource_type] = sum(1 for _ in handle)
    total = sum(counts.values())

    def flatten_deidentify() -> int:
        return gate_tables(export_dir, settings, counts)

    def duckdb_read() -> int:
        import duckdb

        duck_dir.mkdir(parents=True, exist_ok=True)
        connection = duckdb.connect()
        for name, (resource_type, columns) in DUCKDB_VIEWS.items():
            source_file = export_dir / f"{resource_type}.ndjson"
            connection.execute(
                f"copy (select {columns} from read_ndjson_objects('{source_file}')) "
                f"to '{duck_dir / name}.parquet' (format parquet, compression zstd)"
            )
        return total

    def full_lineage() -> int:
        # The whole platform as Dagster runs it (export, gate, load, linkage, terminology, dbt
        # build with its tests, graph), over a clean lake so the gate stage's partitions above
        # are not loaded twice, and a clean warehouse so an earlier bench's rows are not kept.
        import psycopg
        from psycopg import sql

        from starvit_assets.demo import materialize_all

        shutil.rmtree(settings.lake_root, ignore_errors=True)
        layers = ("raw", "staging", "refined", "derived", "reference", "snapshots")
        with psycopg.connect(endpoints.warehouse_dsn, autocommit=True) as connection:
            for layer in layers:
                connection.execute(
                    sql.SQL("drop schema if exists {} cascade").format(
                        sql.Identifier(settings.schema_name(layer))
                    )
                )
        log = settings.home / "logs" / "bench-lineage.log"
        summary = materialize_all(settings, log_path=log)
        if not summary.success:
            raise RuntimeError(f"the full lineage failed in {summary.failed_steps}; see {log}")
        return total

    flatten = run_stage("flatten+deidentify", flatten_deidentify)
    duck = run_stage("duckdb ndjson->parquet", duckdb_read)
    results += [flatten, duck]
    if lineage:
        results.append(run_stage("full lineage (Dagster)", full_lineage))

    ratio = round(flatten.seconds / duck.seconds, 2) if duck.seconds else None
    report: dict[str, Any] = {
        "patients": patients,
        "resources": total,
        "resources_by_type": counts,
        "stages": [asdict(result) for result in results],
        "flatten_deidentify_resources_per_second": flatten.items_per_second,
        "duckdb_resources_per_second": duck.items_per_second,
        "flatten_deidentify_to_duckdb_time_ratio": ratio,
        "flatten_deidentify_to_duckdb_cpu_ratio": (
            round(flatten.cpu_seconds / duck.cpu_seconds, 2) if duck.cpu_seconds else None
        ),
        "cpu_count": os.cpu_count(),
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"flatten+de-identify: {flatten.items_per_second:,.0f} resources/s; {ratio}x DuckDB's time"
    )
    print(f"wrote {out}")
    return 0
