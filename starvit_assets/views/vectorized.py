"""Vectorized flattening: the common ViewDefinition shapes compiled into Arrow work.

A view is compiled once into (1) a minimal explicit Arrow schema holding only the FHIR elements
its paths touch, so that ``pyarrow.json`` parses a whole batch of NDJSON lines in C++ without
inferring anything (dates and dateTimes stay the strings that were written), and (2) a tree of
column operations run with pyarrow.compute and numpy on the parsed batch.

The general evaluator (``runner.CompiledView``) stays the reference: ``compile_vectorized``
returns None for a view that uses anything outside the supported subset, and ``flatten`` hands a
whole batch to the general evaluator whenever the data does something the Arrow path cannot
reproduce exactly (a line pyarrow cannot parse, a value that does not fit the schema, a column
that would hold several values, a primitive with a ``_x`` extension sibling, ...). Both paths
give the same table, so the choice is only about speed.

Collections are kept as (values, owner) pairs: ``values`` is an Arrow array of items and
``owner[i]`` the index of the context item (a resource, or an element of a forEach) that item
belongs to, non-decreasing. That covers FHIRPath's flattening member access, filters and
positions with plain array operations.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
from fhirpathpy.models import models as fhirpath_models

from starvit_assets.views.runner import (
    FHIR_PRIMITIVE_TYPES,
    ROW_INDEX,
    CompiledView,
    ViewDefinitionError,
    fhir_type_matches,
)

Owners = npt.NDArray[np.int64]

_MODEL = fhirpath_models["r4"]
_PATH_TYPES: dict[str, str] = _MODEL["path2Type"]
_CHOICES: dict[str, list[str]] = _MODEL["choiceTypePaths"]
_DEFINED_ELSEWHERE: dict[str, str] = _MODEL["pathsDefinedElsewhere"]
# BackboneElements have no path2Type entry of their own, only their children do.
_BACKBONES = frozenset(
    ".".join(parts[:end])
    for parts in (key.split(".") for key in _PATH_TYPES)
    for end in range(2, len(parts))
) - frozenset(_PATH_TYPES)

# FHIR's JSON puts an element in an array exactly when its max cardinality is above 1, and the
# fhirpathpy model does not say which. These are the repeating elements of the types whose
# definitions were checked one by one (FHIR R4); a path through any other type is not
# vectorized. Getting one wrong is not silent: pyarrow then rejects the batch and the general
# evaluator takes it.
_DATATYPE_ARRAYS = frozenset({"extension"})
_BACKBONE_ARRAYS = frozenset({"extension", "modifierExtension"})
_RESOURCE_ARRAYS = frozenset({"contained", "extension", "modifierExtension"})
_ARRAYS: dict[str, frozenset[str]] = {
    "Extension": _DATATYPE_ARRAYS,
    "Meta": _DATATYPE_ARRAYS | {"profile", "security", "tag"},
    "Narrative": _DATATYPE_ARRAYS,
    "HumanName": _DATATYPE_ARRAYS | {"given", "prefix", "suffix"},
    "Address": _DATATYPE_ARRAYS | {"line"},
    "ContactPoint": _DATATYPE_ARRAYS,
    "Identifier": _DATATYPE_ARRAYS,
    "CodeableConcept": _DATATYPE_ARRAYS | {"coding"},
    "Coding": _DATATYPE_ARRAYS,
    "Quantity": _DATATYPE_ARRAYS,
    "Age": _DATATYPE_ARRAYS,
    "Count": _DATATYPE_ARRAYS,
    "Distance": _DATATYPE_ARRAYS,
    "Duration": _DATATYPE_ARRAYS,
    "Money": _DATATYPE_ARRAYS,
    "Range": _DATATYPE_ARRAYS,
    "Ratio": _DATATYPE_ARRAYS,
    "Period": _DATATYPE_ARRAYS,
    "Reference": _DATATYPE_ARRAYS,
    "Annotation": _DATATYPE_ARRAYS,
    "Attachment": _DATATYPE_ARRAYS,
    "Dosage": _BACKBONE_ARRAYS | {"additionalInstruction", "doseAndRate"},
    "Dosage.doseAndRate": _DATATYPE_ARRAYS,
    "Timing": _BACKBONE_ARRAYS | {"event"},
    "Timing.repeat": _DATATYPE_ARRAYS | {"dayOfWeek", "timeOfDay", "when"},
    "Patient": _RESOURCE_ARRAYS
    | {
        "identifier",
        "name",
        "telecom",
        "address",
        "photo",
        "contact",
        "communication",
        "generalPractitioner",
        "link",
    },
    "Patient.contact": _BACKBONE_ARRAYS | {"relationship", "telecom"},
    "Patient.communication": _BACKBONE_ARRAYS,
    "Patient.link": _BACKBONE_ARRAYS,
    "Encounter": _RESOURCE_ARRAYS
    | {
        "identifier",
        "statusHistory",
        "classHistory",
        "type",
        "episodeOfCare",
        "basedOn",
        "participant",
        "appointment",
        "reasonCode",
        "reasonReference",
        "diagnosis",
        "account",
        "location",
    },
    "Encounter.statusHistory": _BACKBONE_ARRAYS,
    "Encounter.classHistory": _BACKBONE_ARRAYS,
    "Encounter.participant": _BACKBONE_ARRAYS | {"type"},
    "Encounter.diagnosis": _BACKBONE_ARRAYS,
    "Encounter.hospitalization": _BACKBONE_ARRAYS
    | {"dietPreference", "specialCourtesy", "specialArrangement"},
    "Encounter.location": _BACKBONE_ARRAYS,
    "Observation": _RESOURCE_ARRAYS
    | {
        "identifier",
        "basedOn",
        "partOf",
        "category",
        "focus",
        "performer",
        "interpretation",
        "note",
        "referenceRange",
        "hasMember",
        "derivedFrom",
        "component",
    },
    "Observation.referenceRange": _BACKBONE_ARRAYS | {"appliesTo"},
    "Observation.component": _BACKBONE_ARRAYS | {"interpretation", "referenceRange"},
    "Condition": _RESOURCE_ARRAYS
    | {"identifier", "category", "bodySite", "stage", "evidence", "note"},
    "Condition.stage": _BACKBONE_ARRAYS | {"assessment"},
    "Condition.evidence": _BACKBONE_ARRAYS | {"code", "detail"},
    "MedicationRequest": _RESOURCE_ARRAYS
    | {
        "identifier",
        "category",
        "supportingInformation",
        "reasonCode",
        "reasonReference",
        "instantiatesCanonical",
        "instantiatesUri",
        "basedOn",
        "insurance",
        "note",
        "dosageInstruction",
        "detectedIssue",
        "eventHistory",
    },
    "MedicationRequest.dispenseRequest": _BACKBONE_ARRAYS,
    "MedicationRequest.dispenseRequest.initialFill": _BACKBONE_ARRAYS,
    "MedicationRequest.substitution": _BACKBONE_ARRAYS,
    "Procedure": _RESOURCE_ARRAYS
    | {
        "identifier",
        "instantiatesCanonical",
        "instantiatesUri",
        "basedOn",
        "partOf",
        "performer",
        "reasonCode",
        "reasonReference",
        "bodySite",
        "report",
        "complication",
        "complicationDetail",
        "followUp",
        "note",
        "focalDevice",
        "usedReference",
        "usedCode",
    },
    "Procedure.performer": _BACKBONE_ARRAYS,
    "Procedure.focalDevice": _BACKBONE_ARRAYS,
    "Immunization": _RESOURCE_ARRAYS
    | {
        "identifier",
        "performer",
        "note",
        "reasonCode",
        "reasonReference",
        "subpotentReason",
        "education",
        "programEligibility",
        "reaction",
        "protocolApplied",
    },
    "Immunization.performer": _BACKBONE_ARRAYS,
    "Immunization.education": _BACKBONE_ARRAYS,
    "Immunization.reaction": _BACKBONE_ARRAYS,
    "Immunization.protocolApplied": _BACKBONE_ARRAYS | {"targetDisease"},
    "AllergyIntolerance": _RESOURCE_ARRAYS | {"identifier", "category", "reaction", "note"},
    "AllergyIntolerance.reaction": _BACKBONE_ARRAYS | {"manifestation", "note"},
}

# How FHIR primitives arrive in JSON; every other primitive (date, dateTime, instant, code,
# uri, ...) is a string and must stay the exact text: no timestamp parsing, ever.
_JSON_PRIMITIVES: dict[str, pa.DataType] = {
    "boolean": pa.bool_(),
    "integer": pa.int64(),
    "positiveInt": pa.int64(),
    "unsignedInt": pa.int64(),
    "decimal": pa.float64(),
    "System.Boolean": pa.bool_(),
    "System.Integer": pa.int64(),
    "System.Decimal": pa.float64(),
}
# Where `field = literal` is plain equality of the JSON values; FHIRPath compares dates, times
# and decimals by their own rules, which stay with the general evaluator.
_EQUALITY_TYPES = frozenset(
    {
        "string",
        "code",
        "id",
        "uri",
        "url",
        "canonical",
        "oid",
        "uuid",
        "markdown",
        "System.String",
        "boolean",
        "integer",
        "positiveInt",
        "unsignedInt",
    }
)
# The general evaluator turns an integral decimal written without a fraction into a Python int,
# which pyarrow refuses to put in a float64 column above 2**53; such batches go the general way
# so that they fail (or not) exactly as there.
_EXACT_FLOAT_LIMIT = float(2**53)

# runner._REFERENCE in RE2 syntax: Python's `$` also matches before one final newline.
_REFERENCE_PATTERN = (
    r"(?:^|/)(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})"
    r"(?:/_history/[A-Za-z0-9\-.]{1,64})?\n?\z"
)
_CONSTANT_VALUE = re.compile(r"^value[A-Z]")
_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]+")
_SIMPLE_REFERENCE = r"\A{}/[A-Za-z0-9\-.]{{1,64}}\z"

_NULL_EXTENSION = re.compile(rb'"extension"\s*:\s*null')

_MIN_BLOCK = 1 << 20
_TOKEN = re.compile(
    r"\s*(?:(?P<string>'[^'\\]*')|(?P<this>\$this\b)|(?P<constant>%[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<number>\d+)|(?P<ident>[A-Za-z_][A-Za-z0-9_]*)|(?P<punct>[.()\[\],=]))"
)


class _Unsupported(Exception):
    """The view uses something the vectorized path does not compile."""


class _Fallback(Exception):
    """This batch must go through the general evaluator to get its exact result."""


class LineError(ValueError):
    """One line of the batch cannot be flattened; ``line_index`` is 0-based. The message never
    holds content. A ValueError, so that a caller can hand the batch to a per-line path."""

    def __init__(self, line_index: int, reason: str) -> None:
        super().__init__(f"line {line_index} of the batch: {reason}")
        self.line_index = line_index


class InvalidLineError(LineError):
    """The line is not a JSON object."""


class LineViewError(ViewDefinitionError, LineError):
    """The general evaluator raised ViewDefinitionError on the line (chained as __cause__)."""


@dataclass(frozen=True)
class FlatBatch:
    table: pa.Table
    resource_index: pa.Array
    resource_types: pa.Array


# --- the explicit read schema -------------------------------------------------------------------
class _SchemaNode:
    """The touched part of one complex FHIR type, as it will be declared to pyarrow."""

    def __init__(self) -> None:
        self.fields: dict[str, tuple[bool, pa.DataType | None, _SchemaNode | None]] = {}

    def complex_child(self, name: str, is_list: bool) -> _SchemaNode:
        known = self.fields.get(name)
        if known is None:
            node = _SchemaNode()
            self.fields[name] = (is_list, None, node)
            return node
        if known[0] != is_list or known[2] is None:
            raise _Unsupported(f"element {name} is used with two shapes")
        return known[2]

    def leaf(self, name: str, is_list: bool, arrow_type: pa.DataType) -> None:
        known = self.fields.setdefault(name, (is_list, arrow_type, None))
        if known != (is_list, arrow_type, None):
            raise _Unsupported(f"element {name} is used with two shapes")
        # fhirpathpy turns a primitive's `_name` sibling (its id/extensions) into extra items,
        # which only the general evaluator reproduces. Declared as null, any sibling but a JSON
        # null makes pyarrow reject the batch, which then goes the general way; that costs
        # less than reading the siblings and looking.
        self.fields.setdefault(f"_{name}", (False, pa.null(), None))

    def arrow_type(self) -> pa.StructType:
        return pa.struct(
            [
                pa.field(name, _field_type(is_list, leaf, node))
                for name, (is_list, leaf, node) in self.fields.items()
            ]
        )


def _field_type(is_list: bool, leaf: pa.DataType | None, node: _SchemaNode | None) -> pa.DataType:
    inner = leaf if leaf is not None else node.arrow_type() if node is not None else pa.null()
    return pa.list_(inner) if is_list else inner


# --- compiled operations -------------------------------------------------------------------------
@dataclass(frozen=True)
class _Member:
    name: str
    is_list: bool


@dataclass(frozen=True)
class _ResourceKey:
    """getResourceKey() at the resource: its id, read as fhirpathpy reads it (no `_id`)."""


@dataclass(frozen=True)
class _Index:
    position: int  # -1: last()


@dataclass(frozen=True)
class _WhereEqual:
    name: str
    literal: str | bool | int


@dataclass(frozen=True)
class _Extension:
    """fhirpathpy's extension(url): per element its first extension with that url."""

    url: str


@dataclass(frozen=True)
class _ReferenceKey:
    resource_type: str | None


@dataclass(frozen=True)
class _Join:
    separator: str


@dataclass(frozen=True)
class _Exists:
    negate: bool  # empty()


@dataclass(frozen=True)
class _Literal:
    value: str


@dataclass(frozen=True)
class _RowIndex:
    """%rowIndex as a whole column: the item's position in what its select iterates."""


_Op = (
    _Member
    | _ResourceKey
    | _Index
    | _WhereEqual
    | _Extension
    | _ReferenceKey
    | _Join
    | _Exists
    | _Literal
    | _RowIndex
)


@dataclass(frozen=True)
class _Shape:
    """What the items of a collection are, statically."""

    type_path: str | None  # complex FHIR type ("HumanName", "Patient.contact"); None: primitive
    leaf: pa.DataType | None  # Arrow type of primitive items
    node: _SchemaNode | None
    single: bool  # at most one item per context item
    root: bool  # the items are the resources themselves


@dataclass(frozen=True)
class _Expr:
    ops: tuple[_Op, ...]
    shape: _Shape


@dataclass(frozen=True)
class _Column:
    name: str
    expr: _Expr
    arrow_type: pa.DataType  # the column's type in CompiledView.arrow_schema()
    collection: bool


@dataclass(frozen=True)
class _Select:
    mode: str | None
    iterate: _Expr | None
    columns: tuple[_Column, ...]
    selects: tuple[_Select, ...]
    union: tuple[_Select, ...]
    column_types: tuple[tuple[str, pa.DataType], ...]  # every column below, in order


# --- FHIRPath subset: parsing --------------------------------------------------------------------
_Call = tuple[Any, ...]


def _tokens(expression: str) -> list[tuple[str, str]]:
    tokens = []
    position = 0
    text = expression.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.lastgroup is None:
            raise _Unsupported(f"cannot tokenize {expression!r}")
        tokens.append((match.lastgroup, match[match.lastgroup]))
        position = match.end()
    return tokens


class _Parser:
    """Paths of member names, indexers and a few function calls; nothing else."""

    def __init__(self, expression: str) -> None:
        self.expression = expression
        self.tokens = _tokens(expression)
        self.position = 0

    def _peek(self) -> tuple[str, str] | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def _take(self, kind: str, text: str | None = None) -> str:
        token = self._peek()
        if token is None or token[0] != kind or (text is not None and token[1] != text):
            raise _Unsupported(f"unsupported FHIRPath {self.expression!r}")
        self.position += 1
        return token[1]

    def _at(self, kind: str, text: str | None = None) -> bool:
        token = self._peek()
        return token is not None and token[0] == kind and (text is None or token[1] == text)

    def parse(self) -> list[_Call]:
        calls: list[_Call] = []
        if self._at("string"):
            calls.append(("literal", self._take("string")[1:-1]))
        elif self._at("constant", f"%{ROW_INDEX}"):
            self._take("constant")
            calls.append(("rowIndex",))
        elif self._at("this"):
            self._take("this")
            calls.append(("this",))
        else:
            calls.append(self._invocation())
        while self._peek() is not None:
            if self._at("punct", "."):
                self._take("punct", ".")
                calls.append(self._invocation())
            elif self._at("punct", "["):
                self._take("punct", "[")
                calls.append(("index", int(self._take("number"))))
                self._take("punct", "]")
            else:
                raise _Unsupported(f"unsupported FHIRPath {self.expression!r}")
        return calls

    def _invocation(self) -> _Call:
        name = self._take("ident")
        if not self._at("punct", "("):
            return ("member", name)
        self._take("punct", "(")
        args: list[tuple[str, str]] = []
        while not self._at("punct", ")"):
            token = self._peek()
            if token is None:
                raise _Unsupported(f"unsupported FHIRPath {self.expression!r}")
            args.append(token)
            self.position += 1
        self._take("punct", ")")
        return ("function", name, tuple(args))


# --- FHIRPath subset: typing against the FHIR model ---------------------------------------------
def _element(owner: str, name: str) -> tuple[bool, str]:
    """(is_list, type) of element ``name`` of ``owner``; a "@path" type is a BackboneElement."""
    if owner not in _ARRAYS:
        raise _Unsupported(f"type {owner} is not vectorized")
    key = f"{owner}.{name}"
    is_list = name in _ARRAYS[owner]
    if key in _DEFINED_ELSEWHERE:
        return is_list, "@" + _DEFINED_ELSEWHERE[key]
    if key in _PATH_TYPES:
        return is_list, _PATH_TYPES[key]
    if key in _BACKBONES:
        return is_list, "@" + key
    raise _Unsupported(f"{key} is not an R4 element")


def _choice_option(choice: str, type_name: str) -> str:
    """The one JSON suffix of ``choice`` that ofType(type_name) keeps, as the general evaluator
    decides it (subtypes and System types included: Extension.value.ofType(Quantity) keeps
    valueAge too, Observation.effective.ofType(DateTime) valueInstant too)."""
    matching = [
        option
        for option in _CHOICES[choice]
        if fhir_type_matches(_option_type(option), None, type_name)
    ]
    if len(matching) != 1:
        raise _Unsupported(
            f"{choice}.ofType({type_name}) keeps {len(matching)} of its types, not exactly one"
        )
    return matching[0]


def _option_type(option: str) -> str:
    """The FHIR type of a choice suffix: valueString is a string, valueQuantity a Quantity."""
    primitive = option[:1].lower() + option[1:]
    return primitive if primitive in FHIR_PRIMITIVE_TYPES else option


def _literal(token: tuple[str, str], constants: dict[str, Any]) -> str | bool | int:
    kind, text = token
    if kind == "string":
        return text[1:-1]
    if kind == "ident" and text in ("true", "false"):
        return text == "true"
    if kind == "number":
        return int(text)
    if kind == "constant" and isinstance(constants.get(text[1:]), str):
        return str(constants[text[1:]])
    raise _Unsupported(f"unsupported literal {text}")


def _literal_type(literal: str | bool | int) -> pa.DataType:
    if isinstance(literal, bool):
        return pa.bool_()
    return pa.int64() if isinstance(literal, int) else pa.string()


class _Compiler:
    def __init__(self, resource_type: str, constants: dict[str, Any]) -> None:
        self.root_node = _SchemaNode()
        self.root_node.leaf("resourceType", False, pa.string())
        self.root_shape = _Shape(resource_type, None, self.root_node, True, True)
        self.constants = constants
        self.uses_extension = False

    def member(self, shape: _Shape, name: str) -> tuple[_Member, _Shape]:
        if shape.type_path is None or shape.node is None:
            raise _Unsupported(f"member {name} of a primitive")
        is_list, fhir_type = _element(shape.type_path, name)
        single = shape.single and not is_list
        if fhir_type.startswith("@"):
            node = shape.node.complex_child(name, is_list)
            return _Member(name, is_list), _Shape(fhir_type[1:], None, node, single, False)
        if fhir_type[0].islower() or fhir_type.startswith("System."):
            leaf = _JSON_PRIMITIVES.get(fhir_type, pa.string())
            shape.node.leaf(name, is_list, leaf)
            return _Member(name, is_list), _Shape(None, leaf, None, single, False)
        if fhir_type not in _ARRAYS:
            raise _Unsupported(f"type {fhir_type} is not vectorized")
        node = shape.node.complex_child(name, is_list)
        return _Member(name, is_list), _Shape(fhir_type, None, node, single, False)

    def expression(self, expression: str, shape: _Shape) -> _Expr:
        calls = _Parser(expression).parse()
        ops: list[_Op] = []
        index = 0
        while index < len(calls):
            call = calls[index]
            index += 1
            kind = call[0]
            if kind == "this" and index == 1:
                continue
            if kind == "literal" and len(calls) == 1:
                ops.append(_Literal(call[1]))
                shape = _Shape(None, pa.string(), None, True, False)
            elif kind == "rowIndex" and len(calls) == 1:
                ops.append(_RowIndex())
                shape = _Shape(None, pa.int64(), None, True, False)
            elif kind == "member":
                name = call[1]
                choice = f"{shape.type_path}.{name}"
                if shape.type_path is not None and choice in _CHOICES:
                    # A choice element is reachable only through ofType(): value.ofType(Quantity)
                    # is the JSON member valueQuantity.
                    if index >= len(calls) or calls[index][:2] != ("function", "ofType"):
                        raise _Unsupported(f"choice {choice} without ofType()")
                    args = calls[index][2]
                    index += 1
                    if len(args) != 1 or args[0][0] != "ident":
                        raise _Unsupported("ofType() needs a type name")
                    name += _choice_option(choice, args[0][1])
                op, shape = self.member(shape, name)
                ops.append(op)
            elif kind == "index":
                ops.append(_Index(call[1]))
                shape = _Shape(shape.type_path, shape.leaf, shape.node, True, False)
            elif kind == "function":
                shape = self.function(call[1], call[2], shape, ops, first=index == 1)
            else:
                raise _Unsupported(f"unsupported FHIRPath {expression!r}")
        return _Expr(tuple(ops), shape)

    def function(
        self,
        name: str,
        args: tuple[tuple[str, str], ...],
        shape: _Shape,
        ops: list[_Op],
        first: bool,
    ) -> _Shape:
        kinds = [kind for kind, _ in args]
        if name in ("first", "last") and not args:
            ops.append(_Index(0 if name == "first" else -1))
            return _Shape(shape.type_path, shape.leaf, shape.node, True, False)
        if name in ("exists", "empty") and not args:
            ops.append(_Exists(negate=name == "empty"))
            return _Shape(None, pa.bool_(), None, True, False)
        if name == "getResourceKey" and not args and first and shape.root:
            _, result = self.member(shape, "id")
            ops.append(_ResourceKey())
            return result
        if name == "getReferenceKey" and kinds in ([], ["ident"]):
            if shape.type_path != "Reference":
                raise _Unsupported("getReferenceKey() on something else than a Reference")
            self.member(shape, "reference")
            ops.append(_ReferenceKey(args[0][1] if args else None))
            return _Shape(None, pa.string(), None, shape.single, False)
        if name == "join" and kinds in ([], ["string"]):
            if shape.leaf != pa.string():
                raise _Unsupported("join() of something else than strings")
            ops.append(_Join(args[0][1][1:-1] if args else ""))
            return _Shape(None, pa.string(), None, True, False)
        if (
            name == "where"
            and len(args) == 3
            and args[0][0] == "ident"
            and args[1] == ("punct", "=")
        ):
            field_name = args[0][1]
            literal = _literal(args[2], self.constants)
            op, field = self.member(shape, field_name)
            fhir_type = _element(str(shape.type_path), field_name)[1]
            if op.is_list or fhir_type not in _EQUALITY_TYPES:
                raise _Unsupported(f"where({field_name} = ...) on a {fhir_type}")
            if field.leaf != _literal_type(literal):
                raise _Unsupported(f"where({field_name} = ...) with a literal of another type")
            ops.append(_WhereEqual(field_name, literal))
            return _Shape(shape.type_path, shape.leaf, shape.node, shape.single, False)
        if name == "extension" and kinds == ["string"]:
            _, extension = self.member(shape, "extension")
            self.member(extension, "url")
            ops.append(_Extension(args[0][1][1:-1]))
            self.uses_extension = True
            return extension
        raise _Unsupported(f"function {name}() is not vectorized")

    def select(self, spec: dict[str, Any], shape: _Shape, schema: pa.Schema) -> _Select:
        modes = [key for key in ("forEach", "forEachOrNull", "repeat") if key in spec]
        mode = modes[0] if modes else None
        if mode == "repeat":
            raise _Unsupported("repeat is not vectorized")
        iterate = None
        if mode is not None:
            iterate = self.expression(spec[mode], shape)
            navigation = _Member | _Index | _WhereEqual | _Extension
            if not all(isinstance(op, navigation) for op in iterate.ops):
                raise _Unsupported(f"{mode} {spec[mode]!r} is not a plain navigation")
            result = iterate.shape
            shape = _Shape(result.type_path, result.leaf, result.node, True, False)
        columns = tuple(self.column(column, shape, schema) for column in spec.get("column", []))
        selects = tuple(self.select(child, shape, schema) for child in spec.get("select", []))
        union = tuple(self.select(branch, shape, schema) for branch in spec.get("unionAll", []))
        if union and len({branch.column_types for branch in union}) != 1:
            raise _Unsupported("unionAll branches with different column types")
        column_types = tuple((column.name, column.arrow_type) for column in columns)
        for child in selects:
            column_types += child.column_types
        if union:
            column_types += union[0].column_types
        return _Select(mode, iterate, columns, selects, union, column_types)

    def column(self, spec: dict[str, Any], shape: _Shape, schema: pa.Schema) -> _Column:
        name = spec["name"]
        expr = self.expression(spec["path"], shape)
        collection = spec.get("collection", False) is True
        arrow_type = schema.field(name).type
        value_type = arrow_type.value_type if collection else arrow_type
        leaf = expr.shape.leaf
        if leaf is None:
            raise _Unsupported(f"column {name} is not a primitive")
        fits = leaf == value_type or (leaf == pa.int64() and value_type == pa.float64())
        if not fits:
            # The general evaluator fails on such a column when it builds the table; leave it
            # that failure.
            raise _Unsupported(f"column {name}: {leaf} values for a {value_type} column")
        if collection and any(isinstance(op, _ResourceKey) for op in expr.ops):
            # As a collection getResourceKey() tells `"id": null` ([None]) from no id ([]);
            # pyarrow reads both as null.
            raise _Unsupported("getResourceKey() as a collection")
        return _Column(name, expr, arrow_type, collection)


# --- runtime -------------------------------------------------------------------------------------
@dataclass
class _Collection:
    values: pa.Array
    owner: Owners  # context item of each value, non-decreasing
    size: int  # number of context items


class _Context:
    """The items one select runs on, with the collections already computed on them."""

    def __init__(self, items: pa.Array, row_index: Owners | None = None) -> None:
        self.items = items
        self.size = len(items)
        # %rowIndex per item: its position in what the select iterates (0 at the resources).
        self.row_index = np.zeros(self.size, dtype=np.int64) if row_index is None else row_index
        self.cache: dict[tuple[_Op, ...], _Collection] = {}

    def evaluate(self, expr: _Expr) -> _Collection:
        own = np.arange(self.size, dtype=np.int64)
        if expr.ops == (_RowIndex(),):
            return _Collection(pa.array(self.row_index, pa.int64()), own, self.size)
        # Columns share prefixes (code.coding..., value.ofType(Quantity)...): compute each once.
        collection = _Collection(self.items, own, self.size)
        for end in range(len(expr.ops), 0, -1):
            cached = self.cache.get(expr.ops[:end])
            if cached is not None:
                collection = cached
                break
        else:
            end = 0
        for position in range(end, len(expr.ops)):
            collection = _apply(expr.ops[position], collection)
            self.cache[expr.ops[: position + 1]] = collection
        return collection


def _positions(owner: Owners) -> Owners:
    """Each item's 0-based position among the items of the same owner (owner non-decreasing)."""
    return np.arange(len(owner), dtype=np.int64) - np.searchsorted(owner, owner, side="left")


def _on_nothing(expr: _Expr) -> list[Any]:
    """The expression's items on an empty focus with %rowIndex 0, as the general evaluator
    gives them for the null row of a forEachOrNull."""
    items: list[Any] = []
    for op in expr.ops:
        if isinstance(op, _Literal):
            items = [op.value]
        elif isinstance(op, _RowIndex):
            items = [0]
        elif isinstance(op, _Join):
            items = [op.separator.join(items)]
        elif isinstance(op, _Exists):
            items = [not items] if op.negate else [bool(items)]
        elif isinstance(op, _Index):
            items = items[op.position :][:1] if op.position >= 0 else items[-1:]
        else:
            # Navigation: the compiler allows it on complex items only, and on an empty focus
            # there are none.
            items = []
    return items


def _subtree_columns(select: _Select) -> Iterator[_Column]:
    """The columns of a select and everything below it, as the general evaluator walks them."""
    yield from select.columns
    for child in select.selects:
        yield from _subtree_columns(child)
    if select.union:
        yield from _subtree_columns(select.union[0])


def _null_rows(select: _Select, owners: Owners) -> _Rows:
    columns: dict[str, pa.Array] = {}
    for column in _subtree_columns(select):
        items = _on_nothing(column.expr)
        value = items if column.collection else items[0] if items else None
        columns[column.name] = pa.array([value] * len(owners), column.arrow_type)
    return _Rows(owners.astype(np.int64), columns, False)


def _counts(collection: _Collection) -> npt.NDArray[np.int64]:
    return np.bincount(collection.owner, minlength=collection.size).astype(np.int64)


def _keep(collection: _Collection, values: pa.Array, mask: pa.Array) -> _Collection:
    keep = mask.to_numpy(zero_copy_only=False)
    return _Collection(values.filter(mask), collection.owner[keep], collection.size)


def _apply(op: _Op, collection: _Collection) -> _Collection:
    values = collection.values
    if isinstance(op, _Member):
        child = pc.struct_field(values, op.name)
        if op.is_list:
            # fhirpathpy keeps null entries of a JSON array as items (they count for [n],
            # first(), exists() and forEach), so only the absent arrays go.
            lengths = child.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
            owner = np.repeat(collection.owner, lengths)
            return _Collection(pc.list_flatten(child), owner, collection.size)
        if child.null_count == 0:
            return _Collection(child, collection.owner, collection.size)
        return _keep(collection, child, child.is_valid())
    if isinstance(op, _ResourceKey):
        keys = pc.struct_field(values, "id")
        return _keep(collection, keys, keys.is_valid())
    if isinstance(op, _Index):
        owner = collection.owner
        if op.position == 0:
            mask = np.ones(len(owner), dtype=bool)
            mask[1:] = owner[1:] != owner[:-1]
        elif op.position < 0:
            mask = np.ones(len(owner), dtype=bool)
            mask[:-1] = owner[:-1] != owner[1:]
        else:
            starts = np.searchsorted(owner, owner, side="left")
            mask = np.arange(len(owner)) - starts == op.position
        return _Collection(values.filter(pa.array(mask)), owner[mask], collection.size)
    if isinstance(op, _WhereEqual):
        field = pc.struct_field(values, op.name)
        return _keep(collection, values, pc.equal(field, op.literal).fill_null(False))
    if isinstance(op, _Extension):
        extensions = pc.struct_field(values, "extension")
        lengths = extensions.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
        items = pc.list_flatten(extensions)
        urls = pc.struct_field(items, "url")
        if items.null_count or urls.null_count:
            # fhirpathpy fails on a null extension or one without url (KeyError); null and
            # absent urls look alike here, so the general evaluator sorts them out.
            raise _Fallback("extension() over an extension without url")
        element = np.repeat(np.arange(len(values), dtype=np.int64), lengths)
        matches = pc.equal(urls, op.url).to_numpy(zero_copy_only=False)
        element = element[matches]
        first = np.ones(len(element), dtype=bool)
        first[1:] = element[1:] != element[:-1]
        chosen = np.flatnonzero(matches)[first]
        return _Collection(
            items.take(pa.array(chosen, pa.int64())),
            collection.owner[element[first]],
            collection.size,
        )
    if isinstance(op, _ReferenceKey):
        references = pc.struct_field(values, "reference")
        wanted_type = op.resource_type
        if wanted_type is not None and _RESOURCE_TYPE.fullmatch(wanted_type):
            # Nearly every reference is a plain `Type/id`: a capture-free match and a slice
            # are several times cheaper than extract_regex, which the others still get.
            simple = pc.match_substring_regex(references, _SIMPLE_REFERENCE.format(wanted_type))
            if simple.true_count == len(references) - references.null_count:
                keys = pc.utf8_slice_codeunits(references, len(wanted_type) + 1)
                return _keep(collection, keys, simple.fill_null(False))
        parts = pc.extract_regex(references, _REFERENCE_PATTERN)
        keys = pc.struct_field(parts, "id")
        found = keys.is_valid()
        if op.resource_type is not None:
            wanted = pc.equal(pc.struct_field(parts, "type"), op.resource_type)
            found = pc.and_(found, wanted.fill_null(False))
        return _keep(collection, keys, found)
    if isinstance(op, _Join):
        if values.null_count:
            raise _Fallback("join() over null items")
        offsets = np.zeros(collection.size + 1, dtype=np.int32)
        np.cumsum(_counts(collection), out=offsets[1:])
        lists = pa.ListArray.from_arrays(pa.array(offsets), values)
        joined = pc.binary_join(lists, op.separator)
        return _Collection(joined, np.arange(collection.size, dtype=np.int64), collection.size)
    if isinstance(op, _Exists):
        present = _counts(collection) > 0
        result = pa.array(~present if op.negate else present)
        return _Collection(result, np.arange(collection.size, dtype=np.int64), collection.size)
    if isinstance(op, _RowIndex):
        # Only a whole column is %rowIndex, and _Context.evaluate answers it from its items.
        raise AssertionError("%rowIndex is evaluated by its context")
    repeated = pa.array([op.value] * collection.size, pa.string())
    return _Collection(repeated, np.arange(collection.size, dtype=np.int64), collection.size)


def _scatter(collection: _Collection) -> pa.Array:
    """One value per context item (null where none); the collection has at most one each."""
    if len(collection.values) == collection.size:
        return collection.values
    positions = np.full(collection.size, -1, dtype=np.int64)
    positions[collection.owner] = np.arange(len(collection.owner), dtype=np.int64)
    return collection.values.take(pa.array(positions, mask=positions < 0))


def _beyond(values: pa.Array, limit: float) -> bool:
    bounds = pc.min_max(values)
    low, high = bounds["min"].as_py(), bounds["max"].as_py()
    return low is not None and high is not None and (high >= limit or low <= -limit)


def _column_values(column: _Column, context: _Context) -> pa.Array:
    collection = context.evaluate(column.expr)
    values = collection.values
    if values.type == pa.float64() and _beyond(values, _EXACT_FLOAT_LIMIT):
        raise _Fallback("decimal beyond 2**53")
    value_type = column.arrow_type.value_type if column.collection else column.arrow_type
    widened = values.type == pa.int64() and value_type == pa.float64()
    if widened and _beyond(values, _EXACT_FLOAT_LIMIT + 1):
        raise _Fallback("integer beyond 2**53 in a decimal column")
    if column.collection:
        offsets = np.zeros(collection.size + 1, dtype=np.int32)
        np.cumsum(_counts(collection), out=offsets[1:])
        return pa.ListArray.from_arrays(pa.array(offsets), values.cast(value_type))
    if not column.expr.shape.single and len(values) and np.any(np.diff(collection.owner) == 0):
        # The general evaluator reports this ViewDefinitionError with its own message.
        raise _Fallback(f"column {column.name} has several values")
    return _scatter(collection).cast(column.arrow_type)


@dataclass
class _Rows:
    """Rows for the items of a context: ``owner`` says which item each row belongs to."""

    owner: Owners
    columns: dict[str, pa.Array]
    identity: bool  # exactly one row per item, in item order


def _take_rows(rows: _Rows, indices: Owners) -> dict[str, pa.Array]:
    selection = pa.array(indices, pa.int64())
    return {name: values.take(selection) for name, values in rows.columns.items()}


def _product(parts: list[_Rows], size: int) -> _Rows:
    """Per item, the cartesian product of the parts' rows (the first part varies slowest)."""
    if all(part.identity for part in parts):
        columns: dict[str, pa.Array] = {}
        for part in parts:
            columns.update(part.columns)
        return _Rows(np.arange(size, dtype=np.int64), columns, True)
    counts = [np.bincount(part.owner, minlength=size).astype(np.int64) for part in parts]
    totals = np.prod(np.stack(counts), axis=0)
    owner = np.repeat(np.arange(size, dtype=np.int64), totals)
    rank = np.arange(len(owner), dtype=np.int64) - (np.cumsum(totals) - totals)[owner]
    stride = np.ones(len(owner), dtype=np.int64)
    columns = {}
    for part, count in zip(reversed(parts), reversed(counts), strict=True):
        starts = np.cumsum(count) - count
        per_row = count[owner]
        indices = starts[owner] + (rank // stride) % np.maximum(per_row, 1)
        columns.update(_take_rows(part, indices))
        stride = stride * per_row
    ordered = {name: columns[name] for part in parts for name in part.columns}
    return _Rows(owner, ordered, False)


def _concat(parts: list[_Rows]) -> _Rows:
    """All rows of the parts, per item the first part's rows first."""
    owner = np.concatenate([part.owner for part in parts])
    order = np.argsort(owner, kind="stable")
    selection = pa.array(order, pa.int64())
    names = list(parts[0].columns)
    columns = {
        name: pa.concat_arrays([part.columns[name] for part in parts]).take(selection)
        for name in names
    }
    return _Rows(owner[order], columns, False)


def _run_select(select: _Select, context: _Context) -> _Rows:
    if select.iterate is None:
        elements = context
        element_owner: Owners | None = None
    else:
        found = context.evaluate(select.iterate)
        elements = _Context(found.values, _positions(found.owner))
        element_owner = found.owner
    parts: list[_Rows] = []
    if select.columns:
        parts.append(
            _Rows(
                np.arange(elements.size, dtype=np.int64),
                {column.name: _column_values(column, elements) for column in select.columns},
                True,
            )
        )
    parts.extend(_run_select(child, elements) for child in select.selects)
    if select.union:
        parts.append(_concat([_run_select(branch, elements) for branch in select.union]))
    rows = _product(parts, elements.size)
    if element_owner is None:
        return rows
    rows = _Rows(element_owner[rows.owner], rows.columns, False)
    if select.mode == "forEachOrNull":
        empty = np.flatnonzero(np.bincount(element_owner, minlength=context.size) == 0)
        if len(empty):
            # A context item with nothing to iterate keeps one row, for no element.
            rows = _concat([rows, _null_rows(select, empty)])
    return rows


def _is_blank(line: bytes) -> bool:
    return not line or line.isspace()


class VectorizedView:
    """A ViewDefinition compiled to Arrow work; see ``compile_vectorized``."""

    def __init__(
        self,
        general: CompiledView,
        root: _Select,
        where: tuple[_Expr, ...],
        read_schema: pa.Schema,
        uses_extension: bool,
    ) -> None:
        self.resource_type = general.resource_type
        self.column_names = list(general.column_names)
        self._general = general
        self._schema = general.arrow_schema()
        self._root = root
        self._where = where
        self._read_schema = read_schema
        self._uses_extension = uses_extension
        self._parse_options = pa_json.ParseOptions(
            explicit_schema=read_schema, unexpected_field_behavior="ignore"
        )

    @property
    def read_schema(self) -> pa.Schema:
        """The explicit schema pyarrow parses the lines with (the elements the view touches)."""
        return self._read_schema

    def flatten(self, lines: Sequence[bytes]) -> FlatBatch:
        """Rows for the lines, one JSON resource each; lines of another type give no rows.

        Raises a LineError (a ValueError) for the first line that cannot be flattened:
        InvalidLineError when it is not a JSON object, LineViewError (also a
        ViewDefinitionError) where the general evaluator raises on it.
        """
        if not lines:
            return FlatBatch(
                self._schema.empty_table(), pa.array([], pa.int64()), pa.array([], pa.string())
            )
        try:
            return self._vectorized(lines)
        except _Fallback:
            return self._evaluate_generally(lines)

    def _read(self, lines: Sequence[bytes]) -> pa.Table:
        buffer = b"\n".join(lines)
        if self._uses_extension and _NULL_EXTENSION.search(buffer):
            # fhirpathpy's extension() fails on `"extension": null`, which pyarrow reads as
            # an absent array.
            raise _Fallback('"extension": null')
        # pyarrow parses blocks in parallel; a block must hold the longest line.
        threads = max(1, pa.cpu_count())
        block_size = max(
            _MIN_BLOCK, math.ceil(len(buffer) / (2 * threads)), 2 * max(map(len, lines)) + 2
        )
        try:
            table = pa_json.read_json(
                pa.py_buffer(buffer),
                read_options=pa_json.ReadOptions(use_threads=True, block_size=block_size),
                parse_options=self._parse_options,
            )
        except (pa.ArrowException, UnicodeDecodeError) as error:
            raise _Fallback("pyarrow cannot read the batch") from error
        if table.num_rows != len(lines):
            # Two objects on one line, or a line with only a value pyarrow skipped.
            raise _Fallback("lines and parsed objects differ")
        return table

    def _vectorized(self, lines: Sequence[bytes]) -> FlatBatch:
        total = len(lines)
        line_numbers: Owners | None = None
        if not all(lines) or any(map(bytes.isspace, lines)):
            # pyarrow skips blank lines, which would shift every later index.
            line_numbers = np.array(
                [index for index, line in enumerate(lines) if not _is_blank(line)], dtype=np.int64
            )
            lines = [lines[index] for index in line_numbers]
            if not lines:
                return FlatBatch(
                    self._schema.empty_table(),
                    pa.array([], pa.int64()),
                    pa.nulls(total, pa.string()),
                )
        table = self._read(lines)
        resources = pa.StructArray.from_arrays(
            [column.combine_chunks() for column in table.columns], names=table.column_names
        )
        resource_types = pc.struct_field(resources, "resourceType")
        matches = pc.equal(resource_types, self.resource_type).fill_null(False)
        selected = np.flatnonzero(matches.to_numpy(zero_copy_only=False)).astype(np.int64)
        if len(selected) != len(resources):
            resources = resources.take(pa.array(selected))
        context = _Context(resources)
        for clause in self._where:
            keep = _scatter(context.evaluate(clause)).fill_null(False)
            selected = selected[keep.to_numpy(zero_copy_only=False)]
            context = _Context(context.items.filter(keep))
        rows = _run_select(self._root, context)
        flat = pa.Table.from_arrays(
            [rows.columns[name] for name in self.column_names], schema=self._schema
        )
        resource_index = selected[rows.owner]
        if line_numbers is not None:
            resource_index = line_numbers[resource_index]
            positions = np.full(total, -1, dtype=np.int64)
            positions[line_numbers] = np.arange(len(line_numbers), dtype=np.int64)
            resource_types = resource_types.take(pa.array(positions, mask=positions < 0))
        return FlatBatch(flat, pa.array(resource_index, pa.int64()), resource_types)

    def _evaluate_generally(self, lines: Sequence[bytes]) -> FlatBatch:
        columns: dict[str, list[Any]] = {name: [] for name in self.column_names}
        resource_index: list[int] = []
        resource_types: list[str | None] = []
        for index, line in enumerate(lines):
            if _is_blank(line):
                resource_types.append(None)
                continue
            try:
                resource = json.loads(line)
            except ValueError:
                raise InvalidLineError(index, "not valid JSON") from None
            if not isinstance(resource, dict):
                raise InvalidLineError(index, "not a JSON object")
            resource_type = resource.get("resourceType")
            resource_types.append(resource_type if isinstance(resource_type, str) else None)
            try:
                rows = self._general.rows(resource)
            except ViewDefinitionError as error:
                raise LineViewError(index, "the view cannot be evaluated on it") from error
            for row in rows:
                resource_index.append(index)
                for name in self.column_names:
                    columns[name].append(row[name])
        return FlatBatch(
            pa.table(columns, schema=self._schema),
            pa.array(resource_index, pa.int64()),
            pa.array(resource_types, pa.string()),
        )


def _compile(view: dict[str, Any]) -> VectorizedView:
    try:
        general = CompiledView(view)
    except ViewDefinitionError as error:
        raise _Unsupported(f"invalid view: {error}") from None
    constants = {
        constant["name"]: next(
            value for key, value in constant.items() if _CONSTANT_VALUE.match(key)
        )
        for constant in view.get("constant", [])
    }
    compiler = _Compiler(general.resource_type, constants)
    schema = general.arrow_schema()
    root = compiler.select({"select": view["select"]}, compiler.root_shape, schema)
    where = []
    for clause in view.get("where", []):
        expr = compiler.expression(clause["path"], compiler.root_shape)
        if expr.shape.leaf != pa.bool_() or not expr.shape.single:
            raise _Unsupported(f"where {clause['path']!r} is not a single boolean")
        where.append(expr)
    read_schema = pa.schema(list(compiler.root_node.arrow_type()))
    return VectorizedView(general, root, tuple(where), read_schema, compiler.uses_extension)


def unsupported_reason(view: dict[str, Any]) -> str | None:
    """Why ``compile_vectorized`` returns None for the view (None when it compiles)."""
    try:
        _compile(view)
    except _Unsupported as error:
        return str(error)
    return None


def compile_vectorized(view: dict[str, Any]) -> VectorizedView | None:
    """None when the view uses something the vectorized path does not support (caller falls back)."""
    try:
        return _compile(view)
    except _Unsupported:
        return None
