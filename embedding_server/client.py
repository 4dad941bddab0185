"""`EmbeddingClient`: route signs to shards, call them in parallel, reassemble in order.

Shard of a sign = `embedding_server.sharding.shard_of(sign, len(servers))`; the calls to the
shards go out together (gRPC futures, no thread per call) and the answer is in request order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from persia_inc.embedding_server._wire import decode_lookup_reply, encode_apply_request
from persia_inc.embedding_server.errors import ShardError
from persia_inc.embedding_server.protos import embedding_pb2 as pb
from persia_inc.embedding_server.protos import embedding_pb2_grpc as pb_grpc
from persia_inc.embedding_server.sharding import group_by_shard
from persia_inc.packet_format import Packet, Watermark

log = logging.getLogger(__name__)

_METHOD = "/persia_inc.embedding.v1.EmbeddingService/"


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """Per-shard acknowledgements of one packet: `applied[s]` False means shard s already
    held it (at or below its watermark) and changed nothing."""

    applied: tuple[bool, ...]
    inserted: int
    updated: int
    deleted: int

    @property
    def skipped(self) -> bool:
        """True when every shard already held the packet."""
        return not any(self.applied)


class EmbeddingClient:
    """A client of N embedding-server shards (`servers`: host:port in shard order).

    token: sent as `authorization: Bearer <token>` on write calls; tls_ca: PEM bytes of the
    roots to trust (None: plaintext); timeout_s: deadline per call. Thread-safe. Use as a
    context manager, or call `close()`.
    """

    def __init__(self, servers: Sequence[str], *, token: str = "", tls_ca: bytes | None = None,
                 timeout_s: float = 60.0, max_message_bytes: int = 256 * 1024 * 1024) -> None:
        if not servers:
            raise ValueError("EmbeddingClient needs at least one server")
        self.servers = tuple(servers)
        self.timeout_s = timeout_s
        self._write_metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        if tls_ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=tls_ca)
            self._channels = [grpc.secure_channel(s, creds, options=options) for s in self.servers]
        else:
            self._channels = [grpc.insecure_channel(s, options=options) for s in self.servers]
        self._stubs = [pb_grpc.EmbeddingServiceStub(c) for c in self._channels]
        # the two calls that carry big arrays skip protobuf's copies (see _wire.py)
        self._apply_raw = [c.unary_unary(_METHOD + "Apply", request_serializer=None,
                                         response_deserializer=pb.ApplyResponse.FromString)
                           for c in self._channels]
        self._lookup_raw = [c.unary_unary(_METHOD + "Lookup",
                                          request_serializer=pb.LookupRequest.SerializeToString,
                                          response_deserializer=decode_lookup_reply)
                            for c in self._channels]
        self._closed = False

    @classmethod
    def from_config(cls, config: Any) -> EmbeddingClient:
        """A client for `config.infer.servers` with the configured token, TLS and limits."""
        import os

        settings = config.persia_inc.embedding_server
        token = os.environ.get(settings.token_env, "") if settings.token_env else ""
        tls_ca = None
        if settings.tls_cert_file:
            with open(settings.tls_ca_file or settings.tls_cert_file, "rb") as handle:
                tls_ca = handle.read()
        return cls(config.infer.servers, token=token, tls_ca=tls_ca,
                   timeout_s=settings.request_timeout_s,
                   max_message_bytes=settings.max_message_bytes)

    # ---------------------------------------------------------------------------- calls

    def _error(self, shard: int, exc: grpc.RpcError) -> ShardError:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return ShardError(shard, self.servers[shard], code.name, details or "")

    def _gather(self, calls: dict[int, grpc.Future]) -> dict[int, Any]:
        """Wait for every call; raise the first failure (after all have finished)."""
        results, first = {}, None
        for shard, call in calls.items():
            try:
                results[shard] = call.result()
            except grpc.RpcError as exc:
                first = first or self._error(shard, exc)
        if first is not None:
            raise first
        return results

    def _call(self, shard: int, method: str, request: Any, *, write: bool = False) -> Any:
        try:
            return getattr(self._stubs[shard], method)(
                request, timeout=self.timeout_s, metadata=self._write_metadata if write else ())
        except grpc.RpcError as exc:
            raise self._error(shard, exc) from exc

    def lookup(self, table: str, signs: np.ndarray) -> np.ndarray:
        """Rows of `signs` in request order; unknown signs read as zeros.

        signs: uint64[n] -> float32[n, dim]. Raises ShardError (NOT_FOUND: unknown table).
        """
        signs = np.ascontiguousarray(signs, dtype=np.uint64)
        n, num = signs.shape[0], len(self.servers)
        if num == 1 or n == 0:
            try:
                reply = self._lookup_raw[0](pb.LookupRequest(table=table, signs=signs.tobytes()),
                                            timeout=self.timeout_s)
            except grpc.RpcError as exc:
                raise self._error(0, exc) from exc
            return reply.rows.reshape(n, reply.dim) if n else np.zeros((0, reply.dim), np.float32)
        order, bounds = group_by_shard(signs, num)
        grouped = signs[order]
        calls = {}
        for shard in range(num):
            lo, hi = bounds[shard], bounds[shard + 1]
            if hi > lo:
                request = pb.LookupRequest(table=table, signs=grouped[lo:hi].tobytes())
                calls[shard] = self._lookup_raw[shard].future(request, timeout=self.timeout_s)
        replies = self._gather(calls)
        dim = next(iter(replies.values())).dim
        out = np.empty((n, dim), np.float32)
        for shard, reply in replies.items():
            if reply.dim != dim:
                raise ShardError(shard, self.servers[shard], "FAILED_PRECONDITION",
                                 f"table {table!r} has dim {reply.dim} here but {dim} elsewhere")
            lo, hi = bounds[shard], bounds[shard + 1]
            out[order[lo:hi]] = reply.rows.reshape(hi - lo, dim)
        return out

    def apply(self, packet: Packet) -> ApplyResult:
        """Apply a decoded packet: its rows and deletes split by shard, every shard called
        (so every shard's watermark advances) and acknowledged before this returns.

        Idempotent: a packet at or below a shard's watermark changes nothing there.
        Raises ShardError if any shard failed (the others may have applied it: retry).
        """
        h = packet.header
        num = len(self.servers)
        signs = np.ascontiguousarray(packet.signs, dtype=np.uint64)
        rows = np.ascontiguousarray(packet.embeddings, dtype=np.float32)
        deleted = np.ascontiguousarray(packet.deleted, dtype=np.uint64)
        dim = rows.shape[1] if rows.ndim == 2 and rows.shape[1] else h.dim
        order, bounds = group_by_shard(signs, num)
        dorder, dbounds = group_by_shard(deleted, num)
        if num > 1:
            signs, rows, deleted = signs[order], rows[order], deleted[dorder]
        calls = {}
        for shard in range(num):
            lo, hi = bounds[shard], bounds[shard + 1]
            dlo, dhi = dbounds[shard], dbounds[shard + 1]
            request = encode_apply_request(h.table, h.producer, h.generation, h.sequence, dim,
                                           signs[lo:hi], rows[lo:hi], deleted[dlo:dhi])
            calls[shard] = self._apply_raw[shard].future(
                request, timeout=self.timeout_s, metadata=self._write_metadata)
        replies = self._gather(calls)
        ordered = [replies[s] for s in range(num)]
        return ApplyResult(applied=tuple(r.applied for r in ordered),
                           inserted=sum(r.inserted for r in ordered),
                           updated=sum(r.updated for r in ordered),
                           deleted=sum(r.deleted for r in ordered))

    def delete(self, table: str, signs: np.ndarray) -> int:
        """Delete signs outside any producer stream; returns how many rows were freed."""
        signs = np.ascontiguousarray(signs, dtype=np.uint64)
        order, bounds = group_by_shard(signs, len(self.servers))
        grouped = signs[order]
        calls = {
            shard: self._stubs[shard].Delete.future(
                pb.DeleteRequest(table=table, signs=grouped[bounds[shard]:bounds[shard + 1]].tobytes()),
                timeout=self.timeout_s, metadata=self._write_metadata)
            for shard in range(len(self.servers))
        }
        return sum(r.deleted for r in self._gather(calls).values())

    def shard_watermarks(self, shard: int) -> list[Watermark]:
        reply = self._call(shard, "Watermarks", pb.WatermarksRequest())
        return [Watermark(w.table, w.producer, w.generation, w.sequence) for w in reply.watermarks]

    def watermarks(self) -> list[Watermark]:
        """Per (table, producer), the lowest watermark over all shards: what every shard holds.

        A stream some shard has never applied is left out (that shard holds none of it).
        """
        calls = {s: self._stubs[s].Watermarks.future(pb.WatermarksRequest(), timeout=self.timeout_s)
                 for s in range(len(self.servers))}
        replies = self._gather(calls)
        lowest: dict[tuple[str, str], tuple[int, int]] = {}
        counts: dict[tuple[str, str], int] = {}
        for reply in replies.values():
            for w in reply.watermarks:
                key = (w.table, w.producer)
                position = (w.generation, w.sequence)
                lowest[key] = min(lowest.get(key, position), position)
                counts[key] = counts.get(key, 0) + 1
        return [Watermark(t, p, *lowest[(t, p)]) for (t, p) in sorted(lowest)
                if counts[(t, p)] == len(self.servers)]

    def status(self, shard: int) -> pb.StatusResponse:
        """Tables (rows, bytes, misses), watermarks, readiness and uptime of one shard."""
        return self._call(shard, "Status", pb.StatusRequest())

    def load_checkpoint(self, uri: str) -> int:
        """Make every shard replace its tables with its share of the checkpoint at `uri`;
        returns the rows loaded over all shards."""
        calls = {s: self._stubs[s].LoadCheckpoint.future(
            pb.LoadCheckpointRequest(uri=uri), timeout=self.timeout_s,
            metadata=self._write_metadata) for s in range(len(self.servers))}
        return sum(r.rows for r in self._gather(calls).values())

    def dump(self, shard: int, table: str, chunk_rows: int = 0
             ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every live row of `table` on `shard`: (signs: uint64[k], rows: float32[k, dim])."""
        stream = self._stubs[shard].Dump(pb.DumpRequest(table=table, chunk_rows=chunk_rows),
                                         timeout=self.timeout_s, metadata=self._write_metadata)
        try:
            for chunk in stream:
                signs = np.frombuffer(chunk.signs, "<u8")
                yield signs, np.frombuffer(chunk.rows, "<f4").reshape(signs.shape[0], chunk.dim)
        except grpc.RpcError as exc:
            raise self._error(shard, exc) from exc

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Block until every shard's health check says SERVING; TimeoutError otherwise."""
        import time

        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout_s
        for shard, channel in enumerate(self._channels):
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"shard {shard} ({self.servers[shard]}) not SERVING "
                                       f"after {timeout_s} s")
                time.sleep(0.05)

    # ---------------------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Close every channel; safe to call twice."""
        if not self._closed:
            self._closed = True
            for channel in self._channels:
                channel.close()

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
