"""Ask TorchServe for predictions: over gRPC (`infer`, as the seed document does) or HTTP.

    stub = get_inference_stub("127.0.0.1:7070")
    scores = infer(stub, "ctr", PersiaBatch().add_dense(...).add_sparse(...).to_bytes())

The request body is the Arrow IPC bytes of `inference.batch.PersiaBatch`, sent as input
`data`; the answer is float32[B], one score per sample. A refused request raises
`InferenceError` with TorchServe's status (gRPC status name or HTTP code) and message, e.g.
NOT_FOUND for an unknown model or 400/INTERNAL with "bad request: column 'feature3': ..."
for a malformed batch.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import grpc
import numpy as np
import requests

from persia_inc.inference.protos import stubs

INPUT_KEY = "data"


class InferenceError(RuntimeError):
    """TorchServe did not return a prediction. status: HTTP code or gRPC status name."""

    def __init__(self, model_name: str, status: int | str, message: str) -> None:
        self.model_name, self.status, self.message = model_name, status, message
        super().__init__(f"model {model_name!r}: {status}: {message}")


def _scores(model_name: str, body: bytes | str) -> np.ndarray:
    """float32[B] from TorchServe's JSON answer (a list of floats)."""
    try:
        values = json.loads(body)
    except ValueError as exc:
        raise InferenceError(model_name, "BAD_RESPONSE", f"not JSON: {body[:200]!r}") from exc
    if isinstance(values, dict) and "error" in values:
        raise InferenceError(model_name, 400, str(values["error"]))
    if not isinstance(values, list):
        raise InferenceError(model_name, "BAD_RESPONSE", f"expected a list of scores: {body[:200]!r}")
    return np.asarray(values, dtype=np.float32)


def get_inference_stub(target: str = "127.0.0.1:7070", *, max_message_bytes: int = 64 * 1024 * 1024
                       ) -> Any:
    """An `InferenceAPIsServiceStub` on a new insecure channel to `target` (host:port).

    The channel lives as long as the stub; `stub.channel` closes it."""
    protos = stubs()
    channel = grpc.insecure_channel(target, options=[
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes)])
    stub = protos.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
    stub.channel = channel
    return stub


def infer(stub: Any, model_name: str, batch_bytes: bytes, *, timeout_s: float = 30.0,
          model_version: str = "", metadata: tuple[tuple[str, str], ...] = ()) -> np.ndarray:
    """Scores (float32[B]) of one Arrow IPC request over TorchServe's gRPC Predictions."""
    request = stubs().inference_pb2.PredictionsRequest(
        model_name=model_name, model_version=model_version, input={INPUT_KEY: batch_bytes})
    try:
        reply = stub.Predictions(request, timeout=timeout_s, metadata=metadata)
    except grpc.RpcError as exc:
        code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        raise InferenceError(model_name, code, details or "") from exc
    return _scores(model_name, reply.prediction)


def infer_http(base_url: str, model_name: str, batch_bytes: bytes, *, timeout_s: float = 30.0,
               session: requests.Session | None = None, token: str = "") -> np.ndarray:
    """Scores (float32[B]) of one Arrow IPC request over TorchServe's REST predictions API
    (`base_url` e.g. http://127.0.0.1:8080), sent as a raw octet-stream body."""
    headers = {"Content-Type": "application/octet-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    http = session or requests
    try:
        reply = http.post(f"{base_url.rstrip('/')}/predictions/{quote(model_name)}",
                          data=batch_bytes, headers=headers, timeout=timeout_s)
    except requests.RequestException as exc:
        raise InferenceError(model_name, "UNREACHABLE", str(exc)) from exc
    if reply.status_code != 200:
        try:
            body = reply.json()
            message = (body.get("error") or body.get("message") or reply.text
                       if isinstance(body, dict) else reply.text)
        except ValueError:
            message = reply.text
        raise InferenceError(model_name, reply.status_code, str(message).strip())
    return _scores(model_name, reply.content)


__all__ = ["INPUT_KEY", "InferenceError", "get_inference_stub", "infer", "infer_http"]
