"""An embedding-server shard's settings (`persia_inc.embedding_server` in global_config.yaml),
shared by the servers and the clients that call them."""

from __future__ import annotations

import os
from dataclasses import dataclass

LOAD_LOG_INTERVAL_S = 5.0
"""Seconds between two progress lines while a shard loads its checkpoint (a constant: nobody
had a reason to tune it)."""


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """gRPC options of a client's channel to a shard: messages up to `max_message_bytes`; a
    replica that went away dialled again within a second (gRPC's default backoff grows to
    120 s). HTTP/2 frames of 16 MiB instead of 16 KiB were tried for the 1.7 MB answers of a
    26-table lookup and did not pay (two clients on the same servers, interleaved: p50 7.20 ms
    with, 6.80 ms without)."""
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000)]


@dataclass(frozen=True, slots=True)
class EmbeddingServerSettings:
    """Serving side shards and their replicas (a shard listed as several addresses); each
    field says what it means below it."""

    capacity: int = 0
    """Rows per table on each shard before LRU eviction (0: unbounded)."""
    max_message_bytes: int = 256 * 1024 * 1024
    """The largest gRPC message a shard or client sends or takes."""
    token_env: str = ""
    """Name of the environment variable holding the write token (empty: no token)."""
    tls_cert_file: str = ""
    """PEM server certificate (with `tls_key_file`; empty: plaintext)."""
    tls_key_file: str = ""
    """PEM server key (with `tls_cert_file`)."""
    tls_ca_file: str = ""
    """PEM roots clients trust (empty: the server certificate itself)."""
    metrics_port_base: int = 0
    """Shard I serves Prometheus metrics on base + I (0: off)."""
    workers: int = 8
    """GRPC worker threads per shard."""
    grace_s: float = 5.0
    """Seconds in-flight calls get on SIGTERM."""
    drain_s: float = 0.5
    """Seconds a replica with siblings goes on answering after SIGTERM while its health says
    NOT_SERVING, so that clients move its reads to a sibling before it refuses calls (a rolling
    restart then costs a read no failed call); 0: stop taking calls at once."""
    request_timeout_s: float = 60.0
    """The client's deadline per call."""
    dump_chunk_rows: int = 1_000_000
    """Rows per checkpoint part file."""
    replica_max_lag_s: float = 1.0
    """How long a serving replica may lack a position one of its siblings holds before it stops serving
    (NOT_SERVING, lookups go to a fresher sibling) until it has caught up; a (re)started replica serves
    only once it holds everything its siblings hold."""
    replica_poll_s: float = 0.1
    """Seconds between a replica's looks at its siblings' positions."""
    replica_retry_s: float = 0.5
    """Seconds a client leaves a replica that failed (down, or catching up) before it reads from it again,
    while another can answer."""
    shared_memory_lookups: bool = True
    """A client on a shard's host (in its process namespace) lends it a memory file per multi-table
    lookup: the signs and rows go through it, not through gRPC (x0.75 per 128-row request here,
    bench/inference.py). False: a server takes none, a client lends none."""

    def __post_init__(self) -> None:
        if self.capacity < 0:
            raise ValueError("capacity must be >= 0 (0: unbounded)")
        if self.max_message_bytes < 1024 * 1024:
            raise ValueError("max_message_bytes must be at least 1 MiB")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.workers < 1 or self.dump_chunk_rows < 1:
            raise ValueError("workers and dump_chunk_rows must be positive")
        if self.grace_s < 0 or self.drain_s < 0 or self.request_timeout_s <= 0:
            raise ValueError("grace_s and drain_s must be >= 0, request_timeout_s > 0")
        if self.replica_max_lag_s < 0 or self.replica_poll_s <= 0 or self.replica_retry_s < 0:
            raise ValueError("replica_max_lag_s and replica_retry_s must be >= 0, "
                             "replica_poll_s > 0")
        if not 0 <= self.metrics_port_base < 65536:
            raise ValueError("metrics_port_base must be a port number (0: off)")

    def write_token(self) -> str:
        """The write token from the environment variable `token_env` ('' when none is set).
        The same secret guards the servers' write calls and the loader's `POST /clear`."""
        return os.environ.get(self.token_env, "") if self.token_env else ""
