from __future__ import annotations

from pathlib import Path

from starvit_assets.graph.files import GraphData, count_csv_rows, loading_job, write_loading_files


def test_loading_files_round_trip_counts_and_replace_previous_load(tmp_path: Path) -> None:
    graph = GraphData(
        vertices={
            "Patient": [("p1", "female", "30-39", "normal"), ("p2", "male", "90+", None)],
            "Condition": [("38341003", "Hypertension, with a comma")],
            "Medication": [],
        },
        edges={
            "has_condition": [("p1", "38341003", "2020-01-01T00:00:00+00:00")],
            "prescribed": [],
        },
    )
    out = tmp_path / "load"
    (out).mkdir()
    (out / "stale.csv").write_text("old")

    written = write_loading_files(graph, out)

    assert written == graph.counts() == count_csv_rows(out)
    assert not (out / "stale.csv").exists()
    assert (out / "schema.gsql").read_text().count("CREATE VERTEX") == 3


def test_loading_job_loads_every_file_it_defines() -> None:
    job = loading_job()
    for name in ("Patient", "Condition", "Medication", "has_condition", "prescribed"):
        assert f'DEFINE FILENAME f_{name} = "./{name}.csv";' in job
        assert f"LOAD f_{name} TO" in job
