"""Streams for ``s3://`` and ``http(s)://`` URLs, registered in ``webdataset.gopen_schemes``.

Both schemes return a buffered, read-only stream that survives transient failures: when the
connection drops, times out or the server answers 5xx/429, the stream waits (exponential back-off
with jitter) and re-opens at the byte it had reached (HTTP ``Range``), so a shard is never read twice
nor partly.  ``io_retries`` consecutive failures without progress end the read with a
:class:`StorageError` naming the URL.  Permanent failures (missing bucket or object, rejected
credentials, HTTP 4xx) fail at once.  Socket timeouts bound every wait, so nothing hangs.

S3 goes through boto3 with the standard credential chain (environment, profile, instance role); the
endpoint comes from :func:`configure` (``data.s3_endpoint_url``) or else ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``.  Messages and logs name URLs, endpoints and error codes, never credentials.

HTTP goes through ``urllib`` in-process (webdataset's default forks ``curl`` per shard and retries for
up to a minute, which is neither bounded nor cheap).
"""

from __future__ import annotations

import http.client
import io
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

from avi_scale.data.errors import DataError, NotFoundError, StorageError

log = logging.getLogger("avi_scale.data")

_BUFFER = 1 << 20


@dataclass(frozen=True)
class IOSettings:
    endpoint_url: Optional[str] = None  # S3-compatible endpoint; None: AWS_ENDPOINT_URL(_S3) or AWS
    retries: int = 4  # attempts per failure streak (a streak ends when bytes arrive)
    timeout_s: float = 30.0  # connect and read timeout of every request
    backoff_s: float = 0.5  # first back-off; doubles per failed attempt (with jitter), capped at 30 s


_settings = IOSettings()
_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def configure(**changes: Any) -> IOSettings:
    """Set the process-wide I/O settings (keys of :class:`IOSettings`); returns the new settings."""
    global _settings
    _settings = replace(_settings, **changes)
    return _settings


def configure_for(data_cfg: Any) -> IOSettings:
    """The I/O settings of a run, from its ``data`` config section (endpoint, retries, timeout, back-off)."""
    return configure(endpoint_url=data_cfg.s3_endpoint_url, retries=data_cfg.io_retries,
                     timeout_s=data_cfg.io_timeout_s, backoff_s=data_cfg.io_backoff_s)


def settings() -> IOSettings:
    """The current process-wide I/O settings."""
    return _settings


class _Transient(Exception):
    """A failure worth retrying (internal)."""


def display_url(url: str) -> str:
    """``url`` for messages and logs: without user:password@ and without the query (presigned URLs carry
    signatures and tokens there)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    host, slash, path = rest.partition("/")
    host = host.rpartition("@")[2]
    path, question, _ = path.partition("?")
    return f"{scheme}://{host}{slash}{path}" + ("?<query hidden>" if question else "")


def _backoff(failures: int) -> None:
    delay = min(_settings.backoff_s * 2 ** (failures - 1), 30.0) * random.uniform(0.5, 1.0)
    time.sleep(delay)


class RetryingStream(io.RawIOBase):
    """A raw byte stream over ``open_at(offset) -> (body, total_size_or_None)`` that resumes after drops."""

    def __init__(self, url: str, open_at: Callable[[int], tuple[Any, Optional[int]]]):
        super().__init__()
        self.url = display_url(url)
        self._open_at = open_at
        self.pos = 0
        self.size: Optional[int] = None
        self._body: Any = None
        self._reopen(0)

    def _reopen(self, failures: int) -> int:
        """Open at ``self.pos``; returns the failure count of the current streak."""
        while True:
            try:
                self._body, size = self._open_at(self.pos)
                if self.size is None:
                    self.size = size
                return failures
            except _Transient as exc:
                failures = self._failed(failures, exc)

    def _failed(self, failures: int, exc: BaseException) -> int:
        failures += 1
        where = f" at byte {self.pos}" + (f" of {self.size}" if self.size is not None else "")
        if failures >= _settings.retries:
            raise StorageError(f"giving up on {self.url}{where} after {failures} failed attempts: {exc}") from None
        log.warning("transient error on %s%s (attempt %d of %d): %s; retrying", self.url, where, failures,
                    _settings.retries, exc)
        _backoff(failures)
        return failures

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        want = len(buffer)
        if want == 0 or (self.size is not None and self.pos >= self.size):
            return 0
        failures = 0
        while True:
            try:
                data = self._body.read(want)
                if not data and (self.size is None or self.pos >= self.size):
                    return 0
                if not data:
                    raise _Transient(f"connection closed early ({self.size - self.pos} bytes missing)")
            except DataError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                if not isinstance(exc, _Transient) and not _is_transient_read_error(exc):
                    raise StorageError(f"reading {self.url} failed at byte {self.pos}: {exc!r}") from exc
                self._close_body()
                failures = self._failed(failures, exc)
                failures = self._reopen(failures)
                continue
            n = len(data)
            buffer[:n] = data
            self.pos += n
            return n

    def _close_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped anyway
                pass

    def close(self) -> None:
        self._close_body()
        super().close()


def _is_transient_read_error(exc: BaseException) -> bool:
    import botocore.exceptions as bex

    transient = (bex.HTTPClientError, bex.ConnectionError, bex.IncompleteReadError, http.client.HTTPException,
                 OSError, TimeoutError)
    return isinstance(exc, transient)


# ---------------------------------------------------------------------------------------------- S3


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``; the key may be empty (a bucket root)."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"s3 URL without a bucket: {url!r}")
    return bucket, key


def endpoint_url() -> Optional[str]:
    return _settings.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_client() -> Any:
    """A boto3 S3 client for this process (cached; boto3 clients are not fork-safe, so keyed by pid).

    botocore's own retries are off: :class:`RetryingStream` and :func:`s3_call` retry with back-off.
    """
    import boto3
    from botocore.config import Config

    endpoint = endpoint_url()
    key = (os.getpid(), endpoint, _settings.timeout_s)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            config = Config(connect_timeout=_settings.timeout_s, read_timeout=_settings.timeout_s,
                            retries={"total_max_attempts": 1})
            client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
            _clients[key] = client
    return client


def _credential_source() -> str:
    import boto3

    creds = boto3.session.Session().get_credentials()
    return f"credentials from {creds.method}" if creds is not None else "no credentials found"


def s3_error(exc: BaseException, url: str) -> BaseException:
    """Turn a boto3/botocore failure on ``url`` into :class:`_Transient` or a clear :class:`StorageError`."""
    import botocore.exceptions as bex

    endpoint = endpoint_url() or "AWS default endpoint"
    if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError)):
        return StorageError(f"cannot read {url}: no usable AWS credentials (set AWS_ACCESS_KEY_ID and "
                            f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role)")
    if isinstance(exc, bex.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        bucket, key = parse_s3_url(url)
        if code == "NoSuchBucket":
            return StorageError(f"S3 bucket {bucket!r} does not exist at {endpoint} (reading {url})")
        if code in ("NoSuchKey", "404", "NotFound"):
            return NotFoundError(f"{url} does not exist (no object {key!r} in bucket {bucket!r} at {endpoint})")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden",
                    "InvalidToken", "ExpiredToken", "AuthorizationHeaderMalformed") or status in (401, 403):
            return StorageError(f"S3 refused access to {url} at {endpoint} ({code or status}): check the "
                                f"credentials ({_credential_source()}) and the bucket policy")
        if status >= 500 or status in (408, 429) or code in ("SlowDown", "Throttling", "RequestTimeout",
                                                             "InternalError", "ServiceUnavailable"):
            return _Transient(f"S3 {code or status} on {url}")
        return StorageError(f"S3 error on {url} at {endpoint}: {code or status} {err.get('Message', '')}".strip())
    if isinstance(exc, (bex.ConnectionError, bex.HTTPClientError, bex.IncompleteReadError, OSError)):
        return _Transient(f"{type(exc).__name__} talking to {endpoint}: {exc}")
    return StorageError(f"S3 request for {url} failed: {exc!r}")


def s3_call(url: str, fn: Callable[[], Any]) -> Any:
    """Run one S3 request about ``url`` with the retry policy; permanent failures raise at once."""
    failures = 0
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified by s3_error
            mapped = s3_error(exc, url)
            if not isinstance(mapped, _Transient):
                raise mapped from None
            failures += 1
            if failures >= _settings.retries:
                raise StorageError(f"giving up on {url} after {failures} failed attempts: {mapped}") from None
            log.warning("transient S3 error on %s (attempt %d of %d): %s; retrying", url, failures,
                        _settings.retries, mapped)
            _backoff(failures)


def _s3_open_at(url: str) -> Callable[[int], tuple[Any, Optional[int]]]:
    bucket, key = parse_s3_url(url)
    if not key:
        raise StorageError(f"{url} names a bucket, not an object")

    def open_at(offset: int) -> tuple[Any, Optional[int]]:
        kwargs = {"Bucket": bucket, "Key": key}
        if offset:
            kwargs["Range"] = f"bytes={offset}-"
        try:
            response = s3_client().get_object(**kwargs)
        except Exception as exc:  # noqa: BLE001 - classified by s3_error
            raise s3_error(exc, url) from None
        total = response.get("ContentLength")
        content_range = response.get("ContentRange")
        if content_range and "/" in content_range:
            total = int(content_range.rsplit("/", 1)[1])
        return response["Body"], total

    return open_at


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> io.BufferedReader:
    """The ``s3://`` handler for ``webdataset.gopen``: read-only, retrying, buffered."""
    if mode != "rb":
        raise ValueError(f"{url}: s3:// streams are read-only here; write shards with avi-shards --out s3://...")
    return io.BufferedReader(RetryingStream(url, _s3_open_at(url)), buffer_size=max(bufsize, _BUFFER))


# -------------------------------------------------------------------------------------------- HTTP


def _http_open_at(url: str) -> Callable[[int], tuple[Any, Optional[int]]]:
    shown = display_url(url)

    def open_at(offset: int) -> tuple[Any, Optional[int]]:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                              timeout=_settings.timeout_s)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code in (408, 429) or exc.code >= 500:
                raise _Transient(f"HTTP {exc.code} {exc.reason} for {shown}") from None
            if exc.code in (404, 410):
                raise NotFoundError(f"{shown} does not exist (HTTP {exc.code})") from None
            raise StorageError(f"HTTP {exc.code} {exc.reason} for {shown}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise _Transient(f"cannot connect for {shown}: {reason}") from None
        length = response.headers.get("Content-Length")
        total = int(length) if length is not None else None
        if response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            total = int(content_range.rsplit("/", 1)[1]) if "/" in content_range else None
        elif offset:  # the server ignored Range: skip what we already have
            remaining = offset
            while remaining:
                chunk = response.read(min(remaining, _BUFFER))
                if not chunk:
                    response.close()
                    raise _Transient(f"connection closed early while skipping to byte {offset} of {shown}")
                remaining -= len(chunk)
        return response, total

    return open_at


def gopen_http(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> io.BufferedReader:
    """The ``http(s)://`` handler for ``webdataset.gopen``: read-only, retrying, buffered."""
    if mode != "rb":
        raise ValueError(f"{url}: http(s) streams are read-only")
    return io.BufferedReader(RetryingStream(url, _http_open_at(url)), buffer_size=max(bufsize, _BUFFER))


# ------------------------------------------------------------------------------------------ common


def register() -> None:
    """Install the s3/http(s) handlers in ``webdataset.gopen_schemes`` (idempotent)."""
    from webdataset.gopen import gopen_schemes  # the package attribute `gopen` is the function

    gopen_schemes["s3"] = gopen_s3
    gopen_schemes["http"] = gopen_http
    gopen_schemes["https"] = gopen_http


def open_url(url: str) -> io.BufferedIOBase:
    """Open a local path, ``file:``, ``s3://`` or ``http(s)://`` URL for reading through webdataset's gopen.

    Raises :class:`NotFoundError` when it does not exist and :class:`StorageError` for other failures.
    """
    from webdataset.gopen import gopen

    register()
    try:
        return gopen(url, "rb")
    except DataError:
        raise
    except FileNotFoundError:
        raise NotFoundError(f"{url} does not exist") from None
    except OSError as exc:
        raise StorageError(f"cannot open {url}: {exc.strerror or exc}") from None
