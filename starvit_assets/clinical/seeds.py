"""Writes the dbt seeds from the Python tables, so SQL and Python share one source of truth.

``starvit dbt prepare`` calls ``write_seeds`` before parsing the project; the integration test
``test_dbt_seeds_match_python`` fails when the committed CSVs drift from these tables.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

from starvit_assets.clinical.bmi import AGE_BRACKETS, WHO_BMI_CATEGORIES
from starvit_assets.clinical.terminology import BODY_MEASURES, CODE_SYSTEMS
from starvit_assets.clinical.units import UCUM_CONVERSIONS

Cell = str | int | float | None


def seed_tables() -> dict[str, tuple[Sequence[str], list[Sequence[Cell]]]]:
    """Seed name -> (header, rows)."""
    return {
        "ucum_conversions": (
            ("unit_code", "dimension", "canonical_unit", "factor"),
            [
                (c.unit_code, c.dimension.value, c.canonical_unit, c.factor)
                for c in UCUM_CONVERSIONS
            ],
        ),
        "who_bmi_categories": (
            ("weight_category", "lower_bound"),
            [(c.name, c.lower_bound) for c in WHO_BMI_CATEGORIES],
        ),
        "age_brackets": (
            ("age_bracket", "min_age"),
            [(b.label, b.min_age) for b in AGE_BRACKETS],
        ),
        "body_measures": (
            ("measure", "code_system", "code", "canonical_unit", "plausible_min", "plausible_max"),
            [
                (
                    m.measure.value,
                    m.code_system,
                    m.code,
                    m.canonical_unit,
                    m.plausible_min,
                    m.plausible_max,
                )
                for m in BODY_MEASURES
            ],
        ),
        "code_systems": (
            ("code_system_uri", "code_system"),
            [(s.uri, s.short_name) for s in CODE_SYSTEMS],
        ),
    }


def render_csv(header: Sequence[str], rows: Iterable[Sequence[Cell]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(
            [
                "" if cell is None else repr(cell) if isinstance(cell, float) else cell
                for cell in row
            ]
        )
    return buffer.getvalue()


def write_seeds(seeds_dir: Path) -> list[Path]:
    """Write every seed CSV into ``seeds_dir``; files whose content is unchanged are not touched."""
    seeds_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, (header, rows) in seed_tables().items():
        path = seeds_dir / f"{name}.csv"
        content = render_csv(header, rows)
        if not path.is_file() or path.read_text(encoding="utf-8") != content:
            path.write_text(content, encoding="utf-8")
        written.append(path)
    return written
