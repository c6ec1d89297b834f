"""The committed dbt seeds and the clinical constants the models restate equal the Python tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from starvit_assets.clinical.bmi import AGE_BRACKETS, WHO_BMI_CATEGORIES
from starvit_assets.clinical.pipeline import METRIC_OBSERVATION_STATUSES
from starvit_assets.clinical.seeds import write_seeds
from starvit_assets.settings import DBT_PROJECT_DIR

pytestmark = pytest.mark.integration

SEEDS_DIR = DBT_PROJECT_DIR / "seeds"
MODELS_DIR = DBT_PROJECT_DIR / "models"


def test_committed_seeds_equal_what_python_generates(tmp_path: Path) -> None:
    generated = {path.name: path.read_text(encoding="utf-8") for path in write_seeds(tmp_path)}
    committed = {path.name: path.read_text(encoding="utf-8") for path in SEEDS_DIR.glob("*.csv")}

    assert committed == generated, "run `starvit dbt prepare` to regenerate dbt_project/seeds"


def test_write_seeds_leaves_unchanged_files_untouched(tmp_path: Path) -> None:
    first = {path: path.stat().st_mtime_ns for path in write_seeds(tmp_path)}
    (tmp_path / "age_brackets.csv").write_text("stale\n", encoding="utf-8")

    second = write_seeds(tmp_path)

    assert (
        (tmp_path / "age_brackets.csv")
        .read_text(encoding="utf-8")
        .startswith("age_bracket,min_age\n")
    )
    assert {p: p.stat().st_mtime_ns for p in second if p.name != "age_brackets.csv"} == {
        p: t for p, t in first.items() if p.name != "age_brackets.csv"
    }


def _accepted_values(model: str, column: str) -> list[Any]:
    (layer_file,) = MODELS_DIR.rglob(f"{model}.yml")
    spec = yaml.safe_load(layer_file.read_text(encoding="utf-8"))
    (model_spec,) = spec["models"]
    (column_spec,) = [c for c in model_spec["columns"] if c["name"] == column]
    (test,) = [
        t for t in column_spec["data_tests"] if isinstance(t, dict) and "accepted_values" in t
    ]
    return list(test["accepted_values"]["arguments"]["values"])


@pytest.mark.parametrize("model", ["patient_weight_category", "patient_features"])
def test_weight_category_tests_accept_exactly_the_python_categories(model: str) -> None:
    assert _accepted_values(model, "weight_category") == [c.name for c in WHO_BMI_CATEGORIES]


@pytest.mark.parametrize("model", ["patient_age_bracket", "patient_features"])
def test_age_bracket_tests_accept_exactly_the_python_brackets(model: str) -> None:
    assert _accepted_values(model, "age_bracket") == [b.label for b in AGE_BRACKETS]


def test_metric_observation_statuses_var_equals_python() -> None:
    project = yaml.safe_load((DBT_PROJECT_DIR / "dbt_project.yml").read_text(encoding="utf-8"))
    assert tuple(project["vars"]["metric_observation_statuses"]) == METRIC_OBSERVATION_STATUSES
