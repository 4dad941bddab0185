"""Ask TorchServe for predictions: over gRPC (`infer`, as the seed document does) or HTTP.

    stub = get_inference_stub()            # $PERSIA_INC_INFERENCE_ADDRESS, else 127.0.0.1:7070
    scores = infer(stub, "ctr", PersiaBatch().add_dense(...).add_sparse(...).to_bytes())

The request body is the Arrow IPC bytes of `inference.batch.PersiaBatch`, sent as input
`data`; the answer is float32[B], one score per sample. A refused request raises
`InferenceError` with TorchServe's status (gRPC status name or HTTP code) and message:
INVALID_ARGUMENT (gRPC) or 400 (HTTP) with "bad request: column 'feature3': ..." for a
malformed batch (also when TorchServe batched it with good requests and its gRPC front end
answered OK with an error body: TorchServe 0.12 cannot send per-request gRPC statuses);
`ModelNotRegisteredError` ("model 'x' is not registered ...") for an unknown model.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any
from urllib.parse import quote

import grpc
import numpy as np
import requests

from persia_inc.inference.protos import stubs

INPUT_KEY = "data"
ADDRESS_ENV = "PERSIA_INC_INFERENCE_ADDRESS"  # host:port of TorchServe's gRPC inference API
DEFAULT_ADDRESS = "127.0.0.1:7070"  # TorchServe's default grpc_inference_port, on loopback
# TorchServe 0.12's gRPC front end sends an unknown model as INTERNAL (not NOT_FOUND) whose
# description ends with a line naming the Java exception: these types mean "not registered"
_NOT_REGISTERED_TYPES = frozenset({"org.pytorch.serve.archive.model.ModelNotFoundException",
                                   "org.pytorch.serve.archive.model.ModelVersionNotFoundException"})
_JAVA_TYPE = re.compile(r"(?:[a-z_][a-z0-9_]*\.)+[A-Z][A-Za-z0-9_$]*")


def _split_ts_details(details: str) -> tuple[str, str]:
    """(message, Java exception type) of a TorchServe gRPC error description: TorchServe 0.12
    appends the exception's class name as the description's last line ('' if there is none)."""
    message, _, last = details.rstrip().rpartition("\n")
    if message and _JAVA_TYPE.fullmatch(last.strip()):
        return message.strip(), last.strip()
    return details.strip(), ""


class InferenceError(RuntimeError):
    """TorchServe did not return a prediction. status: HTTP code or gRPC status name."""

    def __init__(self, model_name: str, status: int | str, message: str) -> None:
        self.model_name, self.status, self.message = model_name, status, message
        super().__init__(f"model {model_name!r}: {status}: {message}")


class ModelNotRegisteredError(InferenceError):
    """TorchServe has no such model (or version). status: the gRPC status name as sent
    (TorchServe 0.12 sends INTERNAL, naming ModelNotFoundException) or HTTP 404."""


def _not_registered(model_name: str, model_version: str, status: int | str, details: str
                    ) -> ModelNotRegisteredError:
    what = f"version {model_version!r} of model {model_name!r}" if model_version else f"model {model_name!r}"
    return ModelNotRegisteredError(model_name, status, f"{what} is not registered on this TorchServe "
                                                       f"(register its .mar first): {details}")


def _scores(model_name: str, body: bytes | str, error_status: int | str) -> np.ndarray:
    """float32[B] from TorchServe's JSON answer (a list of floats). An error body (a bad
    request answered OK because it shared a TorchServe batch with good ones: TorchServe 0.12's
    gRPC front end drops per-request statuses) raises InferenceError(error_status)."""
    try:
        values = json.loads(body)
    except ValueError as exc:
        raise InferenceError(model_name, "BAD_RESPONSE", f"not JSON: {body[:200]!r}") from exc
    if isinstance(values, dict) and "error" in values:
        raise InferenceError(model_name, error_status, str(values["error"]))
    if not isinstance(values, list):
        raise InferenceError(model_name, "BAD_RESPONSE", f"expected a list of scores: {body[:200]!r}")
    return np.asarray(values, dtype=np.float32)


def default_address() -> str:
    """Where `get_inference_stub()` goes without a target: `$PERSIA_INC_INFERENCE_ADDRESS`
    (host:port; `persia-inc serve` prints the value to use), else 127.0.0.1:7070."""
    return os.environ.get(ADDRESS_ENV, "").strip() or DEFAULT_ADDRESS


def get_inference_stub(target: str | None = None, *, max_message_bytes: int = 64 * 1024 * 1024
                       ) -> Any:
    """An `InferenceAPIsServiceStub` on a new insecure channel to `target` (host:port;
    None: `default_address()`).

    The channel lives as long as the stub; `stub.channel` closes it."""
    target = target or default_address()
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
        details = (exc.details() if hasattr(exc, "details") else str(exc)) or ""
        message, java_type = _split_ts_details(details)
        if code == "NOT_FOUND" or java_type in _NOT_REGISTERED_TYPES:
            raise _not_registered(model_name, model_version, code, message) from exc
        raise InferenceError(model_name, code, message) from exc
    return _scores(model_name, reply.prediction, "INVALID_ARGUMENT")


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
        if reply.status_code == 404:
            raise _not_registered(model_name, "", 404, str(message).strip())
        raise InferenceError(model_name, reply.status_code, str(message).strip())
    return _scores(model_name, reply.content, 400)


__all__ = ["ADDRESS_ENV", "DEFAULT_ADDRESS", "INPUT_KEY", "InferenceError", "ModelNotRegisteredError",
           "default_address", "get_inference_stub", "infer", "infer_http"]
