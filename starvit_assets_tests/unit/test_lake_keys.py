"""``SeenKeys``: the gate's and the contract check's duplicate-key test across batches marks
exactly the rows ``later_duplicates`` marks on the whole column, for pseudonyms (read as
128-bit values) and for any other key (BLAKE2b digests), in little memory."""

from __future__ import annotations

import random
import secrets

import numpy as np
import pyarrow as pa
import pytest

from starvit_assets.lake.contracts import later_duplicates
from starvit_assets.lake.keys import SeenKeys, key_values


def _batched(keys: list[str | None], batch: int, seen: SeenKeys | None = None) -> list[bool]:
    seen = seen or SeenKeys()
    return [
        flag
        for start in range(0, len(keys), batch)
        for flag in seen.later_duplicates(
            pa.chunked_array([keys[start : start + batch]], pa.string())
        ).to_pylist()
    ]


@pytest.mark.parametrize("shape", ["pseudonym", "other"])
@pytest.mark.parametrize("batch", [1, 7, 10, 64, 1000])
def test_batches_mark_the_same_rows_as_later_duplicates_on_the_whole_column(
    shape: str, batch: int
) -> None:
    rng = random.Random(f"{shape}/{batch}")
    pool = [secrets.token_hex(16) if shape == "pseudonym" else f"k{i}" for i in range(300)]
    keys = [rng.choice([None, *pool]) for _ in range(2000)]
    keys[:10] = [f"{i:032x}" if shape == "pseudonym" else f"fresh{i}" for i in range(10)]
    flags = _batched(keys, batch)
    assert flags == later_duplicates(pa.array(keys, pa.string())).to_pylist()
    assert sum(flags) > 1000  # many repeats, within and across batches


def test_a_pseudonym_is_read_as_its_own_128_bit_value() -> None:
    keys = pa.array(["0123456789abcdeffedcba9876543210", None, "f" * 32])
    high, low = key_values(keys)
    assert high.tolist() == [0x0123456789ABCDEF, 0, 2**64 - 1]
    assert low.tolist() == [0xFEDCBA9876543210, 0, 2**64 - 1]


def test_a_batch_with_one_key_of_another_shape_is_digested_whole() -> None:
    pseudonym = "ab" * 16
    high, low = key_values(pa.array([pseudonym, "Patient/1"]))
    # Not read as hex: every key of this batch is digested, so equal keys stay equal.
    assert (int(high[0]), int(low[0])) != (0xABABABABABABABAB, 0xABABABABABABABAB)
    again_high, again_low = key_values(pa.array(["x", pseudonym]))
    assert (again_high[1], again_low[1]) == (high[0], low[0])


def test_keys_that_share_their_high_word_are_told_apart_by_the_low_word() -> None:
    same_high = [f"{'7' * 16}{i:016x}" for i in range(5)]
    seen = SeenKeys()
    assert seen.later_duplicates(pa.array(same_high[:3])).to_pylist() == [False] * 3
    flags = seen.later_duplicates(pa.array([same_high[3], same_high[1], same_high[4]]))
    assert flags.to_pylist() == [False, True, False]
    assert seen.later_duplicates(pa.array(same_high)).to_pylist() == [True] * 5


def test_memory_is_a_few_sorted_runs_of_16_bytes_a_key() -> None:
    seen = SeenKeys()
    total = 0
    for _ in range(200):
        batch = [secrets.token_hex(16) for _ in range(500)]
        total += len(batch)
        assert not any(seen.later_duplicates(pa.array(batch)).to_pylist())
    assert len(seen) == total
    runs = seen._runs
    assert len(runs) <= 2 * int(np.log2(total / 500)) + 2
    assert sum(high.nbytes + low.nbytes for high, low in runs) == 16 * total
    for high, _ in runs:
        assert (high[1:] >= high[:-1]).all()
