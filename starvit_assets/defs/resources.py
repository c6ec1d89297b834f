"""Dagster resources: thin wrappers that hand the domain modules their settings and endpoints."""

from functools import cached_property

import dagster as dg
import psycopg

from starvit_assets import platform
from starvit_assets.lake.partitions import RawLake
from starvit_assets.settings import StarvitSettings, load_settings


class PlatformResource(dg.ConfigurableResource):
    """Settings and running endpoints (embedded PostgreSQL started on first use)."""

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

    def warehouse_connection(self) -> psycopg.Connection:
        return psycopg.connect(self.endpoints.warehouse_dsn)
