"""Register, scale, describe and unregister models through TorchServe's management API.

Two clients with the same methods: `HttpManagement` (REST, default port 8081) and
`GrpcManagement` (gRPC, default port 7071; stubs from `inference.protos`). Both raise
`ManagementError` with TorchServe's status and message. `url` is a .mar file name in the
model store, a file path TorchServe can read, or an http(s) URL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import grpc
import requests

from persia_inc.inference.protos import stubs


class ManagementError(RuntimeError):
    """A management call TorchServe refused or could not be reached for.

    status: the HTTP status, or the gRPC status name; message: TorchServe's message (for
    TorchServe's bare gRPC UNKNOWN, what it means for `action`); address: whom we asked.
    """

    def __init__(self, action: str, status: int | str, message: str, address: str = "") -> None:
        self.action, self.status, self.address = action, status, address
        self.message = message or _EMPTY_MEANS.get(action, "TorchServe gave no message (see its log)")
        where = f" at {address}" if address else ""
        super().__init__(f"{action}{where}: {status}: {self.message}")

    @property
    def not_found(self) -> bool:
        """The model or version is not registered."""
        return self.status in ("NOT_FOUND", 404)

    @property
    def retriable(self) -> bool:
        """TorchServe could not be reached or was busy (try again later), as opposed to a
        refusal of the request itself (a bad archive, an unknown model)."""
        return self.status in _RETRIABLE_STATUSES


# TorchServe 0.12's gRPC API answers some refusals with UNKNOWN and an empty message
_EMPTY_MEANS = {
    "register": "TorchServe gave no message: it answers so when the version is already registered "
                "(describe the model to see) or its worker failed to start (see its model log)",
    "unregister": "TorchServe gave no message: it answers so for the default version, which cannot "
                  "be unregistered while other versions exist",
}

_RETRIABLE_STATUSES = frozenset({"UNREACHABLE", "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED",
                                 502, 503, 504})


@dataclass(frozen=True, slots=True)
class RegisterOptions:
    """Registration settings (TorchServe's names). max_batch_delay_ms: how long TorchServe
    waits to fill a batch of `batch_size` requests; timeouts in seconds."""

    initial_workers: int = 1
    batch_size: int = 1
    max_batch_delay_ms: int = 5
    response_timeout_s: int = 120
    startup_timeout_s: int = 120
    synchronous: bool = True


def _message(text: str) -> str:
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()
    if isinstance(body, dict):
        return str(body.get("message") or body.get("status") or body)
    return text.strip()


class HttpManagement:
    """TorchServe's REST management API at `base_url` (e.g. http://127.0.0.1:8081)."""

    def __init__(self, base_url: str, *, timeout_s: float = 180.0, token: str = "") -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._session = requests.Session()
        if token:  # TorchServe's management key when token authorization is on
            self._session.headers["Authorization"] = f"Bearer {token}"

    def _call(self, action: str, method: str, path: str, params: dict[str, Any] | None = None) -> Any:
        try:
            reply = self._session.request(method, self.base_url + path, params=params,
                                          timeout=self.timeout_s)
        except requests.RequestException as exc:
            raise ManagementError(action, "UNREACHABLE", str(exc), self.base_url) from exc
        if reply.status_code >= 300:
            raise ManagementError(action, reply.status_code, _message(reply.text), self.base_url)
        try:
            return reply.json()
        except ValueError:
            return reply.text

    def register(self, url: str, model_name: str = "", options: RegisterOptions | None = None) -> str:
        """Register the .mar at `url` (and start its workers); returns TorchServe's message."""
        o = options or RegisterOptions()
        params: dict[str, Any] = {
            "url": url, "initial_workers": o.initial_workers, "batch_size": o.batch_size,
            "max_batch_delay": o.max_batch_delay_ms, "response_timeout": o.response_timeout_s,
            "startup_timeout": o.startup_timeout_s, "synchronous": str(o.synchronous).lower()}
        if model_name:
            params["model_name"] = model_name
        return _message(json.dumps(self._call("register", "POST", "/models", params)))

    def scale(self, model_name: str, min_worker: int, max_worker: int | None = None,
              synchronous: bool = True) -> str:
        """Set the model's worker count."""
        top = max_worker if max_worker is not None else min_worker
        params = {"min_worker": min_worker, "max_worker": top,
                  "synchronous": str(synchronous).lower()}
        return _message(json.dumps(self._call("scale", "PUT", f"/models/{quote(model_name)}", params)))

    def describe(self, model_name: str, version: str = "") -> list[dict[str, Any]]:
        """TorchServe's description of the model's default version (`version` "": the one
        requests without a version reach), of one version, or of every one ("all"):
        modelVersion, modelUrl (the .mar), workers ...; ManagementError `not_found` if absent."""
        path = f"/models/{quote(model_name)}" + (f"/{quote(version)}" if version else "")
        return self._call("describe", "GET", path)

    def list_models(self, limit: int = 100) -> list[str]:
        """Names of the registered models (at most `limit`, 1..1000)."""
        body = self._call("list", "GET", "/models", {"limit": limit})
        return [m["modelName"] for m in body.get("models", [])]

    def set_default(self, model_name: str, version: str) -> str:
        """Make `version` of the model the one its requests without a version reach."""
        path = f"/models/{quote(model_name)}/{quote(version)}/set-default"
        return _message(json.dumps(self._call("set_default", "PUT", path)))

    def unregister(self, model_name: str, version: str = "") -> str:
        """Unregister one version of the model (all versions' default when `version` is empty)."""
        path = f"/models/{quote(model_name)}" + (f"/{quote(version)}" if version else "")
        return _message(json.dumps(self._call("unregister", "DELETE", path)))

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> HttpManagement:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class GrpcManagement:
    """TorchServe's gRPC management API at `target` (e.g. 127.0.0.1:7071)."""

    def __init__(self, target: str, *, timeout_s: float = 180.0, token: str = "") -> None:
        protos = stubs()
        self._pb = protos.management_pb2
        self.address = target
        self._channel = grpc.insecure_channel(target)
        self._stub = protos.management_pb2_grpc.ManagementAPIsServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout_s = timeout_s

    def _call(self, action: str, method: str, request: Any) -> str:
        try:
            reply = getattr(self._stub, method)(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise ManagementError(action, code, (details or "").split("\norg.pytorch")[0],
                                  self.address) from exc
        return reply.msg

    def register(self, url: str, model_name: str = "", options: RegisterOptions | None = None) -> str:
        o = options or RegisterOptions()
        request = self._pb.RegisterModelRequest(
            url=url, model_name=model_name, initial_workers=o.initial_workers,
            batch_size=o.batch_size, max_batch_delay=o.max_batch_delay_ms,
            response_timeout=o.response_timeout_s, startup_timeout=o.startup_timeout_s,
            synchronous=o.synchronous)
        return _message(self._call("register", "RegisterModel", request))

    def scale(self, model_name: str, min_worker: int, max_worker: int | None = None,
              synchronous: bool = True) -> str:
        request = self._pb.ScaleWorkerRequest(
            model_name=model_name, min_worker=min_worker,
            max_worker=max_worker if max_worker is not None else min_worker, synchronous=synchronous)
        return _message(self._call("scale", "ScaleWorker", request))

    def describe(self, model_name: str, version: str = "") -> list[dict[str, Any]]:
        """As `HttpManagement.describe`: the default version, one version, or "all"."""
        return json.loads(self._call("describe", "DescribeModel", self._pb.DescribeModelRequest(
            model_name=model_name, model_version=version)))

    def list_models(self, limit: int = 100) -> list[str]:
        """Names of the registered models (at most `limit`, 1..1000; proto3 sends 0 otherwise)."""
        body = json.loads(self._call("list", "ListModels", self._pb.ListModelsRequest(limit=limit)))
        return [m["modelName"] for m in body.get("models", [])]

    def set_default(self, model_name: str, version: str) -> str:
        """Make `version` of the model the one its requests without a version reach."""
        return _message(self._call("set_default", "SetDefault", self._pb.SetDefaultRequest(
            model_name=model_name, model_version=version)))

    def unregister(self, model_name: str, version: str = "") -> str:
        """Unregister one version of the model (the default one when `version` is empty)."""
        return _message(self._call("unregister", "UnregisterModel", self._pb.UnregisterModelRequest(
            model_name=model_name, model_version=version)))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GrpcManagement:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = ["GrpcManagement", "HttpManagement", "ManagementError", "RegisterOptions"]
