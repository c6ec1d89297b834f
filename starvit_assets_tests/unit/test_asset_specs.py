"""Every asset spec, snapshotted: each change to keys, deps, groups, owners, kinds, tags or
freshness shows in review. Regenerate with STARVIT_UPDATE_SNAPSHOTS=1 after a deliberate change."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from starvit_assets.definitions import ZONE_POLICIES, defs

SNAPSHOT = Path(__file__).with_name("snapshots") / "asset_specs.json"


def _describe(spec: dg.AssetSpec) -> dict[str, Any]:
    freshness = spec.freshness_policy
    return {
        "deps": sorted(dep.asset_key.to_user_string() for dep in spec.deps),
        "group": spec.group_name,
        "owners": sorted(spec.owners),
        "kinds": sorted(spec.kinds),
        "tags": dict(
            sorted((k, v) for k, v in spec.tags.items() if not k.startswith("dagster/kind/"))
        ),
        "freshness": type(freshness).__name__ if freshness else None,
        "retention": spec.metadata.get("retention"),
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
def test_every_asset_is_owned_grouped_described_kinded_and_watched(key: str) -> None:
    spec = _all_specs()[key]
    assert spec.owners, "no owner"
    assert spec.group_name in ZONE_POLICIES
    assert spec.kinds, "no kinds"
    assert spec.description, "no description"
    assert isinstance(spec.freshness_policy, dg.FreshnessPolicy)
    assert spec.tags.get("starvit/zone") in {"phi", "research"}


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
    for resource_type in ("Patient", "Encounter", "Observation", "Condition", "MedicationRequest"):
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
