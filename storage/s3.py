"""Ceph RADOS Gateway (or any S3) through boto3: `s3://bucket/prefix`.

A single PUT, or a multipart upload above `multipart_threshold_bytes`, is atomic per object.
Credentials come from `S3Settings` or boto3's standard chain (AWS_ACCESS_KEY_ID, ...); they
are never logged. boto3's own retries are off: `storage.retry` decides, in one place.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO
from urllib.parse import urlparse

import boto3
import botocore.config
import botocore.exceptions
from boto3.s3.transfer import TransferConfig

from persia_inc.foundation.retry import RetryPolicy
from persia_inc.storage.base import ObjectInfo, ObjectStore
from persia_inc.storage.errors import StorageError, TransientStorageError
from persia_inc.storage.settings import S3Settings, resolve_s3_endpoint

_MISSING = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "AllAccessDisabled"}
_TRANSIENT = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
              "ServiceUnavailable", "InternalError", "RequestTimeTooSkewed", "503", "500"}


class _MemoryReader(io.RawIOBase):
    """A seekable read-only stream over a buffer: botocore sends it without first copying a
    packet-sized `bytes` (memoryview alone is not an accepted Body)."""

    def __init__(self, data: bytes | memoryview) -> None:
        super().__init__()
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, target: bytearray | memoryview) -> int:  # type: ignore[override]
        chunk = self._view[self._pos: self._pos + len(target)]
        target[: len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(self._pos + size, len(self._view))
        chunk = self._view[self._pos:end]
        self._pos = end
        return chunk  # type: ignore[return-value]  # a view: http.client sends it as is

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def split_s3_uri(uri: str) -> tuple[str, str]:
    """('bucket', 'prefix') of `s3://bucket/prefix`."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"{uri!r} is not an s3://bucket/prefix URI")
    return parsed.netloc, parsed.path.strip("/")


class S3Store(ObjectStore):
    kind = "ceph"
    parallel_writes = 4  # puts overlap their round trips (bench/results/producer.json)

    def __init__(
        self, root_uri: str, retry: RetryPolicy | None = None, settings: S3Settings | None = None
    ) -> None:
        super().__init__(root_uri, retry)
        self.bucket, self.base = split_s3_uri(self.root_uri)
        self.settings = settings or S3Settings()
        s = self.settings
        endpoint = resolve_s3_endpoint(s.endpoint_url) or None
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            region_name=s.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            aws_access_key_id=s.access_key_id or None,
            aws_secret_access_key=s.secret_access_key or None,
            config=botocore.config.Config(
                retries={"total_max_attempts": 1},
                s3={"addressing_style": s.addressing_style},
                connect_timeout=s.connect_timeout_s,
                read_timeout=s.read_timeout_s,
                max_pool_connections=32,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        self._transfer = TransferConfig(
            multipart_threshold=s.multipart_threshold_bytes,
            multipart_chunksize=s.multipart_chunk_bytes,
            use_threads=True,
        )

    def _object(self, key: str) -> str:
        return f"{self.base}/{key}" if self.base else key

    @contextmanager
    def _mapped(self, key: str) -> Iterator[None]:
        """Translate botocore errors by code and type; never by message text."""
        uri = self.location(key)
        try:
            yield
        except botocore.exceptions.ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in _MISSING or status == 404:
                raise FileNotFoundError(2, f"no such object ({code or status})", uri) from exc
            if code in _DENIED or status == 403:
                raise PermissionError(13, f"access denied ({code or status})", uri) from exc
            if code in _TRANSIENT or status >= 500 or status == 429:
                raise TransientStorageError(uri, f"S3 {code or status}") from exc
            raise StorageError(uri, f"S3 {code or status}") from exc
        except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError,
                botocore.exceptions.ResponseStreamingError,
                botocore.exceptions.IncompleteReadError) as exc:
            raise TransientStorageError(uri, f"S3 endpoint unreachable: {type(exc).__name__}") from exc
        except botocore.exceptions.NoCredentialsError as exc:
            raise PermissionError(13, "no S3 credentials configured", uri) from exc

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (tests, the demo, first deployment)."""
        with self._mapped(""):
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except botocore.exceptions.ClientError as exc:
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
                    raise
                self._client.create_bucket(Bucket=self.bucket)

    def _put(self, key: str, data: bytes | memoryview) -> None:
        with self._mapped(key):
            if len(data) <= self.settings.multipart_threshold_bytes:
                self._client.put_object(Bucket=self.bucket, Key=self._object(key),
                                        Body=_MemoryReader(data))
            else:
                self._client.upload_fileobj(
                    _MemoryReader(data), self.bucket, self._object(key), Config=self._transfer
                )

    def _get(self, key: str) -> bytes:
        with self._mapped(key):
            return self._client.get_object(Bucket=self.bucket, Key=self._object(key))["Body"].read()

    def _open(self, key: str) -> BinaryIO:
        with self._mapped(key):
            return self._client.get_object(Bucket=self.bucket, Key=self._object(key))["Body"]

    def _list(self, prefix: str, start_after: str | None) -> list[ObjectInfo]:
        base = self._object("") if self.base else ""
        if base and not base.endswith("/"):
            base += "/"
        request = {"Bucket": self.bucket, "Prefix": base + prefix}
        if start_after is not None:
            request["StartAfter"] = base + start_after
        found = []
        with self._mapped(prefix):
            for page in self._client.get_paginator("list_objects_v2").paginate(**request):
                for item in page.get("Contents", []):
                    found.append(ObjectInfo(item["Key"][len(base):], int(item["Size"])))
        return found

    def _list_folders(self, prefix: str) -> list[str]:
        """One delimiter listing of `prefix`: its common prefixes (not every key below)."""
        base = self._object("") if self.base else ""
        if base and not base.endswith("/"):
            base += "/"
        names = []
        with self._mapped(prefix):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base + prefix, Delimiter="/")
            for page in pages:
                for common in page.get("CommonPrefixes", []):
                    names.append(common["Prefix"][len(base + prefix):].rstrip("/"))
        return sorted(n for n in names if n and not n.startswith("."))

    def _delete(self, key: str) -> None:
        with self._mapped(key):
            self._client.head_object(Bucket=self.bucket, Key=self._object(key))
            self._client.delete_object(Bucket=self.bucket, Key=self._object(key))

    def _exists(self, key: str) -> bool:
        try:
            with self._mapped(key):
                self._client.head_object(Bucket=self.bucket, Key=self._object(key))
        except FileNotFoundError:
            return False
        return True

    def close(self) -> None:
        super().close()
        self._client.close()
