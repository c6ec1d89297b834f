"""Research opt-outs from FHIR R4 Consent resources, for the record allowlist filter.

Runs in the PHI zone on the Consent resources staged with an export. The rule, after the R4
Consent resource (http://hl7.org/fhir/R4/consent.html):

- only a Consent with ``status`` ``active`` counts (draft, proposed, rejected, inactive and
  entered-in-error directives do not);
- whose ``scope`` is ``research`` (http://terminology.hl7.org/CodeSystem/consentscope);
- whose ``patient`` references a Patient, and whose base ``provision`` has a ``type`` (``deny``
  is an opt-out, ``permit`` an opt-in; consent-provision-type) and, when it has a ``period``,
  covers the export date (day precision);
- a patient's latest such directive (by ``Consent.dateTime``; one without a date is the
  oldest) decides; when two are equally recent, ``deny`` wins.

A patient whose deciding directive is ``deny`` is opted out: every record of that patient is
held back, whatever nested provisions might permit (the whole record, not parts of it: held
back is the safe side of a partial opt-out).

An incremental export (``_since``) carries only the Consents changed since the last one, so the
export step keeps a PHI-zone ledger of the latest version of every Consent across exports
(``update_consent_ledger``); the gate reads the ledger and the export's own staged Consents.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONSENT_SCOPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentscope"
RESEARCH_SCOPE = "research"
CONSENT_FILE_PATTERN = "Consent*.ndjson"


class ConsentError(Exception):
    """A staged Consent line cannot be read; the message names file and line, never content."""


@dataclass(frozen=True)
class ResearchOptOuts:
    patients: frozenset[str]  # PHI-zone patient ids: never leaves the gate
    consents_read: int
    research_directives: int  # active research Consents with a decision in force


def research_opt_outs(resources: Iterable[Mapping[str, Any]], on: dt.date) -> ResearchOptOuts:
    """The patients whose research Consent in force on ``on`` denies research use."""
    latest: dict[str, tuple[str, bool]] = {}  # patient -> (dateTime, denies)
    read = directives = 0
    for resource in resources:
        read += 1
        decision = _research_decision(resource, on)
        if decision is None:
            continue
        directives += 1
        patient, when, denies = decision
        current = latest.get(patient)
        # Later wins; at the same time, deny wins (the tuple order does both).
        if current is None or (when, denies) > current:
            latest[patient] = (when, denies)
    return ResearchOptOuts(
        patients=frozenset(patient for patient, (_, denies) in latest.items() if denies),
        consents_read=read,
        research_directives=directives,
    )


def read_research_opt_outs(files: Sequence[Path], on: dt.date) -> ResearchOptOuts:
    """``research_opt_outs`` of Consent NDJSON files (no files: nobody opted out); a Consent
    id in several files counts once, in its version from the last of them."""
    return research_opt_outs(_latest_versions(files).values(), on)


def update_consent_ledger(
    ledger: Path, staged: Sequence[Path], deleted: Iterable[str], *, full: bool
) -> int:
    """Merge an export's staged Consents into ``ledger`` (the latest version of each Consent
    id; ``full``: the export holds every Consent, so the ledger starts again from it) and drop
    the ``Consent/<id>`` references of its deleted[] lists. Written to a temporary file and
    renamed: a crash leaves the previous ledger. Returns the Consents the ledger holds."""
    previous = [ledger] if ledger.is_file() and not full else []
    latest = _latest_versions([*previous, *staged])
    for reference in deleted:
        resource_type, _, resource_id = reference.partition("/")
        if resource_type == "Consent":
            latest.pop(resource_id, None)
    ledger.parent.mkdir(parents=True, exist_ok=True)
    temporary = ledger.with_name(ledger.name + ".tmp")
    with temporary.open("w", encoding="utf-8", newline="\n") as out:
        for resource in latest.values():
            out.write(json.dumps(resource, separators=(",", ":")) + "\n")
    os.replace(temporary, ledger)
    return len(latest)


def _latest_versions(files: Sequence[Path]) -> dict[str, Mapping[str, Any]]:
    latest: dict[str, Mapping[str, Any]] = {}
    for position, resource in enumerate(_resources(files)):
        resource_id = resource.get("id")
        # A Consent without an id cannot be superseded by id: it stands on its own.
        key = resource_id if isinstance(resource_id, str) and resource_id else f"#{position}"
        latest.pop(key, None)  # re-inserted last: the ledger keeps export order
        latest[key] = resource
    return latest


def _resources(files: Sequence[Path]) -> Iterable[Mapping[str, Any]]:
    for path in files:
        with path.open("rb") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    resource = json.loads(line)
                except ValueError:
                    raise ConsentError(f"{path.name} line {number}: not valid JSON") from None
                if not isinstance(resource, dict) or resource.get("resourceType") != "Consent":
                    raise ConsentError(f"{path.name} line {number}: not a Consent resource")
                yield resource


def _research_decision(resource: Mapping[str, Any], on: dt.date) -> tuple[str, str, bool] | None:
    if resource.get("status") != "active" or not _is_research(resource.get("scope")):
        return None
    patient = _patient_id(resource.get("patient"))
    provision = resource.get("provision")
    if patient is None or not isinstance(provision, dict):
        return None
    kind = provision.get("type")
    if kind not in ("deny", "permit") or not _in_force(provision.get("period"), on):
        return None
    when = resource.get("dateTime")
    return patient, when if isinstance(when, str) else "", kind == "deny"


def _is_research(scope: object) -> bool:
    codings = scope.get("coding") if isinstance(scope, dict) else None
    return isinstance(codings, list) and any(
        isinstance(coding, dict)
        and coding.get("system") == CONSENT_SCOPE_SYSTEM
        and coding.get("code") == RESEARCH_SCOPE
        for coding in codings
    )


def _patient_id(reference: object) -> str | None:
    """The id of a ``Patient/<id>`` reference (relative, or absolute ending so)."""
    value = reference.get("reference") if isinstance(reference, dict) else None
    if not isinstance(value, str):
        return None
    parts = value.split("/")
    if len(parts) < 2 or parts[-2] != "Patient" or not parts[-1]:
        return None
    return parts[-1]


def _in_force(period: object, on: dt.date) -> bool:
    if not isinstance(period, dict):
        return True
    day = on.isoformat()
    start, end = period.get("start"), period.get("end")
    # Compared at the bound's own precision: an end of "2024" runs through 2024-12-31.
    if isinstance(start, str) and start[:10] > day[: len(start[:10])]:
        return False
    return not (isinstance(end, str) and end[:10] < day[: len(end[:10])])
