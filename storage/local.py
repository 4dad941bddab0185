"""Local disk (`/path` or `file:///path`): temp file + fsync + rename + fsync of the folder."""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

from storage.base import ObjectInfo, ObjectStore, check_key
from storage.errors import StorageError, TransientStorageError
from storage.retry import RetryPolicy

TEMP_SUFFIX = ".tmp"
_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE}


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
            temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{TEMP_SUFFIX}")
            try:
                with open(temp, "xb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temp, path)
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
            for folder in [path.parent, *created]:
                _fsync_dir(folder)

    @contextmanager
    def writer(self, key: str) -> Iterator[BinaryIO]:
        """Stream into the temporary file itself (no in-memory copy), then fsync and rename."""
        import pyarrow as pa

        check_key(key)
        path = self._path(key)
        with self._mapped(key, reading=False):
            created = self._make_parents(path.parent)
            temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{TEMP_SUFFIX}")
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
                os.replace(temp, path)
                for folder in [path.parent, *created]:
                    _fsync_dir(folder)
        finally:
            if not sink.closed:
                sink.close()
            temp.unlink(missing_ok=True)

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
        folder_key, _, _ = prefix.rpartition("/")
        found: list[ObjectInfo] = []
        with self._mapped(prefix):
            self._walk(self.root / folder_key if folder_key else self.root,
                       folder_key + "/" if folder_key else "", prefix, start_after, found)
        found.sort()
        return found

    def _walk(
        self, folder: Path, key_prefix: str, prefix: str, start_after: str | None,
        found: list[ObjectInfo],
    ) -> None:
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue  # temp files of puts in flight, and hidden files
            key = key_prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                sub = key + "/"
                if not (sub.startswith(prefix) or prefix.startswith(sub)):
                    continue
                if start_after is not None and sub < start_after and not start_after.startswith(sub):
                    continue  # every key below sorts before start_after
                self._walk(Path(entry.path), sub, prefix, start_after, found)
            elif (entry.is_file(follow_symlinks=False) and key.startswith(prefix)
                  and (start_after is None or key > start_after)):
                found.append(ObjectInfo(key, entry.stat(follow_symlinks=False).st_size))

    def _delete(self, key: str) -> None:
        with self._mapped(key):
            self._path(key).unlink()

    def _exists(self, key: str) -> bool:
        with self._mapped(key):
            return self._path(key).is_file()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
