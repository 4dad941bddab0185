"""kafka-python, imported the one way both the producer and the loader use it.

Two things about kafka-python 3.0.12 are handled here, once:

* its protocol module raises a DeprecationWarning on Python 3.11 at import, which fails runs
  with warnings as errors;
* a connect that fails (broker down: connection refused) leaves its socket open
  (`kafka.net.inet.KafkaNetSocket.sock_connect` raises without closing it); the exception's
  traceback keeps it alive, so every reconnect attempt during an outage holds a file descriptor
  until garbage collection. We close the socket when the connect fails.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

from persia_inc.foundation.fields import FieldError, check_fields, positive

_PATCHED = "_persia_inc_closes_failed_sockets"


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    """Announcements over Kafka (kafka-python). `topic` may use {model}; delivery_timeout_ms:
    how long the producer side lets one announcement wait for acks before re-sending it."""

    bootstrap_servers: tuple[str, ...] = ("127.0.0.1:9092",)
    """The brokers, `host:port`."""
    topic: str = "persia-inc.{model}"
    """The announcement topic; `{model}` is replaced by `persia_inc.model`."""
    group_id: str = "persia-inc-loader"
    """The loaders' consumer group."""
    client_id: str = "persia-inc"
    """The client id the brokers see."""
    session_timeout_ms: int = 10_000
    """A consumer silent this long leaves the group (its partitions move)."""
    heartbeat_interval_ms: int = 3_000
    """Consumer heartbeat period; below `session_timeout_ms`."""
    request_timeout_ms: int = 30_000
    """Longest wait for one broker request."""
    num_partitions: int = 4
    """Partitions of the topic when the producer creates it."""
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """`PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`."""
    delivery_timeout_ms: int = 60_000
    """How long one announcement may wait for acks before it is sent again; at least `request_timeout_ms`."""

    def __post_init__(self) -> None:
        check_fields(self)  # in code as from YAML: FieldError naming the key
        for key in ("session_timeout_ms", "heartbeat_interval_ms", "request_timeout_ms",
                    "num_partitions", "delivery_timeout_ms"):
            positive(key, getattr(self, key))
        if self.delivery_timeout_ms < self.request_timeout_ms:
            raise FieldError("delivery_timeout_ms", "must be at least request_timeout_ms")
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise FieldError("heartbeat_interval_ms", "must be below session_timeout_ms")

    def topic_for(self, model: str) -> str:
        return self.topic.format(model=model)


def import_kafka() -> ModuleType:
    """The `kafka` package, with `kafka.admin`, `kafka.errors` and `kafka.structs` loaded."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        import kafka
        import kafka.admin
        import kafka.errors
        import kafka.structs
    _close_sockets_of_failed_connects()
    return kafka


def _close_sockets_of_failed_connects() -> None:
    try:
        from kafka.net.inet import KafkaNetSocket
    except ImportError:  # another kafka-python layout: nothing to mend
        return
    original = getattr(KafkaNetSocket, "sock_connect", None)
    if original is None or getattr(original, _PATCHED, False):
        return

    async def sock_connect(self: Any, net: Any, sock: Any, sockaddr: Any, timeout_at: Any = None) -> Any:
        try:
            return await original(self, net, sock, sockaddr, timeout_at=timeout_at)
        except BaseException:
            sock.close()
            raise

    setattr(sock_connect, _PATCHED, True)
    KafkaNetSocket.sock_connect = sock_connect
