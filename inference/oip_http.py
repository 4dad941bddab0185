"""The Open Inference Protocol's (KServe v2) REST transport over `inference.oip_server.OipService`,
with the management routes the dense sync and `rollback` use, and Prometheus metrics.

Protocol routes (JSON; errors are `{"error": message}` with the status `OipError` names):

    GET  /v2/health/live, /v2/health/ready          200 / 503
    GET  /v2                                        server metadata
    GET  /v2/models/{name}[/versions/{v}]           model metadata (404: unknown model or version)
    GET  /v2/models/{name}[/versions/{v}]/ready     200 / 503
    POST /v2/models/{name}[/versions/{v}]/infer     inference

Infer takes inputs as JSON `data` or in the binary tensor data extension (tritonclient's and
KServe's default: `Inference-Header-Content-Length` gives the JSON header's size, each binary
input's `parameters.binary_data_size` its bytes after it, in input order). Scores come back
binary when an output asks `binary_data: true` or the request asks `binary_data_output`, else as
JSON numbers (float32 values written as the shortest float64 text: they read back exactly).

Management (TorchServe's REST management routes under `/persia`, so `HttpManagement` drives
both): `POST /persia/models?url=FILE.mar[&model_name=N]`, `PUT
/persia/models/{name}/{v}/set-default`, `DELETE /persia/models/{name}/{v}`, `GET
/persia/models/{name}[/{v}|/all]` (the default, one version, every one). `GET /metrics`:
Prometheus text. With a token every route but the two health checks needs `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from persia_inc.foundation.threads import thread_name
from persia_inc.inference.oip import SCORES, Tensor
from persia_inc.inference.oip_server import OipError, OipService

log = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_BODY_BYTES = 256 * 1024 * 1024


def parse_infer_body(body: bytes, header_length: int | None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(the JSON request, its inputs by name) of an infer body; OipError INVALID_ARGUMENT
    naming what is malformed."""
    size = len(body) if header_length is None else header_length
    if size < 0 or size > len(body):
        raise OipError("INVALID_ARGUMENT",
                       f"{HEADER_LENGTH} {size} is not within the body's {len(body)} bytes")
    try:
        request = json.loads(body[:size])
    except (ValueError, UnicodeDecodeError) as exc:
        raise OipError("INVALID_ARGUMENT", f"the request's JSON is malformed: {exc}") from exc
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise OipError("INVALID_ARGUMENT", "the request needs an 'inputs' list")
    binary, at = memoryview(body)[size:], 0
    inputs: dict[str, Tensor] = {}
    for index, given in enumerate(request["inputs"]):
        if not isinstance(given, dict) or not isinstance(given.get("name"), str):
            raise OipError("INVALID_ARGUMENT", f"inputs[{index}] needs a name")
        name = given["name"]
        shape, datatype = given.get("shape"), given.get("datatype")
        if (not isinstance(shape, list) or not all(isinstance(d, int) for d in shape)
                or not isinstance(datatype, str)):
            raise OipError("INVALID_ARGUMENT",
                           f"bad request: input {name!r}: needs a datatype and an integer shape")
        params = given.get("parameters") or {}
        nbytes = params.get("binary_data_size") if isinstance(params, dict) else None
        if nbytes is not None:
            if not isinstance(nbytes, int) or nbytes < 0 or at + nbytes > len(binary):
                raise OipError("INVALID_ARGUMENT", f"bad request: input {name!r}: binary_data_size {nbytes} "
                                                   f"is past the {len(binary) - at} binary bytes left")
            tensor = Tensor(name, datatype, tuple(shape), raw=binary[at:at + nbytes])
            at += nbytes
        elif isinstance(given.get("data"), list):
            tensor = Tensor(name, datatype, tuple(shape), values=given["data"])
        else:
            raise OipError("INVALID_ARGUMENT",
                           f"bad request: input {name!r}: no data and no binary_data_size")
        if name in inputs:
            raise OipError("INVALID_ARGUMENT", f"bad request: input {name!r} given twice")
        inputs[name] = tensor
    if at != len(binary):
        raise OipError("INVALID_ARGUMENT", f"{len(binary) - at} binary bytes after the last input's")
    return request, inputs


def _wants_binary(request: dict[str, Any]) -> bool:
    for output in request.get("outputs") or []:
        if isinstance(output, dict) and output.get("name") == SCORES:
            return bool((output.get("parameters") or {}).get("binary_data", False))
    return bool((request.get("parameters") or {}).get("binary_data_output", False))


class OipHttpServer(ThreadingHTTPServer):
    """The REST transport on (host, port); `token` ('' off) and `tls` (an SSLContext) optional.
    `serve_forever` in a thread; `shutdown()` then `server_close()` waits for calls in flight."""

    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], service: OipService, *, token: str = "",
                 tls: ssl.SSLContext | None = None) -> None:
        super().__init__(address, _Handler)
        self.service = service
        self.token = token
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close(self) -> None:
        """Stop accepting, end idle keep-alive connections (their read side: a request in
        flight still gets its answer) and wait for the calls in flight."""
        self.shutdown()
        with self._connections_lock:
            open_now = list(self._connections)
        for connection in open_now:
            with contextlib.suppress(OSError):  # already gone
                connection.shutdown(socket.SHUT_RD)
        self.server_close()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name=thread_name("oip-http"), daemon=True)
        thread.start()
        return thread


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY: with Nagle on, a reply's body waited for the ACK of its headers, which the
    # client delays: every small reply (management, validation) took 40+ ms instead of 1
    disable_nagle_algorithm = True
    server: OipHttpServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, body: bytes, content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, body: object) -> None:
        self._send(status, json.dumps(body).encode())

    def _authorized(self, path: str) -> bool:
        token = self.server.token
        if not token or path in ("/v2/health/live", "/v2/health/ready"):
            return True
        scheme, _, secret = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(secret.encode(), token.encode()):
            return True
        self._json(401 if not secret else 403, {"error": "needs 'Authorization: Bearer <token>'"
                                                if not secret else "wrong token"})
        return False

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise OipError("INVALID_ARGUMENT", f"a body of {length} bytes is over {MAX_BODY_BYTES}")
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/") if p]
        try:
            body = self._body() if method in ("POST", "PUT") else b""
            if not self._authorized(url.path):
                return
            if parts[:1] == ["v2"]:
                self._protocol(method, parts[1:], body)
            elif parts[:2] == ["persia", "models"]:
                self._management(method, parts[2:], parse_qs(url.query))
            elif parts == ["metrics"] and method == "GET":
                self._send(200, generate_latest(self.server.service.metrics.registry), CONTENT_TYPE_LATEST)
            else:
                raise OipError("NOT_FOUND", f"no route {method} {url.path}")
        except OipError as exc:
            self._json(exc.http_status, {"error": exc.message})
        except Exception as exc:  # one bad request never kills the server
            log.exception("HTTP %s %s failed", method, self.path)
            self._json(500, {"error": f"{type(exc).__name__}: {exc}"})

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _protocol(self, method: str, parts: list[str], body: bytes) -> None:
        service = self.server.service
        if not parts and method == "GET":
            return self._json(200, service.server_metadata())
        if parts[:1] == ["health"] and len(parts) == 2 and method == "GET":
            ok = service.live() if parts[1] == "live" else service.ready()
            return self._json(200 if ok else 503, {parts[1]: ok})
        if parts[:1] != ["models"] or len(parts) < 2:
            raise OipError("NOT_FOUND", f"no route {method} /v2/{'/'.join(parts)}")
        name, rest, version = parts[1], parts[2:], ""
        if rest[:1] == ["versions"] and len(rest) >= 2:
            version, rest = rest[1], rest[2:]
        if not rest and method == "GET":
            return self._json(200, service.model_metadata(name, version))
        if rest == ["ready"] and method == "GET":
            ready = service.model_ready(name, version)
            if not ready:
                service.repository.resolve(name, version)  # NOT_FOUND for an unknown model
            return self._json(200 if ready else 503, {"name": name, "ready": ready})
        if rest == ["infer"] and method == "POST":
            return self._infer(name, version, body)
        raise OipError("NOT_FOUND", f"no route {method} /v2/{'/'.join(parts)}")

    def _infer(self, name: str, version: str, body: bytes) -> None:
        header = self.headers.get(HEADER_LENGTH)
        try:
            header_length = None if header is None else int(header)
        except ValueError as exc:
            raise OipError("INVALID_ARGUMENT", f"{HEADER_LENGTH}: {header!r} is not a number") from exc
        request, inputs = parse_infer_body(body, header_length)
        answered, scores = self.server.service.infer(name, version, inputs, "http")
        output: dict[str, Any] = {"name": SCORES, "datatype": "FP32", "shape": [int(scores.shape[0])]}
        reply: dict[str, Any] = {"model_name": name, "model_version": answered, "outputs": [output]}
        if "id" in request:
            reply["id"] = request["id"]
        if not _wants_binary(request):
            output["data"] = np.asarray(scores, np.float32).tolist()
            return self._json(200, reply)
        data = np.asarray(scores, "<f4").tobytes()
        output["parameters"] = {"binary_data_size": len(data)}
        head = json.dumps(reply).encode()
        self._send(200, head + data, "application/octet-stream", {HEADER_LENGTH: str(len(head))})

    def _management(self, method: str, parts: list[str], query: dict[str, list[str]]) -> None:
        repository = self.server.service.repository
        if not parts and method == "POST":
            url = (query.get("url") or [""])[0]
            loaded = repository.register(url, (query.get("model_name") or [""])[0])
            return self._json(200, {"status": f"loaded version {loaded.version} of {loaded.name} "
                                              f"in {loaded.load_ms:.0f} ms",
                                    "modelName": loaded.name, "modelVersion": loaded.version})
        if len(parts) in (1, 2) and method == "GET":
            return self._json(200, repository.describe(parts[0], parts[1] if len(parts) == 2 else ""))
        if len(parts) == 3 and parts[2] == "set-default" and method == "PUT":
            repository.set_default(parts[0], parts[1])
            return self._json(200, {"status": f"version {parts[1]} of {parts[0]} is the default"})
        if len(parts) in (1, 2) and method == "DELETE":
            repository.unregister(parts[0], parts[1] if len(parts) == 2 else "")
            return self._json(200, {"status": f"unloaded {'/'.join(parts)}"})
        raise OipError("NOT_FOUND", f"no route {method} /persia/models/{'/'.join(parts)}")


__all__ = ["HEADER_LENGTH", "OipHttpServer", "parse_infer_body"]
