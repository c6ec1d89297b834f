"""Persistent, PHI-free bookkeeping of Bulk Data exports: resumable jobs and `_since` watermarks.

Layout of the state folder (JSON, written atomically)::

    jobs/<slot>.json     one in-flight export per source: status URL, kick-off time, the
                         request's non-PHI parameters and fingerprint, completed files
    jobs/<slot>.lock     advisory lock held while a process works on that source
    watermarks.json      {source: {resource type or "*": transactionTime}}

A *source* is the base URL plus the export level (``/Patient`` or ``/Group/<id>``), so a
Group export's watermark never feeds a system-level export. Nothing here is resource content:
file records hold local file names, line counts and byte sizes; ``_typeFilter`` values and
``patient`` references are kept only as counts and inside a SHA-256 fingerprint.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from starvit_assets.fhir.errors import ExportError

STATE_VERSION = 1
ALL_TYPES = "*"


@dataclass
class FileRecord:
    """A manifest file fully downloaded, verified and renamed into place."""

    name: str
    kind: str  # output | deleted | error
    resource_type: str
    count: int
    bytes: int


@dataclass
class JobState:
    source: str
    status_url: str
    kicked_off_at: str
    fingerprint: str
    request: dict[str, Any]
    transaction_time: str | None = None
    files: dict[str, FileRecord] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["version"] = STATE_VERSION
        return body

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> JobState:
        return cls(
            source=str(body["source"]),
            status_url=str(body["status_url"]),
            kicked_off_at=str(body["kicked_off_at"]),
            fingerprint=str(body["fingerprint"]),
            request=dict(body.get("request", {})),
            transaction_time=body.get("transaction_time"),
            files={key: FileRecord(**value) for key, value in body.get("files", {}).items()},
        )

    def age_seconds(self, now: dt.datetime | None = None) -> float:
        started = dt.datetime.fromisoformat(self.kicked_off_at)
        return ((now or dt.datetime.now(dt.UTC)) - started).total_seconds()


def _slot(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:24]


def _write_json_atomically(path: Path, body: Any) -> None:
    """tmp + fsync + rename, so a crash leaves the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w") as handle:
            json.dump(body, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        # A corrupt state file must not wedge every later run: treat it as absent.
        return None


def _instant(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


class ExportStateStore:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    # --- jobs ------------------------------------------------------------------------------
    def _job_path(self, source: str) -> Path:
        return self.folder / "jobs" / f"{_slot(source)}.json"

    def load_job(self, source: str) -> JobState | None:
        body = _read_json(self._job_path(source))
        if not isinstance(body, dict) or body.get("version") != STATE_VERSION:
            return None
        try:
            job = JobState.from_json(body)
        except (KeyError, TypeError, ValueError):
            return None
        return job if job.source == source else None

    def save_job(self, job: JobState) -> None:
        _write_json_atomically(self._job_path(job.source), job.to_json())

    def clear_job(self, source: str) -> None:
        self._job_path(source).unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self, source: str) -> Iterator[None]:
        """Exclusive per-source lock: two processes resuming one export would corrupt it."""
        path = self.folder / "jobs" / f"{_slot(source)}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ExportError(
                    "state failed: another export for this source is running "
                    f"(lock held on {path.name})",
                    step="state",
                ) from None
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    # --- watermarks ------------------------------------------------------------------------
    @property
    def _watermark_path(self) -> Path:
        return self.folder / "watermarks.json"

    def watermarks(self, source: str) -> dict[str, str]:
        body = _read_json(self._watermark_path)
        if not isinstance(body, dict):
            return {}
        marks = body.get("sources", {}).get(source, {})
        return {str(k): str(v) for k, v in marks.items()} if isinstance(marks, dict) else {}

    def watermark(self, source: str, types: Iterable[str] | None) -> str | None:
        """The `_since` for the next export of ``types`` (None: everything) from ``source``.

        One `_since` covers the whole request, so it is the oldest watermark of the requested
        types; a type never exported yet means no `_since` at all (a full export), because
        starting later would silently skip that type's history.
        """
        marks = self.watermarks(source)
        wanted = list(types) if types else [ALL_TYPES]
        found = [marks.get(name) for name in wanted]
        if any(value is None for value in found):
            return None
        return min((value for value in found if value is not None), key=_instant)

    def advance_watermarks(self, source: str, types: Iterable[str], transaction_time: str) -> None:
        body = _read_json(self._watermark_path)
        if not isinstance(body, dict) or not isinstance(body.get("sources"), dict):
            body = {"version": STATE_VERSION, "sources": {}}
        marks = body["sources"].setdefault(source, {})
        for name in types:
            previous = marks.get(name)
            # Never move a watermark backwards: an older export finishing late must not make
            # the next run re-fetch (or worse, be judged against) a stale boundary.
            if previous is None or _instant(previous) <= _instant(transaction_time):
                marks[name] = transaction_time
        _write_json_atomically(self._watermark_path, body)
