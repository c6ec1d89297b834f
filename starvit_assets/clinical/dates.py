"""FHIR date/dateTime/instant strings to instants, as the ``fhir_datetime_start`` macro does.

A partial date stands for its first instant in UTC: ``2010`` is 2010-01-01T00:00:00Z,
``2010-09`` is 2010-09-01T00:00:00Z, ``2010-09-14`` is midnight UTC that day. A date-time
keeps its offset (FHIR requires one; a missing offset is read as UTC).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum

from starvit_assets.clinical.errors import ClinicalValueError


class Precision(StrEnum):
    YEAR = "year"
    MONTH = "month"
    DAY = "day"
    SECOND = "second"


_FHIR_DATETIME = re.compile(
    r"^(?P<year>\d{4})(-(?P<month>\d{2})(-(?P<day>\d{2})"
    r"(T(?P<time>\d{2}:\d{2}:\d{2}(\.\d+)?)(?P<offset>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


def fhir_datetime_precision(value: str) -> Precision:
    match = _match(value)
    if match["time"] is not None:
        return Precision.SECOND
    if match["day"] is not None:
        return Precision.DAY
    if match["month"] is not None:
        return Precision.MONTH
    return Precision.YEAR


def fhir_datetime_start(value: str) -> datetime:
    """The first instant the FHIR value can denote, timezone-aware."""
    match = _match(value)
    if match["time"] is None:
        year, month, day = int(match["year"]), int(match["month"] or 1), int(match["day"] or 1)
        return _checked(lambda: datetime(year, month, day, tzinfo=UTC))
    offset = match["offset"] or "Z"
    text = value if match["offset"] else value + offset
    return _checked(lambda: datetime.fromisoformat(text))


def _match(value: str) -> re.Match[str]:
    match = _FHIR_DATETIME.match(value)
    if match is None:
        raise ClinicalValueError("not a FHIR date, dateTime or instant")
    return match


def _checked(build: Callable[[], datetime]) -> datetime:
    try:
        return build()
    except ValueError:
        raise ClinicalValueError("not a valid calendar date or time") from None
