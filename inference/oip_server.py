"""`PersiaInference` served over the Open Inference Protocol (KServe v2): versioned models
loaded from `.mar` files, and the gRPC transport (`inference.oip_http` is the REST one).

`ModelRepository` holds each model's versions, one `PersiaInference` per version, all reading
rows through one lookup function (the embedding servers' client). A version is loaded from a
`.mar` in the model store, TorchServe's archive (`inference.archive`): its TorchScript `.pt`
(TorchScript, never pickle), `persia_model.json` and `MAR-INF/MANIFEST.json` (model name and
version). Before a version is held it runs one forward pass shaped by its spec (zeros, no
embedding lookup), so a model that cannot serve its spec is refused and the versions already
held keep serving. The first version of a model becomes its default, as in TorchServe; then
`set_default` moves it. `register`, `set_default`, `unregister` and `describe` are the calls
the loader's dense sync and `persia-inc rollback` make (over `inference.oip_http`'s management
routes), so dense versions work here as they do in TorchServe; loading takes tens of
milliseconds (no worker process to start).

`OipService` is the protocol, transport-free: live, ready, metadata, infer, raising `OipError`
with the gRPC status name and the HTTP status (unknown model or version: NOT_FOUND / 404; a
malformed request: INVALID_ARGUMENT / 400 naming the input). `grpc_handler` registers it as
`inference.GRPCInferenceService`, the protocol's service name.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from persia_inc.embedding_server.errors import ShardError
from persia_inc.inference.batch import BatchError
from persia_inc.inference.engine import EmbeddingShapeError, PersiaInference
from persia_inc.inference.oip import MODEL_OUTPUTS, SCORES, Tensor, decode_inputs, model_inputs
from persia_inc.inference.oip_protos import grpc_predict_v2_pb2 as pb
from persia_inc.inference.spec import SPEC_FILE, ModelSpec, SpecError

if TYPE_CHECKING:
    from persia_inc.embedding_server.client import EmbeddingClient

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
SERVER_NAME = "persia-inc"
PLATFORM = "persia-inc_torchscript"
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403,
               "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "FAILED_PRECONDITION": 409,
               "INTERNAL": 500, "UNAVAILABLE": 503}


class OipError(RuntimeError):
    """A refused call: `code` the gRPC status name, `http_status` its HTTP status."""

    def __init__(self, code: str, message: str) -> None:
        self.code, self.message = code, message
        super().__init__(f"{code}: {message}")

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)


@dataclass(frozen=True, slots=True)
class LoadedVersion:
    """One served version: its engine and spec, the file it came from, when it was loaded."""

    name: str
    version: str
    engine: PersiaInference
    spec: ModelSpec
    source: str
    loaded_at_ns: int
    load_ms: float


def read_mar(path: Path) -> tuple[str, str, bytes, ModelSpec]:
    """(model name, version, TorchScript bytes, spec) of a `.mar`; ValueError naming the file
    and the part that is missing or malformed."""
    try:
        with zipfile.ZipFile(path) as archive:
            manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
            model = manifest["model"]
            serialized = str(model.get("serializedFile") or "")
            if not serialized.endswith(".pt"):
                serialized = next((n for n in archive.namelist() if n.endswith(".pt") and "/" not in n), "")
            if not serialized:
                raise ValueError("holds no TorchScript .pt file")
            spec = ModelSpec.from_json(archive.read(SPEC_FILE).decode("utf-8"), f"{path.name}:{SPEC_FILE}")
            return str(model["modelName"]), str(model.get("modelVersion") or "1.0"), \
                archive.read(serialized), spec
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a usable model archive: {exc}") from exc


def load_scripted(data: bytes, where: str) -> torch.jit.ScriptModule:
    """TorchScript from bytes (torch.jit.load: TorchScript's format, not pickle), eval mode."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated",
                                category=DeprecationWarning)
        try:
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
        except RuntimeError as exc:
            raise ValueError(f"{where}: not a TorchScript module: {exc}") from exc
    module.eval()
    return module


def check_serves_spec(engine: PersiaInference, where: str) -> None:
    """One forward pass of two samples of zeros shaped by the engine's spec: the model must
    answer float32[2] of finite scores; ValueError naming `where` otherwise."""
    spec = engine.spec
    try:
        out = engine.forward(torch.zeros((2, spec.dense_dim)), torch.zeros(spec.sparse_shape(2)))
    except RuntimeError as exc:
        last = (str(exc).strip().splitlines() or [""])[-1]  # TorchScript's traceback: its last line
        raise ValueError(f"{where}: the model does not take its spec's inputs: {last}") from exc
    if tuple(out.shape) != (2,) or out.dtype != torch.float32 or not bool(torch.isfinite(out).all()):
        raise ValueError(f"{where}: the model answered {out.dtype} {list(out.shape)} "
                         f"(finite: {bool(torch.isfinite(out).all())}) for 2 samples; float32[2] expected")


class OipMetrics:
    """Prometheus metrics of one server, in their own registry (served at /metrics)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("persia_oip_requests", "inference requests by model, protocol and status",
                                ["model", "protocol", "status"], registry=r)
        self.latency = Histogram("persia_oip_request_seconds", "inference time inside the server",
                                 ["model", "protocol"], registry=r,
                                 buckets=(.001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5))
        self.default_version = Gauge("persia_oip_default_version", "the default version of a model "
                                     "(numeric versions)", ["model"], registry=r)
        self.versions = Gauge("persia_oip_versions", "versions held per model", ["model"], registry=r)
        self.loads = Counter("persia_oip_version_loads", "version loads by outcome", ["model", "outcome"],
                             registry=r)


class ModelRepository:
    """Versions per model, loaded from `model_store`; every engine reads rows through
    `client` (its `lookup_unique`, as the TorchServe handler's engine does). Thread-safe."""

    def __init__(self, model_store: Path, client: EmbeddingClient,
                 metrics: OipMetrics | None = None) -> None:
        self.model_store = Path(model_store)
        self.client = client
        self.metrics = metrics or OipMetrics()
        self._lock = threading.Lock()
        self._models: dict[str, dict[str, LoadedVersion]] = {}
        self._defaults: dict[str, str] = {}

    def register(self, file_name: str, model_name: str = "") -> LoadedVersion:
        """Load the `.mar` `file_name` of the model store as a version of `model_name` (default:
        the archive's name); its version is the archive's. The model's first version becomes
        its default. OipError: NOT_FOUND (no such file), ALREADY_EXISTS, INVALID_ARGUMENT (not
        a usable archive, or the model refused its spec's inputs)."""
        if not file_name or Path(file_name).name != file_name:
            raise OipError("INVALID_ARGUMENT", f"url must be a .mar file name in the model store, got "
                                               f"{file_name!r}")
        path = self.model_store / file_name
        if not path.is_file():
            raise OipError("NOT_FOUND", f"no {file_name} in the model store {self.model_store}")
        started = time.perf_counter()
        try:
            archive_name, version, data, spec = read_mar(path)
            name = model_name or archive_name
            engine = PersiaInference.from_client(load_scripted(data, str(path)), spec, self.client)
            check_serves_spec(engine, str(path))
        except (ValueError, SpecError) as exc:
            self.metrics.loads.labels(model_name or file_name, "refused").inc()
            raise OipError("INVALID_ARGUMENT", str(exc)) from exc
        loaded = LoadedVersion(name, version, engine, spec, str(path), time.time_ns(),
                               (time.perf_counter() - started) * 1e3)
        with self._lock:
            versions = self._models.setdefault(name, {})
            if version in versions:
                raise OipError("ALREADY_EXISTS", f"version {version} of model {name} is already held")
            versions[version] = loaded
            self._defaults.setdefault(name, version)
            self._publish(name)
        self.metrics.loads.labels(name, "loaded").inc()
        log.info("loaded version %s of model %s from %s in %.0f ms", version, name, path, loaded.load_ms)
        return loaded

    def set_default(self, name: str, version: str) -> None:
        """Make a held version the one requests without a version reach."""
        with self._lock:
            self._held(name, version)
            self._defaults[name] = version
            self._publish(name)
        log.info("version %s of model %s is the default now", version, name)

    def unregister(self, name: str, version: str = "") -> None:
        """Drop a version (empty: the default). The default goes only when it is the model's
        last version (FAILED_PRECONDITION otherwise: make another the default first)."""
        with self._lock:
            version = version or self._defaults.get(name, "")
            self._held(name, version)
            versions = self._models[name]
            if version == self._defaults[name] and len(versions) > 1:
                raise OipError("FAILED_PRECONDITION", f"version {version} is the default of model {name}; "
                                                      "make another version the default first")
            del versions[version]
            if not versions:
                del self._models[name], self._defaults[name]
            self._publish(name)
        log.info("unloaded version %s of model %s", version, name)

    def _held(self, name: str, version: str) -> LoadedVersion:
        if name not in self._models:
            raise OipError("NOT_FOUND", f"unknown model {name!r}; served: {sorted(self._models)}")
        if version not in self._models[name]:
            raise OipError("NOT_FOUND", f"model {name!r} has no version {version!r}; held: "
                                        f"{sorted(self._models[name])}")
        return self._models[name][version]

    def _publish(self, name: str) -> None:
        versions = self._models.get(name, {})
        self.metrics.versions.labels(name).set(len(versions))
        default = self._defaults.get(name, "")
        if default.isdigit():
            self.metrics.default_version.labels(name).set(int(default))

    def resolve(self, name: str, version: str = "") -> LoadedVersion:
        """The version a request names (empty: the default); OipError NOT_FOUND otherwise."""
        with self._lock:
            return self._held(name, version or self._defaults.get(name, ""))

    def versions(self, name: str) -> list[str]:
        with self._lock:
            self._held(name, self._defaults.get(name, ""))
            return sorted(self._models[name], key=_version_key)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def describe(self, name: str, version: str = "") -> list[dict[str, Any]]:
        """The model's default version ("" ), one version, or every one ("all"), in the form
        TorchServe's describe answers with (modelName, modelVersion, modelUrl: the .mar's file
        name in the model store, ...) plus default, source, loadedAtNs, loadMs; NOT_FOUND if absent."""
        with self._lock:
            self._held(name, self._defaults.get(name, ""))
            if version != "all":
                self._held(name, version or self._defaults[name])
            wanted = (sorted(self._models[name].values(), key=lambda v: _version_key(v.version))
                      if version == "all" else [self._models[name][version or self._defaults[name]]])
            return [{"modelName": name, "modelVersion": v.version, "modelUrl": Path(v.source).name,
                     "default": v.version == self._defaults[name],
                     "source": v.source, "loadedAtNs": v.loaded_at_ns, "loadMs": round(v.load_ms, 1)}
                    for v in wanted]


def _version_key(version: str) -> tuple[int, int | str]:
    return (0, int(version)) if version.isdigit() else (1, version)


class OipService:
    """The protocol over a `ModelRepository`, transport-free. `ready()` says whether the
    embedding servers answer (`check_ready`, cached for a second) and a model is held."""

    def __init__(self, repository: ModelRepository, check_ready: Callable[[], bool] = lambda: True) -> None:
        self.repository = repository
        self.metrics = repository.metrics
        self._check_ready = check_ready
        self._ready_until = 0.0
        self.closing = False

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        if self.closing or not self.repository.names():
            return False
        now = time.monotonic()
        if now >= self._ready_until:
            if not self._check_ready():
                return False
            self._ready_until = now + 1.0
        return True

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            self.repository.resolve(name, version)
        except OipError:
            return False
        return not self.closing

    def server_metadata(self) -> dict[str, Any]:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        try:
            ours = dist_version("persia-inc")
        except PackageNotFoundError:
            ours = "0"
        return {"name": SERVER_NAME, "version": ours, "extensions": ["binary_tensor_data", "model_versions"]}

    def model_metadata(self, name: str, version: str = "") -> dict[str, Any]:
        held = self.repository.resolve(name, version)
        inputs = [{"name": n, "datatype": d, "shape": s} for n, d, s in model_inputs(held.spec)]
        return {"name": name, "versions": self.repository.versions(name), "platform": PLATFORM,
                "inputs": inputs,
                "outputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in MODEL_OUTPUTS],
                "parameters": {"version": held.version, "sparse_features": ",".join(held.spec.sparse)}}

    def infer(self, name: str, version: str, inputs: Mapping[str, Tensor], protocol: str
              ) -> tuple[str, np.ndarray]:
        """(the version that answered, scores float32[B]); OipError for a refused request."""
        started = time.perf_counter()
        status = "OK"
        try:
            held = self.repository.resolve(name, version)
            try:
                batch = decode_inputs(inputs, held.spec)
            except BatchError as exc:
                raise OipError("INVALID_ARGUMENT", f"bad request: input {exc.column!r}: {exc.reason}"
                               if exc.column else f"bad request: {exc.reason}") from exc
            try:
                (scores,) = held.engine.run([batch])
            except EmbeddingShapeError as exc:
                raise OipError("INTERNAL", str(exc)) from exc
            except ShardError as exc:
                raise OipError("UNAVAILABLE", f"embedding servers unavailable: {exc}") from exc
            assert isinstance(scores, np.ndarray)
            return held.version, scores
        except OipError as exc:
            status = exc.code
            raise
        except Exception:
            status = "INTERNAL"
            raise
        finally:
            self.metrics.requests.labels(name, protocol, status).inc()
            self.metrics.latency.labels(name, protocol).observe(time.perf_counter() - started)


# ---------------------------------------------------------------------------------- gRPC


def _grpc_tensors(request: Any) -> dict[str, Tensor]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise OipError("INVALID_ARGUMENT", f"raw_input_contents has {len(raw)} entries for "
                                           f"{len(request.inputs)} inputs")
    out: dict[str, Tensor] = {}
    for index, given in enumerate(request.inputs):
        shape = tuple(int(d) for d in given.shape)
        if raw:
            tensor = Tensor(given.name, given.datatype, shape, raw=raw[index])
        else:
            c = given.contents
            values = {"BYTES": c.bytes_contents, "FP32": c.fp32_contents, "FP64": c.fp64_contents,
                      "INT64": c.int64_contents, "UINT64": c.uint64_contents, "BOOL": c.bool_contents,
                      "UINT8": c.uint_contents, "UINT16": c.uint_contents, "UINT32": c.uint_contents
                      }.get(given.datatype, c.int_contents)
            tensor = Tensor(given.name, given.datatype, shape, values=list(values))
        if given.name in out:
            raise OipError("INVALID_ARGUMENT", f"input {given.name!r} given twice")
        out[given.name] = tensor
    return out


class _Servicer:
    def __init__(self, service: OipService) -> None:
        self.service = service

    def _guard(self, context: grpc.ServicerContext, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except OipError as exc:
            context.abort(getattr(grpc.StatusCode, exc.code), exc.message)
        except Exception as exc:  # one bad request never kills the server
            log.exception("gRPC call failed")
            context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    def server_live(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=self.service.live())

    def server_ready(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.service.ready())

    def model_ready(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ModelReadyResponse(ready=self.service.model_ready(request.name, request.version))

    def server_metadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(**self.service.server_metadata())

    def model_metadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        def call() -> Any:
            meta = self.service.model_metadata(request.name, request.version)
            meta.pop("parameters")
            tensors = {k: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta[k]]
                       for k in ("inputs", "outputs")}
            return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"],
                                            platform=meta["platform"], **tensors)
        return self._guard(context, call)

    def model_infer(self, request: Any, context: grpc.ServicerContext) -> Any:
        def call() -> Any:
            version, scores = self.service.infer(request.model_name, request.model_version,
                                                 _grpc_tensors(request), "grpc")
            out = pb.ModelInferResponse.InferOutputTensor(name=SCORES, datatype="FP32",
                                                          shape=[scores.shape[0]])
            return pb.ModelInferResponse(model_name=request.model_name, model_version=version, id=request.id,
                                         outputs=[out], raw_output_contents=[scores.astype("<f4").tobytes()])
        return self._guard(context, call)


METHODS: dict[str, tuple[Any, Any]] = {
    name: (getattr(pb, f"{name}Request"), getattr(pb, f"{name}Response"))
    for name in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")}


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


def grpc_handler(service: OipService) -> grpc.GenericRpcHandler:
    """The protocol's gRPC service (`inference.GRPCInferenceService`) over `service`."""
    servicer = _Servicer(service)
    return grpc.method_handlers_generic_handler(SERVICE, {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, _snake(name)), request_deserializer=req.FromString,
            response_serializer=resp.SerializeToString)
        for name, (req, resp) in METHODS.items()})


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` (UNAUTHENTICATED / PERMISSION_DENIED)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        import hmac

        metadata = dict(handler_call_details.invocation_metadata or ())
        given = str(metadata.get("authorization", ""))
        scheme, _, secret = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(secret.encode(), self._token.encode()):
            return continuation(handler_call_details)
        code = grpc.StatusCode.UNAUTHENTICATED if not given else grpc.StatusCode.PERMISSION_DENIED
        reason = "needs 'authorization: Bearer <token>'" if not given else "wrong token"

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(code, reason)

        return grpc.unary_unary_rpc_method_handler(deny)


__all__ = ["METHODS", "SERVICE", "LoadedVersion", "ModelRepository", "OipError", "OipMetrics", "OipService",
           "TokenInterceptor", "check_serves_spec", "grpc_handler", "load_scripted", "read_mar"]
