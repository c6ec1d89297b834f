"""dbt zone: staging, refined and derived models as assets; dbt tests as asset checks.

The manifest is prepared at install time (``starvit dbt prepare``), never parsed on every
load of the definitions.
"""

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_dbt import (
    DagsterDbtTranslator,
    DagsterDbtTranslatorSettings,
    DbtCliResource,
    DbtProject,
    dbt_assets,
)

from starvit_assets.defs.resources import PlatformResource
from starvit_assets.settings import DBT_PROJECT_DIR, dbt_executable

DBT_DOCS_PORT = 8580
LAYERS = ("staging", "refined", "derived")

dbt_project = DbtProject(project_dir=DBT_PROJECT_DIR, profiles_dir=DBT_PROJECT_DIR)


class ManifestMissingError(Exception):
    pass


def manifest_path() -> Path:
    path = dbt_project.manifest_path
    if not path.is_file():
        raise ManifestMissingError(
            f"dbt manifest not found at {path}: run `make install` (or `starvit dbt prepare`)"
        )
    return path


def _layer(props: Mapping[str, Any]) -> str:
    if props["resource_type"] == "snapshot":
        return "derived"
    if props["resource_type"] == "seed":
        return "reference"
    fqn = props.get("fqn", [])
    return fqn[1] if len(fqn) > 2 and fqn[1] in LAYERS else "derived"


def _meta(props: Mapping[str, Any]) -> Mapping[str, Any]:
    return {**props.get("meta", {}), **props.get("config", {}).get("meta", {})}


class StarvitDbtTranslator(DagsterDbtTranslator):
    """Keys per zone (``refined/patient``), groups per layer, owners from dbt ``meta.owner``."""

    def get_asset_key(self, dbt_resource_props: Mapping[str, Any]) -> dg.AssetKey:
        if dbt_resource_props["resource_type"] == "source":
            return super().get_asset_key(dbt_resource_props)
        return dg.AssetKey([_layer(dbt_resource_props), dbt_resource_props["name"]])

    def get_group_name(self, dbt_resource_props: Mapping[str, Any]) -> str | None:
        return _layer(dbt_resource_props)

    def get_owners(self, dbt_resource_props: Mapping[str, Any]) -> list[str] | None:
        owner = _meta(dbt_resource_props).get("owner")
        return [owner] if isinstance(owner, str) else None

    def get_metadata(self, dbt_resource_props: Mapping[str, Any]) -> Mapping[str, Any]:
        metadata = dict(super().get_metadata(dbt_resource_props))
        resource_type = dbt_resource_props["resource_type"]
        metadata["dbt_docs"] = dg.MetadataValue.url(
            f"http://localhost:{DBT_DOCS_PORT}/#!/{resource_type}/{dbt_resource_props['unique_id']}"
        )
        return metadata


translator = StarvitDbtTranslator(
    settings=DagsterDbtTranslatorSettings(
        enable_asset_checks=True, enable_source_tests_as_checks=True
    )
)


def dbt_resource(target: str) -> DbtCliResource:
    return DbtCliResource(
        project_dir=dbt_project,
        profiles_dir=str(DBT_PROJECT_DIR),
        target=target,
        dbt_executable=dbt_executable(),
    )


@dbt_assets(
    manifest=manifest_path(),
    project=dbt_project,
    dagster_dbt_translator=translator,
    name="dbt_models",
)
def dbt_models(
    context: dg.AssetExecutionContext, dbt: DbtCliResource, platform: PlatformResource
) -> Iterator[Any]:
    platform.endpoints  # noqa: B018 - starts the embedded warehouse and exports the dbt env
    yield from dbt.cli(["build"], context=context).stream()
