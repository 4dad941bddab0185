"""An embedding-server shard's settings (`persia_inc.embedding_server` in global_config.yaml),
shared by the servers and the clients that call them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EmbeddingServerSettings:
    """Serving side shards. capacity: rows per table on each shard before LRU eviction
    (0: unbounded); token_env: name of the environment variable holding the write token
    (empty: no token); tls_cert_file/tls_key_file: PEM server certificate and key (both or
    neither; empty: plaintext); tls_ca_file: PEM roots clients trust (empty: the server
    certificate itself); metrics_port_base: shard I serves Prometheus metrics on base + I
    (0: off); grace_s: seconds in-flight calls get on SIGTERM; request_timeout_s: client
    deadline per call; dump_chunk_rows: rows per checkpoint part file; load_log_interval_s:
    seconds between checkpoint-load progress lines.

    Replicas (a shard listed as several addresses): replica_max_lag_s: how long a serving
    replica may lack a position one of its siblings holds before it stops serving (NOT_SERVING,
    lookups go to a fresher sibling) until it has caught up; a (re)started replica serves only
    once it holds everything its siblings hold; replica_poll_s: seconds between a replica's
    looks at its siblings' positions; replica_retry_s: seconds a client leaves a replica that
    failed (down, or catching up) before it reads from it again, while another can answer."""

    capacity: int = 0
    max_message_bytes: int = 256 * 1024 * 1024
    token_env: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    metrics_port_base: int = 0
    workers: int = 8
    grace_s: float = 5.0
    request_timeout_s: float = 60.0
    dump_chunk_rows: int = 1_000_000
    load_log_interval_s: float = 5.0
    replica_max_lag_s: float = 1.0
    replica_poll_s: float = 0.1
    replica_retry_s: float = 0.5

    def __post_init__(self) -> None:
        if self.capacity < 0:
            raise ValueError("capacity must be >= 0 (0: unbounded)")
        if self.max_message_bytes < 1024 * 1024:
            raise ValueError("max_message_bytes must be at least 1 MiB")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.workers < 1 or self.dump_chunk_rows < 1:
            raise ValueError("workers and dump_chunk_rows must be positive")
        if self.grace_s < 0 or self.request_timeout_s <= 0 or self.load_log_interval_s <= 0:
            raise ValueError("grace_s must be >= 0, request_timeout_s and load_log_interval_s > 0")
        if self.replica_max_lag_s < 0 or self.replica_poll_s <= 0 or self.replica_retry_s < 0:
            raise ValueError("replica_max_lag_s and replica_retry_s must be >= 0, "
                             "replica_poll_s > 0")
        if not 0 <= self.metrics_port_base < 65536:
            raise ValueError("metrics_port_base must be a port number (0: off)")
