"""Every asset spec, snapshotted: each change to keys, deps, groups, owners, kinds, tags,
freshness, automation conditions or contract keys shows in review. Regenerate with
STARVIT_UPDATE_SNAPSHOTS=1 after a deliberate change."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from starvit_assets.definitions import ZONE_POLICIES, defs
from starvit_assets.defs.automation import AUTOMATION_SENSOR
from starvit_assets.defs.extract import GROUP as EXPORT_GROUP
from starvit_assets.defs.extract import current_partition_key

SNAPSHOT = Path(__file__).with_name("snapshots") / "asset_specs.json"


def _plain(value: Any) -> Any:
    """A metadata entry's value, whether the spec holds it raw or as a MetadataValue."""
    return value.value if isinstance(value, dg.MetadataValue) else value


def render_condition(condition: dg.AutomationCondition, top: bool = True) -> str:
    """``AND(eager, NOT(in_progress), ...)``: labelled sub-conditions by their label."""
    label = condition.get_label()
    if label and not top:
        return label
    children = condition.children
    if not children:
        return condition.name
    return f"{condition.name}({', '.join(render_condition(c, top=False) for c in children)})"


def _freshness(policy: dg.FreshnessPolicy | None) -> str | None:
    """``TimeWindowFreshnessPolicy(fail_window=30h, warn_window=26h)``."""
    if policy is None:
        return None
    windows = []
    for name in ("fail_window", "warn_window"):
        window = getattr(policy, name, None)
        if window is not None:
            windows.append(f"{name}={window.to_timedelta().total_seconds() / 3600:g}h")
    return f"{type(policy).__name__}({', '.join(windows)})"


def _describe(spec: dg.AssetSpec) -> dict[str, Any]:
    condition = spec.automation_condition
    contract = _plain(spec.metadata.get("contract")) or {}
    return {
        "deps": sorted(dep.asset_key.to_user_string() for dep in spec.deps),
        "group": spec.group_name,
        "owners": sorted(spec.owners),
        "kinds": sorted(spec.kinds),
        "tags": dict(
            sorted((k, v) for k, v in spec.tags.items() if not k.startswith("dagster/kind/"))
        ),
        "freshness": _freshness(spec.freshness_policy),
        "automation": None
        if condition is None
        else {"label": condition.get_label(), "condition": render_condition(condition)},
        "retention": spec.metadata.get("retention"),
        "contract_keys": contract.get("keys", [[contract["key"]]] if "key" in contract else None),
    }


def _all_specs() -> dict[str, dg.AssetSpec]:
    return {spec.key.to_user_string(): spec for spec in defs.resolve_all_asset_specs()}


def test_asset_specs_match_the_snapshot() -> None:
    current = {key: _describe(spec) for key, spec in sorted(_all_specs().items())}
    if os.environ.get("STARVIT_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    assert current == json.loads(SNAPSHOT.read_text()), (
        "asset specs changed: review the diff, then run with STARVIT_UPDATE_SNAPSHOTS=1"
    )


@pytest.mark.parametrize("key", sorted(_all_specs()))
def test_every_asset_is_owned_grouped_described_kinded_watched_and_contracted(key: str) -> None:
    spec = _all_specs()[key]
    assert spec.owners, "no owner"
    assert spec.group_name in ZONE_POLICIES
    assert spec.kinds, "no kinds"
    assert spec.description, "no description"
    assert isinstance(spec.freshness_policy, dg.FreshnessPolicy)
    assert spec.tags.get("starvit/zone") in {"phi", "research"}
    assert spec.metadata.get("retention"), "no retention statement"
    contract = _plain(spec.metadata.get("contract"))
    assert isinstance(contract, dict), "no contract"
    assert contract.get("grain"), "the contract states no grain"
    keys = contract.get("keys") or ([[contract["key"]]] if contract.get("key") else [])
    # Edges in the graph have no key, but its vertices do; every table has at least one key.
    assert keys and all(isinstance(k, list) and k for k in keys), "the contract states no key"
    # The semantics are stated in the contract or, failing that, by the asset's description.
    assert contract.get("semantics") or spec.description


def _top_level(condition: dg.AutomationCondition) -> list[dg.AutomationCondition]:
    return list(condition.children) if condition.name == "AND" else [condition]


@pytest.mark.parametrize("key", sorted(_all_specs()))
def test_downstream_assets_are_automated_with_in_progress_guards(key: str) -> None:
    spec = _all_specs()[key]
    condition = spec.automation_condition
    if spec.group_name == EXPORT_GROUP:
        assert condition is None, "the exports run on schedules and sensors only"
        return
    assert condition is not None, "no automation condition"
    assert condition.get_label(), "automation conditions are labelled for review"
    top = _top_level(condition)
    assert ~dg.AutomationCondition.in_progress() in top
    assert ~dg.AutomationCondition.any_deps_in_progress() in top
    assert ~dg.AutomationCondition.any_deps_missing() in top
    assert dg.AutomationCondition.all_deps_blocking_checks_passed() in top


def _requested(result: Any, graph: Any) -> list[str]:
    return sorted(
        key.to_user_string()
        for key in graph.materializable_asset_keys
        if result.get_num_requested(key)
    )


# Dagster's own tester selects with a beta parameter; the warning is not about this code.
@pytest.mark.filterwarnings("ignore::dagster.BetaWarning")
def test_an_export_pulls_its_chain_in_one_tick_once_and_a_failed_check_stops_it() -> None:
    graph = defs.resolve_asset_graph()
    with dg.DagsterInstance.ephemeral() as instance:
        initial = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert initial.total_requested == 0, "nothing runs on the first evaluation"
        # Everything materialized once, every check passed (as a full_lineage run leaves it);
        # the exports into today's partition.
        today = current_partition_key()

        def partition_of(key: dg.AssetKey) -> str | None:
            return today if graph.get(key).partitions_def is not None else None

        for key in graph.materializable_asset_keys:
            instance.report_runless_asset_event(
                dg.AssetMaterialization(asset_key=key, partition=partition_of(key))
            )
            for check in graph.get(key).check_keys:
                instance.report_runless_asset_event(
                    dg.AssetCheckEvaluation(asset_key=key, check_name=check.name, passed=True)
                )
        settled = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, cursor=initial.cursor
        )
        assert settled.total_requested == 0

        # New Patient and Condition exports; the Condition export's blocking check failed.
        for resource_type, passed in (("Patient", True), ("Condition", False)):
            key = dg.AssetKey(["fhir", resource_type])
            instance.report_runless_asset_event(
                dg.AssetMaterialization(asset_key=key, partition=today)
            )
            instance.report_runless_asset_event(
                dg.AssetCheckEvaluation(
                    asset_key=key, check_name="manifest_counts_match", passed=passed
                )
            )
        tick = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, cursor=settled.cursor
        )
        # The whole Patient chain in the same tick (so one run), nothing of Condition's.
        assert _requested(tick, graph) == [
            "deid_raw/patient",
            "derived/patient_age_bracket",
            "derived/patient_features",
            "derived/person",
            "derived/person_patient_map",
            "graph/tigergraph_load",
            "linkage/person_patient_map",
            "refined/patient",
            "staging/stg_fhir__patient",
            "staging/stg_linkage__person_patient_map",
            "warehouse_raw/patient",
        ]
        following = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, cursor=tick.cursor
        )
        assert following.total_requested == 0, "requested once, not again on the next tick"

        # A past day's export does not trigger the chain (the gate follows the latest
        # partition; docs/extract.md says how such an export is picked up).
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                asset_key=dg.AssetKey(["fhir", "Patient"]), partition="2025-06-01"
            )
        )
        past = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, cursor=following.cursor
        )
        assert past.total_requested == 0


def test_the_automation_sensor_runs_by_default_over_every_automated_asset() -> None:
    repository = defs.get_repository_def()
    sensor = repository.get_sensor_def(AUTOMATION_SENSOR)
    assert isinstance(sensor, dg.AutomationConditionSensorDefinition)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    graph = defs.resolve_asset_graph()
    automated = {
        key for key in graph.materializable_asset_keys if graph.get(key).automation_condition
    }
    assert automated <= sensor.asset_selection.resolve(graph)
    # Dagster adds no second, stopped default sensor beside it.
    assert [s.name for s in repository.sensor_defs].count(AUTOMATION_SENSOR) == 1


def test_the_schedule_and_the_sensors_start_exports_only() -> None:
    repository = defs.get_repository_def()
    graph = defs.resolve_asset_graph()
    exports = {key for key in graph.materializable_asset_keys if key.path[0] == "fhir"}
    schedule = repository.get_schedule_def("daily_full_lineage")
    assert schedule.job_name == "fhir_exports"
    for name in ("new_fhir_data", "medplum_subscription_events"):
        assert repository.get_sensor_def(name).job_name == "fhir_exports"
    job = defs.resolve_job_def("fhir_exports")
    assert set(job.asset_layer.selected_asset_keys) == exports


def test_the_lineage_is_one_connected_graph_from_fhir_to_the_graph_load() -> None:
    graph = defs.resolve_asset_graph()
    graph_load = dg.AssetKey(["graph", "tigergraph_load"])
    upstream = graph.get(graph_load).parent_keys
    seen: set[dg.AssetKey] = set()
    frontier = set(upstream)
    while frontier:
        key = frontier.pop()
        if key in seen:
            continue
        seen.add(key)
        frontier |= set(graph.get(key).parent_keys)
    for resource_type in (
        "Patient",
        "Encounter",
        "Observation",
        "Condition",
        "MedicationRequest",
        "Consent",
    ):
        assert dg.AssetKey(["fhir", resource_type]) in seen
    assert {key.path[0] for key in seen} >= {
        "fhir",
        "deid_raw",
        "warehouse_raw",
        "staging",
        "refined",
        "derived",
    }


def test_only_the_extract_zone_is_tagged_phi() -> None:
    for key, spec in _all_specs().items():
        assert (spec.tags["starvit/zone"] == "phi") == key.startswith("fhir/"), key


def test_every_gated_table_reads_the_consents_of_its_export_and_none_is_made_of_them() -> None:
    graph = defs.resolve_asset_graph()
    consent = dg.AssetKey(["fhir", "Consent"])
    gated = [key for key in graph.materializable_asset_keys if key.path[0] == "deid_raw"]
    assert gated
    for key in gated:
        assert consent in graph.get(key).parent_keys, key.to_user_string()
    # PHI-zone only: nothing but the gate (and its deletions) reads the Consent export.
    assert {key.path[0] for key in graph.get(consent).child_keys} == {"deid_raw"}


def test_every_exported_type_crosses_the_gate_and_every_generated_type_is_exported() -> None:
    """Nothing lost: an exported type is published by a view, except Consent, which the gate
    reads in the PHI zone and never publishes; and no type the generator writes is left out."""
    from starvit_assets.defs.extract import CONSENT, RESOURCE_TYPES
    from starvit_assets.fhir import synth
    from starvit_assets.settings import load_settings
    from starvit_assets.views.runner import shipped_views

    published = {str(view["resource"]) for view in shipped_views().values()}
    assert set(RESOURCE_TYPES) - published == {CONSENT}
    assert set(synth.RESOURCE_TYPES) <= set(RESOURCE_TYPES)
    assert load_settings().resource_types == list(RESOURCE_TYPES)
