"""HDFS through WebHDFS (the `hdfs` package): `hdfs://namenode:port/path`.

The port is the NameNode's HTTP port (9870 on Hadoop 3). A put writes a hidden temporary file
and renames it into place, so readers never see a partial packet. WebHDFS RENAME refuses an
existing destination, so replacing an object deletes it first (packets are write-once; only
manifests are ever replaced).
"""

from __future__ import annotations

import functools
import io
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO
from urllib.parse import urlparse

import hdfs
import requests

from persia_inc.foundation.retry import RetryPolicy
from persia_inc.storage.base import ObjectInfo, ObjectStore, TreeEntry, walk_tree
from persia_inc.storage.errors import StorageError, TransientStorageError
from persia_inc.storage.local import TEMP_SUFFIX
from persia_inc.storage.settings import HdfsSettings

_MISSING = {"FileNotFoundException"}
_DENIED = {"AccessControlException", "SecurityException"}
_TRANSIENT = {"StandbyException", "RetriableException", "SafeModeException",
              "ObserverRetryOnActiveException", "ConnectTimeoutException"}


def split_hdfs_uri(uri: str, scheme: str = "http") -> tuple[str, str]:
    """('http://host:port', '/path') of `hdfs://host:port/path`."""
    parsed = urlparse(uri)
    if parsed.scheme != "hdfs" or not parsed.hostname or not parsed.port:
        raise ValueError(f"{uri!r} is not an hdfs://namenode:port/path URI")
    return f"{scheme}://{parsed.hostname}:{parsed.port}", "/" + parsed.path.strip("/")


class HdfsStore(ObjectStore):
    kind = "hdfs"
    parallel_writes = 4  # creates overlap their two round trips (namenode, datanode)

    def __init__(
        self, root_uri: str, retry: RetryPolicy | None = None, settings: HdfsSettings | None = None
    ) -> None:
        super().__init__(root_uri, retry)
        self.settings = settings or HdfsSettings()
        url, self.base = split_hdfs_uri(self.root_uri, self.settings.scheme)
        self._client = hdfs.InsecureClient(
            url, user=self.settings.user or None, timeout=self.settings.timeout_s
        )

    def _path(self, key: str) -> str:
        return posixpath.join(self.base, key) if key else self.base

    @contextmanager
    def _mapped(self, key: str) -> Iterator[None]:
        """Translate by RemoteException class name and requests' exception types."""
        uri = self.location(key)
        try:
            yield
        except hdfs.HdfsError as exc:
            name = exc.exception or ""
            if name in _MISSING:
                raise FileNotFoundError(2, "no such file", uri) from exc
            if name in _DENIED:
                raise PermissionError(13, f"access denied ({name})", uri) from exc
            # No RemoteException body at all means a proxy or gateway answered: transient.
            if name in _TRANSIENT or not name:
                raise TransientStorageError(uri, f"WebHDFS {name or 'error'}") from exc
            raise StorageError(uri, f"WebHDFS {name}") from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise TransientStorageError(uri, f"WebHDFS unreachable: {type(exc).__name__}") from exc

    def _put(self, key: str, data: bytes | memoryview) -> None:
        path = self._path(key)
        folder, name = posixpath.split(path)
        temp = posixpath.join(folder, f".{name}.{uuid.uuid4().hex}{TEMP_SUFFIX}")
        with self._mapped(key):
            self._client.makedirs(folder)
            self._client.write(temp, data=io.BytesIO(data), overwrite=False)
            try:
                if self._client.status(path, strict=False) is not None:
                    self._client.delete(path)
                self._client.rename(temp, path)
            except BaseException:
                self._client.delete(temp)
                raise

    def _get(self, key: str) -> bytes:
        with self._mapped(key), self._client.read(self._path(key)) as reader:
            return reader.read()

    def _open(self, key: str) -> BinaryIO:
        with self._mapped(key):
            response = self._client._open(self._path(key))  # streamed GET after the 307
            return response.raw

    def _list(self, prefix: str, start_after: str | None) -> list[ObjectInfo]:
        with self._mapped(prefix):
            return walk_tree(self._list_dir, prefix, start_after)

    def _list_folders(self, prefix: str) -> list[str]:
        """One LISTSTATUS of `prefix`: its sub-folders (not a walk of the whole tree)."""
        with self._mapped(prefix):
            return sorted(e.name for e in self._list_dir(prefix.rstrip("/"))
                          if e.is_dir and not e.name.startswith("."))

    def _list_dir(self, folder_key: str) -> list[TreeEntry]:
        """One LISTSTATUS: the folder's entries with their sizes (none if it is absent)."""
        try:
            entries = self._client.list(self._path(folder_key), status=True)
        except hdfs.HdfsError as exc:
            if exc.exception == "FileNotFoundException":
                return []
            raise
        return [TreeEntry(name, status["type"] == "DIRECTORY", functools.partial(int, status["length"]))
                for name, status in entries]

    def _delete(self, key: str) -> None:
        with self._mapped(key):
            if not self._client.delete(self._path(key)):
                raise FileNotFoundError(2, "no such file", self.uri(key))

    def _exists(self, key: str) -> bool:
        with self._mapped(key):
            status = self._client.status(self._path(key), strict=False)
        return status is not None and status["type"] == "FILE"
