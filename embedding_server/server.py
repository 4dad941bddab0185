"""The gRPC embedding server: one process per shard, over a `Shard`.

`serve(servers, shard_index, replica=R, ...)` binds exactly replica R of `servers[shard_index]`
(an entry is one address, or a list of the shard's replicas), reports NOT_SERVING on the
standard health service until `initial_sparse_checkpoint` is loaded, then SERVING; SIGTERM or
SIGINT stops it gracefully (in-flight calls get `grace_s`; a replica with siblings first drains
for `drain_s`: NOT_SERVING on health, still answering, so clients that follow its health
(`health_watch`) move to a sibling before it refuses a call). A replica of a shard with siblings
is SERVING only while it is current (`siblings.SiblingWatch`): a (re)started one catches up
first, and until then refuses lookups that do not say `allow_behind` (UNAVAILABLE, with the
trailing key `persia-catching-up`, so clients ask a sibling).

Write methods (Apply, Delete, LoadCheckpoint, Dump) need `authorization: Bearer <token>` when
a token is configured; a request that does not fit gets INVALID_ARGUMENT with the reason and
the server goes on serving.
"""

from __future__ import annotations

import faulthandler
import functools
import hmac
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from persia_inc.embedding_server._wire import (
    ApplyRequestView,
    LookupReply,
    decode_apply_request,
    lookup_blocks_reply,
    lookup_tables_reply,
    split_blocks,
)
from persia_inc.embedding_server.health_service import SERVICE_NAME, HealthService
from persia_inc.embedding_server.protos import embedding_pb2 as pb
from persia_inc.embedding_server.protos import embedding_pb2_grpc as pb_grpc
from persia_inc.embedding_server.regions import REGION_KEY, RegionError, RegionMaps
from persia_inc.embedding_server.server_metrics import Metrics
from persia_inc.embedding_server.settings import LOAD_LOG_INTERVAL_S, EmbeddingServerSettings
from persia_inc.embedding_server.shard import (
    ChunkLostError,
    ForeignSignsError,
    PositionConflictError,
    Shard,
    TableNotFoundError,
    TableSlice,
)
from persia_inc.embedding_server.sharding import replica_sets
from persia_inc.foundation.threads import ServiceThread, thread_name
from persia_inc.packet_format import PacketError, PacketLimits
from persia_inc.packet_format.cut import CUT_LANE
from persia_inc.storage import ObjectStore, StorageError

log = logging.getLogger(__name__)

WRITE_METHODS = frozenset({"Apply", "Delete", "LoadCheckpoint", "Dump"})
IDENTITY_KEYS = ("persia-shard", "persia-num-shards")  # trailing metadata of identity refusals
MOVED_KEY = "persia-watermark-moved"  # trailing metadata of a refused conditional apply
CATCHING_UP_KEY = "persia-catching-up"  # trailing metadata of a lookup refused while behind
def _signs(data: bytes | memoryview, field: str) -> np.ndarray:
    """Raw little-endian uint64 bytes -> uint64[n] (a view, no copy)."""
    if len(data) % 8:
        raise ValueError(f"{field} must be a multiple of 8 bytes (uint64 LE), got {len(data)}")
    return np.frombuffer(data, dtype="<u8")


def _slice(table: str, dim: int, signs: bytes | memoryview, rows: bytes | memoryview,
           deleted: bytes | memoryview) -> TableSlice:
    """A received table slice as arrays (views on the message, no copy); ValueError if the
    byte counts do not fit."""
    where = f"table {table!r}: " if table else ""
    sign_array = _signs(signs, f"{where}signs")
    deleted_array = _signs(deleted, f"{where}deleted_signs")
    n = sign_array.shape[0]
    if dim == 0:
        raise ValueError(f"{where}dim must be set (the table's embedding width)")
    if len(rows) != n * dim * 4:
        raise ValueError(
            f"{where}rows has {len(rows)} bytes; {n} signs of dim {dim} need {n * dim * 4} "
            "(float32 LE, n x dim)")
    return TableSlice(table, dim, sign_array, np.frombuffer(rows, dtype="<f4").reshape(n, dim),
                      deleted_array)


class WrongShardError(Exception):
    """A request names a shard identity (index, count) that is not this server's."""


class CatchingUpError(Exception):
    """A lookup reached a replica that lacks what a sibling holds, without `allow_behind`."""


def _rpc(method: str) -> Callable:
    """Wrap a unary servicer method: auth, readiness, latency, and errors -> status codes."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(self: EmbeddingServicer, request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            code, message = self._check_call(method, context)
            level = logging.WARNING
            self.shard.expire_staged()  # abandoned chunked applies go even when no Apply comes
            if code is None:
                try:
                    return fn(self, request, context)
                except TableNotFoundError as exc:
                    code, message = grpc.StatusCode.NOT_FOUND, str(exc)
                except (WrongShardError, ForeignSignsError) as exc:
                    code = (grpc.StatusCode.FAILED_PRECONDITION if isinstance(exc, WrongShardError)
                            else grpc.StatusCode.INVALID_ARGUMENT)
                    message = str(exc)
                    self.metrics.misrouted.labels(method).inc()
                    context.set_trailing_metadata(tuple(zip(
                        IDENTITY_KEYS, (str(self.shard_index), str(self.num_shards)), strict=True)))
                except RegionError as exc:  # the client asks again without the region
                    code, message = grpc.StatusCode.FAILED_PRECONDITION, str(exc)
                    context.set_trailing_metadata(((REGION_KEY, "1"),))
                except CatchingUpError as exc:  # the client asks a sibling replica
                    code, message = grpc.StatusCode.UNAVAILABLE, str(exc)
                    context.set_trailing_metadata(((CATCHING_UP_KEY, "1"),))
                except ChunkLostError as exc:
                    code, message = grpc.StatusCode.ABORTED, str(exc)
                except PositionConflictError as exc:  # the caller looks again and catches up
                    code, message, level = grpc.StatusCode.ABORTED, str(exc), logging.INFO
                    held = exc.held
                    context.set_trailing_metadata(
                        ((MOVED_KEY, "" if held is None else f"{held[0]}-{held[1]}"),))
                except (ValueError, PacketError) as exc:
                    code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
                except FileNotFoundError as exc:
                    code, message = grpc.StatusCode.NOT_FOUND, f"not found: {exc}"
                except (StorageError, PermissionError, OSError) as exc:
                    code, message = grpc.StatusCode.UNAVAILABLE, f"storage: {exc}"
                except Exception as exc:  # one bad request never kills the server
                    log.exception("%s failed unexpectedly", method)
                    code, message = grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
                finally:
                    self.metrics.latency.labels(method).observe(time.perf_counter() - started)
            self.metrics.errors.labels(method, code.name).inc()
            if code not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                log.log(level, "%s from %s: %s: %s", method, context.peer(), code.name, message)
            context.abort(code, message)

        return wrapper

    return decorate


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    """The RPC face of one `Shard`."""

    def __init__(self, shard: Shard, *, shard_index: int = 0, num_shards: int = 1,
                 token: str = "", dump_chunk_rows: int = 1_000_000,
                 loader: Callable[[str], tuple[int, float]] | None = None,
                 max_message_bytes: int = 256 * 1024 * 1024, replica: int = 0,
                 num_replicas: int = 1, model: str = "", regions: RegionMaps | None = None
                 ) -> None:
        self.shard = shard
        self.regions = regions  # None: it takes no lookup regions
        self.model = model
        self.shard_index, self.num_shards = shard_index, num_shards
        self.replica, self.num_replicas = replica, num_replicas
        self.current = True  # set by the sibling watch of a replicated shard
        self.behind_s: Callable[[], float] = lambda: 0.0
        self.siblings_up: Callable[[], int] = lambda: 0
        self.max_message_bytes = max_message_bytes
        self._token = token.encode()
        self.dump_chunk_rows = dump_chunk_rows
        self.metrics = Metrics(shard_index, replica, shard)
        self.ready = threading.Event()
        self._loader = loader

    # ------------------------------------------------------------------------- plumbing

    def _check_call(self, method: str, context: grpc.ServicerContext
                    ) -> tuple[grpc.StatusCode | None, str]:
        if method in WRITE_METHODS and self._token:
            given = ""
            for key, value in context.invocation_metadata():
                if key == "authorization":
                    given = value
            if not given:
                return grpc.StatusCode.UNAUTHENTICATED, f"{method} needs 'authorization: Bearer <token>'"
            scheme, _, secret = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(secret.encode(), self._token):
                return grpc.StatusCode.PERMISSION_DENIED, f"{method}: wrong token"
        if (method in ("Lookup", "LookupTables", "LookupBlocks", "Apply", "Delete", "Dump")
                and not self.ready.is_set()):
            return grpc.StatusCode.UNAVAILABLE, "loading the initial checkpoint; not ready yet"
        return None, ""

    def _check_identity(self, shard: int, num_shards: int) -> None:
        """Refuse a request meant for shard `shard` of `num_shards` (0: not given) unless that is
        this server."""
        if num_shards and (shard, num_shards) != (self.shard_index, self.num_shards):
            raise WrongShardError(
                f"this server is shard {self.shard_index} of {self.num_shards}; the request was "
                f"routed to it as shard {shard} of {num_shards}")

    def _check_current(self, allow_behind: bool) -> None:
        """Refuse a lookup while this replica catches up, unless the caller allows it (every
        replica of the shard is behind: an answer, counted, beats none)."""
        if self.current:
            return
        if not allow_behind:
            self.metrics.behind_lookups.labels("refused").inc()
            raise CatchingUpError(
                f"shard {self.shard_index} replica {self.replica} is catching up with its "
                f"siblings ({self.behind_s():.1f} s behind); ask another replica")
        self.metrics.behind_lookups.labels("answered").inc()

    def _refresh_gauges(self) -> None:
        self.metrics.current.set(1 if self.current else 0)
        self.metrics.behind_seconds.set(self.behind_s())
        for stats in self.shard.stats():
            self.metrics.rows.labels(stats.name).set(stats.rows)
            self.metrics.bytes.labels(stats.name).set(stats.bytes)
        for mark in self.shard.watermarks():
            self.metrics.watermark_generation.labels(mark.table, mark.producer).set(mark.generation)
            self.metrics.watermark_sequence.labels(mark.table, mark.producer).set(mark.sequence)

    # ------------------------------------------------------------------------- methods

    @_rpc("Lookup")
    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext) -> LookupReply:  # noqa: N802
        self._check_identity(request.shard, request.num_shards)
        self._check_current(request.allow_behind)
        signs = _signs(request.signs, "signs")
        rows, misses = self.shard.lookup(request.table, signs, check_owner=not request.num_shards)
        return LookupReply(dim=rows.shape[1], rows=rows, misses=misses)  # encoded by _register

    @_rpc("LookupTables")
    def LookupTables(self, request: pb.LookupTablesRequest, context: grpc.ServicerContext  # noqa: N802
                     ) -> bytes:
        self._check_identity(request.shard, request.num_shards)
        self._check_current(request.allow_behind)
        asked = [(entry.table, _signs(entry.signs, f"signs of table {entry.table!r}"))
                 for entry in request.tables]
        reply = b""

        def into(shapes: Sequence[tuple[int, int, int]]) -> list[np.ndarray]:
            nonlocal reply  # the answer's bytes, the rows gathered straight into them
            reply, rows = lookup_tables_reply([table for table, _ in asked], shapes)
            return rows

        self.shard.lookup_tables(asked, check_owner=not request.num_shards, into=into)
        return reply  # LookupTablesResponse wire bytes

    @_rpc("LookupBlocks")
    def LookupBlocks(self, request: pb.LookupBlocksRequest, context: grpc.ServicerContext  # noqa: N802
                     ) -> bytes:
        self._check_identity(request.shard, request.num_shards)
        self._check_current(request.allow_behind)
        space = None  # a lookup region's bytes for the rows (regions.py)
        if request.region:
            if self.regions is None:
                raise RegionError("this server takes no lookup regions (shared_memory_lookups)")
            region = self.regions.open(request.region)
            count = sum(request.counts)
            signs = self.regions.signs(region, count)
            space = self.regions.rows_space(region, count)
        else:
            signs = _signs(request.signs, "signs")
        asked = split_blocks(request.tables, request.counts, signs)
        reply, misses, in_region = b"", np.zeros(0, np.uint64), False

        def into(shapes: Sequence[tuple[int, int, int]]) -> list[np.ndarray]:
            nonlocal reply, misses, in_region  # the answer's bytes, the rows gathered into them
            reply, rows, misses, in_region = lookup_blocks_reply(shapes, space)
            return rows

        found = self.shard.lookup_blocks(asked, into, check_owner=not request.num_shards)
        misses[:] = found  # the answer's misses field, after the rows
        if space is not None:
            self.metrics.region_lookups[in_region].inc()
        return reply  # LookupBlocksResponse wire bytes

    @_rpc("Apply")
    def Apply(self, request: ApplyRequestView, context: grpc.ServicerContext) -> pb.ApplyResponse:  # noqa: N802
        # the arrays are views on the received message (decode_apply_request): no copy
        if request.error:
            raise ValueError(request.error)
        place = request.place
        self._check_identity(place.shard, place.num_shards)
        if request.tables or request.table == CUT_LANE:
            slices = [_slice(piece.table, piece.dim, piece.signs, piece.rows, piece.deleted_signs)
                      for piece in request.tables]
            outcome = self.shard.apply_tables_chunk(
                request.table, request.producer, request.generation, request.sequence, slices,
                apply_id=place.apply_id, chunk=place.chunk, chunks=place.chunks,
                expect=request.expect)
        else:
            piece = _slice(request.table, request.dim, request.signs, request.rows,
                           request.deleted_signs)
            outcome = self.shard.apply_chunk(
                request.table, request.producer, request.generation, request.sequence,
                piece.dim, piece.signs, piece.rows, piece.deleted, apply_id=place.apply_id,
                chunk=place.chunk, chunks=place.chunks)
        m = self.metrics
        m.applies.labels(request.table, "staged" if outcome.staged else
                         "applied" if outcome.applied else "skipped").inc()
        if outcome.applied:
            for table, rows, deletes in outcome.per_table:
                m.apply_rows.labels(table).inc(rows)
                m.apply_deletes.labels(table).inc(deletes)
            m.watermark_generation.labels(request.table, request.producer).set(request.generation)
            m.watermark_sequence.labels(request.table, request.producer).set(request.sequence)
        log.debug("apply %s/%s %d-%d: %s", request.table, request.producer, request.generation,
                  request.sequence, outcome)
        generation, sequence = outcome.watermark
        return pb.ApplyResponse(
            applied=outcome.applied, inserted=outcome.inserted, updated=outcome.updated,
            deleted=outcome.deleted, evicted=outcome.evicted, staged=outcome.staged,
            watermark=pb.Watermark(table=request.table, producer=request.producer,
                                   generation=generation, sequence=sequence))

    @_rpc("Delete")
    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> pb.DeleteResponse:  # noqa: N802
        self._check_identity(request.shard, request.num_shards)
        signs = _signs(request.signs, "signs")
        self.shard.check_owned(signs)
        deleted = self.shard.delete(request.table, signs)
        return pb.DeleteResponse(deleted=deleted)

    @_rpc("Watermarks")
    def Watermarks(self, request: pb.WatermarksRequest, context: grpc.ServicerContext  # noqa: N802
                   ) -> pb.WatermarksResponse:
        return pb.WatermarksResponse(watermarks=self._watermark_messages())

    def _watermark_messages(self) -> list[pb.Watermark]:
        return [pb.Watermark(table=w.table, producer=w.producer, generation=w.generation,
                             sequence=w.sequence) for w in self.shard.watermarks()]

    @_rpc("LoadCheckpoint")
    def LoadCheckpoint(self, request: pb.LoadCheckpointRequest, context: grpc.ServicerContext  # noqa: N802
                       ) -> pb.LoadCheckpointResponse:
        if self._loader is None:
            raise ValueError("this server cannot load checkpoints")
        rows, seconds = self._loader(request.uri)
        return pb.LoadCheckpointResponse(rows=rows, seconds=seconds)

    @_rpc("Status")
    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:  # noqa: N802
        self._refresh_gauges()
        staged, staged_bytes = self.shard.staged()
        tables = [pb.TableStatus(name=s.name, dim=s.dim, rows=s.rows, bytes=s.bytes,
                                 lookups=s.lookups, lookup_rows=s.lookup_rows, misses=s.misses)
                  for s in self.shard.stats()]
        return pb.StatusResponse(
            shard=self.shard_index, num_shards=self.num_shards, ready=self.ready.is_set(),
            uptime_s=time.monotonic() - self.shard.started, tables=tables,
            watermarks=self._watermark_messages(), max_message_bytes=self.max_message_bytes,
            staged_applies=staged, staged_bytes=staged_bytes,
            foreign_lookup_signs=self.shard.foreign_lookup_signs, replica=self.replica,
            num_replicas=self.num_replicas, current=self.current, behind_s=self.behind_s(),
            siblings_up=self.siblings_up(), model=self.model,
            shared_memory=self.regions.memory if self.regions else "")

    def Dump(self, request: pb.DumpRequest, context: grpc.ServicerContext) -> Iterator[pb.DumpChunk]:  # noqa: N802
        code, message = self._check_call("Dump", context)
        if code is None:
            try:
                table = self.shard.table(request.table)
            except TableNotFoundError as exc:
                code, message = grpc.StatusCode.NOT_FOUND, str(exc)
        if code is not None:
            self.metrics.errors.labels("Dump", code.name).inc()
            context.abort(code, message)
        chunk = int(request.chunk_rows) or self.dump_chunk_rows
        for signs, rows in table.iter_rows(chunk):
            yield pb.DumpChunk(table=request.table, dim=table.dim, signs=signs.tobytes(),
                               rows=rows.tobytes())


# ---------------------------------------------------------------------------------- process


def _register(servicer: EmbeddingServicer, server: grpc.Server) -> None:
    """Add the service like the generated `add_EmbeddingServiceServicer_to_server`, except
    that Lookup's answer is written straight from its row array (`LookupReply.encode`),
    LookupTables' and LookupBlocks' rows are gathered straight into their answers' bytes
    (`lookup_tables_reply`, `lookup_blocks_reply`), and Apply is read as views (`decode_apply_request`)."""
    unary = grpc.unary_unary_rpc_method_handler
    handlers = {
        "Apply": unary(servicer.Apply, request_deserializer=decode_apply_request,
                       response_serializer=pb.ApplyResponse.SerializeToString),
        "Lookup": unary(servicer.Lookup, request_deserializer=pb.LookupRequest.FromString,
                        response_serializer=LookupReply.encode),
        "LookupTables": unary(servicer.LookupTables,
                              request_deserializer=pb.LookupTablesRequest.FromString,
                              response_serializer=None),  # wire bytes already
        "LookupBlocks": unary(servicer.LookupBlocks,
                              request_deserializer=pb.LookupBlocksRequest.FromString,
                              response_serializer=None),  # wire bytes already
        "Dump": grpc.unary_stream_rpc_method_handler(
            servicer.Dump, request_deserializer=pb.DumpRequest.FromString,
            response_serializer=pb.DumpChunk.SerializeToString),
    }
    for name, request, response in (
            ("Delete", pb.DeleteRequest, pb.DeleteResponse),
            ("Watermarks", pb.WatermarksRequest, pb.WatermarksResponse),
            ("LoadCheckpoint", pb.LoadCheckpointRequest, pb.LoadCheckpointResponse),
            ("Status", pb.StatusRequest, pb.StatusResponse)):
        handlers[name] = unary(getattr(servicer, name), request_deserializer=request.FromString,
                               response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _credentials(cert_file: str, key_file: str) -> grpc.ServerCredentials | None:
    if not cert_file:
        return None
    with open(cert_file, "rb") as cert, open(key_file, "rb") as key:
        return grpc.ssl_server_credentials([(key.read(), cert.read())])


def serve(servers: Sequence[str | Sequence[str]], shard_index: int, *,
          settings: EmbeddingServerSettings, limits: PacketLimits,
          open_store: Callable[[str], ObjectStore], initial_checkpoint: str = "",
          stop: threading.Event | None = None, replica: int = 0, model: str = "") -> int:
    """Run replica `replica` of shard `shard_index` of `servers` (in shard order: host:port,
    or a list of the shard's replicas) until SIGTERM/SIGINT (or `stop`); returns an exit code.

    open_store(uri) opens the storage a checkpoint lives on (the initial one, and LoadCheckpoint
    calls); model: the model it serves, reported by Status so that a client of another model
    refuses it. Exit 1 if `initial_checkpoint` (empty: start empty) cannot be loaded.
    """
    from persia_inc.embedding_server.checkpoint import load_shard
    from persia_inc.embedding_server.siblings import SiblingWatch
    from persia_inc.embedding_server.table import warm_up

    sets = replica_sets(servers)
    if not 0 <= shard_index < len(sets):
        raise ValueError(f"--shard {shard_index} is outside the {len(sets)} configured servers")
    if not 0 <= replica < len(sets[shard_index]):
        raise ValueError(f"--replica {replica} is outside shard {shard_index}'s "
                         f"{len(sets[shard_index])} configured replicas")
    address = sets[shard_index][replica]
    siblings = [a for i, a in enumerate(sets[shard_index]) if i != replica]
    label = (f"shard {shard_index} replica {replica}" if len(sets[shard_index]) > 1
             else f"shard {shard_index}")
    num_shards = len(sets)
    token = settings.write_token()
    if settings.token_env and not token:
        raise ValueError(f"token_env names {settings.token_env!r} but that variable is empty")

    shard = Shard(capacity=settings.capacity, max_dim=limits.max_dim, shard_index=shard_index,
                  num_shards=num_shards)
    load_lock = threading.Lock()

    def load(uri: str) -> tuple[int, float]:
        with load_lock:
            started = time.monotonic()
            with open_store(uri) as store:
                tables, marks, rows = load_shard(
                    store, shard_index, num_shards, capacity=settings.capacity,
                    limits=limits, log_interval_s=LOAD_LOG_INTERVAL_S)
            shard.install(tables, marks)
            return rows, time.monotonic() - started

    servicer = EmbeddingServicer(shard, shard_index=shard_index, num_shards=num_shards,
                                 token=token, dump_chunk_rows=settings.dump_chunk_rows, loader=load,
                                 max_message_bytes=settings.max_message_bytes, replica=replica,
                                 num_replicas=len(sets[shard_index]), model=model,
                                 regions=RegionMaps() if settings.shared_memory_lookups else None)
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),  # two processes must never share one shard's port
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.workers,
                                                    thread_name_prefix=thread_name(f"shard{shard_index}")),
                         options=options)
    _register(servicer, server)
    health_servicer = HealthService()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    credentials = _credentials(settings.tls_cert_file, settings.tls_key_file)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise OSError(f"cannot bind {address}: {exc}") from exc
    if not port:
        raise OSError(f"cannot bind {address} (in use, or not an address of this host)")

    stop = stop or threading.Event()
    failed = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())

    server.start()
    # one port per process: shard I replica R is the (sum of replicas before I) + R-th
    target = sum(len(r) for r in sets[:shard_index]) + replica
    metrics_port = settings.metrics_port_base + target if settings.metrics_port_base else 0
    if metrics_port:
        host = address.rpartition(":")[0].strip("[]")
        start_http_server(metrics_port, addr=host, registry=servicer.metrics.registry)
    log.info("%s/%d listening on %s (tls %s, write token %s, metrics %s, capacity %s)",
             label, num_shards, address, "on" if credentials else "off",
             "on" if token else "off", metrics_port or "off", settings.capacity or "unbounded")

    def initial_load() -> None:
        uri = initial_checkpoint
        try:
            started = time.monotonic()
            warm_up()
            log.info("shard %d: kernels ready in %.1f s", shard_index, time.monotonic() - started)
            if uri:
                rows, seconds = load(uri)
                log.info("shard %d loaded %d rows from %s in %.1f s", shard_index, rows, uri, seconds)
            else:
                log.info("shard %d: no initial_sparse_checkpoint; starting empty", shard_index)
        except Exception:
            log.exception("shard %d cannot load initial checkpoint %s; exiting", shard_index, uri)
            failed.set()
            stop.set()
            return
        servicer.ready.set()
        servicer.metrics.ready.set(1)
        watch.start()  # SERVING once current (at once without siblings)
        log.info("%s ready", label)

    def on_change(current: bool) -> None:
        servicer.current = current
        servicer.metrics.current.set(1 if current else 0)
        if servicer.ready.is_set():
            status = (health_pb2.HealthCheckResponse.SERVING if current
                      else health_pb2.HealthCheckResponse.NOT_SERVING)
            for name in ("", SERVICE_NAME):
                health_servicer.set(name, status)

    client_credentials = None
    if credentials is not None:
        with open(settings.tls_ca_file or settings.tls_cert_file, "rb") as handle:
            client_credentials = grpc.ssl_channel_credentials(root_certificates=handle.read())
    watch = SiblingWatch(lambda: {(w.table, w.producer): (w.generation, w.sequence)
                                  for w in shard.watermarks()},
                         siblings, max_lag_s=settings.replica_max_lag_s,
                         poll_s=settings.replica_poll_s, on_change=on_change, label=label,
                         credentials=client_credentials)
    servicer.current = watch.current
    servicer.behind_s = lambda: watch.behind_s
    servicer.siblings_up = lambda: watch.siblings_up
    loading = ServiceThread("initial-load", initial_load).start()
    stop.wait()
    # a stop that hangs leaves every thread's stack on stderr (the log) for whoever kills it
    faulthandler.dump_traceback_later(settings.drain_s + settings.grace_s + 5.0, exit=False)
    watch.close()
    health_servicer.enter_graceful_shutdown()  # NOT_SERVING: clients move to a sibling
    if siblings and settings.drain_s and not failed.is_set():
        log.info("%s draining for %.1f s (NOT_SERVING, still answering)", label, settings.drain_s)
        threading.Event().wait(settings.drain_s)
    log.info("%s stopping (grace %.1f s)", label, settings.grace_s)
    stopped = server.stop(settings.grace_s)
    health_servicer.close_watches()  # a health stream would hold the stop for all of grace_s
    stopped.wait()
    loading.close(timeout_s=1.0)  # a load still running is not waited for: the process exits
    log.info("%s stopped", label)
    return 1 if failed.is_set() else 0
