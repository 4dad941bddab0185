"""Lookup regions: a lookup's signs and rows through shared memory, for a client on the
server's host.

A 128-row request's lookup moves 53k signs out and 3.4 MB of rows back; through gRPC that is
several copies (protobuf framing, the loopback socket, each side's buffers) on the two cores
serving it, about a quarter of the request (bench/inference.py measures both). When the server
runs on the client's host, in its process namespace (`memory_id`, which each reports: the
server in its Status), the client lends it a region per call instead, as Triton's system
shared-memory extension does: an anonymous memory file (memfd) holding a random token and the
signs, into which the server gathers the rows; the gRPC messages carry only its place
(`pid:fd:token`) and counts (LookupBlocksRequest.region). The server opens it through
/proc/PID/fd/FD and maps it once.

Nothing is left behind: a memfd has no name in any folder and goes with the last process
holding it (a client killed with -9 included). The trust boundary is the user: the server
opens only memfds made by this module whose first bytes are the token named in the request
(a reused descriptor number then never matches); a process that can reach them can signal the
server anyway. A region a call failed on is never used again: the server may still be writing
into it.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np

if TYPE_CHECKING:
    from persia_inc.embedding_server._wire import BlocksReply
    from persia_inc.embedding_server.lookup_plan import LookupPlan

log = logging.getLogger(__name__)

MEMFD_NAME = "persia-inc-lookup"
REGION_KEY = "persia-region"  # trailing metadata of a refusal: the region, not the lookup, failed
_NAME = re.compile(r"(\d{1,10}):(\d{1,10}):([0-9a-f]{32})")
_TOKEN_BYTES = 16
_HEAD = 64  # the token, then the signs from here (rows 64-byte aligned after them)
_MIN_BYTES = 1 << 20
_FREE_KEPT = 8  # free regions a client keeps for its next calls


class RegionError(Exception):
    """A lookup region this server cannot use (FAILED_PRECONDITION; the client asks again
    without it)."""


def memory_id() -> str:
    """Where this process can reach another's memory files: the boot id and the process
    namespace (/proc/PID means the same process to both). '' when there is no such place."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return f"{boot}:{namespace}" if hasattr(os, "memfd_create") else ""


def rows_offset(signs: int) -> int:
    """Where a region's rows start, after its token and `signs` signs (64-byte aligned)."""
    return _HEAD + -(-8 * signs // 64) * 64


# ------------------------------------------------------------------------------ client side


@dataclass(frozen=True, slots=True)
class Region:
    """One lent memory file: its place (`pid:fd:token`), descriptor and mapping."""

    name: str
    fd: int
    memory: mmap.mmap

    @property
    def size(self) -> int:
        return len(self.memory)

    def signs(self, n: int) -> np.ndarray:
        """uint64[n], writable: the signs, after the token."""
        return np.frombuffer(self.memory, np.uint64, n, _HEAD)

    def rows(self, signs: int, floats: int) -> np.ndarray:
        """float32[floats]: the rows the server gathered after `signs` signs."""
        return np.frombuffer(self.memory, np.float32, floats, rows_offset(signs))


def _new_region(size: int) -> Region:
    """A memory file of `size` bytes, its pages reserved (a full memory limit fails here, not
    as SIGBUS at a write), its token written."""
    fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
    try:
        os.posix_fallocate(fd, 0, size)
        memory = mmap.mmap(fd, size)
    except OSError:
        os.close(fd)
        raise
    token = secrets.token_bytes(_TOKEN_BYTES)
    memory[:_TOKEN_BYTES] = token
    return Region(f"{os.getpid()}:{fd}:{token.hex()}", fd, memory)


class RegionPool:
    """A client's regions: taken per call, given back once the answer is copied out, discarded
    when a call on them failed. Thread-safe."""

    def __init__(self) -> None:
        self._free: list[Region] = []
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()

    def take(self, nbytes: int) -> Region:
        """A region of at least `nbytes` (a free one, else a new one)."""
        with self._lock:
            if self._pid != os.getpid():  # forked: the free regions are the parent's too
                self._pid, self._free = os.getpid(), []
            fits = [r for r in self._free if r.size >= nbytes]
            if fits:
                region = min(fits, key=lambda r: r.size)
                self._free.remove(region)
                return region
        return _new_region(max(_MIN_BYTES, 1 << (nbytes - 1).bit_length()))

    def give_back(self, region: Region) -> None:
        """`region` is free again (the server has answered and its rows are copied out)."""
        with self._lock:
            if not self._closed and len(self._free) < _FREE_KEPT and self._pid == os.getpid():
                self._free.append(region)
                return
        self.discard(region)

    @staticmethod
    def discard(region: Region) -> None:
        """Never use `region` again: its descriptor closes (its memory goes with the last
        mapping; a server may still write into its own, which no one reads)."""
        os.close(region.fd)

    def close(self) -> None:
        """Close every free region; a region given back later is discarded."""
        with self._lock:
            self._closed = True
            free, self._free = self._free, []
        for region in free:
            self.discard(region)


class RegionLender:
    """Which of a client's targets see its shared memory (learned from their Status), and the
    LookupBlocks call that lends them a region."""

    def __init__(self, addresses: Sequence[str], enabled: bool = True) -> None:
        self.memory = memory_id() if enabled else ""
        self.answered = 0  # answers that came back through a region
        self._addresses = tuple(addresses)  # per target, for the logs
        self._counting = threading.Lock()
        self._warned = False
        self._shared = [False] * len(addresses)
        self._pool = RegionPool() if self.memory else None

    def learn(self, target: int, reported: str) -> None:
        """`target`'s Status said it sees `reported` shared memory ('' : it takes no regions)."""
        self._shared[target] = bool(self.memory) and reported == self.memory

    def lends_to(self, target: int) -> bool:
        return self._shared[target]

    def ask(self, target: int, plan: LookupPlan, shard: int, num_shards: int, allow_behind: bool,
            widths: Sequence[int | None], call: Callable[..., BlocksReply], timeout: float,
            lent: list[Region]) -> BlocksReply:
        """`call` (the target's LookupBlocks) for `shard`'s share of `plan`, through a region
        when the target sees this host's shared memory and every table's width is known
        (`widths`, to size it): the reply's rows are then a view on the region, which is
        appended to `lent` (give each back with `give_back` once copied out). A target that
        cannot use the region is asked again in the message, and not lent regions again."""

        def in_message() -> BlocksReply:
            return call(plan.request(shard, num_shards, allow_behind), timeout=timeout)

        if not self._shared[target] or None in widths:
            return in_message()
        assert self._pool is not None
        lo, hi = int(plan.bounds[shard, 0]), int(plan.bounds[shard, -1])
        counts = np.diff(plan.bounds[shard])
        try:
            region = self._pool.take(rows_offset(hi - lo) + 4 * int(counts @ np.asarray(widths, np.int64)))
        except OSError as exc:  # out of memory, or of descriptors: this call through gRPC
            if not self._warned:
                self._warned = True
                log.warning("cannot create a lookup region (%s); lookups go through gRPC until "
                            "one can be made", exc)
            return in_message()
        region.signs(hi - lo)[:] = plan.grouped[lo:hi]
        try:
            reply = call(plan.request(shard, num_shards, allow_behind, region=region.name),
                         timeout=timeout)
        except grpc.RpcError as exc:
            self._pool.discard(region)
            trailing = dict(exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else {}
            if REGION_KEY not in trailing:
                raise
            self._shared[target] = False
            log.warning("%s cannot use lookup regions (%s); its lookups go through gRPC",
                        self._addresses[target], exc.details() if hasattr(exc, "details") else exc)
            return in_message()
        if not reply.in_region:  # it answered in the message (the widths changed)
            self._pool.give_back(region)
            return reply
        lent.append(region)
        with self._counting:  # two shards' answers may arrive at once
            self.answered += 1
        floats = int(counts @ reply.dims) if reply.dims.shape == counts.shape else 0
        if rows_offset(hi - lo) + 4 * floats > region.size:
            floats = 0  # assemble names the shard: it answered the wrong number of rows
        return replace(reply, rows=region.rows(hi - lo, floats))

    def give_back(self, lent: list[Region]) -> None:
        if self._pool is not None:
            for region in lent:
                self._pool.give_back(region)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()


# ------------------------------------------------------------------------------ server side


class RegionMaps:
    """A server's mappings of the regions clients lent it, the most recently used kept."""

    def __init__(self, kept: int = 64) -> None:
        self.memory = memory_id()
        self._maps: OrderedDict[str, mmap.mmap] = OrderedDict()
        self._kept = kept
        self._lock = threading.Lock()

    def open(self, name: str) -> mmap.mmap:
        """The mapping of region `name` (`pid:fd:token`); RegionError when it cannot be
        reached or is not that region."""
        match = _NAME.fullmatch(name)
        if match is None:
            raise RegionError(f"lookup region {name[:80]!r}: not a region's place (pid:fd:token)")
        with self._lock:
            memory = self._maps.get(name)
            if memory is not None:
                self._maps.move_to_end(name)
                return memory
        pid, fd, token = match.groups()
        try:
            handle = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise RegionError(f"lookup region {name}: cannot open it: {exc.strerror}") from exc
        try:  # what was opened, not what the path named a moment before
            opened = os.readlink(f"/proc/self/fd/{handle}")
            seen = os.fstat(handle)
            if (not opened.startswith(f"/memfd:{MEMFD_NAME} ") or not stat.S_ISREG(seen.st_mode)
                    or seen.st_size < _HEAD):
                raise RegionError(f"lookup region {name}: not a lookup region ({opened[:80]})")
            memory = mmap.mmap(handle, seen.st_size)
        finally:
            os.close(handle)
        if memory[:_TOKEN_BYTES] != bytes.fromhex(token):
            raise RegionError(f"lookup region {name}: its token is another (a reused descriptor)")
        with self._lock:
            self._maps[name] = memory
            while len(self._maps) > self._kept:  # dropped, not closed: a reply may still view it
                self._maps.popitem(last=False)
        return memory

    @staticmethod
    def signs(memory: mmap.mmap, n: int) -> np.ndarray:
        """A copy of the region's `n` signs (the client may write on; the server reads its
        own); RegionError if the region is too small for them."""
        if _HEAD + 8 * n > len(memory):
            raise RegionError(f"lookup region of {len(memory)} bytes cannot hold {n} signs")
        return np.frombuffer(memory, np.uint64, n, _HEAD).copy()

    @staticmethod
    def rows_space(memory: mmap.mmap, signs: int) -> memoryview:
        """The bytes after `signs` signs, for the rows."""
        return memoryview(memory)[min(rows_offset(signs), len(memory)):]


__all__ = ["MEMFD_NAME", "REGION_KEY", "Region", "RegionError", "RegionLender", "RegionMaps",
           "RegionPool", "memory_id", "rows_offset"]
