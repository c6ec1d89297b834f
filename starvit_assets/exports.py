"""Records of completed exports, shared by the PHI zone and the de-identification gate.

A record names an export and its staged files; it holds no PHI (ids, counts, file names,
the server's transaction time), so it lives in the state folder. The staged NDJSON it points
to lives under ``phi/staging/<export_id>/``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from starvit_assets.lake.consent import CONSENT_FILE_PATTERN
from starvit_assets.settings import StarvitSettings


class ExportRecordError(Exception):
    """No usable export record; the message says which asset to materialize first."""


@dataclass(frozen=True)
class StagedExport:
    export_id: str
    resource_type: str
    transaction_time: str
    files: tuple[str, ...]
    count: int
    since: str | None = None
    """The `_since` the export was made with (None: a full export)."""

    def paths(self, settings: StarvitSettings) -> list[Path]:
        return [staging_dir(settings, self.export_id) / name for name in self.files]


def export_id_for(transaction_time: str) -> str:
    """A filesystem-safe export id derived from the manifest's transactionTime."""
    return re.sub(r"[^0-9A-Za-z]", "", transaction_time.replace("+", "p"))


def staging_dir(settings: StarvitSettings, export_id: str) -> Path:
    return settings.phi_staging_dir / export_id


def _latest_path(settings: StarvitSettings, resource_type: str) -> Path:
    return settings.state_dir / "exports" / "latest" / f"{resource_type}.json"


def record_staged_export(settings: StarvitSettings, export: StagedExport) -> None:
    path = _latest_path(settings, export.resource_type)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(asdict(export), indent=2))
    os.replace(temporary, path)


def latest_staged_export(settings: StarvitSettings, resource_type: str) -> StagedExport:
    path = _latest_path(settings, resource_type)
    if not path.is_file():
        raise ExportRecordError(
            f"no export of {resource_type} has been recorded: materialize fhir/{resource_type} first"
        )
    raw = json.loads(path.read_text())
    return StagedExport(
        export_id=raw["export_id"],
        resource_type=raw["resource_type"],
        transaction_time=raw["transaction_time"],
        files=tuple(raw["files"]),
        count=int(raw["count"]),
        since=raw.get("since"),
    )


def leak_hashes_path(settings: StarvitSettings) -> Path:
    """Salted hashes of identifying values seen in exports (PHI zone, hashes only)."""
    return settings.phi_dir / "leak_hashes.bin"


def consent_ledger_path(settings: StarvitSettings) -> Path:
    """The latest version of every exported Consent (PHI zone; lake/consent.py says why)."""
    return settings.phi_dir / "consent" / "Consent.ndjson"


# The manifest's deleted[] lists, as the client names them in the staged export.
DELETED_FILES_GLOB = "_deleted.*.ndjson"
# The gate's retractions (lake/deletions.py): plain ids, so they stay in the PHI zone until
# deid_raw/deleted_resource pseudonymises them with the deleted[] lists.
RETRACTED_FILES_GLOB = "_retracted.*.ndjson"


def retracted_file(settings: StarvitSettings, export_id: str, name: str) -> Path:
    """The side file where the gate lists what it retracts (``name``: a table, or the
    research opt-outs every table writes alike)."""
    return staging_dir(settings, export_id) / RETRACTED_FILES_GLOB.replace("*", name)


def remove_export_folder_when_done(settings: StarvitSettings, export_id: str) -> None:
    """Remove an export's staging folder once nothing in it waits for de-identification: no
    resource NDJSON, no deleted[] list and no retraction (``deid_raw/deleted_resource`` carries
    those)."""
    folder = staging_dir(settings, export_id)
    if not folder.is_dir():
        return
    consent_files = set(folder.glob(CONSENT_FILE_PATTERN))
    resource_files = [
        path
        for path in folder.glob("*.ndjson")
        if not path.name.startswith("_") and path not in consent_files
    ]
    if (
        resource_files
        or any(folder.glob(DELETED_FILES_GLOB))
        or any(folder.glob(RETRACTED_FILES_GLOB))
    ):
        return
    # What is left is the export's bookkeeping: manifest.json and the error[] lists.
    for leftover in folder.iterdir():
        leftover.unlink()
    folder.rmdir()
