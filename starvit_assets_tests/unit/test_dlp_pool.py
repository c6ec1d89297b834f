"""Cloud DLP's quota is per project: with the DLP backend the deid_raw steps share one Dagster
concurrency pool, which the shipped instance configuration limits to one step at a time."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml

from starvit_assets.defs.deid_raw import DLP_POOL, deid_assets
from starvit_assets.platform import DAGSTER_YAML
from starvit_assets.views.runner import shipped_views


def test_with_cloud_dlp_every_deid_raw_step_is_in_the_pool() -> None:
    assets = deid_assets("dlp")
    assert {asset.key.path[-1] for asset in assets} == set(shipped_views())
    assert {asset.op.pool for asset in assets} == {DLP_POOL}


def test_the_local_engine_shares_no_quota_and_no_pool() -> None:
    assert {asset.op.pool for asset in deid_assets("local")} == {None}


def test_the_shipped_instance_runs_one_pool_step_at_a_time(tmp_path: Path) -> None:
    config = yaml.safe_load(DAGSTER_YAML.read_text())
    # The same file without its PostgreSQL storage (the instance's own default instead):
    # Dagster validates the rest as it would at start-up.
    del config["storage"]
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(config))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DAGSTER_HOME", str(tmp_path))
        with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
            concurrency = instance.get_concurrency_config()
    assert concurrency.pool_config.default_pool_limit == 1
    assert concurrency.run_queue_config is not None
    assert concurrency.run_queue_config.max_concurrent_runs == 2
