"""Where converted shards go: a local directory or an S3 prefix, behind one small interface.

Both stores write through temporary names (a rename on disk, a single upload on S3), so a shard appears
under its final name only when complete; :mod:`data_tools.writer` builds on that for crash safety.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from avi_scale.data import openers
from avi_scale.data.errors import NotFoundError, StorageError


class ConvertError(RuntimeError):
    """The conversion cannot proceed (output state, arguments); the message says what to do."""


class LocalStore:
    """A local output directory; files appear atomically (write to a hidden temp file, then rename)."""

    def __init__(self, root: str):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.location = str(self.root)

    def temp_path(self, name: str) -> Path:
        return self.root / f".{name}.partial"

    def put_file(self, name: str, path: Path) -> None:
        os.replace(path, self.root / name)

    def put_bytes(self, name: str, data: bytes) -> None:
        temp = self.temp_path(name)
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, self.root / name)

    def get_bytes(self, name: str) -> Optional[bytes]:
        path = self.root / name
        return path.read_bytes() if path.is_file() else None

    def size(self, name: str) -> Optional[int]:
        path = self.root / name
        return path.stat().st_size if path.is_file() else None

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_file())

    def clean_temporaries(self) -> None:
        for name in self.names():
            if name.startswith(".") and name.endswith(".partial"):
                self.delete(name)

    def close(self) -> None:
        self.clean_temporaries()


class S3Store:
    """``s3://bucket/prefix``: shards are staged in a local temp dir and uploaded whole (never partial)."""

    def __init__(self, url: str, endpoint_url: Optional[str], staging: Optional[str] = None):
        if endpoint_url:
            openers.configure(endpoint_url=endpoint_url)
        self.bucket, prefix = openers.parse_s3_url(url)
        self.prefix = prefix.strip("/")
        self.location = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.client = openers.s3_client()
        try:
            openers.s3_call(self.location, lambda: self.client.head_bucket(Bucket=self.bucket))
        except NotFoundError:
            raise StorageError(f"S3 bucket {self.bucket!r} does not exist at "
                               f"{openers.endpoint_url() or 'the AWS default endpoint'}; create it first") from None
        self._temp = Path(tempfile.mkdtemp(prefix="avi-shards-", dir=staging))

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _request(self, method: str, name: str, **kwargs: Any) -> Any:
        """One retried S3 call about object ``name``."""
        key = self._key(name)
        return openers.s3_call(f"s3://{self.bucket}/{key}",
                               lambda: getattr(self.client, method)(Bucket=self.bucket, Key=key, **kwargs))

    def temp_path(self, name: str) -> Path:
        return self._temp / name

    def put_file(self, name: str, path: Path) -> None:
        key = self._key(name)

        def upload() -> Any:
            with open(path, "rb") as f:  # reopened on each attempt
                return self.client.put_object(Bucket=self.bucket, Key=key, Body=f)

        openers.s3_call(f"s3://{self.bucket}/{key}", upload)
        path.unlink()

    def put_bytes(self, name: str, data: bytes) -> None:
        self._request("put_object", name, Body=data)

    def get_bytes(self, name: str) -> Optional[bytes]:
        try:
            return self._request("get_object", name)["Body"].read()
        except NotFoundError:
            return None

    def size(self, name: str) -> Optional[int]:
        try:
            return int(self._request("head_object", name)["ContentLength"])
        except NotFoundError:
            return None

    def delete(self, name: str) -> None:
        self._request("delete_object", name)

    def names(self) -> list[str]:
        prefix = f"{self.prefix}/" if self.prefix else ""

        def listing() -> list[str]:
            paginator = self.client.get_paginator("list_objects_v2")
            pages = paginator.paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/")
            return [item["Key"] for page in pages for item in page.get("Contents", [])]

        return sorted(key[len(prefix):] for key in openers.s3_call(self.location, listing))

    def clean_temporaries(self) -> None:
        """Uploads are atomic: a crash leaves nothing half-written in the bucket."""

    def close(self) -> None:
        shutil.rmtree(self._temp, ignore_errors=True)


def open_store(out: str, endpoint_url: Optional[str], staging: Optional[str] = None) -> LocalStore | S3Store:
    """The store of ``--out``; ``staging``: where an S3 store stages its shards (default: a new temp dir)."""
    if out.startswith("s3://"):
        return S3Store(out, endpoint_url, staging)
    if "://" in out:
        raise ConvertError(f"--out {out}: write to a local directory or s3://bucket/prefix")
    return LocalStore(out)


# -------------------------------------------------------------------------------------------- splits
