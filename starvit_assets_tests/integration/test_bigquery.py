"""BigQuery, offline: the loader with the real google-cloud-bigquery and google-cloud-storage
clients, and ``dbt compile --target bigquery`` of the whole project, both against the local
endpoint in ``starvit_assets_tests/fakes/bigquery_endpoint.py``.

What this proves is the shape of what is sent (job configurations, SQL, parameters, table
schemas) and that the compiled models are BigQuery SQL; what only a real project can prove is
listed in docs/warehouse.md ("BigQuery: what the local tests verify").
"""

from __future__ import annotations

import contextvars
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from google.auth.credentials import AnonymousCredentials

from starvit_assets.lake.partitions import RawLake
from starvit_assets.warehouse.bigquery import (
    BigQueryLoader,
    GcsLake,
    create_bigquery_client,
    create_storage_client,
    upload_partition,
)
from starvit_assets.warehouse.loader import LoadError
from starvit_assets_tests.fakes.bigquery_endpoint import (
    FakeBigQueryEndpoint,
    write_service_account_key,
)

pytestmark = pytest.mark.integration

PROJECT = "starvit-ci"
BUCKET = "starvit-ci-lake"
RAW = "sv_dev_raw"
# Dots and dashes, as real export ids have: they must reach BigQuery only as a parameter.
EXPORT_1 = "2026-06-01T00.00.00-a1"
EXPORT_2 = "2026-06-02T00.00.00-b2"
REPO = Path(__file__).resolve().parents[2]
DBT_PROJECT = REPO / "dbt_project"
DBT = shutil.which("dbt", path=str(Path(sys.executable).parent)) or shutil.which("dbt")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


needs_dbt = pytest.mark.skipif(
    DBT is None or not _installed("dbt.adapters.bigquery"),
    reason="dbt-core with dbt-bigquery is not installed",
)
_JOB_ID = re.compile(r"/starvit_\w+_[0-9a-f-]{36}$")
# A proxy nobody listens on: anything but the local endpoint fails instead of reaching Google.
# Both spellings, because the lower-case one wins where both are set.
_NO_INTERNET = {
    spelling: value
    for name, value in {
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "127.0.0.1,localhost",
    }.items()
    for spelling in (name, name.lower())
}


@pytest.fixture(autouse=True)
def _no_internet(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in _NO_INTERNET.items():
        monkeypatch.setenv(name, value)


# -- the loader --------------------------------------------------------------------------------


@dataclass
class Warehouse:
    endpoint: FakeBigQueryEndpoint
    loader: BigQueryLoader
    lake: GcsLake
    local: RawLake
    storage: Any

    def publish(self, table: str, export_id: str, data: pa.Table) -> Path:
        """Publishes a partition in the local lake and uploads it, as the pipeline does."""
        self.local.stage(table, export_id, data)
        path = self.local.publish(table, export_id)
        upload_partition(self.storage, self.lake, table, export_id, path)
        return path

    def raw_fields(self, table: str = "things") -> list[dict[str, Any]]:
        found = self.endpoint.table(PROJECT, RAW, table)
        assert found is not None
        return list(found["schema"]["fields"])


@pytest.fixture()
def warehouse(tmp_path: Path) -> Iterator[Warehouse]:
    with FakeBigQueryEndpoint(location="EU") as endpoint:
        client = create_bigquery_client(
            PROJECT, location="EU", credentials=AnonymousCredentials(), api_endpoint=endpoint.url
        )
        storage = create_storage_client(
            PROJECT, credentials=AnonymousCredentials(), api_endpoint=endpoint.url
        )
        lake = GcsLake(BUCKET, "lake")
        yield Warehouse(
            endpoint=endpoint,
            loader=BigQueryLoader(client, lake, env="dev"),
            lake=lake,
            local=RawLake(tmp_path / "lake"),
            storage=storage,
        )


def _partition(export_id: str, ids: list[str], **extra: pa.Array) -> pa.Table:
    columns: dict[str, pa.Array] = {
        "thing_id": pa.array(ids),
        "amount": pa.array([1.5] * len(ids)),
        "_export_id": pa.array([export_id] * len(ids)),
    }
    columns.update(extra)
    return pa.table(columns)


def _statements(sql: str) -> list[str]:
    return [" ".join(part.split()) for part in sql.split(";") if part.strip()]


def _bigquery_calls(endpoint: FakeBigQueryEndpoint) -> list[str]:
    """``METHOD route`` of each BigQuery request, job ids (random) replaced by ``JOB``."""
    calls = []
    for request in endpoint.requests:
        if request.path.startswith("/bigquery/v2/projects/"):
            route = _JOB_ID.sub("/JOB", request.path.split("/", 5)[5])
            calls.append(f"{request.method} {route}")
    return calls


def test_load_job_then_one_parameterised_transaction_then_staging_dropped(
    warehouse: Warehouse,
) -> None:
    warehouse.publish("things", EXPORT_1, _partition(EXPORT_1, ["a", "b", "c"]))

    result = warehouse.loader.load_partition("things", EXPORT_1)

    assert (result.table, result.export_id, result.rows, result.added_columns) == (
        "things",
        EXPORT_1,
        3,
        (),
    )
    endpoint = warehouse.endpoint
    (load,) = [job["load"] for job in endpoint.jobs("load")]
    staging = load["destinationTable"]["tableId"]
    assert staging.startswith("_staging__things__")
    assert load == {
        "sourceFormat": "PARQUET",
        "sourceUris": [
            f"gs://{BUCKET}/lake/deid_raw/things/export_id={EXPORT_1}/part-00000.parquet"
        ],
        "destinationTable": {"projectId": PROJECT, "datasetId": RAW, "tableId": staging},
        "writeDisposition": "WRITE_TRUNCATE",
        "createDisposition": "CREATE_IF_NEEDED",
        "parquetOptions": {"enableListInference": True},
        "decimalTargetTypes": ["NUMERIC", "BIGNUMERIC"],
    }
    (query,) = [job["query"] for job in endpoint.jobs("query")]
    assert query["useLegacySql"] is False
    assert query["parameterMode"] == "NAMED"
    assert query["queryParameters"] == [
        {
            "name": "export_id",
            "parameterType": {"type": "STRING"},
            "parameterValue": {"value": EXPORT_1},
        }
    ]
    assert EXPORT_1 not in query["query"], "the export id must travel as a parameter"
    target = f"`{PROJECT}.{RAW}.things`"
    source = f"`{PROJECT}.{RAW}.{staging}`"
    statements = _statements(query["query"])
    transaction = statements[statements.index("BEGIN BEGIN TRANSACTION") :]
    assert transaction[:4] == [
        "BEGIN BEGIN TRANSACTION",
        f"DELETE FROM {target} WHERE _export_id = @export_id",
        f"INSERT INTO {target} (`thing_id`, `amount`, `_export_id`, _loaded_at) "
        f"SELECT `thing_id`, `amount`, `_export_id`, CURRENT_TIMESTAMP() FROM {source}",
        "COMMIT TRANSACTION",
    ]
    assert transaction[4:] == ["EXCEPTION WHEN ERROR THEN ROLLBACK TRANSACTION", "RAISE", "END"]
    assert statements[0].startswith(f"ASSERT NOT EXISTS ( SELECT 1 FROM {source} WHERE")

    # The order is the guarantee: nothing touches the raw table before the partition is
    # staged and its schema checked, and the staged copy does not outlive the load.
    assert _bigquery_calls(endpoint) == [
        f"GET datasets/{RAW}",
        "POST datasets",
        "POST jobs",
        f"GET datasets/{RAW}/tables/{staging}",
        f"GET datasets/{RAW}/tables/things",
        f"POST datasets/{RAW}/tables",
        "POST jobs",
        "GET queries/JOB",
        f"DELETE datasets/{RAW}/tables/{staging}",
    ]
    assert endpoint.table(PROJECT, RAW, staging) is None
    dataset = endpoint.dataset(PROJECT, RAW)
    assert dataset is not None and dataset["location"] == "EU"
    raw = endpoint.table(PROJECT, RAW, "things")
    assert raw is not None
    assert raw["schema"]["fields"] == [
        {"name": "thing_id", "type": "STRING", "mode": "NULLABLE"},
        {"name": "amount", "type": "FLOAT", "mode": "NULLABLE"},
        {"name": "_export_id", "type": "STRING", "mode": "NULLABLE"},
        {"name": "_loaded_at", "type": "TIMESTAMP", "mode": "REQUIRED"},
    ]
    assert raw["clustering"] == {"fields": ["_export_id"]}


def test_loading_the_same_export_again_issues_the_same_replace(warehouse: Warehouse) -> None:
    warehouse.publish("things", EXPORT_1, _partition(EXPORT_1, ["a", "b"]))
    warehouse.publish("things", EXPORT_2, _partition(EXPORT_2, ["c"]))
    warehouse.loader.load_partition("things", EXPORT_1)
    schema_after_first = warehouse.raw_fields()
    warehouse.loader.load_partition("things", EXPORT_2)

    again = warehouse.loader.load_partition("things", EXPORT_1)

    assert again.rows == 2 and again.added_columns == ()
    first_load, first_replace, _, other_replace, load, replace = warehouse.endpoint.jobs()
    assert (load, replace) == (first_load, first_replace)
    assert other_replace["query"]["queryParameters"][0]["parameterValue"] == {"value": EXPORT_2}
    assert warehouse.raw_fields() == schema_after_first
    calls = _bigquery_calls(warehouse.endpoint)
    assert calls.count(f"POST datasets/{RAW}/tables") == 1
    assert not [call for call in calls if call.startswith("PATCH")]
    assert warehouse.endpoint.table_names(PROJECT, RAW) == ["things"]


def test_a_new_column_is_added_as_nullable_and_inserted(warehouse: Warehouse) -> None:
    warehouse.publish("things", EXPORT_1, _partition(EXPORT_1, ["a", "b"]))
    warehouse.loader.load_partition("things", EXPORT_1)
    # A non-nullable Arrow field stages as REQUIRED; the raw table must still take NULLABLE,
    # because the rows already loaded have no value for it.
    wider = _partition(EXPORT_2, ["c"]).append_column(
        pa.field("colour", pa.string(), nullable=False), pa.array(["red"])
    )
    warehouse.publish("things", EXPORT_2, wider)

    result = warehouse.loader.load_partition("things", EXPORT_2)

    assert result.added_columns == ("colour",)
    assert warehouse.raw_fields()[-2:] == [
        {"name": "_loaded_at", "type": "TIMESTAMP", "mode": "REQUIRED"},
        {"name": "colour", "type": "STRING", "mode": "NULLABLE"},
    ]
    (patch,) = [r for r in warehouse.endpoint.requests if r.method == "PATCH"]
    assert patch.path.endswith(f"/datasets/{RAW}/tables/things")
    assert "If-Match" in patch.headers, "without the etag a concurrent change could be lost"
    assert [f["name"] for f in patch.json["schema"]["fields"]] == [
        "thing_id",
        "amount",
        "_export_id",
        "_loaded_at",
        "colour",
    ]
    replace = warehouse.endpoint.jobs("query")[-1]["query"]["query"]
    assert "(`thing_id`, `amount`, `_export_id`, `colour`, _loaded_at)" in replace
    # Columns are matched the way BigQuery matches them: case-insensitively.
    warehouse.publish("things", "e3", _partition("e3", ["d"], COLOUR=pa.array(["blue"])))
    assert warehouse.loader.load_partition("things", "e3").added_columns == ()


def test_a_type_change_is_refused_before_the_raw_table_is_touched(warehouse: Warehouse) -> None:
    warehouse.publish("things", EXPORT_1, _partition(EXPORT_1, ["a", "b"]))
    warehouse.loader.load_partition("things", EXPORT_1)
    schema_before = warehouse.raw_fields()
    canary = "canary-amount-4711"
    changed = _partition(EXPORT_2, ["c", "d"], amount=pa.array([canary, "2"]))
    warehouse.publish("things", EXPORT_2, changed)
    warehouse.endpoint.clear_requests()

    with pytest.raises(LoadError) as error:
        warehouse.loader.load_partition("things", EXPORT_2)

    message = str(error.value)
    assert message == (
        f"{RAW}.things: column type change refused: amount (FLOAT64 -> STRING); "
        "migrate the table explicitly"
    )
    assert canary not in message
    assert warehouse.endpoint.jobs("query") == []
    assert not [r for r in warehouse.endpoint.requests if r.method == "PATCH"]
    assert warehouse.raw_fields() == schema_before
    assert warehouse.endpoint.table_names(PROJECT, RAW) == ["things"], "staging table left behind"


def test_a_failed_job_names_table_step_reason_and_job_but_not_the_message(
    warehouse: Warehouse,
) -> None:
    # Never uploaded: the load job fails with notFound, and the service's message quotes the
    # URI. Only the reason crosses into our error; the job id leads to the full message.
    with pytest.raises(LoadError) as error:
        warehouse.loader.load_partition("things", EXPORT_1)

    message = str(error.value)
    assert message.startswith(f"{RAW}.things: load job for export {EXPORT_1} failed: NotFound")
    assert "reason notFound" in message
    assert re.search(r"details in BigQuery job starvit_load_things_[0-9a-f-]{36}$", message)
    assert "gs://" not in message
    assert warehouse.endpoint.jobs("query") == []
    assert warehouse.endpoint.table(PROJECT, RAW, "things") is None


def test_a_failed_replace_reports_its_reason_and_drops_the_staging_table(
    warehouse: Warehouse,
) -> None:
    warehouse.publish("things", EXPORT_1, _partition(EXPORT_1, ["a"]))
    canary = "canary-value-0815"
    warehouse.endpoint.fail_jobs(
        lambda configuration: "query" in configuration,
        reason="invalidQuery",
        message=f"Could not cast literal '{canary}' to type FLOAT64",
    )

    with pytest.raises(LoadError) as error:
        warehouse.loader.load_partition("things", EXPORT_1)

    message = str(error.value)
    assert message.startswith(
        f"{RAW}.things: replace transaction for export {EXPORT_1} failed: BadRequest "
        "(HTTP 400, reason invalidQuery)"
    )
    assert canary not in message
    assert error.value.__cause__ is None and error.value.__suppress_context__
    assert warehouse.endpoint.table_names(PROJECT, RAW) == ["things"], "staging table left behind"


def test_a_partition_without_lineage_or_with_odd_names_is_refused(warehouse: Warehouse) -> None:
    warehouse.publish("things", EXPORT_1, pa.table({"thing_id": ["a"]}))
    with pytest.raises(LoadError, match=r"must have the column _export_id"):
        warehouse.loader.load_partition("things", EXPORT_1)

    warehouse.local.stage("odd", "e1", _partition("e1", ["a"], **{"bad`name": pa.array([1])}))
    path = warehouse.local.publish("odd", "e1")
    upload_partition(warehouse.storage, warehouse.lake, "odd", "e1", path)
    with pytest.raises(LoadError, match=r"column name 'bad`name' is not a plain identifier"):
        warehouse.loader.load_partition("odd", "e1")

    with pytest.raises(LoadError, match=r"table name 'things; drop' is not a plain identifier"):
        warehouse.loader.load_partition("things; drop", "e1")
    with pytest.raises(LoadError, match=r"export id may hold only"):
        warehouse.loader.load_partition("things", "../e1")
    assert warehouse.endpoint.jobs("query") == []
    assert warehouse.endpoint.table_names(PROJECT, RAW) == []


def test_lists_become_repeated_columns_and_decimals_stay_exact(warehouse: Warehouse) -> None:
    # What the load options are for: without list inference a Parquet LIST stages as a
    # RECORD wrapping list.element; without decimal targets a wide decimal fails the load.
    data = _partition(
        EXPORT_1,
        ["a"],
        tags=pa.array([["x", "y"]]),
        dose=pa.array([1], pa.decimal128(38, 12)),
    )
    warehouse.publish("things", EXPORT_1, data)

    warehouse.loader.load_partition("things", EXPORT_1)

    fields = {f["name"]: f for f in warehouse.raw_fields()}
    assert fields["tags"] == {"name": "tags", "type": "STRING", "mode": "REPEATED"}
    assert fields["dose"] == {"name": "dose", "type": "BIGNUMERIC", "mode": "NULLABLE"}


def test_loaded_row_counts(warehouse: Warehouse) -> None:
    assert warehouse.loader.loaded_row_counts("things") == {}
    assert warehouse.endpoint.jobs() == [], "no query for a table that does not exist"

    warehouse.endpoint.add_table(PROJECT, RAW, "things", [])
    warehouse.endpoint.answer_queries(
        lambda sql: "GROUP BY _export_id" in sql,
        [{"name": "_export_id", "type": "STRING"}, {"name": "row_count", "type": "INTEGER"}],
        [[EXPORT_1, "3"], [EXPORT_2, "2"]],
    )

    assert warehouse.loader.loaded_row_counts("things") == {EXPORT_1: 3, EXPORT_2: 2}
    (query,) = warehouse.endpoint.jobs("query")
    assert query["query"]["query"] == (
        f"SELECT _export_id, COUNT(*) AS row_count FROM `{PROJECT}.{RAW}.things` "
        "GROUP BY _export_id"
    )


# -- upload ------------------------------------------------------------------------------------


def test_upload_puts_the_partition_where_the_lake_layout_says(
    warehouse: Warehouse, tmp_path: Path
) -> None:
    path = warehouse.publish("things", EXPORT_1, _partition(EXPORT_1, ["a"]))

    relative = path.relative_to(warehouse.local.root).as_posix()
    assert warehouse.lake.object_name("things", EXPORT_1) == f"lake/{relative}"
    assert warehouse.endpoint.object(BUCKET, f"lake/{relative}") == path.read_bytes()
    (upload,) = [r for r in warehouse.endpoint.requests if r.path.startswith("/upload/")]
    assert upload.query["uploadType"] == "multipart"
    assert upload.query["ifGenerationMatch"] == "0", "partitions are immutable: create only"
    metadata = json.loads(upload.body.split(b"\r\n\r\n", 1)[1].split(b"\r\n", 1)[0])
    assert "crc32c" in metadata, "the service must be able to reject corrupted bytes"
    stored = warehouse.endpoint.object_resource(BUCKET, f"lake/{relative}")
    assert stored is not None and stored["contentType"] == "application/vnd.apache.parquet"

    # A re-run after a crash uploads the same bytes again: accepted as done.
    uri = upload_partition(warehouse.storage, warehouse.lake, "things", EXPORT_1, path)
    assert uri == f"gs://{BUCKET}/lake/{relative}"
    # Different bytes under the same export id are refused.
    other = tmp_path / "other.parquet"
    other.write_bytes(path.read_bytes() + b"changed")
    with pytest.raises(LoadError, match=r"already exists with different content"):
        upload_partition(warehouse.storage, warehouse.lake, "things", EXPORT_1, other)


def test_a_partition_over_8_mb_goes_up_as_a_resumable_upload(
    warehouse: Warehouse, tmp_path: Path
) -> None:
    big = tmp_path / "big.parquet"
    big.write_bytes(os.urandom(9 * 1024 * 1024))

    upload_partition(warehouse.storage, warehouse.lake, "things", "big", big)

    name = warehouse.lake.object_name("things", "big")
    assert warehouse.endpoint.object(BUCKET, name) == big.read_bytes()
    kinds = [r.query.get("uploadType") for r in warehouse.endpoint.requests if r.method == "POST"]
    assert kinds == ["resumable"]


# -- dbt compile for BigQuery ------------------------------------------------------------------


@dataclass(frozen=True)
class DbtCompile:
    returncode: int
    output: str
    target: Path
    endpoint: FakeBigQueryEndpoint

    def manifest(self) -> dict[str, Any]:
        return dict(json.loads((self.target / "manifest.json").read_text(encoding="utf-8")))

    def compiled(self, node: dict[str, Any]) -> Path:
        return self.target / "compiled" / node["package_name"] / node["original_file_path"]


BMI_WINDOW = {
    "window_start": "2026-01-01T00:00:00+00:00",
    "window_end": "2026-01-02T00:00:00Z",
    "export_id": "20260102T000000Z",
}


@pytest.fixture(scope="session")
def dbt_bigquery(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DbtCompile]:
    """The one dbt call of this module: ``dbt compile --target bigquery``, whole project."""
    if DBT is None:
        pytest.skip("dbt is not installed")
    work = tmp_path_factory.mktemp("dbt-bigquery")
    with FakeBigQueryEndpoint(require_token=True) as endpoint:
        # An existing TABLE makes is_incremental() true, so bmi_latest's incremental branch is
        # the one compiled (dbt finds it by listing the dataset).
        endpoint.add_table(
            PROJECT,
            "sv_dev_derived",
            "bmi_latest",
            [
                {"name": "patient_id", "type": "STRING", "mode": "NULLABLE"},
                {"name": "source_loaded_at", "type": "TIMESTAMP", "mode": "NULLABLE"},
            ],
        )
        keyfile = work / "service-account.json"
        write_service_account_key(keyfile, endpoint.token_uri, PROJECT)
        env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("STARVIT_", "DBT_", "GOOGLE_"))
        }
        env.update(_NO_INTERNET)
        env.update(
            {
                "STARVIT_WAREHOUSE_TARGET": "bigquery",
                "STARVIT_ENV": "dev",
                "STARVIT_BQ_PROJECT": PROJECT,
                "STARVIT_BQ_KEYFILE": str(keyfile),
                "STARVIT_BQ_API_ENDPOINT": endpoint.url,
                "STARVIT_DBT_THREADS": "2",
                "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
                "DO_NOT_TRACK": "1",
            }
        )
        command = [
            DBT,
            "compile",
            "--target",
            "bigquery",
            "--project-dir",
            str(DBT_PROJECT),
            "--profiles-dir",
            str(DBT_PROJECT),
            # Its own target and log folders: the shared dbt_project/target stays untouched.
            "--target-path",
            str(work / "target"),
            "--log-path",
            str(work / "logs"),
            "--no-partial-parse",
            # An incremental window, so that bmi_latest's window filters are what compiles
            # (the watermark branch without them is the same SQL minus those lines).
            "--vars",
            json.dumps(BMI_WINDOW),
        ]
        completed = subprocess.run(
            command,
            env=env,
            cwd=work,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        yield DbtCompile(
            returncode=completed.returncode,
            output=completed.stdout + completed.stderr,
            target=work / "target",
            endpoint=endpoint,
        )


def _model_files() -> list[str]:
    return sorted(
        p.relative_to(DBT_PROJECT).as_posix() for p in DBT_PROJECT.glob("models/**/*.sql")
    )


@needs_dbt
def test_dbt_compiles_the_project_for_bigquery_through_the_local_endpoint(
    dbt_bigquery: DbtCompile,
) -> None:
    assert dbt_bigquery.returncode == 0, dbt_bigquery.output[-4000:]
    endpoint = dbt_bigquery.endpoint
    assert endpoint.token_assertions, "dbt never fetched a token from the key's token_uri"
    assert all(
        "https://www.googleapis.com/auth/bigquery" in claims["scope"].split()
        for claims in endpoint.token_assertions
    )
    bigquery_requests = [r for r in endpoint.requests if r.path.startswith("/bigquery/")]
    assert bigquery_requests, "dbt did not use STARVIT_BQ_API_ENDPOINT"
    # require_token=True: a request without the issued bearer token would have got 401.
    assert not [r for r in endpoint.requests if r.status == 401]
    listed = {r.path for r in bigquery_requests if r.method == "GET" and r.path.endswith("/tables")}
    assert f"/bigquery/v2/projects/{PROJECT}/datasets/sv_dev_derived/tables" in listed


@needs_dbt
def test_every_model_is_compiled(dbt_bigquery: DbtCompile) -> None:
    assert dbt_bigquery.returncode == 0, dbt_bigquery.output[-4000:]
    models = [
        node
        for node in dbt_bigquery.manifest()["nodes"].values()
        if node["resource_type"] == "model"
    ]
    compiled_models = sorted(
        p.relative_to(dbt_bigquery.target / "compiled" / "starvit").as_posix()
        for p in (dbt_bigquery.target / "compiled" / "starvit" / "models").rglob("*.sql")
        if p.parent.suffix != ".yml"  # data tests compile into <model>.yml/ folders
    )
    assert len(compiled_models) == len(models)
    assert compiled_models == sorted(node["original_file_path"] for node in models)
    assert compiled_models == _model_files()
    assert all(dbt_bigquery.compiled(node).stat().st_size > 0 for node in models)


@needs_dbt
def test_the_incremental_branch_of_bmi_latest_is_compiled(dbt_bigquery: DbtCompile) -> None:
    sql = (dbt_bigquery.target / "compiled/starvit/models/derived/bmi_latest.sql").read_text()
    # The window given (BMI_WINDOW): its filters replace the watermark.
    assert "watermark as (" not in sql
    assert "changed_patients as (" in sql
    assert "observations._loaded_at >= cast('2026-01-01 00:00:00+00:00' as timestamp)" in sql
    assert "observations._loaded_at < cast('2026-01-02 00:00:00+00:00' as timestamp)" in sql
    assert "observations._export_id = '20260102T000000Z'" in sql


# sqlglot's BigQuery reader also accepts some PostgreSQL spellings that BigQuery rejects; these
# are looked for in the SQL outside string literals and comments.
_POSTGRES_ONLY = {
    "'::' cast": re.compile(r"::"),
    "'with time zone' type": re.compile(r"\bwith\s+time\s+zone\b", re.IGNORECASE),
    "'double precision' type": re.compile(r"\bdouble\s+precision\b", re.IGNORECASE),
    "ILIKE": re.compile(r"\bilike\b", re.IGNORECASE),
}


def _bigquery_problems(sql: str) -> list[str]:
    import sqlglot
    from sqlglot.errors import ParseError, TokenError
    from sqlglot.tokens import TokenType

    try:
        statements = sqlglot.parse(sql, read="bigquery")
        tokens = sqlglot.tokenize(sql, read="bigquery")
    except (ParseError, TokenError) as error:
        return [f"does not parse as BigQuery SQL: {error}"]
    if not [s for s in statements if s is not None]:
        return ["no SQL statement"]
    code = " ".join(t.text for t in tokens if t.token_type != TokenType.STRING)
    return [name for name, pattern in _POSTGRES_ONLY.items() if pattern.search(code)]


@needs_dbt
@pytest.mark.parametrize("model_file", _model_files())
def test_compiled_model_is_bigquery_sql(dbt_bigquery: DbtCompile, model_file: str) -> None:
    assert dbt_bigquery.returncode == 0, dbt_bigquery.output[-4000:]
    compiled = dbt_bigquery.target / "compiled" / "starvit" / model_file
    assert _bigquery_problems(compiled.read_text(encoding="utf-8")) == []


@needs_dbt
def test_compiled_data_tests_and_snapshot_are_bigquery_sql(dbt_bigquery: DbtCompile) -> None:
    assert dbt_bigquery.returncode == 0, dbt_bigquery.output[-4000:]
    nodes = [
        node
        for node in dbt_bigquery.manifest()["nodes"].values()
        if node["resource_type"] in ("test", "snapshot") and node.get("compiled_code")
    ]
    assert len([n for n in nodes if n["resource_type"] == "test"]) > 50
    problems = {
        node["unique_id"]: found
        for node in nodes
        if (found := _bigquery_problems(node["compiled_code"]))
    }
    assert problems == {}


@needs_dbt
def test_profile_api_endpoint_is_null_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    # Rendered the way dbt renders profiles.yml, without a dbt run: an unset variable must give
    # null (the client's default endpoint), not an empty string or the text "None".
    from dbt.adapters.bigquery.credentials import BigQueryCredentials
    from dbt.config.profile import Profile, read_profile
    from dbt.config.renderer import ProfileRenderer
    from dbt_common.context import set_invocation_context

    def render() -> BigQueryCredentials:
        set_invocation_context(dict(os.environ))
        _, data = Profile.render_profile(
            read_profile(str(DBT_PROJECT))["starvit"], "starvit", "bigquery", ProfileRenderer({})
        )
        fields = {k: v for k, v in data.items() if k not in ("type", "threads")}
        return BigQueryCredentials.from_dict(BigQueryCredentials.translate_aliases(fields))

    monkeypatch.setenv("STARVIT_BQ_PROJECT", PROJECT)
    monkeypatch.delenv("STARVIT_BQ_KEYFILE", raising=False)
    endpoints = {}
    for value in (None, "http://127.0.0.1:1"):
        if value is None:
            monkeypatch.delenv("STARVIT_BQ_API_ENDPOINT", raising=False)
        else:
            monkeypatch.setenv("STARVIT_BQ_API_ENDPOINT", value)
        # In a copied context, so dbt's invocation context does not outlive this test.
        credentials = contextvars.copy_context().run(render)
        endpoints[value] = credentials.api_endpoint
        assert (credentials.database, credentials.location) == (PROJECT, "US")
    assert endpoints == {None: None, "http://127.0.0.1:1": "http://127.0.0.1:1"}
