"""A SQL on FHIR v2 ViewDefinition runner on fhirpathpy (the general evaluator).

Every FHIRPath expression of a view is compiled once; ``CompiledView.rows`` then evaluates the
view's select tree on one resource. Elements reached by ``forEach``/``forEachOrNull``/``repeat``
stay fhirpathpy nodes, so that ``ofType()`` on choice elements keeps working below them
(fhirpathpy needs its R4 model for that).
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import re
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any

import fhirpathpy
import pyarrow as pa
from fhirpathpy.models import models as fhirpath_models

DEFINITIONS_DIR = Path(__file__).with_name("definitions")
_COLUMN_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_ARROW_TYPES: dict[str, pa.DataType] = {
    "boolean": pa.bool_(),
    "integer": pa.int64(),
    "positiveInt": pa.int64(),
    "unsignedInt": pa.int64(),
    "integer64": pa.int64(),
    "decimal": pa.float64(),
}
_CONSTANT_VALUE = re.compile(r"^value[A-Z]")

Row = dict[str, Any]


class ViewDefinitionError(Exception):
    """The ViewDefinition is invalid or cannot be evaluated as written."""


# --- FHIRPath functions the specification adds ---------------------------------------------
def _resource_key(inputs: list[Any]) -> list[Any]:
    return [item["id"] for item in inputs if isinstance(item, dict) and "id" in item]


def _reference_key(inputs: list[Any], type_specifier: Any = None) -> list[Any]:
    wanted = getattr(type_specifier, "name", None)
    keys = []
    for item in inputs:
        reference = item.get("reference") if isinstance(item, dict) else None
        if not isinstance(reference, str) or "/" not in reference:
            continue
        resource_type, _, key = reference.rstrip("/").rpartition("/")
        resource_type = resource_type.rpartition("/")[2]
        if wanted is None or resource_type == wanted:
            keys.append(key)
    return keys


_FUNCTIONS = {
    "getResourceKey": {"fn": _resource_key, "arity": {0: []}},
    "getReferenceKey": {"fn": _reference_key, "arity": {0: [], 1: ["TypeSpecifier"]}},
}


@cache
def _compile(expression: str) -> Callable[..., list[Any]]:
    try:
        return fhirpathpy.compile(
            expression, model=fhirpath_models["r4"], options={"userInvocationTable": _FUNCTIONS}
        )
    except Exception as error:
        raise ViewDefinitionError(
            f"invalid FHIRPath {expression!r}: {type(error).__name__}"
        ) from None


@cache
def _compile_raw(expression: str) -> Callable[..., list[Any]]:
    try:
        return fhirpathpy.compile(
            expression,
            model=fhirpath_models["r4"],
            options={"userInvocationTable": _FUNCTIONS, "returnRawData": True},
        )
    except Exception as error:
        raise ViewDefinitionError(
            f"invalid FHIRPath {expression!r}: {type(error).__name__}"
        ) from None


def _plain(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return (
            int(value)
            if value == value.to_integral_value() and "." not in str(value)
            else float(value)
        )
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, dt.date | dt.datetime | dt.time):
        return value.isoformat()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return str(value)


# --- compiled select tree ------------------------------------------------------------------
class _Column:
    def __init__(self, spec: dict[str, Any]) -> None:
        name = spec.get("name")
        path = spec.get("path")
        if not isinstance(name, str) or not _COLUMN_NAME.match(name):
            raise ViewDefinitionError(f"invalid column name {name!r}")
        if not isinstance(path, str):
            raise ViewDefinitionError(f"column {name} has no path")
        self.name = name
        self.path = path
        self.type: str | None = spec.get("type")
        self.collection = bool(spec.get("collection", False))
        self.function = _compile(path)

    def value(self, node: Any, variables: dict[str, Any]) -> Any:
        try:
            result = self.function(node, variables)
        except Exception as error:
            raise ViewDefinitionError(
                f"column {self.name}: evaluation failed ({type(error).__name__})"
            ) from None
        values = [_plain(item) for item in result]
        if self.collection:
            return values
        if len(values) > 1:
            raise ViewDefinitionError(
                f"column {self.name} returned {len(values)} values; set collection: true or narrow the path"
            )
        return values[0] if values else None


class _Select:
    def __init__(self, spec: dict[str, Any]) -> None:
        iteration = [key for key in ("forEach", "forEachOrNull", "repeat") if key in spec]
        if len(iteration) > 1:
            raise ViewDefinitionError(
                "a select may use only one of forEach, forEachOrNull and repeat"
            )
        self.mode = iteration[0] if iteration else None
        self.iterate: list[Callable[..., list[Any]]] = []
        if self.mode == "repeat":
            paths = spec["repeat"]
            if not isinstance(paths, list) or not paths:
                raise ViewDefinitionError("repeat needs a list of paths")
            self.iterate = [_compile_raw(path) for path in paths]
        elif self.mode:
            self.iterate = [_compile_raw(spec[self.mode])]
        self.columns = [_Column(column) for column in spec.get("column", [])]
        self.selects = [_Select(select) for select in spec.get("select", [])]
        self.union = [_Select(branch) for branch in spec.get("unionAll", [])]
        if self.union:
            names = [branch.column_names() for branch in self.union]
            if any(branch_names != names[0] for branch_names in names):
                raise ViewDefinitionError(
                    "unionAll branches must have the same columns in the same order"
                )

    def column_names(self) -> list[str]:
        names = [column.name for column in self.columns]
        for select in self.selects:
            names += select.column_names()
        if self.union:
            names += self.union[0].column_names()
        return names

    def _iteration_nodes(self, node: Any, variables: dict[str, Any]) -> list[Any]:
        if self.mode is None:
            return [node]
        if self.mode == "repeat":
            found: list[Any] = []
            frontier = [node]
            while frontier:
                next_frontier = []
                for current in frontier:
                    for function in self.iterate:
                        children = function(current, variables)
                        found.extend(children)
                        next_frontier.extend(children)
                frontier = next_frontier
            return found
        return list(self.iterate[0](node, variables))

    def rows(self, node: Any, variables: dict[str, Any]) -> list[Row]:
        nodes = self._iteration_nodes(node, variables)
        if not nodes:
            if self.mode == "forEachOrNull":
                return [dict.fromkeys(self.column_names())]
            return []
        produced: list[Row] = []
        for current in nodes:
            partial: list[Row] = [
                {column.name: column.value(current, variables) for column in self.columns}
            ]
            parts = [select.rows(current, variables) for select in self.selects]
            if self.union:
                parts.append(
                    [row for branch in self.union for row in branch.rows(current, variables)]
                )
            for part in parts:
                partial = [{**left, **right} for left in partial for right in part]
            produced.extend(partial)
        return produced


class CompiledView:
    def __init__(self, view: dict[str, Any]) -> None:
        resource_type = view.get("resource")
        if not isinstance(resource_type, str) or not resource_type:
            raise ViewDefinitionError("a ViewDefinition needs a resource type")
        if not view.get("select"):
            raise ViewDefinitionError("a ViewDefinition needs at least one select")
        self.resource_type = resource_type
        self.name = str(view.get("name", resource_type))
        self._variables = {
            constant["name"]: _constant_value(constant) for constant in view.get("constant", [])
        }
        self._where = [_compile(clause["path"]) for clause in view.get("where", [])]
        self._root = _Select({"select": view["select"]})
        self.column_names = self._root.column_names()
        duplicates = {name for name in self.column_names if self.column_names.count(name) > 1}
        if duplicates:
            raise ViewDefinitionError(f"duplicate column names: {', '.join(sorted(duplicates))}")
        self._types = {
            column.name: (column.type, column.collection) for column in _all_columns(self._root)
        }

    def rows(self, resource: dict[str, Any]) -> list[Row]:
        if resource.get("resourceType") != self.resource_type:
            return []
        for clause in self._where:
            try:
                result = clause(resource, self._variables)
            except Exception as error:
                raise ViewDefinitionError(f"where clause failed ({type(error).__name__})") from None
            if len(result) > 1 or (result and not isinstance(result[0], bool)):
                raise ViewDefinitionError("a where clause must return a single boolean")
            if result != [True]:
                return []
        return [
            {name: row.get(name) for name in self.column_names}
            for row in self._root.rows(resource, self._variables)
        ]

    def arrow_schema(self) -> pa.Schema:
        fields = []
        for name in self.column_names:
            fhir_type, collection = self._types[name]
            arrow_type = _ARROW_TYPES.get(fhir_type or "", pa.string())
            fields.append(pa.field(name, pa.list_(arrow_type) if collection else arrow_type))
        return pa.schema(fields)


def _all_columns(select: _Select) -> Iterable[_Column]:
    yield from select.columns
    for child in select.selects:
        yield from _all_columns(child)
    if select.union:
        yield from _all_columns(select.union[0])


def _constant_value(constant: dict[str, Any]) -> Any:
    values = [value for key, value in constant.items() if _CONSTANT_VALUE.match(key)]
    if "name" not in constant or len(values) != 1:
        raise ViewDefinitionError("a constant needs a name and exactly one value[x]")
    return values[0]


def compile_view(view: dict[str, Any]) -> CompiledView:
    return CompiledView(view)


def run_view(view: dict[str, Any], resources: Iterable[dict[str, Any]]) -> list[Row]:
    compiled = compile_view(view)
    return [row for resource in resources for row in compiled.rows(resource)]


def load_view(path: Path) -> dict[str, Any]:
    try:
        view = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ViewDefinitionError(
            f"cannot read ViewDefinition {path.name}: {type(error).__name__}"
        ) from None
    if not isinstance(view, dict) or view.get("resourceType") != "ViewDefinition":
        raise ViewDefinitionError(f"{path.name} is not a ViewDefinition")
    return view


def shipped_views() -> dict[str, dict[str, Any]]:
    """The views that define the raw tables, by table name."""
    return {path.stem: load_view(path) for path in sorted(DEFINITIONS_DIR.glob("*.json"))}
