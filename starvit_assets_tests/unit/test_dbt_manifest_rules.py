"""Rules every node of the prepared dbt manifest keeps: documented, contracted, fresh."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import cache
from typing import Any

import pytest

from starvit_assets.defs.dbt import manifest_path

DOCUMENTED = ("model", "seed", "snapshot", "source", "exposure")
CONTRACTED_LAYERS = ("refined", "derived")


@cache
def _manifest() -> dict[str, Any]:
    return dict(json.loads(manifest_path().read_text()))


def _own_nodes(*resource_types: str) -> Iterator[dict[str, Any]]:
    manifest = _manifest()
    for node in (*manifest["nodes"].values(), *manifest["sources"].values()):
        if node["package_name"] == "starvit" and node["resource_type"] in resource_types:
            yield node
    for exposure in manifest["exposures"].values():
        if "exposure" in resource_types:
            yield exposure


def test_the_rules_have_something_to_check() -> None:
    found = {node["resource_type"] for node in _own_nodes(*DOCUMENTED)}
    assert found == set(DOCUMENTED)


def test_every_node_and_column_has_a_description() -> None:
    undocumented = []
    for node in _own_nodes(*DOCUMENTED):
        if not node.get("description", "").strip():
            undocumented.append(node["unique_id"])
        for name, column in node.get("columns", {}).items():
            if not column.get("description", "").strip():
                undocumented.append(f"{node['unique_id']}.{name}")
    assert undocumented == []


@pytest.mark.parametrize("layer", CONTRACTED_LAYERS)
def test_every_refined_and_derived_model_enforces_a_typed_contract(layer: str) -> None:
    models = [node for node in _own_nodes("model") if node["fqn"][1] == layer]
    assert models, f"no {layer} models in the manifest"
    unenforced = [m["unique_id"] for m in models if not m["config"]["contract"]["enforced"]]
    untyped = [
        f"{model['unique_id']}.{name}"
        for model in models
        for name, column in model["columns"].items()
        if not (column.get("data_type") or "").strip()
    ]
    without_columns = [model["unique_id"] for model in models if not model["columns"]]
    assert (unenforced, untyped, without_columns) == ([], [], [])


def test_every_source_table_declares_its_loaded_at_field_and_freshness() -> None:
    stale = [
        source["unique_id"]
        for source in _own_nodes("source")
        if not source.get("loaded_at_field")
        or not (source.get("freshness") or {}).get("error_after", {}).get("count")
        or source["loaded_at_field"] not in source["columns"]
    ]
    assert stale == []
