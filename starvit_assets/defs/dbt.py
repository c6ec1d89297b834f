"""dbt zone: staging, refined and derived models as assets; dbt tests as asset checks.

The manifest is prepared at install time (``starvit dbt prepare``), never parsed on every
load of the definitions. Every model carries a ``contract`` (grain, keys, semantics, units)
derived from its description, its ``unique`` tests, its config and its column descriptions;
the staging models also carry their column lineage from the warehouse raw tables, parsed from
their SQL (``starvit_assets.lineage``).
"""

import datetime as dt
import json
import os
import re
from collections.abc import Iterator, Mapping
from functools import cache
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

from starvit_assets.clinical.terminology import BODY_MEASURES
from starvit_assets.defs.resources import PlatformResource
from starvit_assets.defs.warehouse import raw_contract, warehouse_raw_key
from starvit_assets.lineage import TableLineage, shipped_lineage, staging_model_name
from starvit_assets.settings import (
    DBT_PROJECT_DIR,
    WarehouseTarget,
    dbt_executable,
    load_settings,
)

DBT_DOCS_PORT = 8580
# `starvit dbt docs` generates here, apart from the prepared manifest in dbt_project/target.
DBT_DOCS_TARGET_DIR = DBT_PROJECT_DIR / "target" / "docs"
DBT_INDIRECT_SELECTION = "DBT_INDIRECT_SELECTION"
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


# --- contracts -------------------------------------------------------------------------------
# Units a column description may state ("... in kg/m2"): the canonical units of the body
# measures, and years.
KNOWN_UNITS = frozenset({measure.canonical_unit for measure in BODY_MEASURES} | {"years"})
_STATED_UNIT = re.compile(r"\bin (?:whole )?(?P<unit>[A-Za-z0-9_/\[\]]+)")


@cache
def _unique_tested_columns() -> dict[str, tuple[str, ...]]:
    """Node unique id -> columns with a dbt ``unique`` test, from the prepared manifest."""
    manifest = json.loads(manifest_path().read_text())
    columns: dict[str, list[str]] = {}
    for node in manifest["nodes"].values():
        test = node.get("test_metadata") or {}
        if node["resource_type"] == "test" and test.get("name") == "unique":
            attached, column = node.get("attached_node"), node.get("column_name")
            if attached and column:
                columns.setdefault(attached, []).append(column)
    return {node: tuple(sorted(set(names))) for node, names in columns.items()}


def _first_sentence(text: str) -> str:
    match = re.match(r"(.+?\.)(?:\s|$)", text)
    return match.group(1) if match else text


def _stated_units(props: Mapping[str, Any]) -> dict[str, str]:
    """Column -> unit, from the column's ``meta.unit`` or its description ("... in kg",
    "... in value_unit_code" when another column of the model holds the unit)."""
    columns = props.get("columns", {})
    units: dict[str, str] = {}
    for name, column in columns.items():
        declared = (column.get("meta") or {}).get("unit")
        if isinstance(declared, str):
            units[name] = declared
            continue
        for match in _STATED_UNIT.finditer(" ".join(column.get("description", "").split())):
            unit = match["unit"]
            if unit in KNOWN_UNITS:
                units[name] = unit
                break
            if unit in columns and unit != name:
                units[name] = f"per row: the unit in column {unit}"
                break
    return units


def _staging_lineage(props: Mapping[str, Any]) -> TableLineage | None:
    """The lineage of a staging model over one raw table, when it is one."""
    sources = props.get("sources") or []
    if props["resource_type"] != "model" or len(sources) != 1:
        return None
    lineage = shipped_lineage().get(sources[0][-1])
    if lineage is None or props["name"] != staging_model_name(lineage.table):
        return None
    return lineage


def dbt_contract(props: Mapping[str, Any]) -> dict[str, Any]:
    """The data contract of a dbt node: ``meta.contract`` entries win; otherwise grain is the
    description's first sentence, keys are the ``unique``-tested columns (each a key of its
    own) or the ``unique_key`` config, semantics is the description and units are stated per
    column. A staging model inherits grain and keys from its raw table, renamed."""
    declared = _meta(props).get("contract")
    declared = declared if isinstance(declared, Mapping) else {}
    description = " ".join(props.get("description", "").split())
    keys: list[list[str]] = [
        [column] for column in _unique_tested_columns().get(props["unique_id"], ())
    ]
    unique_key = props.get("config", {}).get("unique_key")
    if unique_key and props["resource_type"] == "snapshot":
        keys = [["dbt_scd_id"], [*_as_list(unique_key), "dbt_valid_from"]]
    elif unique_key and not keys:
        keys = [_as_list(unique_key)]
    grain = _first_sentence(description)
    lineage = _staging_lineage(props)
    if lineage is not None:
        raw = raw_contract(lineage)
        renames = lineage.staging_renames()
        grain = f"{raw['grain']} (a view over raw {lineage.table})"
        keys = [[renames[column][0] for column in key] for key in raw["keys"]]
    contract: dict[str, Any] = {
        "grain": declared.get("grain", grain),
        "keys": declared.get("keys", keys),
        "semantics": declared.get("semantics", description),
        "enforced": bool(props.get("config", {}).get("contract", {}).get("enforced", False)),
    }
    units = declared.get("units", _stated_units(props))
    if units:
        contract["units"] = units
    return contract


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def staging_column_lineage(lineage: TableLineage) -> dg.TableColumnLineage:
    """Each staging column from the raw columns its select-list expression reads."""
    upstream = warehouse_raw_key(lineage.table)
    return dg.TableColumnLineage(
        deps_by_column={
            column: [dg.TableColumnDep(asset_key=upstream, column_name=raw) for raw in raws]
            for column, raws in lineage.staging_sources.items()
        }
    )


def dbt_docs_url(props: Mapping[str, Any], base_url: str | None = None) -> str:
    """The node's page in the dbt docs site (``starvit dbt docs`` serves it on
    ``STARVIT_DBT_DOCS_URL``, default http://127.0.0.1:8580): ``#!/model/model.starvit.<name>``,
    ``#!/source/source.starvit.fhir_raw.<table>`` and so on."""
    base = (base_url or load_settings().dbt_docs_url).rstrip("/")
    return f"{base}/#!/{props['resource_type']}/{props['unique_id']}"


# --- freshness from dbt meta --------------------------------------------------------------
_DURATION = re.compile(r"^(?:(?P<d>\d+)d)?(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?$")


class DbtMetaError(ValueError):
    """A dbt node's ``meta.dagster`` entry cannot be read; the message names the node."""


def _duration(node: str, name: str, value: object) -> dt.timedelta:
    text = str(value).strip()
    match = _DURATION.match(text)
    if not text or match is None:
        raise DbtMetaError(
            f"{node}: meta.dagster.freshness.{name} is {value!r}; write a duration such as "
            "'26h', '7d' or '1d12h'"
        )
    return dt.timedelta(
        days=int(match["d"] or 0), hours=int(match["h"] or 0), minutes=int(match["m"] or 0)
    )


def dbt_freshness_policy(props: Mapping[str, Any]) -> dg.FreshnessPolicy | None:
    """The freshness policy a dbt node declares in ``meta.dagster.freshness``, if any:
    ``{fail_window: 26h, warn_window: 25h}`` (time window; warn optional) or
    ``{cron: "0 6 * * 1", lower_bound_delta: 7d, timezone: UTC}`` (deadline cron)."""
    dagster_meta = _meta(props).get("dagster")
    declared = dagster_meta.get("freshness") if isinstance(dagster_meta, Mapping) else None
    if declared is None:
        return None
    node = props.get("unique_id", props.get("name", "?"))
    if not isinstance(declared, Mapping):
        raise DbtMetaError(f"{node}: meta.dagster.freshness must be a mapping")
    if "cron" in declared:
        unknown = set(declared) - {"cron", "lower_bound_delta", "timezone"}
        if unknown or "lower_bound_delta" not in declared:
            raise DbtMetaError(
                f"{node}: a cron freshness takes cron, lower_bound_delta and optionally "
                f"timezone (got {', '.join(sorted(declared))})"
            )
        return dg.FreshnessPolicy.cron(
            deadline_cron=str(declared["cron"]),
            lower_bound_delta=_duration(node, "lower_bound_delta", declared["lower_bound_delta"]),
            timezone=str(declared.get("timezone", "UTC")),
        )
    unknown = set(declared) - {"fail_window", "warn_window"}
    if unknown or "fail_window" not in declared:
        raise DbtMetaError(
            f"{node}: a time-window freshness takes fail_window and optionally warn_window "
            f"(got {', '.join(sorted(declared))})"
        )
    fail = _duration(node, "fail_window", declared["fail_window"])
    warn = declared.get("warn_window")
    return dg.FreshnessPolicy.time_window(
        fail_window=fail, warn_window=_duration(node, "warn_window", warn) if warn else None
    )


class StarvitDbtTranslator(DagsterDbtTranslator):
    """Keys per zone (``refined/patient``), groups per layer, owners from dbt ``meta.owner``,
    freshness from ``meta.dagster.freshness``, and the warehouse kind of the configured target
    (the prepared manifest is parsed for postgres whatever the target is)."""

    def __init__(
        self,
        settings: DagsterDbtTranslatorSettings | None = None,
        warehouse_target: WarehouseTarget | None = None,
    ) -> None:
        super().__init__(settings=settings)
        self._warehouse_target = warehouse_target

    @property
    def warehouse_target(self) -> WarehouseTarget:
        if self._warehouse_target is None:
            self._warehouse_target = load_settings().warehouse_target
        return self._warehouse_target

    def get_asset_spec(
        self, manifest: Mapping[str, Any], unique_id: str, project: DbtProject | None
    ) -> dg.AssetSpec:
        spec = super().get_asset_spec(manifest, unique_id, project)
        props = self.get_resource_props(manifest, unique_id)
        if props["resource_type"] == "source":
            return spec
        parsed_for = manifest.get("metadata", {}).get("adapter_type")
        kind = self.warehouse_target.value
        return spec.replace_attributes(
            kinds={k for k in spec.kinds if k != parsed_for} | {kind},
            metadata={**spec.metadata, "dagster/storage_kind": kind},
            freshness_policy=dbt_freshness_policy(props),
        )

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
        metadata["dbt_docs"] = dg.MetadataValue.url(dbt_docs_url(dbt_resource_props))
        if resource_type in ("model", "seed", "snapshot"):
            metadata["contract"] = dg.MetadataValue.json(dbt_contract(dbt_resource_props))
        lineage = _staging_lineage(dbt_resource_props)
        if lineage is not None:
            metadata["dagster/column_lineage"] = staging_column_lineage(lineage)
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


# --- incremental windows ----------------------------------------------------------------------
WINDOW_START_TAG = "starvit/dbt_window_start"
WINDOW_END_TAG = "starvit/dbt_window_end"
EXPORT_ID_TAG = "starvit/dbt_export_id"
_EXPORT_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class DbtWindowError(ValueError):
    pass


class DbtRunConfig(dg.Config):
    """The window an incremental run looks for changed rows in; all unset means the models'
    own watermark. Run tags ``starvit/dbt_window_start``, ``starvit/dbt_window_end`` and
    ``starvit/dbt_export_id`` set the same (the run config wins)."""

    window_start: str | None = None
    """ISO 8601 instant: rows loaded into the warehouse (``_loaded_at``) at or after it."""
    window_end: str | None = None
    """ISO 8601 instant: rows loaded before it."""
    export_id: str | None = None
    """Rows whose current version first arrived with this export."""


def _instant(name: str, value: str) -> str:
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise DbtWindowError(f"{name} is not an ISO 8601 instant: {value!r}") from None
    if parsed.tzinfo is None:
        raise DbtWindowError(f"{name} needs an offset (for example +00:00): {value!r}")
    return parsed.astimezone(dt.UTC).isoformat()


def dbt_window_vars(
    config: DbtRunConfig,
    tags: Mapping[str, str],
    time_window: tuple[dt.datetime, dt.datetime] | None = None,
) -> dict[str, str]:
    """The ``--vars`` of a dbt run: the run config, else the run tags, else the partition time
    window the run is for; empty (no ``--vars``) for a run with none of them."""
    start = config.window_start or tags.get(WINDOW_START_TAG)
    end = config.window_end or tags.get(WINDOW_END_TAG)
    export_id = config.export_id or tags.get(EXPORT_ID_TAG)
    if not (start or end or export_id) and time_window is not None:
        start, end = (moment.isoformat() for moment in time_window)
    found: dict[str, str] = {}
    if start:
        found["window_start"] = _instant("window_start", start)
    if end:
        found["window_end"] = _instant("window_end", end)
    if start and end and found["window_start"] >= found["window_end"]:
        raise DbtWindowError("window_start must be before window_end")
    if export_id:
        if not _EXPORT_ID.match(export_id):
            raise DbtWindowError("export_id may hold only letters, digits, '.', '_' and '-'")
        found["export_id"] = export_id
    return found


def _partition_time_window(
    context: dg.AssetExecutionContext,
) -> tuple[dt.datetime, dt.datetime] | None:
    # Only the dbt assets' own time partitions narrow the scan. A run of today's export
    # partition carries that partition key to the unpartitioned dbt step too; taken as a
    # window it made every incremental model recompute everything loaded today.
    if not isinstance(context.assets_def.partitions_def, dg.TimeWindowPartitionsDefinition):
        return None
    if not context.has_partition_key:
        return None
    window = context.partition_time_window
    return window.start, window.end


@dbt_assets(
    manifest=manifest_path(),
    project=dbt_project,
    dagster_dbt_translator=translator,
    name="dbt_models",
)
def dbt_models(
    context: dg.AssetExecutionContext,
    config: DbtRunConfig,
    dbt: DbtCliResource,
    platform: PlatformResource,
) -> Iterator[Any]:
    platform.endpoints  # noqa: B018 - starts the embedded warehouse and exports the dbt env
    # A run splits the dbt models into several steps when a non-dbt asset sits between them
    # (terminology/code_validation: after dbt's source tests, before staging). dbt's default
    # indirect selection (eager) would then run a refined model's relationships test with a
    # seed in the seeds' step, before the model exists; "buildable" runs it with the model.
    os.environ.setdefault(DBT_INDIRECT_SELECTION, "buildable")
    try:
        window = dbt_window_vars(config, context.run.tags, _partition_time_window(context))
    except DbtWindowError as error:
        raise dg.Failure(description=f"dbt run window: {error}") from None
    args = ["build"]
    if window:
        context.log.info(f"dbt incremental window: {window}")
        args += ["--vars", json.dumps(window)]
    yield from dbt.cli(args, context=context).stream()
