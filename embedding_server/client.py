"""`EmbeddingClient`: route signs to shards, call them in parallel, reassemble in order.

Shard of a sign = `embedding_server.sharding.shard_of(sign, num_shards)`; the calls to the
shards go out together (on the client's threads) and the answer is in request order.

Identity is checked, not assumed: before its first call to a server, and again after it was
unreachable (it may have restarted with another configuration), the client asks it which shard
of how many, and which replica of how many, it is (`Status`), and refuses one that disagrees
with its own list (`ShardIdentityError`). Every Lookup, Apply and Delete also names its shard.

An Apply whose slice for one shard exceeds the message limit is sent in chunks under one apply
id; the server commits them together. A producer's cut is one Apply per shard for all its
tables (`apply_cut`); a model's features are one LookupBlocks call per shard (`lookup_tables`).

Replicas: an entry of `servers` may list several addresses, the replicas of that shard (each a
full copy). Writes go to every replica; the calls that name one server take a *target* index
(`targets`: shard 0's replicas, then shard 1's, ...; with one address per shard, target i is
shard i, as before). A read of a shard goes to one replica (`routing.ReplicaRouter` spreads
them) and, on UNAVAILABLE (down, reset, or catching up), a deadline or an abort, to the next,
all within the call's one deadline; it fails only when no replica of the shard answers. A
catching-up replica refuses reads, so a fresher sibling answers; when every replica of a shard
is catching up, the read is asked again with `allow_behind` and counted (`counters()`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from persia_inc.embedding_server._wire import decode_lookup_blocks_reply, decode_lookup_reply
from persia_inc.embedding_server.errors import (
    ShardError,
    ShardIdentityError,
    WatermarkMovedError,
    identity_mismatch,
)
from persia_inc.embedding_server.health_watch import HealthWatch, wait_serving
from persia_inc.embedding_server.messages import (
    HEADROOM_BYTES,
    ApplyResult,
    apply_chunks,
    cut_chunks,
    cut_messages,
    packet_messages,
    targets_of,
)
from persia_inc.embedding_server.protos import embedding_pb2 as pb
from persia_inc.embedding_server.protos import embedding_pb2_grpc as pb_grpc
from persia_inc.embedding_server.regions import Region, RegionLender
from persia_inc.embedding_server.routing import ReplicaRouter, targets_of_servers
from persia_inc.embedding_server.settings import EmbeddingServerSettings, channel_options
from persia_inc.embedding_server.sharding import group_by_shard
from persia_inc.foundation.threads import run_here, thread_name
from persia_inc.packet_format import Packet, Watermark

if TYPE_CHECKING:
    from persia_inc.embedding_server.lookup_plan import UniqueRows
    from persia_inc.packet_format.cut import Cut

log = logging.getLogger(__name__)

__all__ = ["ApplyResult", "EmbeddingClient", "apply_chunks", "cut_chunks"]

_METHOD = "/persia_inc.embedding.v1.EmbeddingService/"
_IDENTITY_KEYS = ("persia-shard", "persia-num-shards")  # server.IDENTITY_KEYS (no grpc server import)
_MOVED_KEY = "persia-watermark-moved"  # server.MOVED_KEY
_CATCHING_UP_KEY = "persia-catching-up"  # server.CATCHING_UP_KEY
_MAX_DIM = 4096  # the widest row a server accepts (PacketLimits.max_dim's default)
# a cut's message for one shard is at most this big (more goes in chunks): messages over
# glibc's largest mmap threshold (32 MiB) are fresh mappings, page-faulted in at every copy
# (client join, gRPC, server); bench/embedding_server.py `cuts` measures with and without
_CUT_MESSAGE_BYTES = 24 * 1024 * 1024
# codes after which a shard may come back as another process: check its identity again
_RECHECK_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "FAILED_PRECONDITION"})
# codes after which a read goes on to another replica of the shard (down, reset, overloaded,
# catching up, aborted mid-call); others (NOT_FOUND, INVALID_ARGUMENT, identity) are answers
_FAILOVER_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED",
                             "CANCELLED", "INTERNAL", "UNKNOWN"})


class EmbeddingClient:
    """A client of N embedding-server shards (`servers`: in shard order, host:port or a list
    of the shard's replicas).

    token: sent as `authorization: Bearer <token>` on write calls; tls_ca: PEM bytes of the
    roots to trust (None: plaintext); timeout_s: deadline per call (a read's failovers
    included); replica_retry_s: how long a replica that failed is tried last; watch_health:
    with replicas, follow each replica's gRPC health to route reads (`health_watch`).
    Thread-safe. Use as a context manager, or call `close()`.
    """

    def __init__(self, servers: Sequence[str | Sequence[str]], *, token: str = "",
                 tls_ca: bytes | None = None, timeout_s: float = 60.0,
                 max_message_bytes: int = 256 * 1024 * 1024, replica_retry_s: float = 0.5,
                 model: str = "", watch_health: bool = True, shared_memory: bool = True) -> None:
        if not servers:
            raise ValueError("EmbeddingClient needs at least one server")
        self.model = model  # "" : any; else a server reporting another model is refused
        self.servers = tuple(s if isinstance(s, str) else tuple(s) for s in servers)
        self.targets, self._by_shard = targets_of_servers(self.servers)
        self.timeout_s = timeout_s
        self.max_message_bytes = max_message_bytes
        self.router = ReplicaRouter(self._by_shard, replica_retry_s)
        num = len(self.targets)
        self._verified = [False] * num
        self._limits = [max_message_bytes] * num  # lowered to what each server accepts
        self._verify_lock = threading.Lock()
        self._dims: dict[str, int] = {}  # table -> width, as last answered
        self._regions = RegionLender([t.address for t in self.targets], shared_memory)  # same host
        self._write_metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = channel_options(max_message_bytes)
        addresses = [t.address for t in self.targets]
        if tls_ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=tls_ca)
            self._channels = [grpc.secure_channel(a, creds, options=options) for a in addresses]
        else:
            self._channels = [grpc.insecure_channel(a, options=options) for a in addresses]
        self._stubs = [pb_grpc.EmbeddingServiceStub(c) for c in self._channels]
        # the two calls that carry big arrays skip protobuf's copies (see _wire.py)
        self._apply_raw = [c.unary_unary(_METHOD + "Apply", None, pb.ApplyResponse.FromString)
                           for c in self._channels]
        self._lookup_raw = [c.unary_unary(_METHOD + "Lookup", pb.LookupRequest.SerializeToString,
                                          decode_lookup_reply) for c in self._channels]
        self._lookup_blocks_raw = [  # requests written by LookupPlan.request
            c.unary_unary(_METHOD + "LookupBlocks", None, decode_lookup_blocks_reply)
            for c in self._channels]
        self._closed = False
        # the calls to several shards at once run on these threads: a gRPC future starts a
        # thread of its own per call (about 0.3 ms of a two-shard call, bench/embedding_server.py)
        self._pool = ThreadPoolExecutor(4 * num, thread_name_prefix=thread_name("embedding-client"))
        replicated = [(t, self._channels[t]) for ts in self._by_shard if len(ts) > 1 for t in ts]
        self._health = (HealthWatch(replicated, self._health_seen).start()
                        if watch_health and replicated else None)

    def _health_seen(self, target: int, serving: bool | None) -> None:
        """News from the health watch (None: its stream ended, the process may come back as
        another: check its identity again). A replica saying SERVING is checked here, off the
        request path, before reads go back to it."""
        if serving is None:
            self._verified[target] = False
        elif serving and not self._verified[target]:
            try:
                self.verify((target,), timeout_s=min(self.timeout_s, 5.0))
            except ShardError as exc:  # not the replica we list (logged by verify), or gone
                log.debug("target %d said SERVING, but: %s", target, exc)
                serving = False
        self.router.health(target, bool(serving))

    @classmethod
    def from_settings(cls, servers: Sequence[str | Sequence[str]],
                      settings: EmbeddingServerSettings, *, model: str = "") -> EmbeddingClient:
        """A client for `servers` (in shard order: host:port, or a shard's replicas) with the
        token (read from the environment variable `settings.token_env`), TLS roots, deadline,
        message limit and replica retry of `settings`."""
        token = settings.write_token()
        tls_ca = None
        if settings.tls_cert_file:
            with open(settings.tls_ca_file or settings.tls_cert_file, "rb") as handle:
                tls_ca = handle.read()
        return cls(servers, token=token, tls_ca=tls_ca, timeout_s=settings.request_timeout_s,
                   max_message_bytes=settings.max_message_bytes,
                   replica_retry_s=settings.replica_retry_s, model=model,
                   shared_memory=settings.shared_memory_lookups)

    @property
    def num_shards(self) -> int:
        """How many shards (entries of `servers`)."""
        return len(self._by_shard)

    def replicas_of(self, shard: int) -> tuple[int, ...]:
        """The target indices of `shard`'s replicas."""
        return self._by_shard[shard]

    def counters(self) -> dict[str, int]:
        """failovers (reads sent on to another replica), behind_answers (every replica behind),
        region_answers (shard answers that came through a lookup region, `regions.py`)."""
        return {"failovers": self.router.failovers, "behind_answers": self.router.behind_answers,
                "region_answers": self._regions.answered}

    # ---------------------------------------------------------------------------- calls

    def _error(self, target: int, exc: grpc.RpcError) -> ShardError:
        """The ShardError of a failed call to `target` (shard and address of that replica)."""
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = (exc.details() if hasattr(exc, "details") else str(exc)) or ""
        trailing = dict(exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else {}
        if code.name in _RECHECK_CODES and _CATCHING_UP_KEY not in trailing:
            self._verified[target] = False
        t = self.targets[target]
        if _IDENTITY_KEYS[0] in trailing:  # the server refused work that is not its own
            reported = (int(trailing[_IDENTITY_KEYS[0]]), int(trailing.get(_IDENTITY_KEYS[1], 0)))
            return ShardIdentityError(t.shard, t.address, (t.shard, self.num_shards),
                                      reported, details)
        if _MOVED_KEY in trailing:  # a conditional apply found another watermark
            generation, _, sequence = str(trailing[_MOVED_KEY]).partition("-")
            held = (int(generation), int(sequence)) if sequence else None
            return WatermarkMovedError(t.shard, t.address, held, details)
        return ShardError(t.shard, t.address, code.name, details)

    def verify(self, targets: Iterable[int] | None = None, *, force: bool = False,
               timeout_s: float | None = None) -> None:
        """Check that each target's server reports the shard index and count, replica index and
        count our list gives it (targets: default all; only those not yet checked unless
        `force`). Raises ShardIdentityError naming the first that disagrees, ShardError if one
        is unreachable. Called before first use and after a server was unreachable."""
        wanted = range(len(self.targets)) if targets is None else targets
        todo = [t for t in wanted if force or not self._verified[t]]
        if not todo:
            return
        timeout = self.timeout_s if timeout_s is None else timeout_s
        if len(todo) == 1:  # on this thread: a read's failover loop runs on the pool already
            try:
                replies = {todo[0]: self._stubs[todo[0]].Status(pb.StatusRequest(), timeout=timeout)}
            except grpc.RpcError as exc:
                raise self._error(todo[0], exc) from exc
        else:
            replies = self._gather({t: self._start(self._stubs[t].Status, pb.StatusRequest(),
                                                   timeout=timeout) for t in todo})
        num = self.num_shards
        with self._verify_lock:
            for index in todo:
                reply, t = replies[index], self.targets[index]
                mismatch = identity_mismatch(t, len(self._by_shard[t.shard]), num, self.model, reply)
                if mismatch is not None:  # logged there
                    self._verified[index] = False
                    raise mismatch
                if reply.max_message_bytes:
                    self._limits[index] = min(self.max_message_bytes, reply.max_message_bytes)
                self._regions.learn(index, reply.shared_memory)
                self._verified[index] = True

    def _start(self, method: Callable[..., Any], request: Any, **kwargs: Any) -> Future:
        """Call `method` (a blocking unary call) on the client's threads; its future's
        result() is the reply, or raises the grpc.RpcError, as a gRPC future's does."""
        return self._pool.submit(method, request, **kwargs)

    def _gather(self, calls: dict[Any, Future]) -> dict[Any, Any]:
        """Wait for every call (keyed by target, or by a tuple starting with the target, or
        a failover read raising ShardError itself); raise the first failure (after all have
        finished)."""
        results, first = {}, None
        for key, call in calls.items():
            try:
                results[key] = call.result()
            except grpc.RpcError as exc:
                first = first or self._error(key[0] if isinstance(key, tuple) else key, exc)
            except ShardError as exc:
                first = first or exc
        if first is not None:
            raise first
        return results

    def _read(self, shard: int, call: Callable[[int, bool, float], Any]) -> Any:
        """`call(target, allow_behind, timeout_s)` on one replica of `shard`, going on to the
        next on a failover code, all within one `timeout_s`; when every replica refused as
        catching up, once more on those with allow_behind (counted). Raises the last
        ShardError when no replica answers."""
        deadline = time.monotonic() + self.timeout_s
        order = self.router.order(shard)
        last: ShardError | None = None
        for allow_behind in (False, True):
            behind = []
            for k, target in enumerate(order):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                share = remaining / (len(order) - k)  # a hung replica leaves time for the rest
                try:
                    self.verify((target,), timeout_s=share)
                    reply = call(target, allow_behind, deadline - time.monotonic()
                                 if k == len(order) - 1 else share)
                except grpc.RpcError as exc:
                    last = self._error(target, exc)
                    trailing = dict(exc.trailing_metadata() or ()) if hasattr(
                        exc, "trailing_metadata") else {}
                    catching_up = _CATCHING_UP_KEY in trailing
                except ShardError as exc:  # verify: unreachable, or not the replica we list
                    if isinstance(exc, ShardIdentityError) or exc.code not in _FAILOVER_CODES:
                        raise
                    last, catching_up = exc, False
                else:
                    self.router.answered(target, behind=allow_behind)
                    return reply
                if last.code not in _FAILOVER_CODES:
                    raise last
                self.router.failed(target, catching_up)
                if catching_up:
                    behind.append(target)
                if k < len(order) - 1:
                    self.router.failed_over(target)
                    log.debug("shard %d: %s failed (%s); asking another replica", shard,
                              self.targets[target].address, last.code)
            if not behind or deadline <= time.monotonic():
                break
            log.warning("shard %d: every replica is catching up; reading one that is behind",
                        shard)
            order = behind
        if last is None:  # only when the deadline had passed before the first try
            raise ShardError(shard, self.targets[order[0]].address, "DEADLINE_EXCEEDED",
                             f"no time left to read shard {shard}")
        raise last

    def _call(self, target: int, method: str, request: Any, *, write: bool = False) -> Any:
        if method != "Status":
            self.verify((target,))
        try:
            return getattr(self._stubs[target], method)(
                request, timeout=self.timeout_s, metadata=self._write_metadata if write else ())
        except grpc.RpcError as exc:
            raise self._error(target, exc) from exc

    def _dim_of(self, table: str) -> int:
        """The table's width as last seen (0: unknown), asking shard 0 once when unknown."""
        if table not in self._dims:
            status = self._read(0, lambda t, _, timeout: self._stubs[t].Status(
                pb.StatusRequest(), timeout=timeout))
            self._dims.update({t.name: t.dim for t in status.tables})
        return self._dims.get(table, 0)

    def lookup(self, table: str, signs: np.ndarray) -> np.ndarray:
        """Rows of `signs` in request order; unknown signs read as zeros.

        signs: uint64[n] -> float32[n, dim]. Raises ShardError (NOT_FOUND: unknown table).
        A shard's share whose answer would exceed the message limit is asked in pieces.
        """
        signs = np.ascontiguousarray(signs, dtype=np.uint64)
        n, num = signs.shape[0], self.num_shards
        if num == 1:
            order, bounds, grouped = None, np.array([0, n], np.int64), signs
        else:
            order, bounds = group_by_shard(signs, num)
            grouped = signs[order]
        used = [s for s in range(num) if bounds[s + 1] > bounds[s]] or [0]
        step = n or 1
        limit = min(self._limits[t] for t in targets_of(used, self._by_shard))
        if n * 4 * _MAX_DIM > limit:
            dim = self._dims.get(table) or self._dim_of(table)
            if dim:
                step = max(1, (limit - HEADROOM_BYTES) // (4 * dim))
        calls = {}
        for shard in used:
            lo, hi = int(bounds[shard]), int(bounds[shard + 1])
            for start in range(lo, max(hi, lo + 1), step):
                stop = min(hi, start + step)
                data = grouped[start:stop].tobytes()

                def ask(target: int, allow_behind: bool, timeout: float, data: bytes = data,
                        shard: int = shard) -> Any:
                    return self._lookup_raw[target](
                        pb.LookupRequest(table=table, signs=data, shard=shard, num_shards=num,
                                         allow_behind=allow_behind), timeout=timeout)

                calls[(shard, start, stop)] = self._pool.submit(self._read, shard, ask)
        replies = self._gather(calls)
        dim = next(iter(replies.values())).dim
        self._dims[table] = dim
        if len(replies) == 1 and order is None:
            reply = next(iter(replies.values()))
            return reply.rows.reshape(n, dim) if n else np.zeros((0, dim), np.float32)
        out = np.empty((n, dim), np.float32)
        for (shard, start, stop), reply in replies.items():
            if reply.dim != dim:
                raise ShardError(shard, self.targets[self._by_shard[shard][0]].address,
                                 "FAILED_PRECONDITION",
                                 f"table {table!r} has dim {reply.dim} here but {dim} elsewhere")
            if order is None:
                out[start:stop] = reply.rows.reshape(stop - start, dim)
            else:
                out[order[start:stop]] = reply.rows.reshape(stop - start, dim)
        return out

    def lookup_tables(self, signs_by_table: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows of several tables' signs, each table's in request order; unknown signs read as
        zeros. signs_by_table: table -> uint64[n_t]; returns table -> float32[n_t, dim_t].

        `lookup_unique`, with each table's rows copied out in request order."""
        found = self.lookup_unique(signs_by_table)
        return {table: found.table(t) for t, table in enumerate(found.dims)}

    def lookup_unique(self, signs_by_table: Mapping[str, np.ndarray]) -> UniqueRows:
        """Rows of several tables' signs, each distinct (table, sign) once; unknown signs read
        as zeros. signs_by_table: table -> uint64[n_t] (see `UniqueRows` for the answer).

        Each table's signs are deduplicated, and every shard holding any of them is called
        once for all the tables (LookupBlocks, concurrently), so it reads them at one
        consistent point. Raises ShardError (NOT_FOUND naming an unknown table), or
        ShardIdentityError. A shard's answer must fit in one message (for bulk reads of one
        table use `lookup`, which splits).
        """
        # numba loads here, on the first multi-table lookup: importing the client stays light
        from persia_inc.embedding_server.lookup_plan import UniqueRows, plan_tables

        if not signs_by_table:
            return UniqueRows({}, np.empty(0, np.int64), np.zeros(1, np.int64), {})
        num = self.num_shards
        plan = plan_tables(tuple(signs_by_table),
                           [np.ascontiguousarray(s, dtype=np.uint64).ravel()
                            for s in signs_by_table.values()], num)

        widths = [self._dims.get(table) for table in plan.tables]
        lent: list[Region] = []  # lookup regions the answers are in, until copied out

        def ask(target: int, allow_behind: bool, timeout: float) -> Any:  # through a region or not
            return self._regions.ask(target, plan, self.targets[target].shard, num, allow_behind,
                                     widths, self._lookup_blocks_raw[target], timeout, lent)

        placing = plan.placing(widths)  # widths seen

        def read(shard: int) -> Any:  # its block placed on the thread that received it
            return placing.take(shard, self._read(shard, ask))

        first, *others = plan.shards()
        calls = {shard: self._pool.submit(read, shard) for shard in others}
        try:
            calls[first] = run_here(read, first)  # one thread hand-off fewer
            found = plan.assemble(self._gather(calls), lambda shard, message: ShardError(
                shard, self.targets[self._by_shard[shard][0]].address, "FAILED_PRECONDITION",
                message), placing)
        finally:
            self._regions.give_back(lent)  # every answer in them is copied out, or failed
        self._dims.update(found.dims)
        return found

    def apply(self, packet: Packet) -> ApplyResult:
        """Apply a decoded packet: its rows and deletes split by shard, every shard (every
        replica of it) called, so every watermark advances, and acknowledged before this
        returns.

        Idempotent: a packet at or below a shard's watermark changes nothing there.
        Raises ShardError if any shard failed (the others may have applied it: retry);
        ShardIdentityError if a server is not the shard our list says (nothing sent to it).
        A shard's slice over the message limit goes in chunks, committed together by the
        server on the last one (a failure in between leaves that shard as it was).
        """
        return self._apply_all(lambda shards: self._apply_messages(packet, shards))

    def apply_cut(self, cut: Cut) -> ApplyResult:
        """Apply a producer's cut: every table's rows and deletes split by shard, one Apply
        per shard for all the tables (its chunks, when over the message limit), under the
        (lane, producer) watermark. Semantics as `apply`: each shard applies all of the cut
        or none of it; idempotent; ShardError if any shard failed (retry)."""
        return self._apply_all(lambda shards: self._cut_messages(cut, shards))

    def apply_cut_shards(self, cut: Cut, shards: Iterable[int],
                         expect: Mapping[int, tuple[int, int] | None] | None = None
                         ) -> dict[int, bool | ShardError]:
        """`apply_shards` for a cut: apply it to the listed targets (shards, with one replica
        each) only, each on its own; target -> True (applied), False (already held) or the
        ShardError it failed with.

        expect: per target, the position of the cut's stream the caller believes it holds
        (None, or a shard left out: nothing); a shard holding another refuses with
        WatermarkMovedError and writes nothing. One round trip instead of reading the
        watermarks before every apply, and no window between the read and the write (the
        loader's guard against a shard that restarted from an older checkpoint)."""
        return self._apply_each(lambda todo: self._cut_messages(cut, todo, expect), shards)

    def _apply_all(self, build: Callable[[Iterable[int]], dict[int, list[bytes]]]
                   ) -> ApplyResult:
        """Send every target its Apply messages (`build(targets)`); raise the first failure."""
        num = len(self.targets)
        self.verify()
        pending = build(range(num))
        # one round per chunk index: every shard's next chunk goes out together; a shard's
        # chunks go in order, each after the one before was staged
        replies: dict[int, pb.ApplyResponse] = {}
        while pending:
            calls = {shard: self._start(self._apply_raw[shard], messages.pop(0),
                                        timeout=self.timeout_s, metadata=self._write_metadata)
                     for shard, messages in pending.items()}
            for shard, reply in self._gather(calls).items():
                replies[shard] = reply
                if not reply.staged:  # committed, or skipped (already held): no more chunks
                    pending[shard].clear()
            pending = {s: m for s, m in pending.items() if m}
        ordered = [replies[s] for s in range(num)]
        return ApplyResult(applied=tuple(r.applied for r in ordered),
                           inserted=sum(r.inserted for r in ordered),
                           updated=sum(r.updated for r in ordered),
                           deleted=sum(r.deleted for r in ordered))

    def apply_shards(self, packet: Packet, shards: Iterable[int]) -> dict[int, bool | ShardError]:
        """Apply `packet`'s slices to the listed targets (shards, with one replica each)
        only, each on its own: one that is unreachable, or not the server our list says, does
        not stop the others.

        Returns target -> True (applied), False (already held: at or below its watermark), or
        the ShardError it failed with (a ShardIdentityError before anything was sent to it).
        Never raises ShardError. For a caller that keeps each shard's progress and lets a
        shard that was down catch up later (the loader). Chunks as `apply` does.
        """
        return self._apply_each(lambda todo: self._apply_messages(packet, todo), shards)

    def _apply_each(self, build: Callable[[Iterable[int]], dict[int, list[bytes]]],
                    shards: Iterable[int]) -> dict[int, bool | ShardError]:
        """Send each of `shards` its Apply messages (`build(shards)`), each on its own."""
        out: dict[int, bool | ShardError] = {}
        todo = []
        for shard in shards:
            try:
                self.verify((shard,))
            except ShardError as exc:
                out[shard] = exc
            else:
                todo.append(shard)
        pending = build(todo)
        while pending:
            calls = {shard: self._start(self._apply_raw[shard], messages.pop(0),
                                        timeout=self.timeout_s, metadata=self._write_metadata)
                     for shard, messages in pending.items()}
            for shard, call in calls.items():
                try:
                    reply = call.result()
                except grpc.RpcError as exc:
                    out[shard] = self._error(shard, exc)
                    pending[shard].clear()
                    continue
                out[shard] = reply.applied
                if not reply.staged:
                    pending[shard].clear()
            pending = {s: m for s, m in pending.items() if m}
        return out

    def _places(self, targets: Iterable[int], cap: int | None = None) -> dict[int, tuple[int, int]]:
        """target -> (its shard, its message budget: its limit, at most `cap`)."""
        return {t: (self.targets[t].shard, min(self._limits[t], cap or self._limits[t]))
                for t in targets}

    def _apply_messages(self, packet: Packet, targets: Iterable[int]) -> dict[int, list[bytes]]:
        """The Apply messages of `packet` for each of `targets` (chunks in order)."""
        return packet_messages(packet, self.num_shards, self._places(targets))

    def _cut_messages(self, cut: Cut, targets: Iterable[int],
                      expect: Mapping[int, tuple[int, int] | None] | None = None
                      ) -> dict[int, list[bytes]]:
        """The Apply messages of `cut` for each of `targets` (chunks over the cut message
        size), each conditional on `expect[target]` when given."""
        return cut_messages(cut, self.num_shards, self._places(targets, _CUT_MESSAGE_BYTES),
                            expect)

    def delete(self, table: str, signs: np.ndarray) -> int:
        """Delete signs outside any producer stream, on every replica; returns how many rows
        were freed (on one replica of each shard)."""
        signs = np.ascontiguousarray(signs, dtype=np.uint64)
        num = self.num_shards
        self.verify()
        order, bounds = group_by_shard(signs, num)
        grouped = signs[order]
        calls = {
            t.index: self._start(
                self._stubs[t.index].Delete,
                pb.DeleteRequest(table=table, signs=grouped[bounds[t.shard]:bounds[t.shard + 1]]
                                 .tobytes(), shard=t.shard, num_shards=num),
                timeout=self.timeout_s, metadata=self._write_metadata)
            for t in self.targets
        }
        replies = self._gather(calls)
        return sum(replies[r[0]].deleted for r in self._by_shard)

    def shard_watermarks(self, shard: int) -> list[Watermark]:
        """The watermarks of one target (shard, with one replica per shard)."""
        reply = self._call(shard, "Watermarks", pb.WatermarksRequest())
        return [Watermark(w.table, w.producer, w.generation, w.sequence) for w in reply.watermarks]

    def watermarks(self) -> list[Watermark]:
        """Per (table, producer), the lowest watermark over all shards (every replica): what
        every one holds.

        A stream some shard has never applied is left out (that shard holds none of it).
        """
        self.verify()
        calls = {s: self._start(self._stubs[s].Watermarks, pb.WatermarksRequest(), timeout=self.timeout_s)
                 for s in range(len(self.targets))}
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
                if counts[(t, p)] == len(self.targets)]

    def status(self, shard: int) -> pb.StatusResponse:
        """Tables (rows, bytes, misses), watermarks, readiness, replica state and uptime of one
        target (shard, with one replica per shard)."""
        return self._call(shard, "Status", pb.StatusRequest())

    def load_checkpoint(self, uri: str) -> int:
        """Make every shard (every replica) replace its tables with its share of the
        checkpoint at `uri`; returns the rows loaded over all shards (one replica each)."""
        self.verify()
        calls = {s: self._start(self._stubs[s].LoadCheckpoint, pb.LoadCheckpointRequest(uri=uri),
                                timeout=self.timeout_s, metadata=self._write_metadata)
                 for s in range(len(self.targets))}
        replies = self._gather(calls)
        return sum(replies[r[0]].rows for r in self._by_shard)

    def dump(self, shard: int, table: str, chunk_rows: int = 0
             ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every live row of `table` on target `shard` (a shard, with one replica per shard):
        (signs: uint64[k], rows: float32[k, dim])."""
        self.verify((shard,))
        stream = self._stubs[shard].Dump(pb.DumpRequest(table=table, chunk_rows=chunk_rows),
                                         timeout=self.timeout_s, metadata=self._write_metadata)
        try:
            for chunk in stream:
                signs = np.frombuffer(chunk.signs, "<u8")
                yield signs, np.frombuffer(chunk.rows, "<f4").reshape(signs.shape[0], chunk.dim)
        except grpc.RpcError as exc:
            raise self._error(shard, exc) from exc

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Block until every target's health service says SERVING (every replica current);
        TimeoutError otherwise. The identities are checked again before the next call (the
        servers may have restarted).

        gRPC's own readiness, no polling (`health_watch.wait_serving`)."""
        wait_serving(self._channels, [f"shard {t.shard} ({t.address})" for t in self.targets],
                     timeout_s)
        self._verified = [False] * len(self.targets)

    # ---------------------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Close every channel; safe to call twice."""
        if not self._closed:
            self._closed = True
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._regions.close()
            if self._health is not None:
                self._health.close()
            for channel in self._channels:
                channel.close()

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
