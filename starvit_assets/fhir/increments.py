"""Which `_since` a daily-partitioned export run asks for (pure logic, no Dagster).

A partition is the UTC day an export runs on. Its run fetches what changed since the stored
watermark (the previous export's ``transactionTime``), with three exceptions:

* a full refresh ignores the watermark;
* a re-run of a *past* day (the watermark already lies beyond that day's end) fetches
  everything changed since the start of that day, because the Bulk Data IG v2 has no upper
  bound (`_until`) to cut an export to one window;
* a staged export that has not been de-identified yet would be superseded by the new one
  (the gate reads the latest export of each type), so the new export starts no later than
  that export's own `_since`: it then holds everything the superseded one held, and nothing
  between two exports is lost.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class SincePlan:
    since: str | None
    """The `_since` to send; None is a full export."""
    reason: str
    """Why, in words fit for logs and metadata (no PHI: instants and export ids only)."""


def _instant(value: str) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def format_instant(moment: dt.datetime) -> str:
    """A FHIR instant in UTC, e.g. ``2026-12-02T00:00:00Z``."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def plan_since(
    *,
    watermark: str | None,
    window_start: dt.datetime,
    window_end: dt.datetime,
    full_refresh: bool = False,
    superseded: Mapping[str, str | None] | None = None,
) -> SincePlan:
    """The `_since` of the run of the partition ``[window_start, window_end)``.

    ``watermark`` is the stored watermark of the requested types (None: some type was never
    exported). ``superseded`` maps the id of each staged export that is not yet
    de-identified to the `_since` it was made with (None: it was a full export).
    """
    if full_refresh:
        return SincePlan(None, "full refresh: the watermark is ignored")
    if watermark is None:
        return SincePlan(None, "no watermark yet for these types: full export")
    if _instant(watermark) < window_end:
        since, reason = watermark, "since the stored watermark"
    else:
        since = format_instant(window_start)
        reason = "a past day re-run: since the start of the partition's window"
    for export_id, earlier in sorted((superseded or {}).items()):
        if earlier is None:
            return SincePlan(None, f"export {export_id} is not de-identified yet and was full")
        if _instant(earlier) < _instant(since):
            since, reason = earlier, f"export {export_id} is not de-identified yet: its _since"
    return SincePlan(since, reason)
