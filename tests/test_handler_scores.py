"""The handler's answer text reads back as the very float32 scores the engine computed."""

from __future__ import annotations

import json

import numpy as np

from persia_inc.inference.client import _scores
from persia_inc.inference.handler import scores_json


def bits(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, np.float32).view(np.uint32)


def test_every_magnitude_reads_back_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    # random bit patterns cover every exponent, subnormals and both signs; NaN/inf dropped
    patterns = rng.integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    finite = patterns[np.isfinite(patterns) & (patterns != 0)]
    edges = np.array([np.finfo(np.float32).max, np.finfo(np.float32).tiny, np.float32(1e-45),
                      -np.finfo(np.float32).max, 1.0, 0.5, np.nextafter(np.float32(1), np.float32(0))],
                     np.float32)
    for scores in (finite, edges, rng.random(128, dtype=np.float32)):
        text = scores_json(scores)
        assert np.array_equal(bits(_scores("m", text, 400)), bits(scores))
        assert np.array_equal(bits(json.loads(text)), bits(scores))  # any JSON reader, then float32


def test_zero_nan_and_other_dtypes_as_json_dumps_writes_them() -> None:
    signed = np.array([0.25, -0.0, 0.0], np.float32)
    assert bits(_scores("m", scores_json(signed), 400)).tolist() == bits(signed).tolist()  # -0.0 kept
    odd = np.array([0.5, np.nan, np.inf], np.float32)
    assert scores_json(odd) == json.dumps(odd.tolist())
    doubles = np.array([0.1, 1 / 3])
    assert json.loads(scores_json(doubles)) == doubles.tolist()
