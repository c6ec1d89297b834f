from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from starvit_assets.clinical.dates import Precision, fhir_datetime_precision, fhir_datetime_start
from starvit_assets.clinical.errors import ClinicalValueError


@pytest.mark.parametrize(
    ("value", "start", "precision"),
    [
        ("2010", datetime(2010, 1, 1, tzinfo=UTC), Precision.YEAR),
        ("2010-09", datetime(2010, 9, 1, tzinfo=UTC), Precision.MONTH),
        ("2010-09-14", datetime(2010, 9, 14, tzinfo=UTC), Precision.DAY),
        ("2010-09-14T08:30:00+02:00", datetime(2010, 9, 14, 6, 30, tzinfo=UTC), Precision.SECOND),
        (
            "2010-09-14T08:30:00.250Z",
            datetime(2010, 9, 14, 8, 30, 0, 250000, tzinfo=UTC),
            Precision.SECOND,
        ),
        ("2010-09-14T08:30:00", datetime(2010, 9, 14, 8, 30, tzinfo=UTC), Precision.SECOND),
    ],
)
def test_fhir_datetime_start_is_the_first_instant(
    value: str, start: datetime, precision: Precision
) -> None:
    assert fhir_datetime_start(value) == start
    assert fhir_datetime_precision(value) is precision


def test_offset_is_kept() -> None:
    parsed = fhir_datetime_start("2010-09-14T08:30:00-05:00")
    assert parsed.utcoffset() == timedelta(hours=-5)
    assert parsed == datetime(2010, 9, 14, 8, 30, tzinfo=timezone(timedelta(hours=-5)))


@pytest.mark.parametrize(
    "value", ["", "10", "2010-9", "2010-13", "2010-02-30", "14/09/2010", "2010-09-14T08:30"]
)
def test_malformed_values_are_refused_without_echoing_them(value: str) -> None:
    with pytest.raises(ClinicalValueError) as raised:
        fhir_datetime_start(value)
    assert value == "" or value not in str(raised.value)
