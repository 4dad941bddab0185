"""The remote backends' settings (`persia_inc.s3`, `persia_inc.hdfs`), kept apart from the
backends so that reading a configuration does not import boto3 or hdfs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class S3Settings:
    """Where the S3 gateway is and how to talk to it. Empty fields fall back to boto3's chain.

    endpoint_url: e.g. http://127.0.0.1:7480 (env S3_ENDPOINT_URL or AWS_ENDPOINT_URL if empty).
    """

    endpoint_url: str = ""
    region: str = ""
    access_key_id: str = field(default="", repr=False)
    secret_access_key: str = field(default="", repr=False)
    addressing_style: str = "path"
    multipart_threshold_bytes: int = 64 * 1024 * 1024
    multipart_chunk_bytes: int = 16 * 1024 * 1024
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 30.0


@dataclass(frozen=True, slots=True)
class HdfsSettings:
    """user: the HDFS user for simple auth (empty: the NameNode's default);
    scheme: http or https for WebHDFS; timeout_s: per request."""

    user: str = ""
    scheme: str = "http"
    timeout_s: float = 30.0
