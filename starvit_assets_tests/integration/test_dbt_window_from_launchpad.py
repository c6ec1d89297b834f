"""A window chosen in the launchpad reaches dbt as ``--vars``: one real, small dbt build
(one seed) through the ``dbt_models`` asset, with the run config and the run tags the
launchpad sets (docs/warehouse.md, "Incremental windows")."""

from __future__ import annotations

import json
import shutil

import dagster as dg
import pytest

from starvit_assets.defs.dbt import EXPORT_ID_TAG, dbt_models, dbt_project, dbt_resource
from starvit_assets.defs.resources import PlatformResource

pytestmark = pytest.mark.integration

SEED = dg.AssetKey(["reference", "age_brackets"])


@pytest.mark.usefixtures("warehouse_dsn")
def test_launchpad_config_and_tags_become_dbt_vars() -> None:
    result = dg.materialize(
        [dbt_models],
        selection=dg.AssetSelection.assets(SEED),
        resources={"platform": PlatformResource(), "dbt": dbt_resource("postgres")},
        # What the launchpad's config editor and "Edit tags" produce.
        run_config={
            "ops": {
                "dbt_models": {
                    "config": {
                        "window_start": "2026-11-01T00:00:00Z",
                        "window_end": "2026-11-02T01:00:00+01:00",
                    }
                }
            }
        },
        tags={EXPORT_ID_TAG: "20261102T080000Z"},
    )

    assert result.success
    assert [m.asset_key for m in result.asset_materializations_for_node("dbt_models")] == [SEED]
    # dagster-dbt gives each invocation its own target folder, named after the run.
    (target,) = dbt_project.project_dir.joinpath("target").glob(f"dbt_models-{result.run_id[:7]}-*")
    try:
        run_results = json.loads((target / "run_results.json").read_text())
    finally:
        shutil.rmtree(target)
    assert run_results["args"]["vars"] == {
        "window_start": "2026-11-01T00:00:00+00:00",
        "window_end": "2026-11-02T00:00:00+00:00",
        "export_id": "20261102T080000Z",
    }
