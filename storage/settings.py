"""The remote backends' settings (`persia_inc.s3`, `persia_inc.hdfs`), kept apart from the
backends so that reading a configuration does not import boto3 or hdfs."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from persia_inc.foundation.fields import check_fields, one_of, positive

# Where an empty `S3Settings.endpoint_url` is looked up, first match wins: ours, then the
# standard AWS variables in botocore's own order (service-specific before global).
S3_ENDPOINT_ENV = ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


@dataclass(frozen=True, slots=True)
class S3Settings:
    """Where the S3 gateway is and how to talk to it. Empty fields fall back to boto3's chain.

    endpoint_url: e.g. http://127.0.0.1:7480; if empty, `resolve_s3_endpoint` reads the
    environment (S3_ENDPOINT_URL, then AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL).
    """

    endpoint_url: str = ""
    """The S3 gateway, e.g. `http://127.0.0.1:7480`; empty: env `S3_ENDPOINT_URL`, then
    `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, then AWS."""
    region: str = ""
    """The region (empty: boto3's default chain)."""
    access_key_id: str = field(default="", repr=False)
    """Access key (empty: the standard `AWS_*` variables); never logged."""
    secret_access_key: str = field(default="", repr=False)
    """Secret key (empty: the standard `AWS_*` variables); never logged."""
    addressing_style: str = "path"
    """`path` (bucket in the path, what Ceph's gateway serves) or `virtual`."""
    multipart_threshold_bytes: int = 64 * 1024 * 1024
    """Objects larger than this are uploaded in parts."""
    multipart_chunk_bytes: int = 16 * 1024 * 1024
    """The size of one uploaded part."""
    connect_timeout_s: float = 3.0
    """Longest wait to connect to the gateway."""
    read_timeout_s: float = 30.0
    """Longest wait for a reply once connected."""

    def __post_init__(self) -> None:
        check_fields(self)  # in code as from YAML: FieldError naming the key
        one_of("addressing_style", self.addressing_style, ("path", "virtual", "auto"))
        for key in ("multipart_threshold_bytes", "multipart_chunk_bytes", "connect_timeout_s",
                    "read_timeout_s"):
            positive(key, getattr(self, key))


def resolve_s3_endpoint(configured: str = "", environ: Mapping[str, str] | None = None) -> str:
    """The S3 endpoint to use: `configured` (config file or flag) if set, else the first set
    of S3_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL; "" means boto3's default (AWS).

    Like botocore, AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true turns the two AWS_* variables off.
    """
    if configured:
        return configured
    env = os.environ if environ is None else environ
    ignore_aws = env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").strip().lower() == "true"
    for name in S3_ENDPOINT_ENV:
        if ignore_aws and name.startswith("AWS_"):
            continue
        value = env.get(name, "").strip()
        if value:
            return value
    return ""


@dataclass(frozen=True, slots=True)
class HdfsSettings:
    """How to reach WebHDFS (`persia_inc.hdfs`); checks itself when given (`foundation.fields`)."""

    user: str = ""
    """The HDFS user for simple auth (empty: the NameNode's default)."""
    scheme: Literal["http", "https"] = "http"
    """How WebHDFS is spoken: http or https."""
    timeout_s: float = 30.0
    """Seconds per WebHDFS request."""

    def __post_init__(self) -> None:
        check_fields(self)
        positive("timeout_s", self.timeout_s)
