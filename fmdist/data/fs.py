"""One resolver for every location fmdist reads or writes: local paths and s3:// URIs.

S3 goes through pyarrow's S3FileSystem built here rather than `FileSystem.from_uri`, so that the
standard AWS settings apply to every access, pyarrow's included: the credential chain (environment,
AWS_PROFILE, instance roles), AWS_REGION / AWS_DEFAULT_REGION, and AWS_ENDPOINT_URL for S3-compatible
stores (MinIO, moto). Transient errors (503 SlowDown, resets, timeouts) are retried with backoff by the
AWS SDK's standard retry strategy, up to FMDIST_S3_MAX_ATTEMPTS attempts, then fail loudly.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

import pyarrow.fs as pafs

S3_MAX_ATTEMPTS_ENV = "FMDIST_S3_MAX_ATTEMPTS"
# Settings workers need to reach the same store; credentials are left to each machine's own chain.
AWS_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")


def s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=int(os.environ.get(S3_MAX_ATTEMPTS_ENV, "10"))),
    }
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URI."""
    if uri.startswith("s3://"):
        return s3_filesystem(), uri.removeprefix("s3://").rstrip("/")
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def aws_env() -> dict[str, str]:
    """The AWS settings of this process that Ray workers and tasks must share (no secrets)."""
    return {k: os.environ[k] for k in AWS_SETTINGS if k in os.environ}
