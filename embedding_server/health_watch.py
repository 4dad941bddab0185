"""What a client knows of each replica's health without paying a failed call to learn it.

Each replica publishes its state on gRPC's standard health service: NOT_SERVING while it
loads, while it catches up with its siblings and while it drains before a stop (SIGTERM), and
SERVING once current. A client of replicated shards follows every replica's health stream
(`Health.Watch`, one thread per replica) and tells its `ReplicaRouter`, so reads go to a
replica that serves:

- a replica that goes NOT_SERVING (draining for a rolling restart, or fallen behind) is moved
  to the back before any read is refused by it;
- a replica killed with SIGKILL ends its stream at once (the connection resets), so it is
  moved to the back by the watch rather than by the next read that would fail on it;
- a restarted replica is watched with wait_for_ready, so its channel is connected (warm) by
  the time it says SERVING, and only then does it come back to the front.

The watch only orders replicas: a replica it calls not serving is still tried last, so a read
never fails because of what the watch saw (a server without the health service is simply not
watched). bench/failover.py measures reads with and without it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from persia_inc.embedding_server.health_service import SERVICE_NAME
from persia_inc.foundation.threads import ServiceThread
from persia_inc.foundation.wait import wait_until

log = logging.getLogger(__name__)

_REWATCH_S = 0.1  # pause before watching again after a stream ended (the channel backs off too)


class HealthWatch:
    """Follows the health of each of `channels` (target index -> channel) and calls
    `on_health(target, serving)`: True when it says SERVING, False when it says anything else,
    None when its stream ends (down, or stopping). close() ends every watch (safe to call
    twice)."""

    def __init__(self, channels: Sequence[tuple[int, grpc.Channel]],
                 on_health: Callable[[int, bool | None], None]) -> None:
        self._on_health = on_health
        self._lock = threading.Lock()
        self._calls: dict[int, Any] = {}
        self._stop = threading.Event()
        self._threads = [ServiceThread(f"health-watch-{target}", self._follower(target, channel),
                                       stop=self._stop, wake=self._cancel_all)
                         for target, channel in channels]

    def start(self) -> HealthWatch:
        for thread in self._threads:
            thread.start()
        return self

    def _follower(self, target: int, channel: grpc.Channel) -> Callable[[], None]:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)

        def follow() -> None:
            while not self._stop.is_set():
                with self._lock:  # close() cancels what is registered here
                    if self._stop.is_set():
                        return
                    call = stub.Watch(request, wait_for_ready=True)
                    self._calls[target] = call
                try:
                    for reply in call:
                        self._on_health(target, reply.status == health_pb2.HealthCheckResponse.SERVING)
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # a server without health
                        log.info("target %d has no health service: not watched", target)
                        return
                if self._stop.is_set():
                    return
                self._on_health(target, None)  # the stream ended: gone, or stopping
                self._stop.wait(_REWATCH_S)
        return follow

    def _cancel_all(self) -> None:
        with self._lock:
            for call in self._calls.values():
                call.cancel()

    def close(self) -> None:
        """End every watch; bounded (each thread is joined for at most a second)."""
        self._stop.set()
        for thread in self._threads:
            thread.close(timeout_s=1.0)


def wait_serving(channels: Sequence[grpc.Channel], names: Sequence[str], timeout_s: float) -> None:
    """Block until the health service behind every one of `channels` says SERVING (`names`:
    how to name each in the TimeoutError). gRPC's own readiness, no polling: the Watch call
    waits for its channel to connect (`wait_for_ready`) and the server pushes each status
    change down the stream."""
    deadline = time.monotonic() + timeout_s
    for channel, name in zip(channels, names, strict=True):
        stub = health_pb2_grpc.HealthStub(channel)

        def serving(stub: health_pb2_grpc.HealthStub = stub) -> bool:
            replies = stub.Watch(health_pb2.HealthCheckRequest(service=""), wait_for_ready=True,
                                 timeout=max(0.01, deadline - time.monotonic()))
            try:
                return any(r.status == health_pb2.HealthCheckResponse.SERVING for r in replies)
            finally:
                replies.cancel()

        wait_until(serving, f"{name} to report SERVING",
                   timeout_s=max(0.0, deadline - time.monotonic()), ignore=(grpc.RpcError,))
