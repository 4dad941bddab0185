"""Local disk (`/path` or `file:///path`): temp file + fsync + rename + fsync of the folder.

Writes that come with a size hint (the producer's packets) bypass the page cache: the producer
never reads its packets back, keeping them would only evict what the training job needs, and
filling fresh page-cache pages cost its writer thread ~10x the CPU of the write itself on the
VMs we measured (bench/producer.py). Other writes (checkpoints, tools) stay cached for readers
on the same host.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

import numpy as np

from persia_inc.foundation.retry import RetryPolicy
from persia_inc.storage.base import ObjectInfo, ObjectStore, TreeEntry, check_key, walk_tree
from persia_inc.storage.errors import StorageError, TransientStorageError

log = logging.getLogger(__name__)
TEMP_SUFFIX = ".tmp"
# a full disk clears when space is freed: retried (back-pressure bounds memory), never dropped
_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE,
                     errno.ENOSPC, errno.EDQUOT}
_PAGE = 4096
_HUGE_PAGE = 2 * 1024 * 1024


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
    kind = "local"

    def __init__(self, root_uri: str, retry: RetryPolicy | None = None) -> None:
        self.root = local_root(root_uri).absolute()
        self._direct_io = True  # until the folder refuses O_DIRECT
        self.direct_writes = True  # size-hinted writes by O_DIRECT (bench/producer.py compares)
        self._hint_overflowed = False
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
        except (FileNotFoundError, PermissionError):
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
        training. The demo's packets were stored sooner for it (bench/results/producer.json:
        freshness p50 -11 ms, p99 -41 ms). Folders that refuse O_DIRECT (older tmpfs, some FUSE
        mounts) get a plain write of the same memory."""
        check_key(key)
        if size_hint > 0 and self.direct_writes and not self._hint_overflowed:
            yield from self._write_from_memory(key, _aligned_empty(-(-size_hint // _PAGE) * _PAGE))
            return
        yield from self._stream_to_file(key)

    def _stream_to_file(self, key: str) -> Iterator[BinaryIO]:
        import pyarrow as pa

        path = self._path(key)
        with self._mapped(key, reading=False):
            created = self._make_parents(path.parent)
            temp = self._temp_path(path)
            sink = pa.OSFile(str(temp), mode="w")  # Arrow's native file: no Python copies
        try:
            yield sink  # type: ignore[misc]
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
            yield sink  # type: ignore[misc]
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
                self._write_file(temp, memoryview(scratch), sink.tell())
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

    def _get(self, key: str) -> bytes:
        with self._mapped(key):
            return self._path(key).read_bytes()

    def _open(self, key: str) -> BinaryIO:
        """A read-only memory map: zero-copy for Arrow readers. Safe because objects are
        replaced by rename, never rewritten in place."""
        import pyarrow as pa

        with self._mapped(key):
            path = self._path(key)
            if path.is_dir():
                raise IsADirectoryError(errno.EISDIR, "a folder", str(path))
            return pa.memory_map(str(path), "r")  # type: ignore[return-value]

    def _list(self, prefix: str, start_after: str | None) -> list[ObjectInfo]:
        with self._mapped(prefix):
            return walk_tree(self._list_dir, prefix, start_after)

    def _list_dir(self, folder_key: str) -> list[TreeEntry]:
        """Folders and regular files of one folder (symlinks and the like are not objects)."""
        try:
            entries = list(os.scandir(self.root / folder_key if folder_key else self.root))
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                out.append(TreeEntry(entry.name, True, lambda: 0))
            elif entry.is_file(follow_symlinks=False):
                out.append(TreeEntry(entry.name, False,
                                     lambda e=entry: e.stat(follow_symlinks=False).st_size))
        return out

    def _delete(self, key: str) -> None:
        with self._mapped(key):
            self._path(key).unlink()

    def _exists(self, key: str) -> bool:
        with self._mapped(key):
            return self._path(key).is_file()


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
