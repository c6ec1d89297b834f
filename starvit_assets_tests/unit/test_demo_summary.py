"""The demo summary's linkage and terminology lines, from the metadata the assets record."""

from __future__ import annotations

from starvit_assets.demo import linkage_summary, terminology_summary
from starvit_assets.linkage.match import LinkageRecord, link_persons


def test_linkage_lines_give_records_persons_and_every_rule() -> None:
    rates = link_persons(
        [
            LinkageRecord("A", "p1", linked_patient_ids=("p2",)),
            LinkageRecord("A", "p2"),
            LinkageRecord("A", "p3", {"link_token_2": "t"}),
            LinkageRecord("A", "p4", {"link_token_2": "t"}),
            LinkageRecord("A", "p5"),
        ]
    ).rates()
    first, rules = linkage_summary(rates)
    assert first == (
        "Record linkage: 5 patient records -> 3 persons; 4 records linked (80.0%), 1 source(s)"
    )
    assert rules == ("  linked by rule: patient_link 2, token_1 0, token_2 2, token_4 0, token_3 0")
    assert linkage_summary({}) == []  # the asset did not run


def test_terminology_lines_give_the_valid_share_per_code_system() -> None:
    metadata = {
        "by_code_system": {
            "http://loinc.org": {
                "system_known": True,
                "coded_rows": 4000,
                "valid_share": 0.999,
            },
            "http://loinc.org/": {"system_known": False, "coded_rows": 1, "valid_share": 0.0},
        }
    }
    lines = [" ".join(line.split()) for line in terminology_summary(metadata)]
    assert lines == [
        "Valid codes per code system (terminology check):",
        "http://loinc.org 99.90% of 4000 coded rows",
        "http://loinc.org/ 0.00% of 1 coded rows (unknown system)",
    ]
    assert terminology_summary({}) == []
