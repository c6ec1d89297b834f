"""Platform settings, read from the environment (prefix ``STARVIT_``) with pydantic-settings.

All local state lives under one folder, ``STARVIT_HOME`` (default ``.starvit/`` in the
checkout). PHI may be written only below ``phi_dir``.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
DBT_PROJECT_DIR = REPO_ROOT / "dbt_project"

KEY_BYTES = 32
SOURCE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def venv_executable(name: str) -> str:
    """A command from this interpreter's virtualenv, so that a non-activated venv still finds it."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else name


def dbt_executable() -> str:
    return venv_executable("dbt")


class Environment(StrEnum):
    DEV = "dev"
    STAGE = "stage"
    PROD = "prod"


class WarehouseTarget(StrEnum):
    POSTGRES = "postgres"
    BIGQUERY = "bigquery"


class SettingsError(Exception):
    """A setting is missing or invalid; the message says which and how to fix it."""


class StarvitSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STARVIT_", extra="ignore")

    home: Path = Field(default=REPO_ROOT / ".starvit", description="Folder for all local state")
    env: Environment = Environment.DEV
    warehouse_target: WarehouseTarget = WarehouseTarget.POSTGRES
    warehouse_dsn: SecretStr | None = Field(
        default=None, description="External warehouse Postgres DSN; embedded server when unset"
    )
    dagster_dsn: SecretStr | None = Field(
        default=None, description="External Postgres DSN for Dagster storage; embedded when unset"
    )
    fhir_base_url: str | None = Field(
        default=None,
        description="FHIR Bulk Data base URL; when unset a local server is started over source_dir",
    )
    source_dir: Path | None = Field(
        default=None, description="Folder of NDJSON served by the embedded FHIR server"
    )
    lake_dir: Path | None = Field(default=None, description="Raw Parquet lake; default home/lake")
    pseudonymisation_key: SecretStr | None = Field(
        default=None, description="Hex-encoded HMAC key (64 hex characters)"
    )
    pseudonymisation_key_file: Path | None = Field(
        default=None, description="File holding the hex-encoded HMAC key"
    )
    linkage_key: SecretStr | None = Field(
        default=None,
        description=(
            "Hex-encoded HMAC key of the linkage tokens (64 hex characters), shared by every "
            "source of one tokenisation domain and distinct from the pseudonymisation key"
        ),
    )
    linkage_key_file: Path | None = Field(
        default=None, description="File holding the hex-encoded linkage-token key"
    )
    source_name: str = Field(
        default="A",
        pattern=SOURCE_NAME_PATTERN.pattern,
        description="Name of this FHIR source in the person linkage (person_patient_map.source)",
    )
    linkage_peer_lakes: str = Field(
        default="",
        description=(
            "De-identified lakes of the other sources of the tokenisation domain that the "
            "linkage reads beside this one: comma-separated name=path (docs/linkage.md)"
        ),
    )
    export_types: str = (
        "Patient,Encounter,Observation,Condition,MedicationRequest,Procedure,Immunization,"
        "AllergyIntolerance,Consent"
    )
    bq_project: str | None = Field(default=None, description="BigQuery project (bigquery target)")
    bq_location: str = Field(default="US", description="BigQuery location")
    gcs_bucket: str | None = Field(
        default=None, description="Cloud Storage bucket the lake partitions are loaded from"
    )
    gcs_prefix: str = Field(default="starvit", description="Object prefix inside the bucket")
    deid_backend: Literal["local", "dlp"] = Field(
        default="local", description="De-identification backend: the local engine or Cloud DLP"
    )
    dlp_project: str | None = Field(default=None, description="Cloud DLP project id")
    dlp_location: str = Field(default="global", description="Cloud DLP location")
    dlp_kms_key_name: str | None = Field(
        default=None, description="Cloud KMS key that wraps the DLP data key (production)"
    )
    dlp_wrapped_key_file: Path | None = Field(
        default=None, description="File holding the KMS-wrapped DLP data key (binary)"
    )
    gate_workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "Forked processes the de-identification gate spreads one table's batches over "
            "(local backend only)"
        ),
    )
    dbt_docs_url: str = Field(
        default="http://127.0.0.1:8580",
        description="Base URL of the dbt docs site the dbt assets link to (`starvit dbt docs`)",
    )
    k_anonymity_threshold: int = Field(
        default=5, ge=2, description="Smallest acceptable class size on the quasi-identifiers"
    )
    tigergraph_host: str | None = Field(
        default=None,
        description="TigerGraph URL (http://host:14240); when unset loading-job files are written",
    )
    tigergraph_graph: str = Field(default="starvit", description="TigerGraph graph name")
    tigergraph_username: str = Field(default="tigergraph", description="TigerGraph user")
    tigergraph_password: SecretStr | None = Field(default=None, description="TigerGraph password")
    tigergraph_secret: SecretStr | None = Field(
        default=None, description="GSQL secret a RESTPP token is requested with"
    )
    tigergraph_token: SecretStr | None = Field(
        default=None, description="RESTPP token already issued (instead of a secret)"
    )
    tigergraph_batch_size: int = Field(
        default=500, ge=1, description="Vertices or edges per RESTPP upsert request"
    )
    tigergraph_max_attempts: int = Field(
        default=5, ge=1, description="Attempts per RESTPP request on transient errors"
    )
    tigergraph_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description=(
            "Seconds a RESTPP request may take before it is abandoned (and retried); also "
            "sent as TigerGraph's GSQL-TIMEOUT"
        ),
    )
    terminology_url: str | None = Field(
        default=None,
        description="FHIR terminology server base URL; the embedded local service when unset",
    )
    terminology_timeout_seconds: float = Field(
        default=30.0, gt=0, description="Timeout of one terminology HTTP request"
    )
    terminology_batch_size: int = Field(
        default=50, ge=1, description="Operation calls per FHIR batch Bundle"
    )
    terminology_cache_max_entries: int = Field(
        default=100_000, ge=1, description="Most answers the terminology cache keeps"
    )
    terminology_min_valid_share: float = Field(
        default=0.95, ge=0, le=1, description="Least share of valid codes per known code system"
    )
    terminology_max_unknown_system_share: float = Field(
        default=0.05, ge=0, le=1, description="Largest share of coded rows in an unknown system"
    )

    @model_validator(mode="after")
    def _absolute_home(self) -> StarvitSettings:
        self.home = self.home.expanduser().resolve()
        return self

    # --- folders -----------------------------------------------------------------------
    @property
    def phi_dir(self) -> Path:
        return self.home / "phi"

    @property
    def phi_staging_dir(self) -> Path:
        return self.phi_dir / "staging"

    @property
    def embedded_source_dir(self) -> Path:
        """Synthetic or user NDJSON served by the embedded FHIR server: PHI, so under phi/."""
        return self.source_dir.resolve() if self.source_dir else self.phi_dir / "source"

    @property
    def lake_root(self) -> Path:
        return (self.lake_dir or self.home / "lake").resolve()

    @property
    def state_dir(self) -> Path:
        """Non-PHI bookkeeping: export records, watermarks, the dev key."""
        return self.home / "state"

    @property
    def graph_dir(self) -> Path:
        return self.home / "graph"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster_home"

    @property
    def pgdata_dir(self) -> Path:
        return self.home / "pgdata"

    @property
    def resource_types(self) -> list[str]:
        return [t.strip() for t in self.export_types.split(",") if t.strip()]

    @property
    def peer_lakes(self) -> dict[str, Path]:
        """``STARVIT_LINKAGE_PEER_LAKES`` as source name -> lake root (absolute), checked."""
        peers: dict[str, Path] = {}
        for entry in (part.strip() for part in self.linkage_peer_lakes.split(",")):
            if not entry:
                continue
            name, separator, path = (piece.strip() for piece in entry.partition("="))
            if not separator or not name or not path:
                raise SettingsError(
                    f"STARVIT_LINKAGE_PEER_LAKES: {entry!r} is not name=path "
                    "(e.g. B=/srv/starvit-b/lake,C=/srv/starvit-c/lake)"
                )
            if not SOURCE_NAME_PATTERN.fullmatch(name):
                raise SettingsError(
                    f"STARVIT_LINKAGE_PEER_LAKES: source name {name!r} must be 1-64 letters, "
                    "digits, '_', '.' or '-'"
                )
            if name == self.source_name or name in peers:
                raise SettingsError(
                    f"STARVIT_LINKAGE_PEER_LAKES: source {name!r} is named twice (this "
                    f"deployment is source {self.source_name!r}, STARVIT_SOURCE_NAME)"
                )
            peers[name] = Path(path).expanduser().resolve()
        return peers

    # --- warehouse schemas ---------------------------------------------------------------
    def schema_name(self, layer: str) -> str:
        return f"sv_{self.env.value}_{layer}"

    @property
    def raw_schema(self) -> str:
        return self.schema_name("raw")

    # --- secrets -------------------------------------------------------------------------
    @cached_property
    def key(self) -> bytes:
        """The pseudonymisation key; a dev key is generated on first local run, never printed."""
        return self._secret_key(
            self.pseudonymisation_key,
            self.pseudonymisation_key_file,
            "STARVIT_PSEUDONYMISATION_KEY",
            "dev-pseudonymisation.key",
        )

    @cached_property
    def linkage_token_key(self) -> bytes:
        """The linkage-token key (docs/linkage.md): generated in dev like the pseudonymisation
        key, but a different key, so that a token never equals a pseudonym."""
        return self._secret_key(
            self.linkage_key, self.linkage_key_file, "STARVIT_LINKAGE_KEY", "dev-linkage.key"
        )

    def _secret_key(
        self, value: SecretStr | None, file: Path | None, variable: str, dev_file: str
    ) -> bytes:
        if value is not None:
            return _decode_key(value.get_secret_value(), variable)
        if file is not None:
            if not file.is_file():
                raise SettingsError(f"{variable}_FILE points to {file}, which is not a file")
            return _decode_key(file.read_text().strip(), f"{variable}_FILE")
        if self.env is not Environment.DEV:
            raise SettingsError(
                f"environment {self.env.value} needs {variable} or {variable}_FILE: "
                "a generated dev key is allowed only in dev"
            )
        return _dev_key(self.state_dir / dev_file)


def _decode_key(text: str, source: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise SettingsError(f"{source} must be hex-encoded") from None
    if len(key) < KEY_BYTES:
        raise SettingsError(
            f"{source} must hold at least {KEY_BYTES} bytes ({2 * KEY_BYTES} hex characters)"
        )
    return key


def _dev_key(path: Path) -> bytes:
    if not path.exists():
        # Several processes of one run (Dagster's steps, the gate's workers) may each be the
        # first: the key is written whole under a private name and linked into place, which
        # fails for all but one, so nobody reads a half-written key or keeps a different one.
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(KEY_BYTES))
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            draft.unlink(missing_ok=True)
    return _decode_key(path.read_text().strip(), str(path))


def load_settings() -> StarvitSettings:
    return StarvitSettings()
