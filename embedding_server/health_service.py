"""The server side of gRPC's standard health service, safe to follow and to stop.

grpc_health's reference `HealthServicer` sends a status change to every Watch stream while
holding the lock that a stream's close callback takes, and that callback runs on the gRPC
server's polling thread: a status change racing a client that cancels its Watch blocked the
polling thread, and with it every call to the server (a test saw Status time out after 10 s).
`HealthService` never holds that lock while it sends, and it can end every Watch stream at a
stop (an open stream holds `server.stop(grace)` for its whole grace period otherwise).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE_NAME = "persia_inc.embedding.v1.EmbeddingService"  # the embedding service, as health names it

_Send = Callable[[Any], None]


class _Stream:
    """One Watch stream's send callback (grpc's non-blocking streaming API: a response is
    sent, None ends the stream with OK), ending it at most once."""

    def __init__(self, send: _Send, service: str) -> None:
        self._send, self.service = send, service
        self._ended, self._lock = False, threading.Lock()

    def __call__(self, response: Any) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = response is None
        self._send(response)


class HealthService(health_pb2_grpc.HealthServicer):
    """Check and Watch of each service's status; `set` changes one, `enter_graceful_shutdown`
    makes every one NOT_SERVING for good, `close_watches` ends every open Watch stream."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # status and streams; never held while sending
        self._send_lock = threading.Lock()  # one sender at a time: streams see changes in order
        self._status: dict[str, int] = {}
        self._streams: set[_Stream] = set()
        self._shutting_down = False

    def Check(self, request: health_pb2.HealthCheckRequest,  # noqa: N802
              context: grpc.ServicerContext) -> health_pb2.HealthCheckResponse:
        with self._lock:
            status = self._status.get(request.service)
        if status is None:
            context.set_code(grpc.StatusCode.NOT_FOUND)
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=status)

    def Watch(self, request: health_pb2.HealthCheckRequest,  # noqa: N802
              context: grpc.ServicerContext, send_response_callback: _Send | None = None) -> None:
        if send_response_callback is None:
            raise RuntimeError("HealthService.Watch needs grpc's non-blocking streaming API")
        stream = _Stream(send_response_callback, request.service)
        with self._send_lock:
            with self._lock:
                self._streams.add(stream)
                status = self._status.get(request.service,
                                          health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            if not context.add_callback(lambda: self._forget(stream)):  # already gone
                self._forget(stream)
                return
            stream(health_pb2.HealthCheckResponse(status=status))

    Watch.experimental_non_blocking = True  # type: ignore[attr-defined]  # no worker per stream

    def _forget(self, stream: _Stream) -> None:
        """A stream closed (runs on the server's polling thread: only the short lock)."""
        with self._lock:
            self._streams.discard(stream)

    def set(self, service: str, status: int) -> None:
        """Set `service`'s status and tell its watchers (ignored after a graceful shutdown)."""
        with self._send_lock:
            with self._lock:
                if self._shutting_down:
                    return
                self._status[service] = status
                streams = [s for s in self._streams if s.service == service]
            for stream in streams:
                stream(health_pb2.HealthCheckResponse(status=status))

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING, for good."""
        with self._lock:
            names = list(self._status)
        for name in names:
            self.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        with self._lock:
            self._shutting_down = True

    def close_watches(self) -> None:
        """End every open Watch stream with OK (call it once the server stopped taking calls,
        or the clients watch again at once)."""
        with self._lock:
            streams, self._streams = list(self._streams), set()
        for stream in streams:
            stream(None)
