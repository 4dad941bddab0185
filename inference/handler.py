"""`PersiaHandler`: the TorchServe front end of `inference.engine.PersiaInference`.

Inside a .mar (see `inference.archive`) the handler finds:

* the TorchScript dense model (`*.pt`, loaded by the stock `BaseHandler`);
* `persia_model.json`, the `ModelSpec` (features, table, limits);
* the embedding servers: the config named by the `PERSIA_INC_CONFIG` environment variable of
  the TorchServe process if set (one .mar, many deployments), else `global_config.yaml`
  shipped in the .mar as an extra file.

Request input: the Arrow IPC bytes under `data` (gRPC input map key, or HTTP form field),
`batch` (the seed document's name) or `body` (an HTTP raw body). A good request's answer is a
JSON list of float scores, one per sample (`scores_json`: each float32 score to 9 significant
digits, which read back as float32 is the same score bit for bit). Embedding servers that fail
give 503 for the batch.

A bad request fails with a message that names the column ("bad request: column 'dense': ..."),
and the worker keeps running. How the failure reaches the client depends on what else is in
the TorchServe batch, because TorchServe 0.12's gRPC front end ignores per-request statuses
(`GRPCJob.response` always answers OK) and maps only a whole-batch error to a gRPC status:

* every request of the batch is bad (always so with `batch_size` 1, our registration
  default): the handler raises `PredictionException(..., 400)`, which TorchServe sends as
  gRPC INVALID_ARGUMENT and HTTP 400;
* good and bad requests share a batch (`batch_size` > 1): the good ones are answered, each bad
  one gets HTTP 400 through `context.set_response_status`, but over gRPC an OK whose body is
  `{"error": ..., "column": ...}` (`inference.client.infer` raises InferenceError
  INVALID_ARGUMENT on it; a generic gRPC client must look at the body). Failing the whole
  batch instead would fail the good requests. Checked in TorchServe 0.12.0's jar:
  `GRPCJob.response` never reads its statusCode argument, and `BatchAggregator.sendResponse`
  calls `sendError` only when the whole batch failed (upstream issue pytorch/serve#1329).

Any table layout of `inference.spec` is served: the engine looks every table up in one
`EmbeddingClient.lookup_tables` call per batch.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

with warnings.catch_warnings():
    # ts/version.py reads version.txt without closing it: a ResourceWarning at import time,
    # which a `-W error` run (our pytest) would turn into a failure
    warnings.simplefilter("ignore", ResourceWarning)
    from ts.torch_handler.base_handler import BaseHandler
    from ts.utils.util import PredictionException

from persia_inc.embedding_server.client import EmbeddingClient
from persia_inc.foundation.memory import keep_freed_memory
from persia_inc.inference.batch import BatchError, DecodedBatch
from persia_inc.inference.engine import EmbeddingShapeError, PersiaInference, serving_threads
from persia_inc.inference.spec import SPEC_FILE, ModelSpec

log = logging.getLogger(__name__)

INPUT_KEYS = ("data", "batch", "body")
READY_TIMEOUT_S = 10.0
WARM_UP_REQUESTS = 2  # the profiling executor's profiled run, then its optimized one


def request_body(row: Any) -> bytes | bytearray:
    """The request bytes of one TorchServe input row; BatchError if there are none."""
    if isinstance(row, dict):
        for key in INPUT_KEYS:
            value = row.get(key)
            if value is not None:
                if isinstance(value, bytes | bytearray):
                    return value
                raise BatchError("", f"input {key!r} must be the raw Arrow IPC bytes "
                                     f"(send Content-Type: application/octet-stream), got "
                                     f"{type(value).__name__}")
    raise BatchError("", f"no request body: send the Arrow IPC bytes as input {INPUT_KEYS[0]!r}")


def scores_json(scores: Any) -> str:
    """One request's scores (float32[B]) as the JSON text TorchServe sends: each to 9
    significant digits, which read back as float32 (or as float64, then float32, as
    `inference.client` does) is the same float32, bit for bit. A list handed to TorchServe
    went through its `json.dumps(indent=2)` of each score's 17-digit float64 repr: for 128
    scores about 270 us to write and 50 us to read back, against 35-75 us and 22 us (measured
    on this project's 2-core machine). Anything else (another dtype, a zero: 'g' drops the
    sign of -0.0; NaN or infinity) is written as json.dumps writes it."""
    values = np.asarray(scores)
    if values.dtype == np.float32 and values.ndim == 1 and np.isfinite(values).all() and values.all():
        return "[" + ",".join([f"{v:.9g}" for v in values.tolist()]) + "]"
    return json.dumps(values.tolist())


class PersiaHandler(BaseHandler):
    """TorchServe handler: preprocess = decode, inference = lookup + pool + forward,
    postprocess = one list of scores (or one error) per request."""

    def __init__(self) -> None:
        super().__init__()
        self.engine: PersiaInference | None = None
        self.client: EmbeddingClient | None = None

    def initialize(self, context: Any) -> None:
        super().initialize(context)  # loads the .pt TorchScript model into self.model
        keep_freed_memory()  # megabyte requests and replies: reuse their pages, as kserve does
        threads = serving_threads()
        model_dir = Path(context.system_properties.get("model_dir"))
        spec = ModelSpec.load(model_dir / SPEC_FILE)
        self.client, where = self.open_client(model_dir)
        try:
            self.client.wait_ready(READY_TIMEOUT_S)
        except TimeoutError as exc:  # serve anyway: lookups answer 503 until the shards are up
            log.warning("embedding servers not ready yet: %s", exc)
        self.engine = PersiaInference.from_client(self.model, spec, self.client)
        self.warm_up(spec)
        log.info("PersiaHandler ready: %d sparse features in %d table(s) on %s (%s), %d torch "
                 "thread(s)", len(spec.sparse), len(spec.tables),
                 ", ".join(t.address for t in self.client.targets), where, threads)
        self.initialized = True

    def warm_up(self, spec: ModelSpec, requests: int = WARM_UP_REQUESTS) -> int:
        """Send the engine `requests` small requests of the spec's shape (`validate.sample_request`)
        before the worker reports ready; returns how many were answered. TorchScript's
        profiling executor profiles and optimizes the model on its first calls (~35 ms for the
        demo's model here): the version's validation request and its first users paid that at
        full priority, now the start does, at the low priority it runs at
        (`inference.worker_start`). A failure (embedding servers not up yet) is logged: the
        first real request then pays it."""
        from persia_inc.inference.validate import sample_request

        answered = 0
        for seed in range(requests):
            try:
                self._engine().predict(sample_request(spec, seed=seed))
            except Exception as exc:  # never fail a start for its warm-up
                log.warning("warm-up request %d failed: %s: %s", seed, type(exc).__name__, exc)
                break
            answered += 1
        return answered

    def open_client(self, model_dir: Path) -> tuple[EmbeddingClient, str]:
        """The embedding servers' client for the model in `model_dir`, and where their
        addresses came from (for the log). The application's handler
        (`persia_inc.handler.ConfiguredHandler`, the one a .mar names) reads them from the
        deployment's configuration."""
        raise NotImplementedError(f"{type(self).__name__} must say how to reach the embedding servers")

    def _load_torchscript_model(self, model_pt_path: str) -> Any:
        """BaseHandler's TorchScript loader (torch.jit.load), without torch 2.13's
        deprecation warning (see inference.model.script)."""
        from persia_inc.inference.model import load_torchscript

        return load_torchscript(model_pt_path, map_location=self.device)

    def _engine(self) -> PersiaInference:
        if self.engine is None:
            raise RuntimeError("PersiaHandler used before initialize()")
        return self.engine

    def preprocess(self, data: list[Any]) -> list[DecodedBatch | BatchError]:
        """Decode every request; a bad one becomes its BatchError. If all of them are bad,
        raise PredictionException(400) naming the column(s): TorchServe then answers gRPC
        INVALID_ARGUMENT and HTTP 400 (see the module docstring)."""
        engine = self._engine()
        out: list[DecodedBatch | BatchError] = []
        for row in data:
            try:
                out.append(engine.decode(request_body(row)))
            except BatchError as exc:
                out.append(exc)
        if out and all(isinstance(item, BatchError) for item in out):
            messages = list(dict.fromkeys(f"bad request: {item}" for item in out))
            log.info("bad request%s: %s", "s" if len(out) > 1 else "", "; ".join(messages))
            raise PredictionException("; ".join(messages), 400)
        return out

    def inference(self, data: list[DecodedBatch | BatchError], *args: Any, **kwargs: Any) -> list[Any]:
        """Look up, pool and run the model for the good requests, together."""
        from persia_inc.embedding_server.errors import ShardError

        engine = self._engine()
        try:
            return engine.run(data)
        except ShardError as exc:
            log.warning("embedding lookup failed: %s", exc)
            raise PredictionException(f"embedding servers unavailable: {exc}", 503) from exc
        except EmbeddingShapeError as exc:
            raise PredictionException(str(exc), 500) from exc
        except PredictionException:
            raise
        except Exception as exc:  # the dense module itself: say why, not just "Prediction failed"
            log.exception("the dense model failed")
            raise PredictionException(f"the dense model failed: {type(exc).__name__}: {exc}", 500) from exc

    def postprocess(self, data: list[Any]) -> list[Any]:
        """One entry per request: its scores as JSON text (`scores_json`), or (a bad request
        beside good ones) an error dict with status 400."""
        out: list[Any] = []
        for index, item in enumerate(data):
            if isinstance(item, BatchError):
                log.info("bad request %d: %s", index, item)
                if self.context is not None:
                    self.context.set_response_status(400, f"bad request: {item}", index)
                out.append({"error": f"bad request: {item}", "column": item.column})
            else:
                out.append(scores_json(item))
        return out


__all__ = ["INPUT_KEYS", "PersiaHandler", "request_body", "scores_json"]
