"""Serving the model the demo trains: does freshness pay, in predictions?

Two arms answer every request with the same dense part (the TorchScript one exported at the
checkpoint); only where the embeddings come from differs:

* live: the embedding servers the loader keeps applying packets to;
* frozen: servers that loaded the same checkpoint and never receive a packet.

`ServingProbe` sends a steady stream of seed-shaped requests (128 rows, 13 dense and 26
sparse features) drawn from the click stream at request time, scores each on both arms,
then learns the labels (prequential evaluation) and keeps AUC and log-loss over time.

Both arms send the same request bytes (`request_bytes`, the seed document's format) to the
same engine code, `inference.engine.PersiaInference`, with the same TorchScript file. The live
arm's scoring is one function, `live_scorer`: "torchserve" sends the request over TorchServe's
gRPC inference API to the .mar's handler (that engine inside a TorchServe worker);
"in-process" calls the engine here. The frozen arm always scores in process.
`compare_frontends` checks, once the rows stand still, that TorchServe answers bit for bit as
the in-process engine does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from persia_inc.demo.clicks import table_names
from persia_inc.foundation.threads import ServiceThread

if TYPE_CHECKING:
    from persia_inc.demo.clicks import ClickStream
    from persia_inc.demo.report import Progress
    from persia_inc.embedding_server.client import EmbeddingClient
    from persia_inc.inference.engine import PersiaInference

log = logging.getLogger(__name__)

FRONTENDS = ("in-process", "torchserve", "kserve")

# score(dense: float32[b, 13], ids: int64[b, 26]) -> click probability float32[b]
ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ServingOptions:
    """frontend: how the live arm is served ("torchserve" or "in-process");
    request_rows: samples per request (128, as the seed document's); request_interval_s:
    time between request starts (default 0.05 s: 20 requests/s); window_s: stream seconds
    per point of the AUC timeline; seed: the requests' sample generator; check_requests:
    requests scored by TorchServe and in process after training (torchserve frontend)."""

    frontend: str = "torchserve"  # or "kserve": persia_inc.demo.kserve scores the live arm
    request_rows: int = 128
    request_interval_s: float = 0.05
    window_s: float = 5.0
    seed: int = 1
    check_requests: int = 100

    def __post_init__(self) -> None:
        if self.frontend not in FRONTENDS:
            raise ValueError(f"frontend must be one of {FRONTENDS}, got {self.frontend!r}")
        if (self.request_rows < 1 or self.request_interval_s < 0 or self.window_s <= 0
                or self.check_requests < 0):
            raise ValueError("need request_rows >= 1, request_interval_s >= 0, window_s > 0, "
                             "check_requests >= 0")


# ------------------------------------------------------------------------------ metrics


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by ranks (ties count one half): scores float[n], labels {0, 1}[n]; NaN when
    one class is absent."""
    scores = np.asarray(scores, np.float64).ravel()
    positive = np.asarray(labels).ravel() > 0.5
    n, n_pos = scores.shape[0], int(positive.sum())
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(n, np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)  # 1-based mean rank of ties
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy: probs float[n] in [0, 1], labels {0, 1}[n]; NaN if n = 0."""
    p = np.clip(np.asarray(probs, np.float64).ravel(), eps, 1.0 - eps)
    y = np.asarray(labels, np.float64).ravel()
    if y.size == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


# ------------------------------------------------------------------------------ scoring


def lookup_embeddings(client: EmbeddingClient, ids: np.ndarray) -> np.ndarray:
    """ids: int64[b, 26] (row of table C{i+1} in column i, whose sign is the row) ->
    float32[b, 26, dim], in one LookupBlocks RPC per shard."""
    names = table_names()
    rows = client.lookup_tables({name: ids[:, i].astype(np.uint64) for i, name in enumerate(names)})
    return np.stack([rows[name] for name in names], axis=1)


def request_bytes(dense_features: np.ndarray, ids: np.ndarray) -> bytes:
    """The seed-shaped request (`inference.batch.PersiaBatch`, Arrow IPC) of dense_features:
    float32[b, 13] and ids: int64[b, 26] (feature C{i+1}: one id per sample, column i)."""
    from persia_inc.inference.batch import PersiaBatch

    signs = np.ascontiguousarray(ids, dtype=np.uint64)
    return (PersiaBatch().add_dense([dense_features])
            .add_sparse([(name, signs[:, i:i + 1]) for i, name in enumerate(table_names())])
            .to_bytes())


def in_process_scorer(engine: PersiaInference) -> ScoreFn:
    """Score here, exactly as the TorchServe handler does: the request's bytes through
    `engine` (`PersiaInference`: decode, one lookup per shard, pool, TorchScript forward)."""
    return lambda dense_features, ids: engine.predict(request_bytes(dense_features, ids))


def torchserve_scorer(stub: Any, model_name: str, timeout_s: float = 10.0) -> ScoreFn:
    """Score over TorchServe's gRPC inference API (`inference.client.infer`); `stub` from
    `get_inference_stub`. Raises InferenceError for a refused request."""
    from persia_inc.inference.client import infer

    return lambda dense_features, ids: infer(stub, model_name, request_bytes(dense_features, ids),
                                             timeout_s=timeout_s)


def live_scorer(frontend: str, engine: PersiaInference, stub: Any = None,
                model_name: str = "") -> ScoreFn:
    """The seam: how the live arm scores a request.

    "in-process": `in_process_scorer(engine)`. "torchserve": `torchserve_scorer(stub,
    model_name)`, TorchServe's handler looking up the same servers and running the same
    TorchScript file (`compare_frontends` checks that it answers as `engine` does)."""
    if frontend == "in-process":
        return in_process_scorer(engine)
    if frontend == "torchserve":
        if stub is None or not model_name:
            raise ValueError("the torchserve frontend needs a gRPC stub and the model's name")
        return torchserve_scorer(stub, model_name)
    raise ValueError(f"unknown frontend {frontend!r}; one of {FRONTENDS}")


def torchserve_missing() -> str | None:
    """Why the live arm cannot be served by TorchServe here, in one line naming what to
    install (TorchServe, torch-model-archiver, Java); None when all is there."""
    from persia_inc.extras import have, install_hint
    from persia_inc.inference.local import TorchServeMissingError, check_installed

    try:
        check_installed()
    except TorchServeMissingError as exc:
        return str(exc)
    for module, what in (("model_archiver", "torch-model-archiver"),
                         ("google.rpc", "googleapis-common-protos")):
        if not have(module):
            return f"{what} is not installed: {install_hint('ts')}"
    return None


@dataclass(frozen=True)
class FrontendCheck:
    """TorchServe against the in-process engine: `checked` requests scored by both,
    `mismatched` of them whose scores differ in any bit (or that failed on either side)."""

    checked: int = 0
    mismatched: int = 0


def compare_frontends(stream: ClickStream, served: ScoreFn, reference: ScoreFn, requests: int,
                      rows: int = 128, seed: int = 2) -> FrontendCheck:
    """Score `requests` requests of `rows` samples, drawn from `stream` as it stands, on both
    scorers; call it when the rows no longer move (training stopped, the loader drained)."""
    rng = np.random.default_rng(seed)
    mismatched = 0
    for index in range(requests):
        clicks = stream.sample(rng, rows)
        try:
            got = np.asarray(served(clicks.dense, clicks.ids), np.float32)
            want = np.asarray(reference(clicks.dense, clicks.ids), np.float32)
        except Exception as exc:  # counted and logged: the check goes on
            log.warning("frontend check: request %d failed: %s", index, exc)
            mismatched += 1
            continue
        if got.shape != want.shape or not np.array_equal(got.view(np.uint32), want.view(np.uint32)):
            log.warning("frontend check: request %d differs: served %s, in process %s", index,
                        got[:4], want[:4])
            mismatched += 1
    return FrontendCheck(checked=requests, mismatched=mismatched)


# ------------------------------------------------------------------------------ the probe


ARMS = ("live", "checkpoint_dense", "frozen")
"""live: the live rows and the served dense part (TorchServe: the active dense version);
checkpoint_dense: the live rows and the checkpoint's dense part, in process; frozen: the
checkpoint's rows and dense part, in process."""


@dataclass
class ServingRecord:
    """Everything scored, request by request (stream seconds, probabilities per arm, labels).
    errors: requests that failed on any arm; error_arms: per arm (the first that failed)."""

    t_s: list[float] = field(default_factory=list)  # per request
    latency_ms: list[float] = field(default_factory=list)  # live arm, per request
    scores: dict[str, list[np.ndarray]] = field(
        default_factory=lambda: {arm: [] for arm in ARMS})  # float32[rows] per request
    labels: list[np.ndarray] = field(default_factory=list)
    requests: int = 0
    errors: int = 0
    error_arms: dict[str, int] = field(default_factory=dict)

    def arrays(self) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """(t_s float64[n], {arm: probabilities float64[n]}, labels float64[n]) per sample;
        an arm that scored nothing (no scorer) is absent."""
        if not self.labels:
            return np.zeros(0), {}, np.zeros(0)
        sizes = [x.shape[0] for x in self.labels]
        t = np.repeat(np.asarray(self.t_s[:len(sizes)]), sizes)
        arms = {arm: np.concatenate(parts).astype(np.float64)
                for arm, parts in self.scores.items() if parts}
        return t, arms, np.concatenate(self.labels).astype(np.float64)


class ServingProbe:
    """Requests on a steady beat, each scored on every arm, then labelled (prequential).

    stream_clock() is the stream time in seconds (0 at the checkpoint); no request starts at
    or after `until_s` of it. checkpoint_dense: the live rows with the checkpoint's dense part
    (None: that arm is not scored). start / close / with.
    """

    def __init__(self, stream: ClickStream, live: ScoreFn, frozen: ScoreFn,
                 options: ServingOptions, progress: Progress,
                 stream_clock: Callable[[], float], until_s: float = float("inf"),
                 checkpoint_dense: ScoreFn | None = None) -> None:
        self.stream, self.live, self.frozen = stream, live, frozen
        self.checkpoint_dense = checkpoint_dense
        self.options, self.progress, self.clock = options, progress, stream_clock
        self.until_s = until_s
        self.record = ServingRecord()
        self._rng = np.random.default_rng(options.seed)
        self._thread = ServiceThread("demo-serving", self._run)

    def start(self) -> ServingProbe:
        self.progress.serving_started = time.monotonic()
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop sending (bounded, safe to call twice)."""
        self._thread.close(timeout_s=10)

    def __enter__(self) -> ServingProbe:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self) -> None:
        stop = self._thread.stop
        last_auc = time.monotonic()
        while not stop.is_set() and self.clock() < self.until_s:
            began = time.monotonic()
            self.one_request()
            if began - last_auc > 1.0:
                self._update_progress()
                last_auc = began
            stop.wait(max(0.0, self.options.request_interval_s - (time.monotonic() - began)))

    def one_request(self) -> None:
        """Draw a request at the current stream time, score it on every arm, keep the labels.
        A failed request (on any arm) is counted, with the arm, and logged, never fatal."""
        t_s = self.clock()
        self.stream.advance_to(t_s)
        clicks = self.stream.sample(self._rng, self.options.request_rows)
        record = self.record
        record.requests += 1
        self.progress.requests += 1
        arm = "live"
        scores: dict[str, np.ndarray] = {}
        try:
            began = time.perf_counter()
            scores["live"] = self.live(clicks.dense, clicks.ids)
            latency_ms = (time.perf_counter() - began) * 1e3
            arm = "frozen"
            scores["frozen"] = self.frozen(clicks.dense, clicks.ids)
            if self.checkpoint_dense is not None:
                arm = "checkpoint_dense"
                scores["checkpoint_dense"] = self.checkpoint_dense(clicks.dense, clicks.ids)
        except Exception as exc:  # one bad request never stops the probe
            record.errors += 1
            record.error_arms[arm] = record.error_arms.get(arm, 0) + 1
            self.progress.serving_errors += 1
            log.warning("serving request %d at stream %.2f s failed on the %s arm: %s",
                        record.requests, t_s, arm, exc)
            return
        record.t_s.append(t_s)
        record.latency_ms.append(latency_ms)
        for name, probs in scores.items():
            record.scores[name].append(probs)
        record.labels.append(clicks.label)
        self.progress.serving_ms.append(latency_ms)

    def _update_progress(self) -> None:
        _, arms, labels = self.record.arrays()
        nan = np.full(labels.shape, np.nan)
        self.progress.auc_live = auc(arms.get("live", nan), labels)
        self.progress.auc_frozen = auc(arms.get("frozen", nan), labels)
        self.progress.auc_checkpoint_dense = auc(arms.get("checkpoint_dense", nan), labels)

    def report(self) -> dict[str, Any]:
        """The report's `serving` object (see `serving_report`)."""
        return serving_report(self.record, self.options)


def serving_report(record: ServingRecord, options: ServingOptions) -> dict[str, Any]:
    """frontend, requests, errors (requests that failed on any arm) and error_arms (per arm),
    p50_ms / p99_ms (live arm), checked / mismatched (TorchServe against in-process; 0 in
    process), cumulative AUC and log-loss of each arm of `ARMS` (`auc_live`,
    `auc_checkpoint_dense`, `auc_frozen`, ...; None for an arm not scored), and a `timeline` of
    windows of `window_s` stream seconds (each window's figures and the cumulative ones at its
    end; t_s: the window's end, or its last request if sooner)."""
    t, arms, labels = record.arrays()
    lat = np.asarray(record.latency_ms)
    out: dict[str, Any] = {
        "frontend": options.frontend, "requests": record.requests, "errors": record.errors,
        "error_arms": dict(record.error_arms),
        "p50_ms": _round(float(np.percentile(lat, 50))) if lat.size else 0.0,
        "p99_ms": _round(float(np.percentile(lat, 99))) if lat.size else 0.0,
        "checked": 0, "mismatched": 0, "samples": int(labels.size),
    }
    for arm in ARMS:
        probs = arms.get(arm)
        out[f"auc_{arm}"] = None if probs is None else _round(auc(probs, labels), 4)
        out[f"logloss_{arm}"] = None if probs is None else _round(log_loss(probs, labels), 4)
    out.update(window_s=options.window_s, timeline=[])
    if not labels.size:
        return out
    window = np.floor(t / options.window_s).astype(np.int64)
    ends = np.searchsorted(window, np.arange(window.max() + 1), side="right")  # t is sorted
    starts = np.concatenate([[0], ends[:-1]])
    for w, (lo, hi) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        if hi == lo:
            continue
        part = slice(lo, hi)
        point: dict[str, Any] = {
            "t_s": round(min((w + 1) * options.window_s, float(t[hi - 1])), 1), "samples": hi - lo}
        for arm, probs in arms.items():
            point[f"auc_{arm}"] = _round(auc(probs[part], labels[part]), 4)
            point[f"logloss_{arm}"] = _round(log_loss(probs[part], labels[part]), 4)
            point[f"cum_auc_{arm}"] = _round(auc(probs[:hi], labels[:hi]), 4)
        out["timeline"].append(point)
    return out


def _round(value: float, digits: int = 2) -> float | None:
    """Rounded; None for NaN (JSON has no NaN)."""
    return None if np.isnan(value) else round(float(value), digits)


__all__ = ["ARMS", "FRONTENDS", "FrontendCheck", "ScoreFn", "ServingOptions", "ServingProbe", "ServingRecord",
           "auc", "compare_frontends", "in_process_scorer", "live_scorer", "log_loss",
           "lookup_embeddings", "request_bytes", "serving_report", "torchserve_missing",
           "torchserve_scorer"]
