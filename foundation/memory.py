"""Keep large freed buffers for reuse (glibc malloc), in processes that move big messages.

By default glibc serves every allocation over its mmap threshold (at most 32 MiB, and 128 KiB
until large blocks have been freed) with a mapping of its own and returns it on free. A
process that builds, sends and receives apply messages of megabytes then has the kernel map
and zero fresh pages for every message. `keep_freed_memory` raises the mmap and trim
thresholds and keeps one arena, so such buffers come from the heap and stay there once
freed: the process keeps its peak heap instead of returning it. Measured on 26-table cuts
(bench/embedding_server.py `cuts` against `--default-malloc`): 1.45-1.55x the apply rows/s.
The loader, the embedding servers and both serving frontends turn it on at start, unless
PERSIA_INC_KEEP_FREED_MEMORY=0 (e.g. with another allocator preloaded).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

OPT_OUT = "PERSIA_INC_KEEP_FREED_MEMORY"
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def keep_freed_memory(largest_buffer_bytes: int = 1 << 30) -> bool:
    """Serve allocations up to `largest_buffer_bytes` from malloc's heap and keep freed memory
    there, in one arena (threads' own arenas cannot hold buffers over 64 MiB). False (and
    nothing changed) where the C library is not glibc, or PERSIA_INC_KEEP_FREED_MEMORY=0."""
    if os.environ.get(OPT_OUT, "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    limit = min(largest_buffer_bytes, 2**31 - 1)
    done = all(mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, limit), (_M_TRIM_THRESHOLD, limit)))
    if not done:
        log.info("malloc kept its defaults for large buffers (mallopt refused)")
    return done
