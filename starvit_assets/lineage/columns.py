"""Column-level lineage of the raw tables, from three sources that each own one step:

* the SQL on FHIR ViewDefinition (``views/definitions/<table>.json``): raw column <- FHIRPath;
* the de-identification policy (``deid/policy.yaml``): the method applied to each raw column;
  a ``drop`` column is read in the PHI zone but never published, so it has no lineage here;
* the dbt staging model (``models/staging/stg_fhir__<table>.sql``): staging column <- raw
  column(s), read from the select list of its ``renamed`` CTE.

The staging SQL is rendered with stub macros (a macro call becomes a SQL function call on its
arguments, ``lineage_columns()`` becomes the column list of the macro file) and parsed with
sqlglot; no dbt, no database, no Dagster. Pure functions over the files in the checkout.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import sqlglot
from sqlglot import expressions as exp
from sqlglot.errors import ParseError

from starvit_assets.deid.policy import ColumnRule, Policy, TablePolicy, load_policy
from starvit_assets.lake.contracts import LINEAGE_COLUMNS
from starvit_assets.linkage.tokens import recipe_inputs
from starvit_assets.settings import DBT_PROJECT_DIR
from starvit_assets.views.runner import shipped_views
from starvit_assets.warehouse.loader import LOADED_AT

STAGING_DIR = DBT_PROJECT_DIR / "models" / "staging"
LINEAGE_MACRO = DBT_PROJECT_DIR / "macros" / "lineage_columns.sql"
RAW_SOURCE = "fhir_raw"
STAGING_CTE = "renamed"
STAGING_PREFIX = "stg_fhir__"

_MACRO_LIST = re.compile(r"for\s+\w+\s+in\s+\[(?P<items>[^\]]*)\]")
_QUOTED = re.compile(r"'([^']*)'|\"([^\"]*)\"")


class LineageError(Exception):
    """The lineage cannot be derived as written; the message names the table and the column."""


@dataclass(frozen=True)
class ColumnLineage:
    """One published raw column: where it comes from and where it goes."""

    raw_column: str
    fhir_path: str
    """The ViewDefinition column's FHIRPath (``forEach`` context prefixed, ``unionAll`` paths
    joined by `` | ``)."""
    method: str
    """The de-identification method as in docs/raw-tables.md: ``keep``, ``date_shift``,
    ``pseudonymise(Patient)``, ``generalise(zip3)``..."""
    staging_columns: tuple[str, ...]
    """The staging model's columns computed from this raw column (empty when it reads none)."""


@dataclass(frozen=True)
class TableLineage:
    table: str
    resource_type: str
    columns: tuple[ColumnLineage, ...]
    """Published view columns, in view order; ``drop`` columns are absent."""
    dropped: tuple[str, ...]
    """View columns the policy drops: never published, so in no lineage."""
    bookkeeping_columns: tuple[str, ...]
    """Raw columns that come from no FHIR element: the de-identification engine's lineage
    columns (``_export_id``...) and the warehouse load's ``_loaded_at``."""
    staging_model: str
    staging_sources: Mapping[str, tuple[str, ...]]
    """Staging column -> the raw columns it is computed from, in select-list order."""

    @property
    def published(self) -> tuple[str, ...]:
        return tuple(column.raw_column for column in self.columns)

    def column(self, raw_column: str) -> ColumnLineage:
        for column in self.columns:
            if column.raw_column == raw_column:
                return column
        raise KeyError(raw_column)

    def fhir_paths(self) -> dict[str, dict[str, str]]:
        """Raw column -> FHIRPath and de-identification method: the ``fhir_paths`` metadata."""
        return {
            column.raw_column: {"fhir_path": column.fhir_path, "method": column.method}
            for column in self.columns
        }

    def staging_renames(self) -> dict[str, tuple[str, ...]]:
        """Raw column -> staging columns, for every raw column the staging model reads."""
        return _raw_to_staging(self.staging_sources)


def _raw_to_staging(staging_sources: Mapping[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    renames: dict[str, list[str]] = {}
    for staging_column, raw_columns in staging_sources.items():
        for raw_column in raw_columns:
            renames.setdefault(raw_column, []).append(staging_column)
    return {raw: tuple(columns) for raw, columns in renames.items()}


def staging_model_name(table: str) -> str:
    return f"{STAGING_PREFIX}{table}"


def staging_sql_path(table: str, staging_dir: Path = STAGING_DIR) -> Path:
    return staging_dir / f"{staging_model_name(table)}.sql"


def method_label(rule: ColumnRule) -> str:
    if rule.method == "pseudonymise":
        return f"pseudonymise({rule.resource_type})"
    if rule.method == "generalise":
        return f"generalise({rule.kind})"
    return rule.method


def view_column_paths(view: Mapping[str, Any]) -> dict[str, str]:
    """Column name -> FHIRPath of every column of a ViewDefinition's select tree."""
    paths: dict[str, list[str]] = {}
    _collect_paths(view.get("select", []), "", paths)
    return {name: " | ".join(dict.fromkeys(found)) for name, found in paths.items()}


def _collect_paths(selects: Iterable[Mapping[str, Any]], context: str, out: dict) -> None:
    for select in selects:
        prefix = context
        for iterator in ("forEach", "forEachOrNull"):
            if iterator in select:
                prefix = _join_path(context, str(select[iterator]))
        if "repeat" in select:
            prefix = _join_path(context, f"repeat({', '.join(select['repeat'])})")
        for column in select.get("column", []):
            out.setdefault(str(column["name"]), []).append(_join_path(prefix, str(column["path"])))
        _collect_paths(select.get("select", []), prefix, out)
        _collect_paths(select.get("unionAll", []), prefix, out)


def _join_path(context: str, path: str) -> str:
    return f"{context}.{path}" if context else path


@cache
def macro_lineage_columns(macro_path: Path = LINEAGE_MACRO) -> tuple[str, ...]:
    """The columns the dbt macro ``lineage_columns()`` expands to, read from its loop list."""
    match = _MACRO_LIST.search(macro_path.read_text())
    if match is None:
        raise LineageError(f"no column list found in {macro_path.name}")
    return tuple(a or b for a, b in _QUOTED.findall(match["items"]))


class _MacroCall(jinja2.Undefined):
    """A macro the stub environment does not define renders as a SQL call on its arguments:
    ``{{ fhir_datetime_start('onset_datetime') }}`` -> ``fhir_datetime_start(onset_datetime)``.
    Staging macros take column names, so a string argument becomes a column reference."""

    def __call__(self, *args: Any, **kwargs: Any) -> str:  # type: ignore[override]
        return f"{self._undefined_name}({', '.join(str(arg) for arg in args)})"

    def __getattr__(self, name: str) -> Any:
        # Jinja probes a callable for markers such as `jinja_pass_arg`: it has none.
        raise AttributeError(name)


def render_staging_sql(text: str) -> tuple[str, list[tuple[str, str]]]:
    """The staging model's SQL with stub macros, and the ``source()`` relations it reads."""
    sources: list[tuple[str, str]] = []

    def source(source_name: str, table_name: str) -> str:
        sources.append((source_name, table_name))
        return f"{source_name}.{table_name}"

    environment = jinja2.Environment(undefined=_MacroCall, autoescape=False)  # SQL, not HTML
    environment.globals.update(
        source=source,
        ref=lambda name, *_: name,
        config=lambda *_, **__: "",
        lineage_columns=lambda *_: ", ".join(macro_lineage_columns()),
    )
    return environment.from_string(text).render(), sources


def parse_staging_select(sql: str, model: str) -> dict[str, tuple[str, ...]]:
    """Staging column -> raw columns read, from the select list of the ``renamed`` CTE."""
    try:
        tree = sqlglot.parse_one(sql, read="postgres")
    except ParseError as error:
        raise LineageError(f"{model}: the staging SQL does not parse: {error}") from None
    cte = next((c for c in tree.find_all(exp.CTE) if c.alias == STAGING_CTE), None)
    if cte is None or not isinstance(cte.this, exp.Select):
        raise LineageError(f"{model}: no `{STAGING_CTE}` CTE with a select list")
    selected: dict[str, tuple[str, ...]] = {}
    for projection in cte.this.expressions:
        if isinstance(projection, exp.Star) or projection.find(exp.Star):
            raise LineageError(f"{model}: `select *` in `{STAGING_CTE}`; list the columns")
        name = projection.alias_or_name
        if not name or name in selected:
            raise LineageError(f"{model}: unnamed or repeated column {name!r} in {STAGING_CTE}")
        columns = (column.name for column in projection.find_all(exp.Column))
        selected[name] = tuple(dict.fromkeys(columns))
    return selected


def table_lineage(
    table: str,
    view: Mapping[str, Any],
    policy: Policy,
    staging_dir: Path = STAGING_DIR,
) -> TableLineage:
    rules = policy.table(table)
    paths = view_column_paths(view)
    rules.check_covers(list(paths), table)
    published = [name for name in paths if rules.columns[name].method != "drop"]
    dropped = tuple(name for name in paths if rules.columns[name].method == "drop")
    bookkeeping = (*LINEAGE_COLUMNS, LOADED_AT)
    model = staging_model_name(table)

    sql_path = staging_sql_path(table, staging_dir)
    try:
        text = sql_path.read_text()
    except OSError as error:
        raise LineageError(f"{model}: cannot read {sql_path} ({type(error).__name__})") from None
    sql, sources = render_staging_sql(text)
    if sources != [(RAW_SOURCE, table)]:
        raise LineageError(f"{model}: reads {sources}, expected only {RAW_SOURCE}.{table}")
    staging_sources = parse_staging_select(sql, model)

    if rules.linkage_tokens is not None:
        published += list(rules.linkage_tokens.tokens)
    readable = {*published, *bookkeeping}
    for staging_column, raw_columns in staging_sources.items():
        for raw_column in raw_columns:
            if raw_column in dropped:
                raise LineageError(
                    f"{model}.{staging_column} reads {raw_column}, which the policy drops"
                )
            if raw_column not in readable:
                raise LineageError(
                    f"{model}.{staging_column} reads {raw_column}, which raw {table} lacks"
                )

    renames = _raw_to_staging(staging_sources)
    columns = tuple(
        ColumnLineage(
            raw_column=name,
            fhir_path=paths[name],
            method=method_label(rules.columns[name]),
            staging_columns=renames.get(name, ()),
        )
        for name in published
        if name in paths
    )
    columns += _token_lineage(rules, paths, renames)
    return TableLineage(
        table=table,
        resource_type=str(view["resource"]),
        columns=columns,
        dropped=dropped,
        bookkeeping_columns=bookkeeping,
        staging_model=model,
        staging_sources=staging_sources,
    )


LINKAGE_TOKEN_METHOD = "linkage_token"


def _token_lineage(
    rules: TablePolicy, paths: Mapping[str, str], renames: Mapping[str, tuple[str, ...]]
) -> tuple[ColumnLineage, ...]:
    """A linkage token comes from the FHIRPaths of the inputs its recipe reads, joined by
    ``, `` (docs/linkage.md); it is computed in the PHI zone, from raw values."""
    spec = rules.linkage_tokens
    if spec is None:
        return ()
    lineage = []
    for token in spec.tokens:
        try:
            inputs = recipe_inputs(token)
        except KeyError:
            raise LineageError(f"linkage token {token!r} has no recipe") from None
        lineage.append(
            ColumnLineage(
                raw_column=token,
                fhir_path=", ".join(paths[spec.inputs[field]] for field in inputs),  # type: ignore[index]
                method=LINKAGE_TOKEN_METHOD,
                staging_columns=renames.get(token, ()),
            )
        )
    return tuple(lineage)


@cache
def shipped_lineage() -> dict[str, TableLineage]:
    """The lineage of every shipped raw table, by table name."""
    policy = load_policy()
    return {name: table_lineage(name, view, policy) for name, view in shipped_views().items()}
