"""Where packets live: local disk, HDFS (WebHDFS) or Ceph (S3), behind one `ObjectStore`.

`open_store(uri)` picks the backend from the URI scheme; backends import their library lazily,
so a missing one fails with an install hint rather than an ImportError three frames deep.
"""

import logging

from persia_inc.foundation.retry import NO_RETRY, RetryPolicy, call_with_retry, is_retriable
from persia_inc.storage.base import ObjectInfo, ObjectStore, StorageKind, check_key
from persia_inc.storage.errors import BackendUnavailableError, StorageError, TransientStorageError
from persia_inc.storage.registry import open_store, storage_kind
from persia_inc.storage.settings import S3_ENDPOINT_ENV, HdfsSettings, S3Settings, resolve_s3_endpoint

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "NO_RETRY",
    "S3_ENDPOINT_ENV",
    "BackendUnavailableError",
    "HdfsSettings",
    "ObjectInfo",
    "ObjectStore",
    "RetryPolicy",
    "S3Settings",
    "StorageError",
    "StorageKind",
    "TransientStorageError",
    "call_with_retry",
    "check_key",
    "is_retriable",
    "open_store",
    "resolve_s3_endpoint",
    "storage_kind",
]
