"""Duplicate keys across a whole table read batch by batch, in memory that grows by about 16
bytes a key.

A set of the key strings took about 130 bytes a key (a 32-character pseudonym as a Python str
plus its slot), which made the gate's peak memory grow with the export: about 340 MiB for the
2.6 million Observations of 30,000 patients. Keys are kept instead as 128-bit values in a few
sorted numpy runs. A pseudonym (32 hex characters, the published form of every id) is its own
128-bit value; any other key is reduced to a 128-bit BLAKE2b digest, where a collision between
two different keys of one export (about n^2 / 2^129) is not a practical concern.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_PSEUDONYM_CHARS = 32
_HEX_VALUES = np.zeros(256, dtype=np.uint8)
_IS_HEX = np.zeros(256, dtype=bool)
for _digit, _char in enumerate("0123456789abcdef"):
    _HEX_VALUES[ord(_char)] = _digit
    _IS_HEX[ord(_char)] = True


def _pseudonym_characters(strings: pa.StringArray) -> np.ndarray | None:
    """The characters of every string as a (rows, 32) byte matrix when each one is 32
    lowercase hex characters (a pseudonym), else None."""
    count = len(strings)
    if not count or not pc.all(pc.equal(pc.binary_length(strings), _PSEUDONYM_CHARS)).as_py():
        return None
    offsets = np.frombuffer(strings.buffers()[1], dtype=np.int32)
    start = int(offsets[strings.offset])
    data = np.frombuffer(strings.buffers()[2], dtype=np.uint8)
    characters = data[start : start + _PSEUDONYM_CHARS * count].reshape(count, -1)
    return characters if bool(_IS_HEX[characters].all()) else None


def key_values(keys: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The 128-bit value of each key as (high, low) uint64 arrays; a null key gives (0, 0)."""
    strings = keys.cast(pa.string()) if keys.type != pa.string() else keys
    filled = pc.fill_null(strings, "0" * _PSEUDONYM_CHARS)
    count = len(filled)
    octets: np.ndarray
    characters = _pseudonym_characters(filled)
    if characters is not None:
        nibbles = _HEX_VALUES[characters]
        octets = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
    else:
        digests = b"".join(
            hashlib.blake2b(key.encode(), digest_size=16).digest() for key in filled.to_pylist()
        )
        octets = np.frombuffer(digests, dtype=np.uint8).reshape(count, 16)
    words = np.ascontiguousarray(octets).view(">u8").astype(np.uint64)
    return words[:, 0], words[:, 1]


class SeenKeys:
    """The keys of every row so far, to mark a later row with the same key a duplicate (the
    first may publish), as ``contracts.later_duplicates`` does on a whole column.

    Runs are sorted by the high word only (a stable sort of two sorted runs is a linear merge);
    a lookup compares the low word over the few entries that share the high word. A new run
    is merged into the one before it while that one is at most twice its size, so there are
    about log2(keys / batch) runs."""

    def __init__(self) -> None:
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []

    def __len__(self) -> int:
        return sum(len(high) for high, _ in self._runs)

    def later_duplicates(self, keys: pa.Array | pa.ChunkedArray) -> pa.Array:
        if isinstance(keys, pa.ChunkedArray):
            keys = keys.combine_chunks()
        flags = np.zeros(len(keys), dtype=bool)
        valid = np.flatnonzero(pc.is_valid(keys).to_numpy(zero_copy_only=False))
        if not len(valid):
            return pa.array(flags)
        high, low = key_values(keys.take(pa.array(valid)))
        # One stable sort by the high word serves the in-batch test, the lookups and the run.
        order = np.argsort(high, kind="stable")
        high, low = high[order], low[order]
        repeated = self._repeated_in_batch(high, low) | self._seen_before(high, low)
        flags[valid[order]] = repeated
        self._add(high[~repeated], low[~repeated])
        return pa.array(flags)

    @staticmethod
    def _repeated_in_batch(high: np.ndarray, low: np.ndarray) -> np.ndarray:
        """Rows (sorted by high word, stably) whose key an earlier row of the batch has."""
        repeated = np.zeros(len(high), dtype=bool)
        shares_high = np.flatnonzero(high[1:] == high[:-1])
        if not len(shares_high):  # the usual batch: every key different
            return repeated
        # Stretches of one high word, in row order: a key is repeated if an earlier row of
        # its stretch has the same low word.
        for row in np.unique(np.r_[shares_high, shares_high + 1]):
            earlier = row - 1
            while earlier >= 0 and high[earlier] == high[row]:
                if low[earlier] == low[row]:
                    repeated[row] = True
                    break
                earlier -= 1
        return repeated

    def _seen_before(self, high: np.ndarray, low: np.ndarray) -> np.ndarray:
        """Rows (sorted by high word) whose key an earlier batch had. Looked up in sorted
        order, each binary search starts near the last one's answer and the run stays in
        cache (a third of the time of lookups in row order)."""
        seen = np.zeros(len(high), dtype=bool)
        for run_high, run_low in self._runs:
            first = np.minimum(np.searchsorted(run_high, high), len(run_high) - 1)
            same_high = run_high[first] == high
            seen |= same_high & (run_low[first] == low)
            # A high word that more keys of the run have: rare (random 64-bit words), so the
            # rest of that stretch is looked at one by one.
            for row in np.flatnonzero(same_high & ~seen):
                stretch = slice(first[row], np.searchsorted(run_high, high[row], side="right"))
                seen[row] |= bool((run_low[stretch] == low[row]).any())
        return seen

    def _add(self, high: np.ndarray, low: np.ndarray) -> None:
        """A new run of keys sorted by high word; merged with the run before it while that
        one is at most twice its size."""
        if not len(high):
            return
        self._runs.append((high, low))
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            (high_a, low_a), (high_b, low_b) = self._runs.pop(-2), self._runs.pop()
            merged_high = np.concatenate([high_a, high_b])
            order = np.argsort(merged_high, kind="stable")  # two sorted runs: a linear merge
            self._runs.append((merged_high[order], np.concatenate([low_a, low_b])[order]))
