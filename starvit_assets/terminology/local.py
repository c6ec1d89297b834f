"""The embedded terminology service: the shipped CodeSystem, ValueSet and ConceptMap files.

Answers the same questions a FHIR terminology server does, in process, over JSON resources
(``content/`` in this package by default; docs/terminology.md says what is shipped and under
which licence). A code system it does not hold is unknown (``system_known`` False), and every
code of it invalid; a code missing from a shipped code system is invalid, even though the
shipped code systems are fragments (``content: fragment``): the demo validates its own data.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starvit_assets.terminology.model import (
    Coding,
    Expansion,
    Lookup,
    MapMatch,
    NotFoundError,
    TranslateRequest,
    Translation,
    Validation,
)

CONTENT_DIR = Path(__file__).resolve().parent / "content"


class ContentError(Exception):
    """A terminology content file is unreadable or not a resource the service can use."""


@dataclass(frozen=True)
class _CodeSystem:
    url: str
    name: str
    version: str | None
    concepts: dict[str, str | None]


@dataclass(frozen=True)
class _MapElement:
    concept_map_url: str
    source_system: str
    target_system: str
    targets: tuple[tuple[str, str | None, str], ...]
    """(code, display, equivalence) per target."""


def _resources(folders: Iterable[Path]) -> Iterable[tuple[Path, dict[str, Any]]]:
    for folder in folders:
        if not folder.is_dir():
            raise ContentError(f"terminology content folder {folder} does not exist")
        for path in sorted(folder.glob("*.json")):
            try:
                resource = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as error:
                raise ContentError(f"{path.name}: not readable JSON ({error})") from None
            if not isinstance(resource, dict) or not isinstance(resource.get("url"), str):
                raise ContentError(f"{path.name}: not a FHIR resource with a canonical url")
            yield path, resource


def _flatten(concepts: list[dict[str, Any]]) -> Iterable[tuple[str, str | None]]:
    for concept in concepts:
        yield str(concept["code"]), concept.get("display")
        yield from _flatten(concept.get("concept", []))


class LocalTerminology:
    """The embedded default of ``TerminologyService``."""

    def __init__(self, folders: Sequence[Path] = (CONTENT_DIR,)) -> None:
        self._code_systems: dict[str, _CodeSystem] = {}
        self._value_sets: dict[str, dict[str, Any]] = {}
        self._maps: dict[tuple[str, str], list[_MapElement]] = {}
        self._concept_maps: set[str] = set()
        for path, resource in _resources(folders):
            kind = resource.get("resourceType")
            if kind == "CodeSystem":
                self._add_code_system(resource)
            elif kind == "ValueSet":
                self._value_sets[resource["url"]] = resource
            elif kind == "ConceptMap":
                self._add_concept_map(resource)
            else:
                raise ContentError(f"{path.name}: resourceType {kind!r} is not terminology")

    @property
    def description(self) -> str:
        return "embedded"

    def close(self) -> None:
        """Nothing to release: the content is in memory."""

    def _add_code_system(self, resource: dict[str, Any]) -> None:
        concepts = dict(_flatten(resource.get("concept", [])))
        self._code_systems[resource["url"]] = _CodeSystem(
            url=resource["url"],
            name=str(resource.get("title") or resource.get("name") or resource["url"]),
            version=resource.get("version"),
            concepts=concepts,
        )

    def _add_concept_map(self, resource: dict[str, Any]) -> None:
        url = resource["url"]
        self._concept_maps.add(url)
        for group in resource.get("group", []):
            for element in group.get("element", []):
                targets = tuple(
                    (str(t["code"]), t.get("display"), str(t.get("equivalence", "equivalent")))
                    for t in element.get("target", [])
                    if "code" in t
                )
                mapped = _MapElement(url, group["source"], group["target"], targets)
                self._maps.setdefault((group["source"], str(element["code"])), []).append(mapped)

    # --- CodeSystem ------------------------------------------------------------------------
    def knows_system(self, system: str) -> bool:
        return system in self._code_systems

    def validate_code(self, coding: Coding) -> Validation:
        system = self._code_systems.get(coding.system)
        if system is None:
            return Validation(
                valid=False,
                system_known=False,
                message=f"A definition for CodeSystem '{coding.system}' could not be found",
            )
        if coding.code not in system.concepts:
            return Validation(
                valid=False,
                message=f"Unknown code '{coding.code}' in the CodeSystem '{coding.system}'",
            )
        display = system.concepts[coding.code]
        if coding.display is not None and display is not None and coding.display != display:
            return Validation(
                valid=False,
                display=display,
                message=(
                    f"Wrong display '{coding.display}' for {coding.system}#{coding.code}: "
                    f"should be '{display}'"
                ),
            )
        return Validation(valid=True, display=display)

    def validate_codes(self, codings: Sequence[Coding]) -> list[Validation]:
        return [self.validate_code(coding) for coding in codings]

    def lookup(self, coding: Coding) -> Lookup:
        system = self._code_systems.get(coding.system)
        if system is None:
            raise NotFoundError(f"A definition for CodeSystem '{coding.system}' could not be found")
        if coding.code not in system.concepts:
            raise NotFoundError(f"Unknown code '{coding.code}' in the CodeSystem '{coding.system}'")
        return Lookup(
            name=system.name, display=system.concepts[coding.code], version=system.version
        )

    # --- ValueSet --------------------------------------------------------------------------
    def _value_set(self, url: str) -> dict[str, Any]:
        value_set = self._value_sets.get(url)
        if value_set is None:
            raise NotFoundError(f"A definition for ValueSet '{url}' could not be found")
        return value_set

    def _members(self, url: str) -> list[Coding]:
        members: dict[tuple[str, str], Coding] = {}
        for include in self._value_set(url).get("compose", {}).get("include", []):
            system_url = include.get("system")
            system = self._code_systems.get(system_url) if system_url else None
            if system_url and system is None:
                raise NotFoundError(
                    f"ValueSet '{url}' includes CodeSystem '{system_url}', which is not known"
                )
            if system is None:
                continue
            listed = include.get("concept")
            pairs = (
                ((str(c["code"]), c.get("display")) for c in listed)
                if listed is not None
                else system.concepts.items()
            )
            for code, display in pairs:
                members[(system.url, code)] = Coding(
                    system.url, code, display or system.concepts.get(code)
                )
        return list(members.values())

    def validate_in_value_set(self, value_set_url: str, coding: Coding) -> Validation:
        members = {(m.system, m.code): m for m in self._members(value_set_url)}
        member = members.get((coding.system, coding.code))
        if member is None:
            known = self.knows_system(coding.system)
            return Validation(
                valid=False,
                system_known=known,
                message=(
                    f"The code {coding.system}#{coding.code} is not in the ValueSet "
                    f"'{value_set_url}'"
                ),
            )
        return Validation(valid=True, display=member.display)

    def expand(
        self, value_set_url: str, *, filter_text: str | None = None, count: int | None = None
    ) -> Expansion:
        members = self._members(value_set_url)
        if filter_text:
            wanted = filter_text.lower()
            members = [m for m in members if wanted in (m.display or "").lower()]
        shown = members if count is None else members[: max(count, 0)]
        return Expansion(url=value_set_url, total=len(members), contains=tuple(shown))

    # --- ConceptMap ------------------------------------------------------------------------
    def translate(self, request: TranslateRequest) -> Translation:
        if request.concept_map_url and request.concept_map_url not in self._concept_maps:
            raise NotFoundError(
                f"A definition for ConceptMap '{request.concept_map_url}' could not be found"
            )
        coding = request.coding
        matches = [
            MapMatch(
                equivalence, Coding(element.target_system, code, display), element.concept_map_url
            )
            for element in self._maps.get((coding.system, coding.code), [])
            if (request.concept_map_url in (None, element.concept_map_url))
            and (request.target_system in (None, element.target_system))
            for code, display, equivalence in element.targets
        ]
        if not matches:
            return Translation(
                result=False, message=f"No mapping found for {coding.system}#{coding.code}"
            )
        return Translation(
            result=any(m.equivalence != "unmatched" for m in matches), matches=tuple(matches)
        )

    def translate_many(self, requests: Sequence[TranslateRequest]) -> list[Translation]:
        return [self.translate(request) for request in requests]
