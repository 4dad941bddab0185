"""URI scheme -> backend class, imported only when a URI of that scheme is opened."""

from __future__ import annotations

import importlib

from persia_inc.foundation.retry import RetryPolicy
from persia_inc.storage.base import ObjectStore, StorageKind
from persia_inc.storage.errors import BackendUnavailableError
from persia_inc.storage.settings import HdfsSettings, S3Settings

# scheme: (module, class, storage kind, pip package that provides its library)
_BACKENDS: dict[str, tuple[str, str, StorageKind, str]] = {
    "file": ("persia_inc.storage.local", "LocalStore", "local", ""),
    "hdfs": ("persia_inc.storage.hdfs", "HdfsStore", "hdfs", "hdfs"),
    "s3": ("persia_inc.storage.s3", "S3Store", "ceph", "boto3"),
}


def _scheme(uri: str) -> str:
    head, sep, _ = uri.partition("://")
    if not sep:
        return "file"  # a plain path
    if head not in _BACKENDS:
        raise ValueError(
            f"unsupported storage URI {uri!r}: use a path, file://, hdfs://host:port/path "
            "or s3://bucket/prefix"
        )
    return head


def storage_kind(uri: str) -> StorageKind:
    """The `storage:` value (local, hdfs, ceph) that a URI implies."""
    return _BACKENDS[_scheme(uri)][2]


def open_store(
    uri: str,
    *,
    retry: RetryPolicy | None = None,
    s3: S3Settings | None = None,
    hdfs: HdfsSettings | None = None,
) -> ObjectStore:
    """Open the store rooted at `uri`. `s3` (S3Settings) and `hdfs` (HdfsSettings) configure
    their backends; `retry` the shared retry policy."""
    module_name, class_name, _, package = _BACKENDS[_scheme(uri)]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailableError(
            uri, f"the {package!r} package is missing: pip install {package}"
        ) from exc
    cls = getattr(module, class_name)
    settings = {"s3": s3, "hdfs": hdfs}.get(_scheme(uri))
    return cls(uri, retry) if settings is None else cls(uri, retry, settings=settings)
