"""Deletions from an export's deleted[] list: pseudonymised like the gate, counted, reconciled."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from starvit_assets.deid.engine import LocalDeidEngine, pseudonym
from starvit_assets.deid.policy import Policy, load_policy
from starvit_assets.exports import remove_export_folder_when_done, retracted_file
from starvit_assets.lake.deletions import (
    DELETIONS_SCHEMA,
    DeletionCounts,
    deletion_policy,
    deletions_table,
    published_ids,
    write_retractions,
)
from starvit_assets.lake.partitions import RawLake
from starvit_assets.settings import StarvitSettings

KEY = bytes(range(32))
DAY = dt.date(2026, 1, 2)


def _bundle(*urls: str, method: str = "DELETE") -> str:
    return json.dumps(
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [{"request": {"method": method, "url": url}} for url in urls],
        }
    )


def _everything_published(_resource_type: str, tokens: set[str]) -> set[str]:
    return tokens


def _run(
    tmp_path: Path,
    lines: list[str],
    retractions: list[Path] | None = None,
    published: Callable[[str, set[str]], set[str]] = _everything_published,
) -> tuple[pa.Table, DeletionCounts]:
    path = tmp_path / "_deleted.1.ndjson"
    path.write_text("\n".join(lines) + "\n")

    def backend(policy: Policy) -> LocalDeidEngine:
        return LocalDeidEngine(KEY, policy, reference_date=DAY)

    return deletions_table(
        [path],
        policy=load_policy(),
        backend_for=backend,
        key=KEY,
        export_id="e2",
        transaction_time="2026-01-02T03:04:05Z",
        retraction_paths=retractions or [],
        published=published,
    )


def test_deleted_ids_get_the_token_of_the_resource_they_name(tmp_path: Path) -> None:
    data, counts = _run(
        tmp_path,
        [
            _bundle("Observation/obs-1", "https://fhir.example.org/fhir/Patient/pat-1"),
            _bundle("Procedure/proc-1"),
        ],
    )
    assert data.schema == DELETIONS_SCHEMA
    rows = data.to_pylist()
    assert [(r["resource_type"], r["resource_id"]) for r in rows] == [
        ("Observation", pseudonym(KEY, "Observation", "obs-1")),
        ("Patient", pseudonym(KEY, "Patient", "pat-1")),
        ("Procedure", pseudonym(KEY, "Procedure", "proc-1")),
    ]
    # The same token as the gate's: its engine pseudonymises the patient table's id alike.
    gate = LocalDeidEngine(KEY, load_policy(), reference_date=DAY)
    patient_columns = load_policy().table("patient").columns
    patient = pa.table(
        {name: pa.array(["pat-1" if name == "patient_id" else None]) for name in patient_columns}
    )
    assert (
        gate.deidentify("patient", patient).column("patient_id")[0].as_py()
        == rows[1]["resource_id"]
    )
    assert {r["reason"] for r in rows} == {"deleted"}
    assert {r["export_transaction_time"] for r in rows} == {"2026-01-02T03:04:05Z"}
    assert {r["_export_id"] for r in rows} == {"e2"}
    assert [r["_source_line"] for r in rows] == [1, 1, 2]
    assert {r["_policy_version"] for r in rows} == {load_policy().version}
    assert counts.reconciles and counts.rows == 3
    assert not any(
        "obs-1" in str(value) or "pat-1" in str(value) for r in rows for value in r.values()
    )


def test_bad_entries_are_counted_by_reason_and_duplicates_once(tmp_path: Path) -> None:
    data, counts = _run(
        tmp_path,
        [
            _bundle("Condition/c-1", "Condition/c-1"),
            _bundle("Condition/c-2", method="PUT"),
            "not json",
            _bundle("lowercase/c-3", "Condition/" + "x" * 80),
        ],
    )
    assert data.num_rows == 1
    assert counts.lines_read == 4
    assert counts.lines_without_deletions == 2
    assert counts.duplicates == 1
    assert counts.refused == {
        "resource type is not a FHIR type name": 1,
        "resource id is not a FHIR id": 1,
    }
    assert counts.reconciles


def test_no_deletions_give_an_empty_partition(tmp_path: Path) -> None:
    data, counts = _run(tmp_path, [])
    assert data.num_rows == 0 and data.schema == DELETIONS_SCHEMA
    assert counts.reconciles


def test_the_narrowed_policy_keeps_the_gate_policy_version() -> None:
    narrowed = deletion_policy(load_policy(), ["Patient"])
    assert narrowed.version == load_policy().version
    (table,) = narrowed.tables.values()
    assert table.columns["resource_id"].resource_type == "Patient"


def test_the_staged_export_stays_while_its_deleted_list_waits(tmp_path: Path) -> None:
    settings = StarvitSettings(home=tmp_path)
    folder = settings.phi_staging_dir / "e1"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    deleted = folder / "_deleted.1.ndjson"
    deleted.write_text(_bundle("Patient/p") + "\n")
    remove_export_folder_when_done(settings, "e1")
    assert deleted.is_file()
    deleted.unlink()
    remove_export_folder_when_done(settings, "e1")
    assert not folder.exists()


def _published_id(table: str, column: str, plain: str) -> str:
    """The token the gate's own engine gives ``plain`` in ``table.column``."""
    gate = LocalDeidEngine(KEY, load_policy(), reference_date=DAY)
    columns = load_policy().table(table).columns
    row = pa.table({name: pa.array([plain if name == column else None]) for name in columns})
    return str(gate.deidentify(table, row).column(column)[0].as_py())


def test_retractions_cross_pseudonymised_like_the_published_ids(tmp_path: Path) -> None:
    held_back = tmp_path / "_retracted.observation.ndjson"
    opt_outs = tmp_path / "_retracted.research_opt_out.ndjson"
    write_retractions(
        held_back,
        [("Observation", "obs-9", "status"), ("Observation", "obs-8", "security_label")],
    )
    write_retractions(opt_outs, [("Patient", "pat-7", "research_opt_out")])
    data, counts = _run(tmp_path, [], [held_back, opt_outs])
    rows = {(r["resource_type"], r["resource_id"]): r for r in data.to_pylist()}
    assert {key: row["reason"] for key, row in rows.items()} == {
        ("Observation", _published_id("observation", "observation_id", "obs-9")): "status",
        ("Observation", _published_id("observation", "observation_id", "obs-8")): (
            "security_label"
        ),
        # The same token as the patient_id of every row of that patient, in every table.
        ("Patient", _published_id("observation", "patient_id", "pat-7")): "research_opt_out",
    }
    assert counts.retracted_by_reason == {"status": 1, "security_label": 1, "research_opt_out": 1}
    assert counts.reconciles and counts.rows == 3
    assert {r["_source_file"] for r in rows.values()} == {held_back.name, opt_outs.name}
    cells = [str(value) for row in rows.values() for value in row.values()]
    assert not any(plain in cell for plain in ("obs-9", "obs-8", "pat-7") for cell in cells)


def test_a_deletion_and_a_retraction_of_one_resource_are_one_row(tmp_path: Path) -> None:
    first = tmp_path / "_retracted.patient.ndjson"
    second = tmp_path / "_retracted.research_opt_out.ndjson"
    write_retractions(first, [("Patient", "p-1", "security_label"), ("Patient", "p-2", "nope")])
    # Every table writes the same opt-out list: one row per patient all the same.
    write_retractions(second, [("Patient", "p-1", "research_opt_out")])
    data, counts = _run(tmp_path, [_bundle("Patient/p-1")], [first, second])
    assert data.column("reason").to_pylist() == ["deleted"]
    assert counts.duplicates == 2
    assert counts.refused == {"retraction reason is unknown": 1}
    assert counts.retracted_by_reason == {}
    assert counts.reconciles


def test_retraction_side_files_hold_type_id_and_reason_only(tmp_path: Path) -> None:
    path = tmp_path / "_retracted.condition.ndjson"
    path.write_text("stale\n")
    assert write_retractions(path, [("Condition", "c-1", "status")]) == 1
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"resourceType": "Condition", "id": "c-1", "reason": "status"}
    ]
    assert write_retractions(path, []) == 0
    assert path.read_text() == ""
    assert sorted(child.name for child in tmp_path.iterdir()) == [path.name]


def test_the_staged_export_stays_while_a_retraction_waits(tmp_path: Path) -> None:
    settings = StarvitSettings(home=tmp_path)
    folder = settings.phi_staging_dir / "e1"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    side_file = retracted_file(settings, "e1", "observation")
    assert side_file.parent == folder and side_file.name == "_retracted.observation.ndjson"
    write_retractions(side_file, [("Observation", "o", "status")])
    remove_export_folder_when_done(settings, "e1")
    assert side_file.is_file()
    side_file.unlink()
    remove_export_folder_when_done(settings, "e1")
    assert not folder.exists()


def test_a_retraction_of_nothing_published_does_not_cross(tmp_path: Path) -> None:
    side_file = tmp_path / "_retracted.research_opt_out.ndjson"
    write_retractions(
        side_file, [("Patient", "never-crossed", "research_opt_out"), ("Patient", "p-1", "status")]
    )
    crossed = pseudonym(KEY, "Patient", "p-1")
    asked: list[tuple[str, set[str]]] = []

    def published(resource_type: str, tokens: set[str]) -> set[str]:
        asked.append((resource_type, tokens))
        return tokens & {crossed}

    # A deletion crosses whether or not its resource was ever published.
    data, counts = _run(tmp_path, [_bundle("Condition/c-9")], [side_file], published)
    assert asked == [("Patient", {crossed, pseudonym(KEY, "Patient", "never-crossed")})]
    assert data.column("resource_id").to_pylist() == [pseudonym(KEY, "Condition", "c-9"), crossed]
    assert counts.nothing_to_retract == 1
    assert counts.retracted_by_reason == {"status": 1}
    assert counts.reconciles


def test_published_ids_look_in_the_partitions_up_to_the_export(tmp_path: Path) -> None:
    lake = RawLake(tmp_path)
    lake.stage("patient", "e1", pa.table({"patient_id": ["p-a"]}))
    lake.publish("patient", "e1")
    lake.stage("observation", "e2", pa.table({"observation_id": ["o-b"], "patient_id": ["p-b"]}))
    lake.publish("observation", "e2")
    lake.stage("patient", "e3", pa.table({"patient_id": ["p-c"]}))
    lake.publish("patient", "e3")
    wanted = {"p-a", "p-b", "p-c", "o-b"}
    # A patient's rows in any table count; a later export's partitions do not.
    assert published_ids(lake, "Patient", wanted, up_to="e2") == {"p-a", "p-b"}
    assert published_ids(lake, "Observation", wanted, up_to="e2") == {"o-b"}
    assert published_ids(lake, "Observation", wanted, up_to="e1") == set()
    assert published_ids(lake, "Procedure", wanted, up_to="e3") == set()


def test_an_export_waits_for_every_gate_whose_latest_export_it_is(tmp_path: Path) -> None:
    from starvit_assets.defs.deletions import undecided_tables
    from starvit_assets.exports import StagedExport, record_staged_export

    settings = StarvitSettings(home=tmp_path)
    lake = RawLake(settings.lake_root)
    for resource_type, export_id in (("Patient", "e2"), ("Observation", "e2"), ("Procedure", "e1")):
        record_staged_export(
            settings, StagedExport(export_id, resource_type, "2026-01-02T00:00:00Z", (), 0)
        )
    # Tables of types never exported (no record) and of types last exported by e1 do not count.
    assert undecided_tables(settings, lake, "e2") == ["observation", "patient"]
    lake.stage("patient", "e2", pa.table({"patient_id": ["p"]}))
    lake.publish("patient", "e2")
    assert undecided_tables(settings, lake, "e2") == ["observation"]
    lake.stage("observation", "e2", pa.table({"observation_id": ["o"]}))
    lake.publish("observation", "e2")
    assert undecided_tables(settings, lake, "e2") == []
    assert undecided_tables(settings, lake, "e1") == ["procedure"]


def test_the_partition_keeps_its_contract_and_an_unknown_reason_breaks_it(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from starvit_assets.lake.contracts import DELETIONS_CONTRACT, validate_file

    side_file = tmp_path / "_retracted.observation.ndjson"
    write_retractions(side_file, [("Observation", "o-1", "status")])
    data, _ = _run(tmp_path, [_bundle("Patient/p-1")], [side_file])
    path = tmp_path / "part.parquet"
    pq.write_table(data, path)
    assert validate_file(DELETIONS_CONTRACT, path, DELETIONS_SCHEMA) == []
    reasons = data.schema.get_field_index("reason")
    broken = data.set_column(reasons, "reason", pa.array(["deleted", "forgotten"]))
    pq.write_table(broken, path)
    assert validate_file(DELETIONS_CONTRACT, path, DELETIONS_SCHEMA) == [
        "reason: isin(['deleted', 'missing_element', 'research_opt_out', 'security_label', "
        "'status', 'date_range']) (1 rows)"
    ]
