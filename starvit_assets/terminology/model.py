"""The terminology operations' inputs and answers, and the FHIR ``Parameters`` they travel in.

One interface (``TerminologyService``) with two implementations: the embedded local service
over the shipped CodeSystem/ValueSet/ConceptMap files (``local.py``) and the client of a
remote FHIR terminology server (``client.py``). Both speak the FHIR R4 operations
``CodeSystem/$validate-code``, ``CodeSystem/$lookup``, ``ValueSet/$validate-code``,
``ValueSet/$expand`` and ``ConceptMap/$translate``; this module holds what they share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# tx.fhir.org (and the HL7 validator's terminology tests) name the code system a failed
# $validate-code could not find in this output parameter; the local server does the same.
UNKNOWN_SYSTEM_PARAMETER = "x-caused-by-unknown-system"


class TerminologyError(Exception):
    """A terminology operation failed; the message names the operation and the HTTP status."""

    def __init__(self, operation: str, reason: str, *, status: int | None = None) -> None:
        self.operation = operation
        self.status = status
        where = f"HTTP {status}" if status is not None else "no HTTP response"
        super().__init__(f"terminology {operation} failed ({where}): {reason}")


class NotFoundError(Exception):
    """A code, value set or concept map the service does not know (HTTP 404 on the wire)."""


@dataclass(frozen=True, order=True)
class Coding:
    system: str
    code: str
    display: str | None = None

    def as_fhir(self) -> dict[str, str]:
        coding = {"system": self.system, "code": self.code}
        if self.display is not None:
            coding["display"] = self.display
        return coding


@dataclass(frozen=True)
class Validation:
    """The answer of a ``$validate-code``: ``system_known`` is False when the code system
    itself is unknown to the service (then ``valid`` is False too)."""

    valid: bool
    system_known: bool = True
    display: str | None = None
    message: str | None = None


@dataclass(frozen=True)
class Lookup:
    name: str
    display: str | None
    version: str | None = None


@dataclass(frozen=True)
class MapMatch:
    equivalence: str
    target: Coding
    source: str | None = None
    """Canonical URL of the ConceptMap the match came from."""


@dataclass(frozen=True)
class Translation:
    result: bool
    matches: tuple[MapMatch, ...] = ()
    message: str | None = None

    def best(self) -> MapMatch | None:
        """The first match that is a usable mapping (not ``unmatched`` or ``disjoint``)."""
        for match in self.matches:
            if match.equivalence in MAPPED_EQUIVALENCES:
                return match
        return None


# ConceptMapEquivalence codes (R4) that state the target can stand for the source.
MAPPED_EQUIVALENCES = ("equivalent", "equal", "relatedto", "wider", "subsumes", "narrower")


@dataclass(frozen=True)
class TranslateRequest:
    coding: Coding
    target_system: str | None = None
    concept_map_url: str | None = None


@dataclass(frozen=True)
class Expansion:
    url: str
    total: int
    contains: tuple[Coding, ...] = field(default_factory=tuple)


class TerminologyService(Protocol):
    """What the platform asks of terminology; batched forms for the asset, single for the CLI."""

    @property
    def description(self) -> str:
        """Which service answers (``embedded`` or the server's base URL), for metadata."""
        ...

    def validate_code(self, coding: Coding) -> Validation: ...

    def validate_codes(self, codings: Sequence[Coding]) -> list[Validation]: ...

    def lookup(self, coding: Coding) -> Lookup:
        """Raises ``NotFoundError`` for a code the service does not know."""
        ...

    def validate_in_value_set(self, value_set_url: str, coding: Coding) -> Validation: ...

    def expand(
        self, value_set_url: str, *, filter_text: str | None = None, count: int | None = None
    ) -> Expansion: ...

    def translate(self, request: TranslateRequest) -> Translation: ...

    def translate_many(self, requests: Sequence[TranslateRequest]) -> list[Translation]: ...

    def close(self) -> None: ...


# --- Parameters on the wire ----------------------------------------------------------------
# (name, value[x] key) of the parameters the operations take and give.
_VALUE_KEYS = (
    "valueBoolean",
    "valueString",
    "valueCode",
    "valueUri",
    "valueCanonical",
    "valueInteger",
    "valueCoding",
)


def parameters(*entries: tuple[str, str, Any]) -> dict[str, Any]:
    """A FHIR Parameters resource from (name, value key, value); None values are left out."""
    return {
        "resourceType": "Parameters",
        "parameter": [
            {"name": name, key: value} for name, key, value in entries if value is not None
        ],
    }


def parameter_values(resource: Any) -> dict[str, list[Any]]:
    """Name -> values of a Parameters resource (``part`` lists stay as they are)."""
    if not isinstance(resource, dict) or resource.get("resourceType") != "Parameters":
        raise ValueError("not a FHIR Parameters resource")
    values: dict[str, list[Any]] = {}
    for entry in resource.get("parameter", []):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError("a Parameters entry without a name")
        value: Any = entry.get("part")
        for key in _VALUE_KEYS:
            if key in entry:
                value = entry[key]
                break
        values.setdefault(entry["name"], []).append(value)
    return values


def first(values: dict[str, list[Any]], name: str) -> Any:
    found = values.get(name)
    return found[0] if found else None


def validation_parameters(validation: Validation, system: str) -> dict[str, Any]:
    return parameters(
        ("result", "valueBoolean", validation.valid),
        ("message", "valueString", validation.message),
        ("display", "valueString", validation.display),
        (
            UNKNOWN_SYSTEM_PARAMETER,
            "valueCanonical",
            None if validation.system_known else system,
        ),
    )


def validation_from_parameters(resource: Any) -> Validation:
    values = parameter_values(resource)
    result = first(values, "result")
    if not isinstance(result, bool):
        raise ValueError("$validate-code answer without a boolean result")
    return Validation(
        valid=result,
        system_known=UNKNOWN_SYSTEM_PARAMETER not in values,
        display=first(values, "display"),
        message=first(values, "message"),
    )


def translation_parameters(translation: Translation) -> dict[str, Any]:
    resource = parameters(
        ("result", "valueBoolean", translation.result),
        ("message", "valueString", translation.message),
    )
    for match in translation.matches:
        part = [
            {"name": "equivalence", "valueCode": match.equivalence},
            {"name": "concept", "valueCoding": match.target.as_fhir()},
        ]
        if match.source is not None:
            part.append({"name": "source", "valueUri": match.source})
        resource["parameter"].append({"name": "match", "part": part})
    return resource


def translation_from_parameters(resource: Any) -> Translation:
    values = parameter_values(resource)
    result = first(values, "result")
    if not isinstance(result, bool):
        raise ValueError("$translate answer without a boolean result")
    matches = []
    for part in values.get("match", []):
        if not isinstance(part, list):
            raise ValueError("$translate match without parts")
        fields = parameter_values({"resourceType": "Parameters", "parameter": part})
        concept = first(fields, "concept")
        if not isinstance(concept, dict) or "code" not in concept:
            raise ValueError("$translate match without a concept coding")
        matches.append(
            MapMatch(
                equivalence=str(first(fields, "equivalence") or "equivalent"),
                target=Coding(
                    str(concept.get("system", "")), concept["code"], concept.get("display")
                ),
                source=first(fields, "source"),
            )
        )
    return Translation(result=result, matches=tuple(matches), message=first(values, "message"))


def lookup_parameters(lookup: Lookup) -> dict[str, Any]:
    return parameters(
        ("name", "valueString", lookup.name),
        ("version", "valueString", lookup.version),
        ("display", "valueString", lookup.display),
    )


def lookup_from_parameters(resource: Any) -> Lookup:
    values = parameter_values(resource)
    name = first(values, "name")
    if not isinstance(name, str):
        raise ValueError("$lookup answer without a name")
    return Lookup(name=name, display=first(values, "display"), version=first(values, "version"))


def expansion_resource(expansion: Expansion, identifier: str, timestamp: str) -> dict[str, Any]:
    return {
        "resourceType": "ValueSet",
        "url": expansion.url,
        "status": "active",
        "expansion": {
            "identifier": identifier,
            "timestamp": timestamp,
            "total": expansion.total,
            "contains": [coding.as_fhir() for coding in expansion.contains],
        },
    }


def expansion_from_resource(resource: Any) -> Expansion:
    if not isinstance(resource, dict) or resource.get("resourceType") != "ValueSet":
        raise ValueError("$expand answer is not a ValueSet")
    expansion = resource.get("expansion")
    if not isinstance(expansion, dict):
        raise ValueError("$expand answer without an expansion")
    contains = tuple(
        Coding(str(item.get("system", "")), str(item["code"]), item.get("display"))
        for item in expansion.get("contains", [])
        if isinstance(item, dict) and "code" in item
    )
    total = expansion.get("total", len(contains))
    return Expansion(url=str(resource.get("url", "")), total=int(total), contains=contains)


def operation_outcome(code: str, diagnostics: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }


def outcome_text(resource: Any) -> str | None:
    """The diagnostics of an OperationOutcome, if the body is one."""
    if not isinstance(resource, dict) or resource.get("resourceType") != "OperationOutcome":
        return None
    texts = [
        str(issue.get("diagnostics") or issue.get("details", {}).get("text") or issue.get("code"))
        for issue in resource.get("issue", [])
        if isinstance(issue, dict)
    ]
    return "; ".join(texts) or None
