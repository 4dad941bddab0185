"""Local disk (`/path` or `file:///path`): temp file + fsync + rename + fsync of the folder.

Writes that come with a size hint (the producer's packets) bypass the page cache: the producer
never reads its packets back, keeping them would only evict what the training job needs, and
they are stored sooner (bench/results/producer.json: the demo's packets 37 ms after their flush
at p50 and 76 ms at p99, vs 44 and 151 ms through the page cache). Other writes (checkpoints,
tools) stay cached for readers on the same host.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import mmap
import os
import stat
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

import numpy as np

from persia_inc.foundation.retry import RetryPolicy
from persia_inc.storage.base import (
    NotAnObjectError,
    ObjectInfo,
    ObjectStat,
    ObjectStore,
    TreeEntry,
    check_key,
    walk_tree,
)
from persia_inc.storage.errors import StorageError, TransientStorageError

log = logging.getLogger(__name__)
TEMP_SUFFIX = ".tmp"
# a full disk clears when space is freed: retried (back-pressure bounds memory), never dropped
_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE,
                     errno.ENOSPC, errno.EDQUOT}
_PAGE = 4096
_HUGE_PAGE = 2 * 1024 * 1024
_KEPT_SCRATCH_MAX = 64 * 1024 * 1024  # a writer thread keeps its scratch memory up to this size
_REPORTED_MAX = 100_000  # keys remembered as reported non-objects (then forgotten, re-reported)
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO never blocks
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "other"


def _aligned_empty(size: int) -> np.ndarray:
    """An uninitialized uint8[size] whose first byte is page aligned (what O_DIRECT asks).

    Blocks of a huge page or more are their own mapping, offered to transparent huge pages
    (Linux, THP "madvise" or "always"): a 7 MB packet then pins 4 pages for a direct write
    instead of ~1800, which cut the write's CPU time by about 40% on the VMs we measured."""
    if size >= _HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
        mapping = mmap.mmap(-1, -(-size // _PAGE) * _PAGE,
                            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        with contextlib.suppress(OSError):  # THP "never", or a kernel without it
            mapping.madvise(mmap.MADV_HUGEPAGE)
        return np.frombuffer(mapping, dtype=np.uint8)[:size]  # unmapped with its last view
    raw = np.empty(size + _PAGE, dtype=np.uint8)
    offset = (-raw.ctypes.data) % _PAGE
    return raw[offset:offset + size]


def local_root(uri: str) -> Path:
    """The folder a plain path or `file://` URI names."""
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{uri!r}: file:// URIs must be local (file:///path)")
        return Path(unquote(parsed.path))
    return Path(uri)


class LocalStore(ObjectStore):
    """Objects are the regular files below the root. Nothing else is one: a symlink (never
    followed, below the root: it could lead anywhere), a FIFO, socket or device is skipped by
    listings, absent to `exists`, and refused by `get`, `open` and `stat` (`NotAnObjectError`)
    without ever being opened in a way that could block; each is logged once and reported to
    `on_not_object`."""

    kind = "local"
    parallel_writes = 1  # one O_DIRECT write at a time already keeps up (bench/results/producer.json)

    def __init__(self, root_uri: str, retry: RetryPolicy | None = None) -> None:
        self.root = local_root(root_uri).absolute()
        self._direct_io = True  # until the folder refuses O_DIRECT
        self.direct_writes = True  # size-hinted writes by O_DIRECT (bench/producer.py compares)
        self._hint_overflowed = False
        self._reported: set[str] = set()
        self._scratch = threading.local()  # per writing thread: its page-aligned block, reused
        super().__init__(root_uri, retry)

    def _path(self, key: str) -> Path:
        return self.root / key

    @contextmanager
    def _mapped(self, key: str, *, reading: bool = True) -> Iterator[None]:
        """Translate OSError to the built-ins and StorageError, naming the URI.

        A path component that is a file means "absent" to a reader, but a failure to a writer.
        """
        try:
            yield
        except (FileNotFoundError, PermissionError, StorageError):
            raise
        except (IsADirectoryError, NotADirectoryError, FileExistsError) as exc:
            if not reading:
                raise StorageError(self.location(key), f"cannot write here: {exc.strerror}") from exc
            if isinstance(exc, NotADirectoryError):
                raise FileNotFoundError(errno.ENOENT, "no such object", self.location(key)) from exc
            raise FileNotFoundError(errno.ENOENT, "a folder, not an object", self.location(key)) from exc
        except OSError as exc:
            error = TransientStorageError if exc.errno in _TRANSIENT_ERRNOS else StorageError
            raise error(self.location(key), os.strerror(exc.errno or 0) or str(exc)) from exc

    def _put(self, key: str, data: bytes | memoryview) -> None:
        path = self._path(key)
        with self._mapped(key, reading=False):
            created = self._make_parents(path.parent)
            temp = self._temp_path(path)
            try:
                with open(temp, "xb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                self._publish(temp, path, created)
            except BaseException:
                temp.unlink(missing_ok=True)
                raise

    @contextmanager
    def writer(self, key: str, size_hint: int = 0) -> Iterator[BinaryIO]:
        """Stream into the temporary file itself (no in-memory copy), then fsync and rename.

        With a size_hint, encode into page-aligned memory instead and write it with
        O_DIRECT: no page-cache pages to fill and write back, on cores the writer shares with
        training (see the module docstring for what it gains). Folders that refuse O_DIRECT
        (older tmpfs, some FUSE mounts) get a plain write of the same memory. Each writing
        thread keeps its block (up to 64 MB) for its next object: fresh memory costs the kernel
        a fault and a zeroing per page, 1.3 ms of CPU for a 9.5 MB packet against 0.45 ms to
        fill a kept block (bench/results/producer.json, "decisions")."""
        check_key(key)
        if size_hint > 0 and self.direct_writes and not self._hint_overflowed:
            scratch, kept = self._take_scratch(-(-size_hint // _PAGE) * _PAGE)
            try:
                yield from self._write_from_memory(key, scratch)
            finally:
                if kept:
                    self._scratch.busy = False
            return
        yield from self._stream_to_file(key)

    def _take_scratch(self, size: int) -> tuple[np.ndarray, bool]:
        """(page-aligned uint8[size], whether it is this thread's kept block, to give back by
        clearing `busy`); a nested write on the same thread gets fresh memory."""
        state = self._scratch
        if getattr(state, "busy", False) or size > _KEPT_SCRATCH_MAX:
            return _aligned_empty(size), False
        block: np.ndarray | None = getattr(state, "block", None)
        if block is None or block.size < size:
            block = state.block = _aligned_empty(size)
        state.busy = True
        return block[:size], True

    def _stream_to_file(self, key: str) -> Iterator[BinaryIO]:
        import pyarrow as pa

        path = self._path(key)
        with self._mapped(key, reading=False):
            created = self._make_parents(path.parent)
            temp = self._temp_path(path)
            sink = pa.OSFile(str(temp), mode="w")  # Arrow's native file: no Python copies
        try:
            yield sink
            with self._mapped(key, reading=False):
                sink.close()
                fd = os.open(temp, os.O_RDONLY)  # fsync flushes the file, whichever fd asks
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                self._publish(temp, path, created)
        finally:
            if not sink.closed:
                sink.close()
            temp.unlink(missing_ok=True)

    def _write_from_memory(self, key: str, scratch: np.ndarray) -> Iterator[BinaryIO]:
        import pyarrow as pa

        sink = pa.FixedSizeBufferWriter(pa.py_buffer(scratch))
        try:
            yield sink
        except OSError:  # the block only writes to memory: this is Arrow's "out of bounds"
            self._hint_overflowed = True
            log.warning("an object for %s outgrew its size hint of %d bytes; writing "
                        "through the page cache from now on", self.location(key), scratch.size)
            raise
        path = self._path(key)
        with self._mapped(key, reading=False):
            created = self._make_parents(path.parent)
            temp = self._temp_path(path)
            try:
                self._write_file(temp, scratch.data, sink.tell())
                self._publish(temp, path, created)
            except BaseException:
                temp.unlink(missing_ok=True)
                raise

    def _write_file(self, temp: Path, data: memoryview, size: int) -> None:
        """Write data[:size] to a new file, durably: O_DIRECT in whole pages (`data` is page
        aligned and whole pages long), then truncated to `size`."""
        fd = -1
        if self._direct_io:
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o666)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct_io = False
                log.info("%s does not support O_DIRECT; writing through the page cache", self.root)
        direct = fd >= 0
        if not direct:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            end = -(-size // _PAGE) * _PAGE
            done = 0
            while done < end:  # a write may stop short
                done += os.write(fd, data[done:end])
            os.ftruncate(fd, size)
            if direct:
                os.fsync(fd)
            else:
                _sync_and_drop_pages(fd)
        finally:
            os.close(fd)

    def _temp_path(self, path: Path) -> Path:
        return path.with_name(f".{path.name}.{uuid.uuid4().hex}{TEMP_SUFFIX}")

    def _publish(self, temp: Path, path: Path, created: list[Path]) -> None:
        os.replace(temp, path)
        for folder in [path.parent, *created]:
            _fsync_dir(folder)

    def _make_parents(self, folder: Path) -> list[Path]:
        """mkdir -p; returns the parents of newly made folders (whose entries must be synced)."""
        missing = []
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for path in reversed(missing):
            path.mkdir(exist_ok=True)
        return [path.parent for path in missing]

    def _not_object(self, key: str, kind: str) -> NotAnObjectError:
        """Log (once per key) and report a key that is not an object; the error to raise."""
        if key not in self._reported:
            if len(self._reported) >= _REPORTED_MAX:
                self._reported.clear()
            self._reported.add(key)
            log.warning("%s is a %s, not a regular file: skipped, never read (symlinks are "
                        "never followed)", self.location(key), kind)
            if self.on_not_object is not None:
                self.on_not_object(key, kind)
        return NotAnObjectError(self.location(key), kind)

    def _open_regular(self, key: str) -> tuple[int, os.stat_result]:
        """An fd of the regular file at `key`, reached from the root without following a
        symlink (every folder opened with O_NOFOLLOW, relative to its parent), and its fstat.
        Anything else is refused before it is opened (a FIFO's open could block) or right
        after a non-blocking open (it was swapped in between)."""
        *folders, name = key.split("/")
        try:
            dir_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise FileNotFoundError(errno.ENOENT, "no such object", self.location(key)) from exc
        try:
            for index, folder in enumerate(folders):
                try:
                    fd = os.open(folder, _DIR_FLAGS, dir_fd=dir_fd)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    mode = os.stat(folder, dir_fd=dir_fd, follow_symlinks=False).st_mode
                    if stat.S_ISLNK(mode):
                        raise self._not_object("/".join(folders[:index + 1]), "symlink") from exc
                    raise FileNotFoundError(errno.ENOENT, "no such object", self.location(key)) from exc
                os.close(dir_fd)
                dir_fd = fd
            mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            if not stat.S_ISREG(mode):
                if stat.S_ISDIR(mode):
                    raise IsADirectoryError(errno.EISDIR, "a folder", self.location(key))
                raise self._not_object(key, _kind(mode))
            fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if isinstance(exc, StorageError):
                raise
            if exc.errno == errno.ELOOP:  # a symlink swapped in after the stat
                raise self._not_object(key, "symlink") from exc
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise FileNotFoundError(errno.ENOENT, "no such object", self.location(key)) from exc
            raise
        finally:
            os.close(dir_fd)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # swapped for a FIFO between the stat and the open
            os.close(fd)
            raise self._not_object(key, _kind(info.st_mode))
        return fd, info

    def _read_regular(self, key: str) -> np.ndarray:
        """The bytes of the regular file at `key`: uint8[size], read (not memory-mapped: a
        file truncated in place under a map would kill the reader with SIGBUS)."""
        fd, info = self._open_regular(key)
        try:
            data = np.empty(info.st_size, dtype=np.uint8)
            done = 0
            while done < data.size:
                got = os.readv(fd, [data.data[done:]])
                if got == 0:
                    return data[:done]  # shrank while read: what was there
                done += got
            return data
        finally:
            os.close(fd)

    def _get(self, key: str) -> bytes:
        with self._mapped(key):
            return self._read_regular(key).tobytes()

    def _open(self, key: str) -> BinaryIO:
        """A reader over the file's bytes, read once into memory the packet's arrays view
        (one copy, no Python bytes). Only regular files are opened (see the class)."""
        import pyarrow as pa

        with self._mapped(key):
            return pa.BufferReader(pa.py_buffer(self._read_regular(key)))

    def _stat(self, key: str) -> ObjectStat:
        with self._mapped(key):
            fd, info = self._open_regular(key)
            os.close(fd)
            return ObjectStat(info.st_size, info.st_mtime_ns, info.st_ino)

    def _list(self, prefix: str, start_after: str | None) -> list[ObjectInfo]:
        with self._mapped(prefix):
            return walk_tree(self._list_dir, prefix, start_after)

    def _list_dir(self, folder_key: str) -> list[TreeEntry]:
        """Folders and regular files of one folder. Symlinks, FIFOs, sockets and devices are
        not objects: skipped (and reported once, see `_not_object`)."""
        try:
            entries = list(os.scandir(self.root / folder_key if folder_key else self.root))
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                out.append(TreeEntry(entry.name, True, lambda: 0))
            elif entry.is_file(follow_symlinks=False):
                out.append(TreeEntry(entry.name, False, functools.partial(_file_size, entry)))
            elif not entry.name.startswith("."):
                with contextlib.suppress(OSError):  # gone already: nothing to report
                    key = f"{folder_key}/{entry.name}" if folder_key else entry.name
                    self._not_object(key, _kind(entry.stat(follow_symlinks=False).st_mode))
        return out

    def _list_folders(self, prefix: str) -> list[str]:
        with self._mapped(prefix):
            return sorted(e.name for e in self._list_dir(prefix.rstrip("/"))
                          if e.is_dir and not e.name.startswith("."))

    def _delete(self, key: str) -> None:
        with self._mapped(key):
            self._path(key).unlink()

    def _exists(self, key: str) -> bool:
        """A regular file reached without a symlink; a non-object reads as absent (and is
        reported once)."""
        try:
            with self._mapped(key):
                fd, _ = self._open_regular(key)
                os.close(fd)
                return True
        except (FileNotFoundError, NotAnObjectError):
            return False


def _sync_and_drop_pages(fd: int) -> None:
    """fsync `fd`, then let the kernel reuse its (now clean) page-cache pages."""
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_size(entry: os.DirEntry[str]) -> int:
    """A listed file's size, read only when a listing asks (the entry's own stat, no symlinks)."""
    return entry.stat(follow_symlinks=False).st_size
