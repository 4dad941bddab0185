"""A drifting click stream: what users like moves, and new ids keep arriving.

Every id of every sparse feature has a latent preference (a logit contribution). The click
probability of a sample is sigmoid(bias + dense . w + sum of its ids' current preferences).
The world moves in epochs of `drift_every_s` seconds of stream time; at each epoch

* every preference takes one AR(1) step: p <- rho p + sqrt(1 - rho^2) N(0, pref_std^2), so it
  keeps its spread while forgetting its past (after k epochs the correlation is rho^k);
* `arrivals` popular ranks per feature are handed to ids from the far tail, which training
  has (almost) never seen, with fresh preferences: new ids arriving.

A model whose embeddings follow the stream therefore predicts better than one whose
embeddings stopped at a checkpoint. Epoch e's changes come from `default_rng([seed, e])`
alone, so the state at a stream time is a pure function of (config, time): the trainer and
the request generator, each with its own sample generator, see the same world.
Needs numpy only (no torch).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

DENSE_FEATURES, SPARSE_FEATURES = 13, 26  # Criteo's shape


def table_names() -> list[str]:
    """The embedding table of each sparse feature, in order: C1..C26."""
    return [f"C{i + 1}" for i in range(SPARSE_FEATURES)]


@dataclass(frozen=True)
class ClickStreamConfig:
    """vocab: ids per feature (the table rows); zipf: popularity skew of the ranks;
    pref_std: spread of an id's preference (logit units); drift_every_s: stream seconds per
    epoch; rho: AR(1) factor of a preference per epoch (1: no drift); arrivals: popular ranks
    per feature and epoch given to new ids; popular: how many top ranks arrivals may take;
    dense_std: spread of the dense features' (fixed) weights; bias: base logit; seed."""

    vocab: int = 20_000
    zipf: float = 1.2
    pref_std: float = 0.6
    drift_every_s: float = 1.0
    rho: float = 0.97
    arrivals: int = 4
    popular: int = 200
    dense_std: float = 0.3
    bias: float = -1.2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.vocab < 100:
            raise ValueError(f"vocab must be >= 100, got {self.vocab}")
        if not 0 < self.popular <= self.vocab // 2 or not 0 <= self.arrivals <= self.popular:
            raise ValueError("need 0 <= arrivals <= popular <= vocab / 2")
        if not 0.0 <= self.rho <= 1.0 or self.drift_every_s <= 0 or self.zipf <= 1.0:
            raise ValueError("need 0 <= rho <= 1, drift_every_s > 0 and zipf > 1")


@dataclass(frozen=True)
class Clicks:
    """A batch: dense float32[b, 13]; ids int64[b, 26] (row of table C{i+1} in column i);
    label float32[b] (1 = click); prob float64[b], the true click probability."""

    dense: np.ndarray
    ids: np.ndarray
    label: np.ndarray
    prob: np.ndarray


class ClickStream:
    """The stream's world at a stream time; `advance_to` moves it, `sample` draws from it.

    Thread-safe: an epoch builds new arrays and swaps them in, so a reader sees one epoch.
    """

    def __init__(self, config: ClickStreamConfig | None = None) -> None:
        self.config = config = config or ClickStreamConfig()
        rng = np.random.default_rng([config.seed, 1 << 32])
        self._dense_w = rng.normal(0.0, config.dense_std, DENSE_FEATURES)
        self._prefs = rng.normal(0.0, config.pref_std, (SPARSE_FEATURES, config.vocab))
        # rank_to_id[f, r]: the id at popularity rank r of feature f (a permutation per feature)
        self._rank_to_id = np.argsort(rng.random((SPARSE_FEATURES, config.vocab)), axis=1)
        self.epoch = 0
        self._lock = threading.Lock()

    def epoch_at(self, stream_s: float) -> int:
        return max(0, math.floor(stream_s / self.config.drift_every_s))

    def advance_to(self, stream_s: float) -> int:
        """Apply every epoch up to `stream_s` (never backwards); returns the epoch."""
        target = self.epoch_at(stream_s)
        with self._lock:
            while self.epoch < target:
                self._step(self.epoch + 1)
        return self.epoch

    def _step(self, epoch: int) -> None:
        c = self.config
        rng = np.random.default_rng([c.seed, epoch])
        noise = rng.normal(0.0, c.pref_std, self._prefs.shape)
        prefs = c.rho * self._prefs + math.sqrt(1.0 - c.rho * c.rho) * noise
        ranks = self._rank_to_id.copy()
        if c.arrivals:
            rows = np.arange(SPARSE_FEATURES)[:, None]
            top = np.argsort(rng.random((SPARSE_FEATURES, c.popular)), axis=1)[:, :c.arrivals]
            tail_size = c.vocab - c.vocab // 2
            tail = c.vocab // 2 + np.argsort(rng.random((SPARSE_FEATURES, tail_size)),
                                             axis=1)[:, :c.arrivals]
            old, new = ranks[rows, top], ranks[rows, tail]
            ranks[rows, top], ranks[rows, tail] = new, old
            prefs[rows, new] = rng.normal(0.0, c.pref_std, new.shape)
        self._prefs, self._rank_to_id, self.epoch = prefs, ranks, epoch

    def sample(self, rng: np.random.Generator, batch: int) -> Clicks:
        """`batch` samples of the current world, drawn with `rng`."""
        c = self.config
        with self._lock:
            prefs, rank_to_id = self._prefs, self._rank_to_id
        dense = rng.standard_normal((batch, DENSE_FEATURES), dtype=np.float32)
        ranks = (rng.zipf(c.zipf, (batch, SPARSE_FEATURES)) - 1) % c.vocab
        ids = rank_to_id[np.arange(SPARSE_FEATURES), ranks]
        prob = 1.0 / (1.0 + np.exp(-self._logit(prefs, dense, ids)))
        label = (rng.random(batch) < prob).astype(np.float32)
        return Clicks(dense, ids.astype(np.int64), label, prob)

    def logit(self, dense: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """The true click logit now: dense float32[b, 13], ids int64[b, 26] -> float64[b]."""
        with self._lock:
            prefs = self._prefs
        return self._logit(prefs, dense, ids)

    def _logit(self, prefs: np.ndarray, dense: np.ndarray, ids: np.ndarray) -> np.ndarray:
        features = np.arange(SPARSE_FEATURES)
        return (self.config.bias + dense.astype(np.float64) @ self._dense_w
                + prefs[features, ids].sum(axis=1))


__all__ = ["DENSE_FEATURES", "SPARSE_FEATURES", "ClickStream", "ClickStreamConfig", "Clicks",
           "table_names"]
