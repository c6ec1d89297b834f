"""The dbt assets' docs links, column schemas and incremental window vars."""

from __future__ import annotations

import datetime as dt
import json

import dagster as dg
import pytest

from starvit_assets.defs.dbt import (
    EXPORT_ID_TAG,
    WINDOW_END_TAG,
    WINDOW_START_TAG,
    DbtRunConfig,
    DbtWindowError,
    dbt_docs_url,
    dbt_models,
    manifest_path,
)

REFINED = ("patient", "encounter", "observation", "condition", "medication_request")


def _spec(key: dg.AssetKey) -> dg.AssetSpec:
    return next(spec for spec in dbt_models.specs if spec.key == key)


@pytest.mark.parametrize("name", [*REFINED, "procedure", "immunization", "allergy_intolerance"])
def test_each_refined_model_links_to_its_docs_page_and_shows_its_typed_columns(name: str) -> None:
    spec = _spec(dg.AssetKey(["refined", name]))
    url = spec.metadata["dbt_docs"]
    assert isinstance(url, dg.UrlMetadataValue)
    assert url.url == f"http://127.0.0.1:8580/#!/model/model.starvit.{name}"
    schema = spec.metadata["dagster/column_schema"]
    manifest = json.loads(manifest_path().read_text())
    columns = manifest["nodes"][f"model.starvit.{name}"]["columns"]
    assert [column.name for column in schema.columns] == list(columns)
    assert all(column.type not in ("", "?") and column.description for column in schema.columns)
    assert "{{" not in " ".join(column.type for column in schema.columns)


def test_every_dbt_model_has_a_docs_link_and_a_column_schema() -> None:
    for spec in dbt_models.specs:
        assert isinstance(spec.metadata["dbt_docs"], dg.UrlMetadataValue), spec.key
        assert spec.metadata["dagster/column_schema"].columns, spec.key


def test_every_dbt_unit_test_name_fits_a_postgres_relation_name() -> None:
    """dbt names the unit test's temporary relation after the test; PostgreSQL refuses
    identifiers over 63 bytes, and the error only shows when the whole build runs."""
    unit_tests = json.loads(manifest_path().read_text())["unit_tests"].values()
    too_long = [test["name"] for test in unit_tests if len(test["name"].encode()) > 63]
    assert unit_tests and too_long == []


def test_the_docs_base_url_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    props = {"resource_type": "source", "unique_id": "source.starvit.fhir_raw.patient"}
    monkeypatch.setenv("STARVIT_DBT_DOCS_URL", "https://docs.example.org/dbt/")
    assert (
        dbt_docs_url(props)
        == "https://docs.example.org/dbt/#!/source/source.starvit.fhir_raw.patient"
    )


def test_no_window_means_no_vars_and_a_full_or_watermark_run() -> None:
    from starvit_assets.defs.dbt import dbt_window_vars

    assert dbt_window_vars(DbtRunConfig(), {}) == {}


def test_the_window_comes_from_config_then_tags_then_the_partition() -> None:
    from starvit_assets.defs.dbt import dbt_window_vars

    tags = {WINDOW_START_TAG: "2026-01-01T00:00:00Z", WINDOW_END_TAG: "2026-01-02T01:00:00+01:00"}
    assert dbt_window_vars(DbtRunConfig(), tags) == {
        "window_start": "2026-01-01T00:00:00+00:00",
        "window_end": "2026-01-02T00:00:00+00:00",
    }
    config = DbtRunConfig(export_id="20260102T000000Z")
    assert dbt_window_vars(config, tags)["export_id"] == "20260102T000000Z"
    assert dbt_window_vars(DbtRunConfig(), {EXPORT_ID_TAG: "e-1"}) == {"export_id": "e-1"}
    day = (dt.datetime(2026, 3, 4, tzinfo=dt.UTC), dt.datetime(2026, 3, 5, tzinfo=dt.UTC))
    assert dbt_window_vars(DbtRunConfig(), {}, day) == {
        "window_start": "2026-03-04T00:00:00+00:00",
        "window_end": "2026-03-05T00:00:00+00:00",
    }
    # An explicit window wins over the partition's.
    assert dbt_window_vars(DbtRunConfig(export_id="e-2"), {}, day) == {"export_id": "e-2"}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (DbtRunConfig(window_start="yesterday"), "not an ISO 8601 instant"),
        (DbtRunConfig(window_start="2026-01-01T00:00:00"), "needs an offset"),
        (
            DbtRunConfig(window_start="2026-01-02T00:00:00Z", window_end="2026-01-01T00:00:00Z"),
            "before window_end",
        ),
        (DbtRunConfig(export_id="x'; drop table patient; --"), "export_id may hold only"),
    ],
)
def test_a_bad_window_is_refused_with_a_clear_message(config: DbtRunConfig, message: str) -> None:
    from starvit_assets.defs.dbt import dbt_window_vars

    with pytest.raises(DbtWindowError, match=message):
        dbt_window_vars(config, {})
