"""Record linkage in the research zone: Patient.link pairs and token agreements -> persons.

Pure Python over de-identified values only (pseudonymised ids, link types, linkage tokens).
Deterministic rules (``MATCH_RULES``): two records are the same person when they are linked
by Patient.link in one source, or when every token of a rule agrees. Persons are the
connected components of those pairs (union-find): matching is transitive, so A~B and B~C put
A, B and C in one person even when A and C agree on nothing.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations

PATIENT_LINK_RULE = "patient_link"
SINGLETON_RULE = "none"
# Token rules in order of precedence: each names the tokens that must all agree. A single
# token suffices because each already combines a full name (or its Soundex, or an initial)
# with a birth date or year: docs/linkage.md gives the measured precision and recall.
MATCH_RULES: Mapping[str, tuple[str, ...]] = {
    "token_1": ("link_token_1",),
    "token_2": ("link_token_2",),
    "token_4": ("link_token_4",),
    "token_3": ("link_token_3",),
}
PERSON_KEY_HEX_CHARS = 32

RecordKey = tuple[str, str]
"""(source, patient id): a patient id is unique only within its source."""


@dataclass(frozen=True)
class LinkageRecord:
    source: str
    patient_id: str
    tokens: Mapping[str, str | None] = field(default_factory=dict)
    linked_patient_ids: tuple[str, ...] = ()
    """Patient.link targets in the same source (any link type: all four say same person)."""

    @property
    def key(self) -> RecordKey:
        return (self.source, self.patient_id)


@dataclass(frozen=True)
class PersonAssignment:
    person_key: str
    source: str
    patient_id: str
    match_rule: str
    """The highest-precedence rule that joined this record to another; ``none`` if alone."""
    person_size: int


@dataclass(frozen=True)
class LinkageResult:
    assignments: tuple[PersonAssignment, ...]
    links_to_absent_records: int
    """Patient.link targets not among the records (not exported, or deleted)."""

    @property
    def persons(self) -> int:
        return len({a.person_key for a in self.assignments})

    def clusters(self) -> dict[str, set[RecordKey]]:
        clusters: dict[str, set[RecordKey]] = defaultdict(set)
        for a in self.assignments:
            clusters[a.person_key].add((a.source, a.patient_id))
        return dict(clusters)

    def rates(self) -> dict[str, float | int]:
        """Linkage rates for the materialization metadata (counts, never identifiers)."""
        patients = len(self.assignments)
        by_rule = Counter(a.match_rule for a in self.assignments)
        linked = patients - by_rule.get(SINGLETON_RULE, 0)
        rates: dict[str, float | int] = {
            "patients": patients,
            "persons": self.persons,
            "patients_linked": linked,
            "share_linked": round(linked / patients, 4) if patients else 0.0,
            "sources": len({a.source for a in self.assignments}),
            "persons_in_several_sources": sum(
                1
                for members in self.clusters().values()
                if len({source for source, _ in members}) > 1
            ),
            "links_to_absent_records": self.links_to_absent_records,
        }
        for rule in (PATIENT_LINK_RULE, *MATCH_RULES):
            count = by_rule.get(rule, 0)
            rates[f"linked_by_{rule}"] = count
            rates[f"share_linked_by_{rule}"] = round(count / patients, 4) if patients else 0.0
        return rates


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[RecordKey, RecordKey] = {}

    def add(self, key: RecordKey) -> None:
        self.parent.setdefault(key, key)

    def find(self, key: RecordKey) -> RecordKey:
        root = key
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[key] != root:  # path compression
            self.parent[key], key = root, self.parent[key]
        return root

    def union(self, a: RecordKey, b: RecordKey) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            # The smaller key becomes the root: the result does not depend on input order.
            low, high = sorted((root_a, root_b))
            self.parent[high] = low


def link_persons(
    records: Iterable[LinkageRecord], rules: Mapping[str, Sequence[str]] = MATCH_RULES
) -> LinkageResult:
    """Persons over ``records`` (one per (source, patient id); later duplicates are refused)."""
    by_key: dict[RecordKey, LinkageRecord] = {}
    for record in records:
        if record.key in by_key:
            raise ValueError(f"record {record.key} given twice: pass the latest version only")
        by_key[record.key] = record
    union = _UnionFind()
    for key in by_key:
        union.add(key)
    # The best rule each record was matched by: lower rank is higher precedence.
    ranks = {rule: rank for rank, rule in enumerate((PATIENT_LINK_RULE, *rules))}
    best: dict[RecordKey, int] = {}

    def matched(a: RecordKey, b: RecordKey, rule: str) -> None:
        union.union(a, b)
        for key in (a, b):
            best[key] = min(best.get(key, len(ranks)), ranks[rule])

    absent = 0
    for record in by_key.values():
        for other in record.linked_patient_ids:
            other_key = (record.source, other)
            if other_key in by_key:
                matched(record.key, other_key, PATIENT_LINK_RULE)
            else:
                absent += 1
    for rule, token_names in rules.items():
        blocks: dict[tuple[str, ...], list[RecordKey]] = defaultdict(list)
        for record in by_key.values():
            values = tuple(record.tokens.get(name) or "" for name in token_names)
            if all(values):
                blocks[values].append(record.key)
        for members in blocks.values():
            # Every member agrees with the first: joining each to it joins them all.
            for member in members[1:]:
                matched(members[0], member, rule)

    roots: dict[RecordKey, list[RecordKey]] = defaultdict(list)
    for key in by_key:
        roots[union.find(key)].append(key)
    by_rank = {rank: rule for rule, rank in ranks.items()}
    assignments = []
    for root, members in roots.items():
        person_key = _person_key(root)
        for source, patient_id in sorted(members):
            rank = best.get((source, patient_id))
            assignments.append(
                PersonAssignment(
                    person_key=person_key,
                    source=source,
                    patient_id=patient_id,
                    match_rule=SINGLETON_RULE if rank is None else by_rank[rank],
                    person_size=len(members),
                )
            )
    assignments.sort(key=lambda a: (a.person_key, a.source, a.patient_id))
    return LinkageResult(assignments=tuple(assignments), links_to_absent_records=absent)


def _person_key(root: RecordKey) -> str:
    # The smallest record of the person names it: stable while that record stays, and a
    # hash of already pseudonymous values, so it says nothing about the person.
    return hashlib.sha256(f"person/{root[0]}/{root[1]}".encode()).hexdigest()[:PERSON_KEY_HEX_CHARS]


@dataclass(frozen=True)
class PairwiseScore:
    true_pairs: int
    predicted_pairs: int
    correct_pairs: int

    @property
    def precision(self) -> float:
        return self.correct_pairs / self.predicted_pairs if self.predicted_pairs else 1.0

    @property
    def recall(self) -> float:
        return self.correct_pairs / self.true_pairs if self.true_pairs else 1.0

    def __str__(self) -> str:
        return (
            f"precision {self.precision:.3f} ({self.correct_pairs}/{self.predicted_pairs} pairs), "
            f"recall {self.recall:.3f} ({self.correct_pairs}/{self.true_pairs} pairs)"
        )


def _pairs(clusters: Iterable[set[RecordKey]]) -> set[tuple[RecordKey, RecordKey]]:
    return {pair for members in clusters for pair in combinations(sorted(members), 2)}


def pairwise_score(
    predicted: Mapping[str, set[RecordKey]], truth: Mapping[str, set[RecordKey]]
) -> PairwiseScore:
    """Pairwise precision and recall: over all record pairs put in one person."""
    predicted_pairs, true_pairs = _pairs(predicted.values()), _pairs(truth.values())
    return PairwiseScore(
        true_pairs=len(true_pairs),
        predicted_pairs=len(predicted_pairs),
        correct_pairs=len(predicted_pairs & true_pairs),
    )
