"""Compiled checks the writer runs on every flushed table: one pass each, no temporaries.

numpy's `np.isfinite(rows).all()` and `np.all(signs[1:] > signs[:-1])` each build a boolean
array as large as their input before reducing it; on a 100k-row flush that took 0.7 ms of the
writer's CPU per flush under training load (bench/producer.py), these loops a fraction of it.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _all_finite(values: np.ndarray) -> bool:
    bad = False
    for i in range(values.size):  # one flat loop: it vectorizes (a 2-D one did not, 8x slower)
        x = values[i]
        bad |= (x - x) != 0  # NaN - NaN and inf - inf are NaN; no branch in the loop
    return not bad


@numba.njit(cache=True, nogil=True)
def _strictly_ascending(signs: np.ndarray) -> bool:
    ok = True
    for i in range(1, signs.size):
        ok &= signs[i] > signs[i - 1]
    return ok


def all_finite(rows: np.ndarray) -> bool:
    """Whether every value of rows: float32[n, dim] is finite (no NaN, no +-inf)."""
    if rows.dtype != np.float32 or not rows.flags.c_contiguous:
        return bool(np.isfinite(rows).all())
    return bool(_all_finite(rows.reshape(-1)))


def strictly_ascending(signs: np.ndarray) -> bool:
    """Whether signs: uint64[n] are in strictly ascending order (sorted and unique)."""
    if signs.ndim != 1 or signs.dtype != np.uint64:
        return signs.size < 2 or bool(np.all(signs[1:] > signs[:-1]))
    return bool(_strictly_ascending(signs))
