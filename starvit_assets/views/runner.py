"""A SQL on FHIR v2 ViewDefinition runner on fhirpathpy (the general evaluator).

Every FHIRPath expression of a view is parsed once; ``CompiledView.rows`` then evaluates the
view's select tree on one resource. Elements reached by ``forEach``/``forEachOrNull``/``repeat``
stay fhirpathpy nodes, so that ``ofType()`` on choice elements keeps working below them
(fhirpathpy needs its R4 model for that).
"""

from __future__ import annotations

import calendar
import datetime as dt
import decimal
import json
import re
from collections.abc import Callable, Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pyarrow as pa
from antlr4 import CommonTokenStream, InputStream
from antlr4.error.ErrorListener import ErrorListener
from fhirpathpy.engine import do_eval
from fhirpathpy.engine.invocations.constants import constants as fhirpath_constants
from fhirpathpy.engine.nodes import FP_DateTime, FP_Quantity, FP_Time, ResourceNode, TypeInfo
from fhirpathpy.engine.util import arraify, get_data
from fhirpathpy.models import models as fhirpath_models
from fhirpathpy.parser import parse
from fhirpathpy.parser.generated.FHIRPathLexer import FHIRPathLexer
from fhirpathpy.parser.generated.FHIRPathParser import FHIRPathParser

DEFINITIONS_DIR = Path(__file__).with_name("definitions")
# Environment variables the runner sets: %rowIndex (SQL on FHIR 2.1) and FHIR's %resource and
# %rootResource (the resource being flattened; contained resources are not flattened, so both
# are the same resource). A constant may not take one of these names.
ROW_INDEX = "rowIndex"
RESERVED_VARIABLES = frozenset({ROW_INDEX, "resource", "rootResource", "context", "ucum"})
_EXHAUSTED = object()
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
_MODEL = fhirpath_models["r4"]

Row = dict[str, Any]


class ViewDefinitionError(Exception):
    """The ViewDefinition is invalid or cannot be evaluated as written."""


# --- FHIRPath functions the specification adds ---------------------------------------------
# They receive the input collection as fhirpathpy items (ResourceNode, FP_DateTime, ...), not
# as plain data: lowBoundary() must know whether "2010-10-10" is a date or a dateTime, and
# only the node's FHIR type says so.
def _resource_key(inputs: list[Any]) -> list[Any]:
    keys = []
    for item in inputs:
        data = get_data(item)
        if isinstance(data, dict) and "id" in data:
            keys.append(data["id"])
    return keys


# Relative (`Patient/1`), absolute (`https://host/fhir/Patient/1`) and versioned
# (`Patient/1/_history/2`) literal references all name the same row.
_REFERENCE = re.compile(
    r"(?:^|/)(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$"
)


def _reference_key(inputs: list[Any], type_specifier: Any = None) -> list[Any]:
    wanted = getattr(type_specifier, "name", None)
    keys = []
    for item in inputs:
        data = get_data(item)
        reference = data.get("reference") if isinstance(data, dict) else None
        match = _REFERENCE.search(reference) if isinstance(reference, str) else None
        if match and (wanted is None or match["type"] == wanted):
            keys.append(match["id"])
    return keys


def _join(inputs: list[Any], separator: Any = "") -> list[str]:
    # fhirpathpy returns empty for an empty input; the SQL on FHIR tests (and the reference
    # implementation) expect "" so that a joined column is never null just for lack of parts.
    values = [get_data(item) for item in inputs]
    if not all(isinstance(value, str) for value in values):
        raise TypeError("join() needs a collection of strings")
    return [(separator if isinstance(separator, str) else "").join(values)]


# FHIRPath lowBoundary()/highBoundary(): the least/greatest value the input may stand for, given
# its precision, expressed to the requested precision. Precisions are FHIRPath's digit counts.
_DECIMAL_DEFAULT_PRECISION = 8
_DECIMAL_MAX_PRECISION = 28
_DATE_PRECISIONS = (4, 6, 8)
_DATETIME_PRECISIONS = (4, 6, 8, 10, 12, 14, 17)
_TIME_PRECISIONS = (2, 4, 6, 9)
# Without an offset the instant is uncertain by the whole range of offsets: the earliest
# reading is at +14:00, the latest at -12:00.
_LOW_OFFSET, _HIGH_OFFSET = "+14:00", "-12:00"
_DATETIME_TEXT = re.compile(
    r"^(?P<year>\d{4})(?:-(?P<month>\d{2})(?:-(?P<day>\d{2})"
    r"(?:T(?P<hour>\d{2})(?::(?P<minute>\d{2})(?::(?P<second>\d{2})(?:\.(?P<fraction>\d+))?)?)?"
    r"(?P<offset>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)
_TIME_TEXT = re.compile(
    r"^T?(?P<hour>\d{2})(?::(?P<minute>\d{2})(?::(?P<second>\d{2})(?:\.(?P<fraction>\d+))?)?)?$"
)
_BOUNDARY_KINDS = {
    "decimal": "decimal",
    "integer": "decimal",
    "positiveInt": "decimal",
    "unsignedInt": "decimal",
    "integer64": "decimal",
    "System.Decimal": "decimal",
    "System.Integer": "decimal",
    "date": "date",
    "System.Date": "date",
    "dateTime": "dateTime",
    "instant": "dateTime",
    "System.DateTime": "dateTime",
    "time": "time",
    "System.Time": "time",
}


def _boundary_operand(item: Any) -> tuple[str, Any] | None:
    if isinstance(item, ResourceNode):
        kind = _BOUNDARY_KINDS.get(str(item.path))
        return (kind, get_data(item)) if kind else None
    if isinstance(item, FP_Time):
        return "time", item.asStr
    if isinstance(item, FP_DateTime):
        # fhirpathpy parses @2010-10-10 and @2010-10-10T alike; a literal without a time part
        # is read as the Date it usually is.
        text = item.asStr or ""
        return ("dateTime" if "T" in text else "date"), text
    if isinstance(item, decimal.Decimal | int | float) and not isinstance(item, bool):
        return "decimal", get_data(item)
    return None


def _decimal_boundary(value: Any, precision: int | None, high: bool) -> decimal.Decimal | None:
    digits = _DECIMAL_DEFAULT_PRECISION if precision is None else precision
    if not 0 <= digits <= _DECIMAL_MAX_PRECISION:
        return None
    number = decimal.Decimal(value) if isinstance(value, int) else value
    if not isinstance(number, decimal.Decimal) or not number.is_finite():
        return None
    exponent = number.as_tuple().exponent
    scale = max(0, -exponent) if isinstance(exponent, int) else 0
    half_unit = decimal.Decimal(5).scaleb(-(scale + 1))
    with decimal.localcontext() as context:
        context.prec = 2 * _DECIMAL_MAX_PRECISION + 20
        bound = number + half_unit if high else number - half_unit
        return bound.quantize(
            decimal.Decimal(1).scaleb(-digits),
            rounding=decimal.ROUND_CEILING if high else decimal.ROUND_FLOOR,
        )


def _fraction(text: str | None, high: bool) -> str:
    return ((text or "") + ("999" if high else "000"))[:3]


def _datetime_boundary(text: Any, precision: int | None, high: bool, date_only: bool) -> Any:
    allowed = _DATE_PRECISIONS if date_only else _DATETIME_PRECISIONS
    digits = allowed[-1] if precision is None else precision
    match = _DATETIME_TEXT.match(text) if isinstance(text, str) else None
    if digits not in allowed or match is None:
        return None
    year = int(match["year"])
    month = int(match["month"] or (12 if high else 1))
    if not 1 <= month <= 12:
        return None
    last_day = calendar.monthrange(year, month)[1]
    day = int(match["day"] or (last_day if high else 1))
    filled = {
        4: f"{year:04d}",
        6: f"-{month:02d}",
        8: f"-{day:02d}",
        10: f"T{match['hour'] or ('23' if high else '00')}",
        12: f":{match['minute'] or ('59' if high else '00')}",
        14: f":{match['second'] or ('59' if high else '00')}",
        17: f".{_fraction(match['fraction'], high)}",
    }
    result = "".join(part for size, part in filled.items() if size <= digits)
    if digits >= 10:
        result += match["offset"] or (_HIGH_OFFSET if high else _LOW_OFFSET)
    return FP_DateTime(result)


def _time_boundary(text: Any, precision: int | None, high: bool) -> Any:
    digits = _TIME_PRECISIONS[-1] if precision is None else precision
    match = _TIME_TEXT.match(text) if isinstance(text, str) else None
    if digits not in _TIME_PRECISIONS or match is None:
        return None
    filled = {
        2: match["hour"],
        4: f":{match['minute'] or ('59' if high else '00')}",
        6: f":{match['second'] or ('59' if high else '00')}",
        9: f".{_fraction(match['fraction'], high)}",
    }
    return FP_Time("".join(part for size, part in filled.items() if size <= digits))


def _quantity_boundary(item: Any, precision: int | None, high: bool) -> Any:
    """A Quantity's boundary is its value's, in the same unit."""
    if isinstance(item, FP_Quantity):
        value = _decimal_boundary(decimal.Decimal(str(item.value)), precision, high)
        return None if value is None else FP_Quantity(value, item.unit)
    data = get_data(item)
    if not isinstance(data, dict) or "value" not in data:
        return None
    value_node = ResourceNode.create_node(data["value"], "decimal")
    operand = _boundary_operand(value_node)
    if operand is None:
        return None
    value = _decimal_boundary(operand[1], precision, high)
    return None if value is None else ResourceNode.create_node({**data, "value": value}, item.path)


def _is_quantity(item: Any) -> bool:
    return isinstance(item, FP_Quantity) or (
        isinstance(item, ResourceNode) and _fhir_type_is(str(item.path), "Quantity")
    )


def _boundary(inputs: list[Any], precision: Any, high: bool) -> list[Any]:
    # An empty precision argument propagates like any empty operand.
    if not inputs or isinstance(precision, list):
        return []
    if len(inputs) > 1:
        raise ValueError("lowBoundary()/highBoundary() need a single input item")
    if _is_quantity(inputs[0]):
        quantity = _quantity_boundary(inputs[0], precision, high)
        return [] if quantity is None else [quantity]
    if isinstance(inputs[0], ResourceNode) and inputs[0].path == "Period":
        # The SQL on FHIR specification requires the boundaries of a Period: the earliest its
        # start may be, the latest its end may be (empty for an open end).
        bound = get_data(inputs[0]).get("end" if high else "start")
        if bound is None:
            return []
        return _boundary([ResourceNode.create_node(bound, "dateTime")], precision, high)
    operand = _boundary_operand(inputs[0])
    if operand is None:
        return []
    kind, value = operand
    if kind == "decimal":
        result = _decimal_boundary(value, precision, high)
    elif kind == "time":
        result = _time_boundary(value, precision, high)
    else:
        result = _datetime_boundary(value, precision, high, date_only=kind == "date")
    return [] if result is None else [result]


def _low_boundary(inputs: list[Any], precision: Any = None) -> list[Any]:
    return _boundary(inputs, precision, high=False)


def _high_boundary(inputs: list[Any], precision: Any = None) -> list[Any]:
    return _boundary(inputs, precision, high=True)


# --- types: ofType(), is(), as() ------------------------------------------------------------
# The FHIRPath type of each FHIR primitive's value (its `value` element in the FHIR
# definitions): `ofType(String)` or `ofType(System.String)` keeps a FHIR code or uri too.
_SYSTEM_TYPE_OF_PRIMITIVE = {
    "boolean": "Boolean",
    "integer": "Integer",
    "positiveInt": "Integer",
    "unsignedInt": "Integer",
    "integer64": "Long",
    "decimal": "Decimal",
    "date": "Date",
    "dateTime": "DateTime",
    "instant": "DateTime",
    "time": "Time",
    **dict.fromkeys(
        (
            "string",
            "code",
            "id",
            "markdown",
            "uri",
            "url",
            "canonical",
            "oid",
            "uuid",
            "base64Binary",
            "xhtml",
        ),
        "String",
    ),
}
FHIR_PRIMITIVE_TYPES = frozenset(_SYSTEM_TYPE_OF_PRIMITIVE)
_SYSTEM_TYPES = frozenset(_SYSTEM_TYPE_OF_PRIMITIVE.values()) | {"Quantity"}
_TYPE_PARENTS: dict[str, str] = _MODEL["type2Parent"]


def _fhir_type_is(fhir_type: str, wanted: str) -> bool:
    """``fhir_type`` is ``wanted`` or derives from it in the FHIR R4 model (Age is a Quantity,
    code is a string)."""
    current: str | None = fhir_type
    while current:
        if current == wanted:
            return True
        current = _TYPE_PARENTS.get(current)
    return False


def fhir_type_matches(fhir_type: str, namespace: str | None, name: str) -> bool:
    """Whether a value of FHIR type ``fhir_type`` is of the FHIRPath type ``namespace.name``.

    An unqualified name is looked up as a FHIR type, then as a System type. A capitalised FHIR
    primitive that is no System type (``Instant``, ``Code``, ``PositiveInt``) names that
    primitive: the SQL on FHIR tests write ``ofType(Instant)``.
    """
    if namespace in (None, "FHIR") and _fhir_type_is(fhir_type, name):
        return True
    if namespace in (None, "System") and name in _SYSTEM_TYPES:
        return _SYSTEM_TYPE_OF_PRIMITIVE.get(fhir_type) == name
    primitive = name[:1].lower() + name[1:]
    return (
        namespace is None
        and name[:1].isupper()
        and primitive in FHIR_PRIMITIVE_TYPES
        and _fhir_type_is(fhir_type, primitive)
    )


def _has_type(item: Any, type_specifier: Any) -> bool:
    namespace = getattr(type_specifier, "namespace", None)
    name = getattr(type_specifier, "name", None)
    if not isinstance(name, str):
        return False
    info = TypeInfo.from_value(item)
    if info is None:
        return False
    if info.namespace == TypeInfo.System:
        # A System value (a literal, or an element the model types as System.String).
        return namespace in (None, "System") and info.name == name
    return fhir_type_matches(str(info.name), namespace, name)


def _of_type(inputs: list[Any], type_specifier: Any) -> list[Any]:
    # fhirpathpy's ofType() compares names only while no is/as has set its global model, and
    # knows no FHIR primitive as a System type (valueTime.ofType(Time) was empty).
    return [item for item in inputs if _has_type(item, type_specifier)]


def _single_operand(inputs: list[Any], operator: str) -> Any:
    if len(inputs) > 1:
        raise ValueError(f"'{operator}' needs a single item on its left, got {len(inputs)}")
    return inputs[0]


def _is(inputs: list[Any], type_specifier: Any) -> list[Any]:
    if not inputs:
        return []
    return [_has_type(_single_operand(inputs, "is"), type_specifier)]


def _as(inputs: list[Any], type_specifier: Any) -> list[Any]:
    if not inputs:
        return []
    item = _single_operand(inputs, "as")
    return [item] if _has_type(item, type_specifier) else []


_FUNCTIONS: dict[str, dict[str, Any]] = {
    "ofType": {"fn": _of_type, "arity": {1: ["TypeSpecifier"]}},
    "is": {"fn": _is, "arity": {1: ["TypeSpecifier"]}},
    "as": {"fn": _as, "arity": {1: ["TypeSpecifier"]}},
    "isOp": {"fn": _is, "arity": {2: ["Any", "TypeSpecifier"]}},
    "asOp": {"fn": _as, "arity": {2: ["Any", "TypeSpecifier"]}},
    "getResourceKey": {"fn": _resource_key, "arity": {0: []}},
    "getReferenceKey": {"fn": _reference_key, "arity": {0: [], 1: ["TypeSpecifier"]}},
    "lowBoundary": {"fn": _low_boundary, "arity": {0: [], 1: ["Integer"]}},
    "highBoundary": {"fn": _high_boundary, "arity": {0: [], 1: ["Integer"]}},
    "join": {"fn": _join, "arity": {0: [], 1: ["String"]}},
}


def _invocation(function: Callable[..., list[Any]]) -> Callable[..., list[Any]]:
    def invoke(ctx: dict[str, Any], inputs: list[Any], *params: Any) -> list[Any]:
        return function(inputs, *params)

    return invoke


# fhirpathpy's own userInvocationTable wrapper would strip the nodes down to plain data.
_INVOCATIONS = {
    name: {**entry, "fn": _invocation(entry["fn"])} for name, entry in _FUNCTIONS.items()
}


def _is_extension_only(item: Any) -> bool:
    # fhirpathpy represents a primitive that has only an extension (`_given: [{...}]`) as a
    # node of its own; it is not a value.
    return (
        isinstance(item, ResourceNode)
        and isinstance(item.data, dict)
        and list(item.data) == ["extension"]
    )


class _SyntaxErrors(ErrorListener):
    def syntaxError(
        self, recognizer: Any, offendingSymbol: Any, line: int, column: int, msg: str, e: Any
    ) -> None:
        raise SyntaxError(f"column {column + 1}: {msg}")


def _check_syntax(expression: str) -> None:
    # fhirpathpy's parse() recovers from syntax errors and stops at the first token it cannot
    # use, so `name.where(` or `id id` would quietly evaluate as something else.
    listener = _SyntaxErrors()
    lexer = FHIRPathLexer(InputStream(expression))
    lexer.removeErrorListeners()
    lexer.addErrorListener(listener)
    parser = FHIRPathParser(CommonTokenStream(lexer))
    parser.removeErrorListeners()
    parser.addErrorListener(listener)
    parser.entireExpression()


class _Expression:
    """One parsed FHIRPath expression, evaluated on a resource or on a node below it."""

    def __init__(self, expression: str) -> None:
        try:
            _check_syntax(expression)
            self._ast = parse(expression)
        except Exception as error:
            raise ViewDefinitionError(f"invalid FHIRPath {expression!r}: {error}") from None
        self.expression = expression

    def nodes(self, node: Any, variables: dict[str, Any]) -> list[Any]:
        """The result as fhirpathpy items, so that a further expression can start from them."""
        # fhirpath.evaluate() builds the same context, but it leaves `$this` unset outside
        # function arguments: a column `$this` below a forEach needs it at the top level too.
        fhirpath_constants.reset()
        root = arraify(node)
        ctx: dict[str, Any] = {
            "dataRoot": root,
            "$this": root,
            "vars": {"context": node, "ucum": "http://unitsofmeasure.org", **variables},
            "model": _MODEL,
            "userInvocationTable": _INVOCATIONS,
        }
        result = do_eval(ctx, root, self._ast["children"][0])
        return [item for item in arraify(result) if not _is_extension_only(item)]

    def values(self, node: Any, variables: dict[str, Any]) -> list[Any]:
        """The result as plain JSON-like values."""
        return [_plain(get_data(item)) for item in self.nodes(node, variables)]


@cache
def _expression(expression: str) -> _Expression:
    return _Expression(expression)


def _plain(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return (
            int(value)
            if value == value.to_integral_value() and "." not in str(value)
            else float(value)
        )
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    # The FHIRPath text keeps the precision; str() would drop zero milliseconds.
    if isinstance(value, FP_Time):
        return str(value.asStr).removeprefix("T")
    if isinstance(value, FP_DateTime):
        return str(value.asStr)
    if isinstance(value, dt.date | dt.datetime | dt.time):
        return value.isoformat()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return str(value)


# --- compiled select tree ------------------------------------------------------------------
def _path(value: Any, where: str) -> _Expression:
    if not isinstance(value, str) or not value.strip():
        raise ViewDefinitionError(f"{where} needs a FHIRPath string, got {value!r}")
    return _expression(value)


def _objects(spec: dict[str, Any], key: str) -> list[dict[str, Any]]:
    items = spec.get(key, [])
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ViewDefinitionError(f"{key} must be a list of objects")
    return items


class _Column:
    def __init__(self, spec: dict[str, Any]) -> None:
        name = spec.get("name")
        if not isinstance(name, str) or not _COLUMN_NAME.match(name):
            raise ViewDefinitionError(
                f"invalid column name {name!r}: use a letter, then letters, digits or _"
            )
        if "path" not in spec:
            raise ViewDefinitionError(f"column {name} has no path")
        self.name = name
        self.expression = _path(spec["path"], f"column {name}")
        self.type: str | None = spec.get("type")
        self.collection = spec.get("collection", False) is True

    def value(self, node: Any, variables: dict[str, Any]) -> Any:
        try:
            values = self.expression.values(node, variables)
        except Exception as error:
            raise ViewDefinitionError(
                f"column {self.name}: evaluation failed ({type(error).__name__}: {error})"
            ) from None
        if self.collection:
            return values
        if len(values) > 1:
            raise ViewDefinitionError(
                f"column {self.name} returned {len(values)} values; set collection: true or narrow the path"
            )
        return values[0] if values else None


class _Select:
    """One select: its own columns, nested selects and unionAll, joined as a cartesian product,
    once per element of its forEach/forEachOrNull/repeat (or once for the parent element)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        iteration = [key for key in ("forEach", "forEachOrNull", "repeat") if key in spec]
        if len(iteration) > 1:
            raise ViewDefinitionError(
                "a select may use only one of forEach, forEachOrNull and repeat"
            )
        self.mode = iteration[0] if iteration else None
        self.iterate: list[_Expression] = []
        if self.mode == "repeat":
            paths = spec["repeat"]
            if not isinstance(paths, list) or not paths:
                raise ViewDefinitionError("repeat needs a non-empty list of FHIRPath strings")
            self.iterate = [_path(path, "repeat") for path in paths]
        elif self.mode:
            self.iterate = [_path(spec[self.mode], self.mode)]
        self.columns = [_Column(column) for column in _objects(spec, "column")]
        self.selects = [_Select(select) for select in _objects(spec, "select")]
        self.union = [_Select(branch) for branch in _objects(spec, "unionAll")]
        if self.union:
            names = [branch.column_names() for branch in self.union]
            if any(branch_names != names[0] for branch_names in names):
                raise ViewDefinitionError(
                    "unionAll branches must have the same columns in the same order, got "
                    + " vs ".join(str(branch_names) for branch_names in names)
                )

    def column_names(self) -> list[str]:
        # The specification's column order: own columns, then nested selects, then unionAll.
        names = [column.name for column in self.columns]
        for select in self.selects:
            names += select.column_names()
        if self.union:
            names += self.union[0].column_names()
        return names

    def _children(self, node: Any, variables: dict[str, Any]) -> Iterator[Any]:
        for expression in self.iterate:
            yield from expression.nodes(node, variables)

    def _iteration_nodes(self, node: Any, variables: dict[str, Any]) -> list[Any]:
        if self.mode is None:
            return [node]
        try:
            if self.mode != "repeat":
                return self.iterate[0].nodes(node, variables)
            # repeat: every element reachable by any sequence of the paths, the start excluded,
            # depth first in document order (each element, then what it leads to), which is the
            # order %rowIndex counts in. A stack of iterators, not recursion: depth is the data's.
            found: list[Any] = []
            pending = [self._children(node, variables)]
            while pending:
                child = next(pending[-1], _EXHAUSTED)
                if child is _EXHAUSTED:
                    pending.pop()
                    continue
                found.append(child)
                pending.append(self._children(child, variables))
            return found
        except Exception as error:
            paths = ", ".join(expression.expression for expression in self.iterate)
            raise ViewDefinitionError(
                f"{self.mode} {paths}: evaluation failed ({type(error).__name__}: {error})"
            ) from None

    def rows(self, node: Any, variables: dict[str, Any]) -> list[Row]:
        nodes = self._iteration_nodes(node, variables)
        if not nodes:
            if self.mode == "forEachOrNull":
                return [self._null_row(variables)]
            return []
        produced: list[Row] = []
        for index, current in enumerate(nodes):
            # %rowIndex: the element's 0-based position in what this select iterates; a select
            # that does not iterate keeps the enclosing one (0 at the resource).
            scope = variables if self.mode is None else {**variables, ROW_INDEX: index}
            partial: list[Row] = [
                {column.name: column.value(current, scope) for column in self.columns}
            ]
            parts = [select.rows(current, scope) for select in self.selects]
            if self.union:
                parts.append([row for branch in self.union for row in branch.rows(current, scope)])
            # A part with no rows (an empty forEach below) removes the element altogether.
            for part in parts:
                partial = [{**left, **right} for left in partial for right in part]
            produced.extend(partial)
        return produced

    def _null_row(self, variables: dict[str, Any]) -> Row:
        # forEachOrNull with nothing to iterate: one row for no element, so every column below
        # is evaluated on the empty collection with %rowIndex 0. Paths into the element give
        # null; what does not depend on it (%rowIndex, a literal, exists()) keeps its value.
        scope = {**variables, ROW_INDEX: 0}
        return {column.name: column.value([], scope) for column in _all_columns(self)}


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
            constant["name"]: _constant_value(constant) for constant in _objects(view, "constant")
        }
        reserved = sorted(RESERVED_VARIABLES.intersection(self._variables))
        if reserved:
            raise ViewDefinitionError(
                f"constant name {', '.join(reserved)} is reserved for an environment variable"
            )
        self._where = [_path(clause.get("path"), "where") for clause in _objects(view, "where")]
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
        variables = {
            **self._variables,
            ROW_INDEX: 0,
            "resource": resource,
            "rootResource": resource,
        }
        for clause in self._where:
            try:
                result = clause.values(resource, variables)
            except Exception as error:
                raise ViewDefinitionError(
                    f"where {clause.expression!r} failed ({type(error).__name__}: {error})"
                ) from None
            if len(result) > 1 or (result and not isinstance(result[0], bool)):
                raise ViewDefinitionError(
                    f"where {clause.expression!r} must return a single boolean, got {result!r}"
                )
            if result != [True]:
                return []
        return [
            {name: row.get(name) for name in self.column_names}
            for row in self._root.rows(resource, variables)
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
