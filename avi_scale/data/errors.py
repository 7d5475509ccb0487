"""Errors raised by the data layer.

Every message names what is wrong and where: the shard URL, the sample key, the member, the bucket.
Each class takes a single message argument so that a DataLoader worker can re-raise it unchanged in
the main process.
"""

from __future__ import annotations


class DataError(RuntimeError):
    """Base class of every error raised by :mod:`avi_scale.data`."""


class ManifestError(DataError):
    """The manifest is missing, unreadable or does not describe the requested shards."""


class ShardError(DataError):
    """A shard or one of its samples is corrupt: truncated tar, missing/undecodable member, wrong shape."""


class StorageError(DataError):
    """The storage refused or failed: missing bucket/object, rejected credentials, server unreachable."""


class NotFoundError(StorageError):
    """The file or object does not exist (the bucket, if any, does)."""
