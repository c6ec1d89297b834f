"""Freshness policies from dbt ``meta.dagster.freshness``, and the warehouse kind of the
configured target, on the dbt assets' specs."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import dagster as dg
import pytest

from starvit_assets.defs.dbt import (
    DbtMetaError,
    StarvitDbtTranslator,
    dbt_freshness_policy,
    dbt_project,
    manifest_path,
)
from starvit_assets.settings import WarehouseTarget


def _manifest() -> dict[str, Any]:
    return dict(json.loads(manifest_path().read_text()))


def _defs_spec(key: str) -> dg.AssetSpec:
    from starvit_assets.definitions import defs

    asset_key = dg.AssetKey.from_user_string(key)
    return next(
        spec
        for assets_def in defs.assets or []
        if isinstance(assets_def, dg.AssetsDefinition)
        for spec in assets_def.specs
        if spec.key == asset_key
    )


def test_a_refined_models_meta_freshness_reaches_its_asset_spec() -> None:
    assert _defs_spec("refined/patient").freshness_policy == dg.FreshnessPolicy.time_window(
        fail_window=dt.timedelta(hours=28), warn_window=dt.timedelta(hours=26)
    )
    assert _defs_spec("derived/patient_features").freshness_policy == (
        dg.FreshnessPolicy.time_window(
            fail_window=dt.timedelta(hours=30), warn_window=dt.timedelta(hours=27)
        )
    )


def test_a_models_own_cron_freshness_wins_over_its_layers() -> None:
    assert _defs_spec("derived/patient_age_bracket").freshness_policy == (
        dg.FreshnessPolicy.cron(
            deadline_cron="0 6 * * 1", lower_bound_delta=dt.timedelta(days=7), timezone="UTC"
        )
    )


def test_assets_without_a_declared_freshness_get_the_platform_default() -> None:
    from starvit_assets.definitions import DAILY_FRESHNESS

    assert _defs_spec("staging/stg_fhir__patient").freshness_policy == DAILY_FRESHNESS
    assert _defs_spec("warehouse_raw/patient").freshness_policy == DAILY_FRESHNESS


def test_the_platform_policy_keeps_a_freshness_the_asset_already_has() -> None:
    from starvit_assets.definitions import DAILY_FRESHNESS, apply_platform_policies

    weekly = dg.FreshnessPolicy.time_window(fail_window=dt.timedelta(days=7))
    spec = dg.AssetSpec("x", group_name="derived", freshness_policy=weekly)
    assert apply_platform_policies(spec).freshness_policy == weekly
    bare = dg.AssetSpec("y", group_name="derived")
    assert apply_platform_policies(bare).freshness_policy == DAILY_FRESHNESS


@pytest.mark.parametrize(
    ("declared", "policy"),
    [
        (
            {"fail_window": "1d12h", "warn_window": "30m"},
            dg.FreshnessPolicy.time_window(
                fail_window=dt.timedelta(hours=36), warn_window=dt.timedelta(minutes=30)
            ),
        ),
        (
            {"fail_window": "26h"},
            dg.FreshnessPolicy.time_window(fail_window=dt.timedelta(hours=26)),
        ),
        (
            {"cron": "0 3 * * *", "lower_bound_delta": "24h", "timezone": "Europe/Berlin"},
            dg.FreshnessPolicy.cron(
                deadline_cron="0 3 * * *",
                lower_bound_delta=dt.timedelta(hours=24),
                timezone="Europe/Berlin",
            ),
        ),
    ],
)
def test_meta_freshness_forms(declared: dict[str, str], policy: dg.FreshnessPolicy) -> None:
    props = {
        "unique_id": "model.starvit.m",
        "config": {"meta": {"dagster": {"freshness": declared}}},
    }
    assert dbt_freshness_policy(props) == policy


def test_no_meta_freshness_means_none() -> None:
    assert dbt_freshness_policy({"unique_id": "model.starvit.m", "meta": {"owner": "x"}}) is None


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        ({"fail_window": "a day"}, r"model\.starvit\.m: meta\.dagster\.freshness\.fail_window"),
        ({"warn_window": "1h"}, "takes fail_window"),
        ({"cron": "0 3 * * *"}, "lower_bound_delta"),
        ("26h", "must be a mapping"),
    ],
)
def test_a_bad_meta_freshness_names_the_model(declared: object, message: str) -> None:
    props = {"unique_id": "model.starvit.m", "meta": {"dagster": {"freshness": declared}}}
    with pytest.raises(DbtMetaError, match=message):
        dbt_freshness_policy(props)


@pytest.mark.parametrize("target", list(WarehouseTarget))
def test_dbt_assets_show_the_configured_warehouse_kind(target: WarehouseTarget) -> None:
    translator = StarvitDbtTranslator(warehouse_target=target)
    spec = translator.get_asset_spec(_manifest(), "model.starvit.patient", dbt_project)
    other = {WarehouseTarget.POSTGRES: "bigquery", WarehouseTarget.BIGQUERY: "postgres"}[target]
    assert target.value in spec.kinds and other not in spec.kinds and "dbt" in spec.kinds
    assert spec.metadata["dagster/storage_kind"] == target.value


def test_the_warehouse_kind_follows_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STARVIT_WAREHOUSE_TARGET", "bigquery")
    spec = StarvitDbtTranslator().get_asset_spec(_manifest(), "seed.starvit.age_brackets", None)
    assert spec.kinds == {"dbt", "bigquery"}
