"""One place that turns a URI into an fsspec filesystem: local paths, `file://`, `s3://`.

S3-compatible stores outside AWS (MinIO, Ceph, a moto server in tests) are reached through
`AWS_ENDPOINT_URL` (or `P2P_S3_ENDPOINT_URL`), passed to s3fs explicitly so every process,
Ray workers included, resolves the same endpoint.
"""

from __future__ import annotations

import os

import fsspec

from p2p.errors import P2PError


def storage_options(uri: str) -> dict:
    if not uri.startswith(("s3://", "s3a://")):
        return {}
    endpoint = os.environ.get("P2P_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for `uri`; an unknown scheme is a one-line P2PError."""
    try:
        return fsspec.core.url_to_fs(uri, **storage_options(uri))
    except (ValueError, ImportError) as exc:
        scheme = uri.split("://", 1)[0] if "://" in uri else uri
        raise P2PError(f"{uri}: unsupported storage scheme {scheme!r} ({exc}); use a path, file://... or "
                       f"s3://bucket/prefix") from None


def display(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The path as a user would type it: plain for local files, `s3://...` otherwise."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"
