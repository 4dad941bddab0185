"""`ObjectStore`: the few primitives every backend implements, and what is built on them once.

Keys are relative to the store's root URI, '/'-separated, never absolute, never '..'.
Backends implement `_put` (atomic), `_get`, `_open`, `_list`, `_delete`, `_exists`;
retries, key checks and logging live here.
"""

from __future__ import annotations

import builtins
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, ClassVar, Literal, TypeVar

from persia_inc.foundation.retry import RetryPolicy, call_with_retry
from persia_inc.storage.errors import StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")
StorageKind = Literal["local", "hdfs", "ceph"]


@dataclass(frozen=True, slots=True, order=True)
class ObjectInfo:
    """One stored object: its key (relative to the store root) and size in bytes."""

    key: str
    size: int


@dataclass(frozen=True, slots=True)
class ObjectStat:
    """What tells one version of an object from the next: size in bytes, modification time
    (ns since the epoch) and the file's identity (inode; 0 where the backend has none). Two
    stats of the same key that differ mean its bytes may have changed in between."""

    size: int
    mtime_ns: int
    ident: int = 0


class NotAnObjectError(StorageError):
    """The key names something that is not an object: a symlink (never followed), a FIFO, a
    socket, a device. Never retried: it will not become a regular file by waiting.
    `kind`: "symlink", "fifo", "socket", "device" or "other"."""

    def __init__(self, uri: str, kind: str) -> None:
        super().__init__(uri, f"a {kind}, not a regular file: refused (only regular files are "
                         "objects; symlinks are never followed)", retriable=False)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class TreeEntry:
    """One entry of a folder, as a backend's folder lister reports it to `walk_tree`.

    size: the object's size in bytes, asked only of files the walk keeps (a stat may cost)."""

    name: str
    is_dir: bool
    size: Callable[[], int]


def walk_tree(list_dir: Callable[[str], Iterable[TreeEntry]], prefix: str,
              start_after: str | None) -> list[ObjectInfo]:
    """`ObjectStore._list` for folder-tree backends (local disk, HDFS), written once.

    list_dir(folder_key) -> the entries of that folder ("" is the root), empty if it does not
    exist. Hidden names (temporary files of puts in flight) are skipped, and so are folders
    that cannot hold a key under `prefix` sorting after `start_after`. Returns key order.
    """
    found: list[ObjectInfo] = []

    def walk(folder_key: str) -> None:
        key_prefix = folder_key + "/" if folder_key else ""
        for entry in list_dir(folder_key):
            if entry.name.startswith("."):
                continue  # temp files of puts in flight, and hidden files
            key = key_prefix + entry.name
            if entry.is_dir:
                sub = key + "/"
                if not (sub.startswith(prefix) or prefix.startswith(sub)):
                    continue
                if start_after is not None and sub < start_after and not start_after.startswith(sub):
                    continue  # every key below sorts before start_after
                walk(key)
            elif key.startswith(prefix) and (start_after is None or key > start_after):
                found.append(ObjectInfo(key, entry.size()))

    walk(prefix.rpartition("/")[0])
    found.sort()
    return found


def check_key(key: str, *, allow_empty: bool = False) -> str:
    """Return `key` if it is a safe relative key, else raise ValueError."""
    if not isinstance(key, str):
        raise ValueError(f"storage key must be a string, got {type(key).__name__}")
    if key == "" and allow_empty:
        return key
    parts = key.split("/")
    trailing_ok = allow_empty and parts[-1] == ""  # a prefix may end in '/'
    body = parts[:-1] if trailing_ok else parts
    if not body or any(p in ("", ".", "..") for p in body) or "\\" in key or "\0" in key:
        raise ValueError(f"invalid storage key {key!r}: want relative 'a/b/c' without '..'")
    return key


class ObjectStore(ABC):
    """A root URI under which objects are put, got, listed and deleted."""

    kind: ClassVar[StorageKind]
    parallel_writes: ClassVar[int] = 1
    """How many packets a producer stores at once on this backend by default (its
    `max_inflight`): more hides a remote store's round trip; measured in bench/producer.py."""

    def __init__(self, root_uri: str, retry: RetryPolicy | None = None) -> None:
        self.root_uri = root_uri.rstrip("/")
        self.retry = retry or RetryPolicy()
        self.stop = threading.Event()  # set by close(): cuts retry waits short
        self.retries = 0  # retried calls so far, for metrics
        # called once per key found to be a symlink, FIFO, socket or device (backends where
        # that can happen: local disk): on_not_object(key, kind); the loader counts them
        self.on_not_object: Callable[[str, str], None] | None = None

    # --- primitives --------------------------------------------------------------------

    @abstractmethod
    def _put(self, key: str, data: bytes | memoryview) -> None:
        """Store `data` at `key` atomically: readers see all of it or nothing."""

    @abstractmethod
    def _get(self, key: str) -> bytes: ...

    @abstractmethod
    def _open(self, key: str) -> BinaryIO: ...

    @abstractmethod
    def _list(self, prefix: str, start_after: str | None) -> list[ObjectInfo]:
        """Objects whose key starts with `prefix` and sorts after `start_after`, in key order."""

    @abstractmethod
    def _delete(self, key: str) -> None: ...

    @abstractmethod
    def _exists(self, key: str) -> bool: ...

    def _stat(self, key: str) -> ObjectStat | None:
        """The object's `ObjectStat`, or None where objects are only ever published whole
        (S3 PUT, HDFS rename): nothing there is ever seen half written."""
        return None

    def _list_folders(self, prefix: str) -> list[str]:
        """Names of the folders one level below `prefix` ("" or ending in '/'), sorted.
        This default derives them from a full listing; backends that can list one level
        (a folder, an S3 delimiter listing) override it."""
        names = {info.key[len(prefix):].partition("/")[0] for info in self._list(prefix, None)
                 if "/" in info.key[len(prefix):]}
        return sorted(n for n in names if not n.startswith("."))

    # --- public face -------------------------------------------------------------------

    def uri(self, key: str) -> str:
        """The full URI of `key`."""
        return f"{self.root_uri}/{check_key(key)}"

    def location(self, key_or_prefix: str) -> str:
        """A URI for messages: `uri` without validation, for prefixes too."""
        return f"{self.root_uri}/{key_or_prefix}" if key_or_prefix else self.root_uri

    def key_of(self, uri: str) -> str:
        """Inverse of `uri`: the key of a URI under this root; ValueError if it is outside."""
        prefix = self.root_uri + "/"
        if not uri.startswith(prefix):
            raise ValueError(f"{uri!r} is not under {self.root_uri!r}")
        return check_key(uri[len(prefix):])

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Atomically store `data` at `key` (replacing any object there)."""
        check_key(key)
        view = memoryview(data).cast("B")
        self._retrying(f"put {self.uri(key)} ({view.nbytes} bytes)", lambda: self._put(key, view))

    @contextmanager
    def writer(self, key: str, size_hint: int = 0) -> Iterator[BinaryIO]:
        """A binary sink whose contents are stored atomically at `key` when the block exits
        cleanly, and discarded when it raises. Saves a copy of large objects where the
        backend can stream (local disk writes straight into the temporary file).

        size_hint: an upper bound of the bytes the block writes, when the caller knows one;
        local disk then encodes into reused aligned memory and writes it with direct I/O."""
        import pyarrow as pa  # a dependency of the project; only needed here

        check_key(key)
        sink = pa.BufferOutputStream()
        yield sink
        self.put(key, sink.getvalue())

    def get(self, key: str) -> bytes:
        """The whole object at `key`; FileNotFoundError if absent."""
        check_key(key)
        return self._retrying(f"get {self.uri(key)}", lambda: self._get(key))

    def open(self, key: str) -> BinaryIO:
        """A readable binary stream of the object at `key` (opening is retried, reads are not)."""
        check_key(key)
        return self._retrying(f"open {self.uri(key)}", lambda: self._open(key))

    def list(self, prefix: str = "", start_after: str | None = None) -> list[ObjectInfo]:
        """Objects under `prefix` whose key sorts strictly after `start_after`, in key order.

        Temporary objects of unfinished puts are never listed.
        """
        check_key(prefix, allow_empty=True)
        return self._retrying(
            f"list {self.root_uri}/{prefix} after {start_after!r}",
            lambda: self._list(prefix, start_after),
        )

    def delete(self, key: str) -> None:
        """Remove the object at `key`; FileNotFoundError if absent."""
        check_key(key)
        self._retrying(f"delete {self.uri(key)}", lambda: self._delete(key))

    def warm_up(self) -> None:
        """One cheap request (is there an object at a key that is never written), so that the
        first packet does not pay for opening a connection and the service's first-request
        costs (on a fresh Ceph bucket the first object request took about 90 ms here, the
        next ones 3 ms). Best effort and never retried: a failure is logged (the retrying
        calls that follow meet it again), never raised."""
        try:
            self._exists("_warm_up")
        except Exception as exc:  # an outage here is the next call's to handle
            log.info("warming up %s: %s: %s (the next call retries)", self.root_uri,
                     type(exc).__name__, exc)

    def exists(self, key: str) -> bool:
        """Whether an object is at `key`. Outages raise; they never read as 'absent'."""
        check_key(key)
        return self._retrying(f"exists {self.uri(key)}", lambda: self._exists(key))

    def stat(self, key: str) -> ObjectStat | None:
        """The object's size, modification time and identity, to notice a file still being
        written or rewritten in place; None where objects are published whole.
        FileNotFoundError if absent; NotAnObjectError for a symlink, FIFO, socket, device."""
        check_key(key)
        return self._retrying(f"stat {self.uri(key)}", lambda: self._stat(key))

    def list_folders(self, prefix: str = "") -> builtins.list[str]:
        """The folder names one level below `prefix` ("" or ending in '/'): a cheap look at
        the top of a tree (which models have packets here), not a full listing where the
        backend can avoid one. Hidden names are skipped."""
        check_key(prefix, allow_empty=True)
        if prefix and not prefix.endswith("/"):
            raise ValueError(f"list_folders: prefix {prefix!r} must be empty or end with '/'")
        return self._retrying(f"list folders of {self.location(prefix)}",
                              lambda: self._list_folders(prefix))

    def close(self) -> None:
        """Stop pending retries and release connections; safe to call twice."""
        self.stop.set()

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root_uri!r})"

    def _retrying(self, describe: str, operation: Callable[[], T]) -> T:
        def count(_exc: BaseException, _attempt: int) -> None:
            self.retries += 1

        return call_with_retry(operation, self.retry, describe, stop=self.stop, on_retry=count)
