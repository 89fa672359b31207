"""The order rows are visited in: a seeded permutation per epoch, computed per position (never
stored), so any step's rows follow from the step number alone and memory does not grow with the
number of rows. No torch here (the tokenizing workers import this module)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..runtime import mix_seed
from .records import DataError

_MASK64 = (1 << 64) - 1


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (their products wrap, as intended)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(index: np.ndarray | Sequence[int], n: int, seed: int) -> np.ndarray:
    """A seeded bijection of [0, n), applied to ``index`` (int64 array): a four-round Feistel
    network over the smallest even-bit domain holding n, walked until it lands inside [0, n)
    (the domain is less than 4n, so a few rounds on average). O(1) memory: row r's position in a
    shuffled epoch is computed, never looked up in a stored permutation."""
    x = np.asarray(index, dtype=np.uint64).copy()
    if n < 1:
        raise ValueError(f"cannot permute an empty range (n = {n})")
    if x.size and int(x.max()) >= n:
        raise ValueError(f"index out of range [0, {n})")
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    low = np.uint64((1 << half) - 1)
    keys = _mix(np.arange(1, 5, dtype=np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) & _MASK64))

    def feistel(v: np.ndarray) -> np.ndarray:
        left, right = v >> np.uint64(half), v & low
        for key in keys:
            left, right = right, left ^ (_mix(right ^ key) & low)
        return (left << np.uint64(half)) | right

    todo = np.ones(x.shape, dtype=bool)
    while todo.any():
        x[todo] = feistel(x[todo])
        todo = x >= np.uint64(n)
    return x.astype(np.int64)


class RowOrder:
    """The global rows of each optimiser step: step s takes positions s*B ... s*B + B - 1 of the
    endless sequence epoch 0, epoch 1, ..., each epoch a seeded permutation of all rows."""

    def __init__(self, rows: int, batch_size: int, seed: int) -> None:
        if rows < 1:
            raise DataError("no training rows")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed

    def batch(self, step: int) -> list[int]:
        """Rows of optimiser step ``step`` (0-based)."""
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=np.int64)
        out = np.empty_like(positions)
        for epoch in np.unique(positions // self.rows).tolist():
            here = positions // self.rows == epoch
            out[here] = permute(positions[here] % self.rows, self.rows, mix_seed(self.seed, epoch))
        return out.tolist()
