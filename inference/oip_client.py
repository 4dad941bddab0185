"""A small Open Inference Protocol (KServe v2) client for our own callers (the demo, the
benchmark): the request bytes as the BYTES input `request`, scores back as FP32. Any other v2
client (tritonclient, KServe's) works as well; this one needs only grpc and requests.

Errors raise `inference.client.InferenceError` with the gRPC status name or the HTTP status.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import numpy as np
import requests

from persia_inc.inference.client import InferenceError
from persia_inc.inference.oip import REQUEST, join_bytes
from persia_inc.inference.oip_protos import grpc_predict_v2_pb2 as pb

SERVICE_PATH = "/inference.GRPCInferenceService/"


class OipClient:
    """gRPC client of one server at `target` (host:port); token: sent as `Bearer` ('' none)."""

    def __init__(self, target: str, *, token: str = "", timeout_s: float = 10.0,
                 max_message_bytes: int = 64 * 1024 * 1024) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)])
        self._infer = self.channel.unary_unary(
            SERVICE_PATH + "ModelInfer", request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString)
        self._ready = self.channel.unary_unary(
            SERVICE_PATH + "ServerReady", request_serializer=pb.ServerReadyRequest.SerializeToString,
            response_deserializer=pb.ServerReadyResponse.FromString)

    def server_ready(self) -> bool:
        """Whether the server says it is ready; False when it does not answer."""
        try:
            reply = self._ready(pb.ServerReadyRequest(), timeout=self.timeout_s, metadata=self._metadata)
            return bool(reply.ready)
        except grpc.RpcError:
            return False

    def infer(self, model_name: str, body: bytes, version: str = "") -> np.ndarray:
        """float32[B] scores of one request body (`PersiaBatch.to_bytes()`)."""
        tensor = pb.ModelInferRequest.InferInputTensor(name=REQUEST, datatype="BYTES", shape=[1])
        request = pb.ModelInferRequest(model_name=model_name, model_version=version, inputs=[tensor],
                                       raw_input_contents=[join_bytes([body])])
        try:
            reply = self._infer(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise InferenceError(model_name, code, details or "") from exc
        return np.frombuffer(reply.raw_output_contents[0], "<f4").astype(np.float32)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> OipClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def infer_rest(session: requests.Session, base_url: str, model_name: str, body: bytes, *,
               timeout_s: float = 10.0) -> np.ndarray:
    """float32[B] scores of one request body over REST, binary tensor data both ways."""
    data = join_bytes([body])
    head = json.dumps({"inputs": [{"name": REQUEST, "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": len(data)}}],
                       "outputs": [{"name": "scores", "parameters": {"binary_data": True}}]}).encode()
    reply = session.post(f"{base_url}/v2/models/{model_name}/infer", data=head + data, timeout=timeout_s,
                         headers={"Inference-Header-Content-Length": str(len(head)),
                                  "Content-Type": "application/octet-stream"})
    if reply.status_code != 200:
        raise InferenceError(model_name, reply.status_code, _error(reply.text))
    size = int(reply.headers["Inference-Header-Content-Length"])
    return np.frombuffer(reply.content[size:], "<f4").astype(np.float32)


def _error(text: str) -> str:
    try:
        body: Any = json.loads(text)
    except ValueError:
        return text.strip()
    return str(body.get("error", body)) if isinstance(body, dict) else text.strip()


__all__ = ["OipClient", "infer_rest"]
