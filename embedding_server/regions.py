"""Lookup regions: a lookup's signs and rows through shared memory, for a client on the
server's host.

A 128-row request's lookup moves 53k signs out and 3.4 MB of rows back; through gRPC that is
several copies (protobuf framing, the loopback socket, each side's buffers) on the two cores
serving it, about 3 ms of a 7 ms lookup (bench/inference.py). When the server sees the same
/dev/shm as the client (`memory_id`, which each reports: the server in its Status), the client
lends it a region per call instead, as Triton's system shared-memory extension does: a file in
/dev/shm holding the signs, into which the server gathers the rows, and the gRPC messages carry
only names and counts (LookupBlocksRequest.region).

The trust boundary is the user: regions are created 0600 and a server opens only regular files
of its own user, with this module's names, never following a link; a process that can write
them can signal the server anyway. A region a call failed on (a deadline, a failover) is never
used again: the server may still be writing into it.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import secrets
import stat
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

if TYPE_CHECKING:
    from persia_inc.embedding_server._wire import BlocksReply
    from persia_inc.embedding_server.lookup_plan import LookupPlan

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PREFIX = "persia-inc-lookup-"
_NAME = re.compile(r"persia-inc-lookup-(\d+)-[0-9a-f]{32}")
REGION_KEY = "persia-region"  # trailing metadata of a refusal: the region, not the lookup, failed
_ALIGN = 64
_MIN_BYTES = 1 << 20
_FREE_KEPT = 8  # free regions a client keeps for its next calls


class RegionError(Exception):
    """A lookup region this server cannot use (FAILED_PRECONDITION; the client asks again
    without it)."""


def memory_id() -> str:
    """The shared memory this process sees: the boot id and /dev/shm's device and inode (two
    containers of one host have the same boot id but their own /dev/shm). '' when there is
    none to share."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        seen = os.stat(SHM_DIR)
    except OSError:
        return ""
    return f"{boot}:{seen.st_dev}:{seen.st_ino}" if stat.S_ISDIR(seen.st_mode) else ""


def rows_offset(signs: int) -> int:
    """Where a region's rows start, after `signs` signs (64-byte aligned)."""
    return -(-8 * signs // _ALIGN) * _ALIGN


# ------------------------------------------------------------------------------ client side


@dataclass(frozen=True, slots=True)
class Region:
    """One lent file: its name (in SHM_DIR) and its mapping."""

    name: str
    memory: mmap.mmap

    @property
    def size(self) -> int:
        return len(self.memory)

    def signs(self, n: int) -> np.ndarray:
        """uint64[n], writable: the signs at the region's start."""
        return np.frombuffer(self.memory, np.uint64, n)

    def rows(self, signs: int, floats: int) -> np.ndarray:
        """float32[floats]: the rows the server gathered after `signs` signs."""
        return np.frombuffer(self.memory, np.float32, floats, rows_offset(signs))


def _unlink(names: set[str]) -> None:
    mine = f"{PREFIX}{os.getpid()}-"  # a forked child never removes its parent's regions
    for name in list(names):
        names.discard(name)
        if name.startswith(mine):
            with contextlib.suppress(OSError):
                os.unlink(SHM_DIR / name)


def _sweep_dead() -> None:
    """Remove the regions of clients that died without closing (kill -9): the pid in the name
    no longer runs."""
    try:
        entries = list(os.scandir(SHM_DIR))
    except OSError:
        return
    for entry in entries:
        match = _NAME.fullmatch(entry.name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
        except OSError:  # alive, another user's
            pass


class RegionPool:
    """A client's regions: taken per call, given back once the answer is copied out, discarded
    when a call on them failed. Thread-safe; its files are removed by `close`, or at exit."""

    def __init__(self) -> None:
        self._free: list[Region] = []
        self._names: set[str] = set()  # created, not yet removed
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        self._finalizer = weakref.finalize(self, _unlink, self._names)
        _sweep_dead()

    def take(self, nbytes: int) -> Region:
        """A region of at least `nbytes` (a free one, else a new one)."""
        with self._lock:
            if self._pid != os.getpid():  # forked: the free regions are the parent's
                self._pid, self._free = os.getpid(), []
            fits = [r for r in self._free if r.size >= nbytes]
            if fits:
                region = min(fits, key=lambda r: r.size)
                self._free.remove(region)
                return region
        size = max(_MIN_BYTES, 1 << (nbytes - 1).bit_length())
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(16)}"
        fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        with self._lock:
            self._names.add(name)
        try:  # the pages reserved now: a full /dev/shm fails here (ENOSPC), not as SIGBUS later
            os.posix_fallocate(fd, 0, size)
            return Region(name, mmap.mmap(fd, size))
        except OSError:
            self.discard_name(name)
            raise
        finally:
            os.close(fd)

    def give_back(self, region: Region) -> None:
        """`region` is free again (the server has answered and its rows are copied out)."""
        with self._lock:
            if not self._closed and len(self._free) < _FREE_KEPT:
                self._free.append(region)
                return
        self.discard(region)

    def discard(self, region: Region) -> None:
        """Never use `region` again: its file goes (a server may still write into its own
        mapping, which no one reads)."""
        self.discard_name(region.name)

    def discard_name(self, name: str) -> None:
        with self._lock:
            names = {name} & self._names
            self._names.difference_update(names)
        _unlink(names)

    def close(self) -> None:
        """Remove every region's file; a region given back later is discarded."""
        with self._lock:
            self._closed = True
            self._free.clear()
        self._finalizer()


class RegionLender:
    """Which of a client's targets see its shared memory (learned from their Status), and the
    LookupBlocks call that lends them a region."""

    def __init__(self, targets: int, enabled: bool = True) -> None:
        self.memory = memory_id() if enabled else ""
        self.answered = 0  # answers that came back through a region
        self._warned = False
        self._shared = [False] * targets
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
        if not self._shared[target] or None in widths:
            return call(plan.request(shard, num_shards, allow_behind), timeout=timeout)
        assert self._pool is not None
        lo, hi = int(plan.bounds[shard, 0]), int(plan.bounds[shard, -1])
        counts = np.diff(plan.bounds[shard])
        try:
            region = self._pool.take(rows_offset(hi - lo) + 4 * int(counts @ np.asarray(widths, np.int64)))
        except OSError as exc:  # /dev/shm full, or not writable: this call through gRPC
            if not self._warned:
                self._warned = True
                log.warning("cannot create a lookup region in %s (%s); lookups go through gRPC "
                            "until one can be made", SHM_DIR, exc)
            return call(plan.request(shard, num_shards, allow_behind), timeout=timeout)
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
            log.warning("target %d cannot use lookup regions (%s); its lookups go through gRPC",
                        target, exc.details() if hasattr(exc, "details") else exc)
            return call(plan.request(shard, num_shards, allow_behind), timeout=timeout)
        if not reply.in_region:  # it answered in the message (the widths changed)
            self._pool.give_back(region)
            return reply
        lent.append(region)
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
        """The mapping of region `name`; RegionError when it is not a region of this user."""
        if not _NAME.fullmatch(name):
            raise RegionError(f"lookup region {name[:80]!r}: not a region name")
        with self._lock:
            memory = self._maps.get(name)
            if memory is not None:
                self._maps.move_to_end(name)
                return memory
        try:
            fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise RegionError(f"lookup region {name}: cannot open it: {exc.strerror}") from exc
        try:
            seen = os.fstat(fd)
            if not stat.S_ISREG(seen.st_mode) or seen.st_uid != os.getuid() or seen.st_size < _ALIGN:
                raise RegionError(f"lookup region {name}: not a regular file of this user "
                                  f"of at least {_ALIGN} bytes")
            memory = mmap.mmap(fd, seen.st_size)
        finally:
            os.close(fd)
        with self._lock:
            self._maps[name] = memory
            while len(self._maps) > self._kept:  # dropped, not closed: a reply may still view it
                self._maps.popitem(last=False)
        return memory

    def signs(self, memory: mmap.mmap, n: int) -> np.ndarray:
        """A copy of the region's `n` signs (the client may write on; the server reads its
        own); RegionError if the region is too small for them."""
        if 8 * n > len(memory):
            raise RegionError(f"lookup region of {len(memory)} bytes cannot hold {n} signs")
        return np.frombuffer(memory, np.uint64, n).copy()

    @staticmethod
    def rows_space(memory: mmap.mmap, signs: int) -> memoryview:
        """The bytes after `signs` signs, for the rows."""
        return memoryview(memory)[min(rows_offset(signs), len(memory)):]


def trailing_region_error() -> tuple[tuple[str, str], ...]:
    """The trailing metadata of a RegionError's refusal."""
    return ((REGION_KEY, "1"),)


__all__: list[Any] = ["PREFIX", "REGION_KEY", "Region", "RegionError", "RegionLender",
                      "RegionMaps", "RegionPool", "memory_id", "rows_offset",
                      "trailing_region_error"]
