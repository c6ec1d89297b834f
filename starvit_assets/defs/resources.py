"""Dagster resources: thin wrappers that hand the domain modules their settings and endpoints."""

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property

import dagster as dg
import psycopg
from dagster_gcp import BigQueryResource, GCSResource

from starvit_assets import platform
from starvit_assets.deid.engine import DeidBackend, LocalDeidEngine
from starvit_assets.deid.policy import Policy
from starvit_assets.lake.partitions import QUARANTINE_LAYER, RawLake
from starvit_assets.settings import StarvitSettings, WarehouseTarget, load_settings
from starvit_assets.warehouse.targets import (
    BigQueryRawWarehouse,
    RawWarehouse,
    gcs_lake,
    postgres_raw_warehouse,
)


def bigquery_resource(settings: StarvitSettings) -> BigQueryResource:
    """dagster-gcp's BigQuery resource for the configured project and location; credentials
    are Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, workload identity)."""
    return BigQueryResource(project=settings.bq_project, location=settings.bq_location)


def gcs_resource(settings: StarvitSettings) -> GCSResource:
    """dagster-gcp's Cloud Storage resource, billed to the BigQuery project."""
    return GCSResource(project=settings.bq_project)


class PlatformResource(dg.ConfigurableResource):
    """Settings and running endpoints (embedded PostgreSQL started on first use).

    ``bigquery`` and ``gcs`` are the dagster-gcp resources that hand the bigquery target its
    clients; unset, they are built from the settings (``bigquery_resource``, ``gcs_resource``).
    """

    bigquery: BigQueryResource | None = None
    gcs: GCSResource | None = None

    @cached_property
    def settings(self) -> StarvitSettings:
        settings = load_settings()
        platform.ensure_dirs(settings)
        return settings

    @cached_property
    def endpoints(self) -> platform.Endpoints:
        return platform.activate(self.settings)

    @property
    def lake(self) -> RawLake:
        return RawLake(self.settings.lake_root)

    @property
    def quarantine(self) -> RawLake:
        return RawLake(self.settings.lake_root, layer=QUARANTINE_LAYER)

    def deid_backend(self, policy: Policy, reference_date: dt.date) -> DeidBackend:
        """The configured backend for one export: the local engine, or Cloud DLP."""
        settings = self.settings
        if settings.deid_backend == "local":
            return LocalDeidEngine(settings.key, policy, reference_date=reference_date)
        from starvit_assets.deid.dlp import KmsWrappedKey, UnwrappedKey, create_dlp_backend

        if not settings.dlp_project:
            raise dg.Failure(description="STARVIT_DEID_BACKEND=dlp needs STARVIT_DLP_PROJECT")
        key: KmsWrappedKey | UnwrappedKey
        if settings.dlp_kms_key_name and settings.dlp_wrapped_key_file:
            key = KmsWrappedKey(
                settings.dlp_wrapped_key_file.read_bytes(), settings.dlp_kms_key_name
            )
        elif settings.env == "dev":
            key = UnwrappedKey(settings.key)
        else:
            raise dg.Failure(
                description=(
                    "outside dev, the DLP backend needs a KMS-wrapped key: set "
                    "STARVIT_DLP_KMS_KEY_NAME and STARVIT_DLP_WRAPPED_KEY_FILE"
                )
            )
        return create_dlp_backend(
            project=settings.dlp_project,
            location=settings.dlp_location,
            key=key,
            policy=policy,
            reference_date=reference_date,
        )

    @contextmanager
    def raw_warehouse(self) -> Iterator[RawWarehouse]:
        """The configured warehouse's raw schema: PostgreSQL or BigQuery. Raises LoadError
        when the bigquery target lacks its project or bucket."""
        settings = self.settings
        if settings.warehouse_target != WarehouseTarget.BIGQUERY:
            with postgres_raw_warehouse(settings, self.endpoints.warehouse_dsn) as warehouse:
                yield warehouse
            return
        lake = gcs_lake(settings)
        bigquery = self.bigquery or bigquery_resource(settings)
        gcs = self.gcs or gcs_resource(settings)
        with bigquery.get_client() as client:
            yield BigQueryRawWarehouse(
                client,
                gcs.get_client(),
                lake,
                env=settings.env.value,
                location=bigquery.location or settings.bq_location,
            )

    def warehouse_connection(self) -> psycopg.Connection:
        return psycopg.connect(self.endpoints.warehouse_dsn)
