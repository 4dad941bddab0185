"""`persia-inc serve --frontend kserve`: the model over the Open Inference Protocol (KServe v2),
REST and gRPC, in this process (`inference.oip_server`, `inference.oip_http`).

Why not KServe's own `kserve.ModelServer`: kserve 0.21 (and tritonclient's `grpc` extra) pin
protobuf < 7, while this project's generated stubs need protobuf >= 7.35 (the runtime check in
every `_pb2.py`); kserve also pulls in fastapi, uvicorn, kubernetes and pandas. The protocol is
small: its messages are generated from the published `grpc_predict_v2.proto`
(`inference/oip_protos`), the REST side is the standard library's threaded HTTP server, and
tritonclient's gRPC and HTTP clients (tests) call it unchanged.
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from persia_inc.foundation.threads import thread_name

if TYPE_CHECKING:
    import grpc

    from persia_inc.embedding_server.client import EmbeddingClient
    from persia_inc.inference.oip_http import OipHttpServer
    from persia_inc.inference.oip_server import ModelRepository, OipService

log = logging.getLogger(__name__)

DEFAULT_HTTP_PORT, DEFAULT_GRPC_PORT = 8080, 8081  # KServe's defaults
TOKEN_ENV = "PERSIA_INC_SERVE_TOKEN"


@dataclass(frozen=True)
class KServeSettings:
    """host: where both transports bind (127.0.0.1; put a proxy in front for other hosts);
    http_port / grpc_port: 0 takes a free port; token: '' off, else every call but the health
    checks needs `Bearer <token>`; tls_cert_file / tls_key_file: PEM, both or neither;
    workers: gRPC threads; grace_s: what calls in flight get at close."""

    host: str = "127.0.0.1"
    http_port: int = DEFAULT_HTTP_PORT
    grpc_port: int = DEFAULT_GRPC_PORT
    token: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    workers: int = 4
    grace_s: float = 5.0

    def __post_init__(self) -> None:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        if self.workers < 1 or self.grace_s < 0:
            raise ValueError("workers must be at least 1 and grace_s >= 0")


class KServeFrontend:
    """The embedding servers of `config_path`, the `.mar` files of `model_store`, served over
    the Open Inference Protocol; start / close / with. `mar` (a file name in `model_store`,
    optional) is loaded at start, as model `model_name` (default: the archive's)."""

    def __init__(self, config_path: Path, model_store: Path, settings: KServeSettings | None = None,
                 mar: str = "", model_name: str = "") -> None:
        self.config_path = Path(config_path)
        self.model_store = Path(model_store)
        self.settings = settings or KServeSettings()
        self.mar, self.model_name = mar, model_name
        self.client: EmbeddingClient | None = None
        self.repository: ModelRepository | None = None
        self.service: OipService | None = None
        self.grpc_server: grpc.Server | None = None
        self.http: OipHttpServer | None = None
        self.grpc_port = 0
        self.http_port = 0
        self._closed = False

    @property
    def grpc_target(self) -> str:
        return f"{self.settings.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        scheme = "https" if self.settings.tls_cert_file else "http"
        return f"{scheme}://{self.settings.host}:{self.http_port}"

    def start(self) -> KServeFrontend:
        """Open the servers' client, load `mar`, bind both transports. ValueError for an
        unusable archive or TLS file, OSError for a port in use; nothing is left running."""
        import grpc

        from persia_inc.config import load_config
        from persia_inc.inference.oip_http import OipHttpServer
        from persia_inc.inference.oip_server import (
            ModelRepository,
            OipError,
            OipService,
            TokenInterceptor,
            grpc_handler,
        )
        from persia_inc.wiring import embedding_client

        if self._closed:
            raise RuntimeError("this frontend was closed; start a new one")
        s = self.settings
        try:
            self.client = client = embedding_client(load_config(self.config_path, need_servers=True))
            self.repository = ModelRepository(self.model_store, client)
            if self.mar:
                try:
                    loaded = self.repository.register(self.mar, self.model_name)
                except OipError as exc:
                    raise ValueError(exc.message) from exc
                self.model_name = loaded.name
            self.service = OipService(self.repository, check_ready=lambda: _servers_ready(client))
            interceptors = [TokenInterceptor(s.token)] if s.token else []
            pool = futures.ThreadPoolExecutor(s.workers, thread_name_prefix=thread_name("oip-grpc"))
            options = [("grpc.max_receive_message_length", 256 * 1024 * 1024), ("grpc.so_reuseport", 0)]
            self.grpc_server = grpc.server(pool, interceptors=interceptors, options=options)
            self.grpc_server.add_generic_rpc_handlers((grpc_handler(self.service),))
            address = f"{s.host}:{s.grpc_port}"
            if s.tls_cert_file:
                key, cert = Path(s.tls_key_file).read_bytes(), Path(s.tls_cert_file).read_bytes()
                self.grpc_port = self.grpc_server.add_secure_port(
                    address, grpc.ssl_server_credentials([(key, cert)]))
            else:
                self.grpc_port = self.grpc_server.add_insecure_port(address)
            if not self.grpc_port:
                raise OSError(f"cannot bind gRPC to {address}")
            tls = None
            if s.tls_cert_file:
                tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                tls.load_cert_chain(s.tls_cert_file, s.tls_key_file)
            self.http = OipHttpServer((s.host, s.http_port), self.service, token=s.token, tls=tls)
            self.http_port = self.http.server_address[1]
            self.grpc_server.start()
            self.http.start()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Refuse new calls, give calls in flight `grace_s`, close the client (bounded; safe
        to call twice)."""
        self._closed = True
        if self.service is not None:
            self.service.closing = True
        grpc_server, self.grpc_server = self.grpc_server, None
        stopped = grpc_server.stop(self.settings.grace_s) if grpc_server is not None else None
        http, self.http = self.http, None
        if http is not None:
            http.close()
        if stopped is not None:
            stopped.wait(self.settings.grace_s + 1)
        client, self.client = self.client, None
        if client is not None:
            client.close()

    def __enter__(self) -> KServeFrontend:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _servers_ready(client: EmbeddingClient) -> bool:
    try:
        client.wait_ready(0.5)
    except TimeoutError:
        return False
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options only this frontend takes (the rest are `serve`'s)."""
    group = parser.add_argument_group("--frontend kserve")
    group.add_argument("--tls-cert", metavar="PEM", default="", help="TLS certificate (with --tls-key)")
    group.add_argument("--tls-key", metavar="PEM", default="", help="TLS private key (with --tls-cert)")


def run(args: argparse.Namespace) -> int:
    """`serve --frontend kserve`: serve until SIGTERM / Ctrl-C, then stop gracefully."""
    import signal

    from persia_inc.extras import have
    from persia_inc.foundation.memory import keep_freed_memory

    # a request's lookup replies, rows and request copies are megabytes, built on the gRPC
    # pool's threads: with malloc's defaults each took fresh pages (about 1,700 page faults,
    # 2-3 ms per request, the frontend's whole gap to the in-process engine)
    keep_freed_memory()

    if not have("torch"):
        print("persia-inc serve: --frontend kserve needs torch: pip install 'persia-inc[kserve]'",
              file=sys.stderr)
        return 1
    token = ""
    if args.token_auth:
        token = os.environ.get(TOKEN_ENV, "")
        if not token:
            print(f"persia-inc serve: --token-auth with --frontend kserve reads the token from {TOKEN_ENV}, "
                  "which is empty", file=sys.stderr)
            return 2
    try:
        settings = KServeSettings(
            http_port=DEFAULT_HTTP_PORT if args.inference_port is None else args.inference_port,
            grpc_port=DEFAULT_GRPC_PORT if args.grpc_inference_port is None else args.grpc_inference_port,
            token=token, tls_cert_file=args.tls_cert, tls_key_file=args.tls_key)
    except ValueError as exc:
        print(f"persia-inc serve: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    from persia_inc.inference.engine import serving_threads

    serving_threads()  # one torch thread, as TorchServe's workers: idle OpenMP threads spin
    frontend = KServeFrontend(Path(args.config).resolve(), Path(args.model_store).resolve(), settings,
                              mar=args.model)
    try:
        frontend.start()
    except (ValueError, OSError, ssl.SSLError) as exc:
        print(f"persia-inc serve: cannot serve {args.model}: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"serving model {frontend.model_name!r} over the Open Inference Protocol (KServe v2), pid "
              f"{os.getpid()}\n  gRPC {frontend.grpc_target}  REST {frontend.http_url}/v2/models/"
              f"{frontend.model_name}\n  management {frontend.http_url}/persia/models  metrics "
              f"{frontend.http_url}/metrics\n  token authorization: "
              f"{'on (' + TOKEN_ENV + ')' if token else 'off (--token-auth turns it on)'}\n"
              "stop with SIGTERM or Ctrl-C", flush=True)
        while not stop.wait(0.5):
            pass
        log.info("stopping the kserve frontend")
    finally:
        started = time.monotonic()
        frontend.close()
    log.info("stopped in %.1f s", time.monotonic() - started)
    return 0


__all__ = ["DEFAULT_GRPC_PORT", "DEFAULT_HTTP_PORT", "TOKEN_ENV", "KServeFrontend", "KServeSettings"]
