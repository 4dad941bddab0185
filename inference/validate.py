"""Validate a dense version before it becomes the default: one real request, shaped by the
version's own spec, sent to that version alone.

`VersionProbe.validate(model_name, version, mar_file)` reads `persia_model.json` from the
`.mar`, sends `sample_request(spec)` through TorchServe's gRPC Predictions with
`model_version` set (so the default version is untouched), and checks that the answer has one
score per sample and that every score is finite. A failure raises `ValidationError`:
`retriable` when TorchServe or the embedding servers were unavailable (try again later),
otherwise with the reason, to which TorchServe's model log adds the worker's own error (the
last exception its worker logged), when `log_dir` (TorchServe's LOG_LOCATION) is readable here.
"""

from __future__ import annotations

import json
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import requests

from persia_inc.inference.batch import PersiaBatch
from persia_inc.inference.client import InferenceError, ModelNotRegisteredError, get_inference_stub, infer
from persia_inc.inference.spec import SPEC_FILE, ModelSpec

MODEL_LOG = "model_log.log"
_RETRIABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "UNREACHABLE",
                        502, 503, 504})
_LOG_TAIL_BYTES = 256 * 1024
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")


class ValidationError(RuntimeError):
    """A version did not answer its validation request well. retriable: TorchServe or the
    embedding servers were unavailable, not the version's fault."""

    def __init__(self, message: str, *, retriable: bool = False) -> None:
        super().__init__(message)
        self.retriable = retriable


def sample_request(spec: ModelSpec, rows: int = 4, seed: int = 0) -> bytes:
    """A request of `rows` samples shaped by `spec`: dense float32[rows, dense_dim] in [0, 1),
    and for every sparse feature two ids per sample (uint64[rows, 2], deterministic)."""
    rng = np.random.default_rng(seed)
    sparse = [(feature, rng.integers(1, 1 << 20, (rows, 2), dtype=np.uint64)) for feature in spec.sparse]
    return (PersiaBatch().add_dense([rng.random((rows, spec.dense_dim), dtype=np.float32)])
            .add_sparse(sparse).to_bytes())


def check_scores(scores: np.ndarray, rows: int) -> None:
    """ValidationError unless `scores` is float[rows] with every value finite."""
    if scores.shape != (rows,):
        raise ValidationError(f"{rows} samples were answered with scores of shape {scores.shape} "
                              f"(expected ({rows},): the dense module must return one score per sample)")
    bad = int(np.count_nonzero(~np.isfinite(scores)))
    if bad:
        raise ValidationError(f"{bad} of {rows} scores are NaN or infinite")


def spec_of(mar_file: Path) -> ModelSpec:
    """The `ModelSpec` inside a `.mar`; ValidationError naming the file if it has none."""
    try:
        with zipfile.ZipFile(mar_file) as archive:
            text = archive.read(SPEC_FILE).decode("utf-8")
        return ModelSpec.from_json(text, f"{mar_file}:{SPEC_FILE}")
    except (OSError, KeyError, UnicodeDecodeError, ValueError, zipfile.BadZipFile) as exc:
        raise ValidationError(f"{mar_file} has no readable {SPEC_FILE}: {exc}") from exc


def model_log_reason(log_dir: str | Path, model_name: str, version: str, since: int = -1) -> str:
    """The last exception TorchServe's model log (`log_dir/model_log.log`) holds for a worker of
    `model_name` version `version` (after byte `since`; -1: in the log's tail), '' if none."""
    path = Path(log_dir) / MODEL_LOG
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, 2)
            start = since if 0 <= since <= size else max(0, size - _LOG_TAIL_BYTES)
            handle.seek(start)
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    marker = f"-{model_name}_{version}-"
    found = ""
    for line in text.splitlines():
        head, sep, message = line.partition(" MODEL_LOG - ")
        if sep and marker in head and _EXCEPTION_LINE.match(message):
            found = message.strip()
    return found


def log_size(log_dir: str | Path) -> int:
    """The model log's current size in bytes (-1 if unreadable)."""
    try:
        return (Path(log_dir) / MODEL_LOG).stat().st_size
    except OSError:
        return -1


class VersionProbe:
    """Validates versions through TorchServe's gRPC inference API at `address` (host:port);
    `log_dir`: TorchServe's log folder ('' : the reason is TorchServe's answer alone)."""

    def __init__(self, address: str, *, log_dir: str = "", rows: int = 4, timeout_s: float = 60.0) -> None:
        self.address = address
        self.log_dir = log_dir
        self.rows = rows
        self.timeout_s = timeout_s
        self._stub = get_inference_stub(address)

    def validate(self, model_name: str, version: str, mar_file: Path) -> None:
        """Send the version the spec's sample request; ValidationError if it answers badly."""
        body = sample_request(spec_of(Path(mar_file)), self.rows)
        since = log_size(self.log_dir) if self.log_dir else -1
        try:
            scores = infer(self._stub, model_name, body, timeout_s=self.timeout_s, model_version=version)
        except ModelNotRegisteredError as exc:
            raise ValidationError(f"{exc} (at {self.address})", retriable=True) from exc
        except InferenceError as exc:
            retriable = exc.status in _RETRIABLE
            reason = "" if retriable else self.log_reason(model_name, version, since)
            raise ValidationError(f"{exc.status}: {exc.message} (at {self.address})"
                                  + (f"; TorchServe's model log: {reason}" if reason else ""),
                                  retriable=retriable) from exc
        try:
            check_scores(scores, self.rows)
        except ValidationError as exc:
            raise ValidationError(f"{exc} (sample request of {self.rows} rows, at {self.address})") from exc

    def log_reason(self, model_name: str, version: str, since: int = -1) -> str:
        """The worker's last logged exception for this version ('' without a log_dir)."""
        return model_log_reason(self.log_dir, model_name, version, since) if self.log_dir else ""

    def close(self) -> None:
        self._stub.channel.close()


class OipVersionProbe:
    """Validates versions on the kserve frontend (`persia-inc serve --frontend kserve`) at
    `address` (its REST host:port): the spec's sample request as the BYTES input `request`
    (HTTP binary extension) to /v2/models/{name}/versions/{v}/infer, that version alone. The
    frontend loads a version in-process, so its refusal is the answer's error itself."""

    def __init__(self, address: str, *, rows: int = 4, timeout_s: float = 60.0) -> None:
        self.address = address
        self.rows = rows
        self.timeout_s = timeout_s
        self._session = requests.Session()

    def validate(self, model_name: str, version: str, mar_file: Path) -> None:
        """Send the version the spec's sample request; ValidationError if it answers badly."""
        body = sample_request(spec_of(Path(mar_file)), self.rows)
        element = struct.pack("<I", len(body)) + body
        head = json.dumps({"inputs": [{"name": "request", "datatype": "BYTES", "shape": [1],
                                       "parameters": {"binary_data_size": len(element)}}],
                           "outputs": [{"name": "scores"}]}).encode()
        url = f"http://{self.address}/v2/models/{model_name}/versions/{version}/infer"
        try:
            reply = self._session.post(url, data=head + element, timeout=self.timeout_s,
                                       headers={"Inference-Header-Content-Length": str(len(head))})
        except requests.RequestException as exc:
            raise ValidationError(f"UNREACHABLE: {exc} (at {self.address})", retriable=True) from exc
        if reply.status_code != 200:
            try:
                message = str(reply.json().get("error", reply.text))
            except ValueError:
                message = reply.text.strip()
            raise ValidationError(f"{reply.status_code}: {message} (at {url})",
                                  retriable=reply.status_code in _RETRIABLE or reply.status_code == 404)
        try:
            outputs = {o.get("name"): o for o in reply.json().get("outputs", [])}
            scores = np.asarray(outputs["scores"]["data"], dtype=np.float64)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValidationError(f"{url} answered without a scores output: {reply.text[:200]!r}") from exc
        try:
            check_scores(scores, self.rows)
        except ValidationError as exc:
            raise ValidationError(f"{exc} (sample request of {self.rows} rows, at {url})") from exc

    def close(self) -> None:
        self._session.close()


__all__ = ["OipVersionProbe", "ValidationError", "VersionProbe", "check_scores", "model_log_reason",
           "sample_request", "spec_of"]
