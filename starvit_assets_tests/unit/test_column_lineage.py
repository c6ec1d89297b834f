"""Column-level lineage FHIR element -> raw column -> dbt staging column, checked against each
independent statement of it: the views, the policy, the staging SQL (read here with a plain
regex, not sqlglot), the dbt model docs in the manifest and docs/raw-tables.md; then the
Dagster metadata built from it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import dagster as dg
import pytest

from starvit_assets.definitions import defs
from starvit_assets.deid.policy import load_policy
from starvit_assets.lake.contracts import LINEAGE_COLUMNS
from starvit_assets.lineage import LineageError, shipped_lineage, table_lineage
from starvit_assets.lineage.columns import (
    macro_lineage_columns,
    staging_sql_path,
    view_column_paths,
)
from starvit_assets.linkage.tokens import recipe_inputs
from starvit_assets.settings import DBT_PROJECT_DIR, REPO_ROOT
from starvit_assets.views.runner import shipped_views
from starvit_assets.warehouse.loader import LOADED_AT

TABLES = sorted(shipped_views())
RAW_TABLES_DOC = REPO_ROOT / "docs" / "raw-tables.md"
# `raw_column as staging_column` or `{{ macro('raw_column') }} as staging_column`, or a bare
# `raw_column,` line in the staging select list.
_RENAMED = re.compile(
    r"^\s*(?:\{\{\s*\w+\('(?P<macro_arg>\w+)'\)\s*\}\}|(?P<raw>\w+))"
    r"(?:\s+as\s+(?P<alias>\w+))?\s*,?\s*$"
)


def _policy_methods(table: str) -> dict[str, str]:
    return {name: rule.method for name, rule in load_policy().table(table).columns.items()}


def _tokens(table: str) -> list[str]:
    spec = load_policy().table(table).linkage_tokens
    return list(spec.tokens) if spec else []


def _regex_select_list(table: str) -> dict[str, tuple[str, ...]]:
    """Raw column -> staging columns, read line by line from the ``renamed`` CTE."""
    text = staging_sql_path(table).read_text()
    start = text.index("renamed as (")
    body = text[start : text.index("from source", start)]
    renames: dict[str, list[str]] = {}
    for line in body.splitlines()[1:]:
        stripped = line.strip()
        if stripped in {"", "select"} or stripped.startswith("--"):
            continue
        if stripped == "{{ lineage_columns() }}":
            for column in macro_lineage_columns():
                renames.setdefault(column, []).append(column)
            continue
        match = _RENAMED.match(line)
        assert match is not None, f"unrecognised select-list line in {table}: {stripped}"
        raw = match["macro_arg"] or match["raw"]
        renames.setdefault(raw, []).append(match["alias"] or raw)
    return {raw: tuple(staging) for raw, staging in renames.items()}


def _documented_columns() -> dict[str, dict[str, tuple[str, str]]]:
    """Table -> raw column -> (FHIRPath, method) from the tables of docs/raw-tables.md."""
    documented: dict[str, dict[str, tuple[str, str]]] = {}
    table = None
    for line in RAW_TABLES_DOC.read_text().splitlines():
        heading = re.match(r"^## (\w+) \(\w+\)$", line)
        if heading:
            table = heading[1]
            documented[table] = {}
            continue
        row = re.match(r"^\| (\w+) \| `(.+)` \| \w+ \| ([\w()]+) \|", line)
        if table and row:
            documented[table][row[1]] = (row[2], row[3])
    return documented


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((DBT_PROJECT_DIR / "target" / "manifest.json").read_text())


@pytest.mark.parametrize("table", TABLES)
def test_every_published_column_is_mapped_and_dropped_columns_are_absent(table: str) -> None:
    lineage = shipped_lineage()[table]
    methods = _policy_methods(table)
    view_columns = list(view_column_paths(shipped_views()[table]))
    published = [name for name in view_columns if methods[name] != "drop"] + _tokens(table)
    dropped = [name for name in view_columns if methods[name] == "drop"]

    assert list(lineage.published) == published
    assert list(lineage.dropped) == dropped
    assert "security_labels" in lineage.dropped
    for name in dropped:
        assert name not in lineage.fhir_paths()
        assert all(name not in sources for sources in lineage.staging_sources.values())
    # Complete: every published raw column reaches at least one staging column.
    for column in lineage.columns:
        assert column.fhir_path, column.raw_column
        assert column.staging_columns, f"{table}.{column.raw_column} reaches no staging column"


@pytest.mark.parametrize("table", TABLES)
def test_paths_and_methods_match_the_view_the_policy_and_the_docs(table: str) -> None:
    lineage = shipped_lineage()[table]
    view = shipped_views()[table]
    paths = {c["name"]: c["path"] for select in view["select"] for c in select["column"]}
    documented = _documented_columns()[table]
    spec = load_policy().table(table).linkage_tokens
    for column in lineage.columns:
        if column.raw_column in _tokens(table):
            # A token's FHIRPaths are those of the view columns its recipe reads.
            assert spec is not None
            inputs = [paths[spec.inputs[field]] for field in recipe_inputs(column.raw_column)]
            assert column.fhir_path == ", ".join(inputs)
        else:
            assert column.fhir_path == paths[column.raw_column]
        assert (column.fhir_path, column.method) == documented[column.raw_column]
        assert lineage.fhir_paths()[column.raw_column] == {
            "fhir_path": column.fhir_path,
            "method": column.method,
        }


@pytest.mark.parametrize("table", TABLES)
def test_renames_match_the_staging_sql(table: str) -> None:
    assert shipped_lineage()[table].staging_renames() == _regex_select_list(table)


@pytest.mark.parametrize("table", TABLES)
def test_staging_columns_are_the_documented_dbt_columns(table: str, manifest: dict) -> None:
    node = manifest["nodes"][f"model.starvit.{shipped_lineage()[table].staging_model}"]
    assert list(shipped_lineage()[table].staging_sources) == list(node["columns"])


def test_known_renames() -> None:
    lineage = shipped_lineage()
    assert lineage["patient"].column("deceased").staging_columns == ("is_deceased",)
    assert lineage["patient"].column("last_updated").staging_columns == ("last_updated_at",)
    assert lineage["observation"].column("code_system").staging_columns == ("code_system_uri",)
    assert lineage["observation"].column("value_unit_system").staging_columns == (
        "value_unit_system_uri",
    )
    assert lineage["encounter"].column("type_system").staging_columns == ("type_system_uri",)
    assert lineage["condition"].column("onset_datetime").staging_columns == (
        "onset_at",
        "onset_precision",
    )
    assert lineage["medication_request"].column("authored_on").staging_columns == ("authored_at",)
    assert lineage["patient"].column("patient_id").method == "pseudonymise(Patient)"
    assert lineage["patient"].column("birth_year").fhir_path == "birthDate"
    assert lineage["patient"].column("birth_year").method == "generalise(birth_year)"


def test_the_lineage_macro_lists_the_raw_bookkeeping_columns() -> None:
    assert macro_lineage_columns() == (*LINEAGE_COLUMNS, LOADED_AT)
    for lineage in shipped_lineage().values():
        assert lineage.bookkeeping_columns == (*LINEAGE_COLUMNS, LOADED_AT)


def _write_staging(folder: Path, table: str, select_list: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"stg_fhir__{table}.sql").write_text(
        "with source as (select * from {{ source('fhir_raw', '" + table + "') }}),\n"
        f"renamed as (select {select_list} from source)\nselect * from renamed\n"
    )


def test_a_staging_model_reading_a_dropped_column_is_refused(tmp_path: Path) -> None:
    _write_staging(tmp_path, "patient", "patient_id, security_labels as labels")
    with pytest.raises(LineageError, match="security_labels, which the policy drops"):
        table_lineage("patient", shipped_views()["patient"], load_policy(), staging_dir=tmp_path)


def test_select_star_and_unknown_columns_are_refused(tmp_path: Path) -> None:
    view, policy = shipped_views()["patient"], load_policy()
    _write_staging(tmp_path, "patient", "*")
    with pytest.raises(LineageError, match="select \\*"):
        table_lineage("patient", view, policy, staging_dir=tmp_path)
    _write_staging(tmp_path, "patient", "patient_id, shoe_size")
    with pytest.raises(LineageError, match="shoe_size, which raw patient lacks"):
        table_lineage("patient", view, policy, staging_dir=tmp_path)
    _write_staging(tmp_path, "encounter", "patient_id")
    (tmp_path / "stg_fhir__patient.sql").write_text(
        (tmp_path / "stg_fhir__encounter.sql").read_text()
    )
    with pytest.raises(LineageError, match=r"expected only fhir_raw\.patient"):
        table_lineage("patient", view, policy, staging_dir=tmp_path)


# --- the Dagster metadata built from it ------------------------------------------------------
def _spec(key: str) -> dg.AssetSpec:
    return next(s for s in defs.resolve_all_asset_specs() if s.key.to_user_string() == key)


def _plain(value: object) -> object:
    return value.value if isinstance(value, dg.MetadataValue) else value


@pytest.mark.parametrize("table", TABLES)
def test_warehouse_raw_carries_column_lineage_from_the_lake_and_fhir_paths(table: str) -> None:
    lineage = shipped_lineage()[table]
    spec = _spec(f"warehouse_raw/{table}")
    column_lineage = spec.metadata["dagster/column_lineage"]
    assert isinstance(column_lineage, dg.TableColumnLineage)
    deps = column_lineage.deps_by_column
    assert set(deps) == {*lineage.published, *LINEAGE_COLUMNS}
    for column, column_deps in deps.items():
        assert column_deps == [
            dg.TableColumnDep(asset_key=dg.AssetKey(["deid_raw", table]), column_name=column)
        ]
    assert not set(lineage.dropped) & set(deps)
    assert _plain(spec.metadata["fhir_paths"]) == lineage.fhir_paths()
    contract = _plain(spec.metadata["contract"])
    assert isinstance(contract, dict)
    assert contract["keys"][0][1] == "_export_id"


@pytest.mark.parametrize("table", TABLES)
def test_deid_raw_fhir_paths_match_the_lineage(table: str) -> None:
    spec = _spec(f"deid_raw/{table}")
    if "fhir_paths" not in spec.metadata:
        pytest.skip("defs/deid_raw.py does not carry `fhir_paths` yet")
    assert _plain(spec.metadata["fhir_paths"]) == shipped_lineage()[table].fhir_paths()


@pytest.mark.parametrize("table", TABLES)
def test_staging_models_carry_column_lineage_from_warehouse_raw(table: str) -> None:
    lineage = shipped_lineage()[table]
    spec = _spec(f"staging/{lineage.staging_model}")
    column_lineage = spec.metadata["dagster/column_lineage"]
    assert isinstance(column_lineage, dg.TableColumnLineage)
    upstream = dg.AssetKey(["warehouse_raw", table])
    assert {
        column: [dep.column_name for dep in deps if dep.asset_key == upstream]
        for column, deps in column_lineage.deps_by_column.items()
    } == {column: list(sources) for column, sources in lineage.staging_sources.items()}
    assert upstream in {dep.asset_key for dep in spec.deps}


def test_only_staging_models_carry_dbt_column_lineage() -> None:
    for spec in defs.resolve_all_asset_specs():
        if spec.group_name in {"refined", "derived", "reference"}:
            assert "dagster/column_lineage" not in spec.metadata, spec.key
