"""Opening shard URLs: local paths, file://, http(s)://, s3:// and (only when allowed) pipe:.

Remote reads go through `ResumableStream`: it counts the bytes handed out, and when a connection
drops or the server answers 5xx it waits (exponential backoff) and reopens the object at the byte
reached, so a server outage in the middle of a shard costs no sample and repeats none.
Written by hand because webdataset's gopen has no s3 handler and its http handler shells out to
curl without resuming; boto3 gives us the S3 requests, urllib the HTTP ones.
"""

from __future__ import annotations

import http.client
import io
import os
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

from side4video.config import DataConfig
from side4video.errors import UserError, first_line
from side4video.logs import get_logger

log = get_logger(__name__)

KINDS = ("local", "http", "s3", "pipe")


class SourceUnavailable(UserError, OSError):
    """A remote shard or manifest still unreadable after every retry: bad input (a wrong URL, a
    server that is down), reported in one line; an OSError for callers that handle I/O errors."""


def url_kind(url: str) -> str:
    """local | http | s3 | pipe; UserError for any other scheme."""
    if url.startswith("pipe:"):
        return "pipe"
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        return "local"
    if scheme in ("http", "https"):
        return "http"
    if scheme in ("s3", "s3a"):
        return "s3"
    raise UserError(
        f"shard URL {url!r}: unsupported scheme '{scheme}:' (allowed: local path, file://, http(s)://, s3://, pipe:)"
    )


def check_url(url: str, allow_pipe: bool) -> str:
    """Refuse pipe: URLs unless the config allows them (they run a shell command)."""
    if url_kind(url) == "pipe" and not allow_pipe:
        raise UserError(
            f"shard URL {url!r} runs a shell command; refused (set data.allow_pipe=true to allow pipe: URLs)"
        )
    return url


def local_path(url: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path) if url.startswith("file:") else url


def join_url(base: str, relative: str) -> str:
    """`relative` resolved against the folder of `base` (a manifest URL); absolute URLs pass through."""
    if "://" in relative or relative.startswith("/") or relative.startswith("pipe:"):
        return relative
    kind = url_kind(base)
    if kind == "local" and not base.startswith("file:"):
        return os.path.normpath(os.path.join(os.path.dirname(base), relative))
    head = base.rsplit("/", 1)[0] if "/" in base.split("://", 1)[-1] else base
    return f"{head}/{relative}"


# ------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class SourceOptions:
    """What opening a URL takes from the data section, read from a `DataConfig` in one place.

    A frozen copy rather than the config itself: the defaults stay in the schema only (`None`,
    for library callers and tests without a config, means `DataConfig()` here and nowhere
    else), the reader threads get plain values, and the S3 settings, resolved against the AWS
    environment once, are hashable: they key the boto3 client cache.
    """

    allow_pipe: bool
    retries: int
    retry_backoff: float
    read_chunk: int
    timeout: float
    s3_endpoint_url: Optional[str]
    s3_key: Optional[str]
    s3_secret: Optional[str]
    s3_region: Optional[str]

    @classmethod
    def of(cls, data_cfg: Optional[DataConfig]) -> SourceOptions:
        d = data_cfg if data_cfg is not None else DataConfig()
        # endpoint and credentials: the config first, else the standard AWS environment
        s3 = d.s3
        return cls(
            allow_pipe=bool(d.allow_pipe),
            retries=int(d.retries),
            retry_backoff=float(d.retry_backoff),
            read_chunk=int(d.read_chunk),
            timeout=float(d.timeout),
            s3_endpoint_url=s3.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None,
            s3_key=s3.access_key_id or os.environ.get("AWS_ACCESS_KEY_ID") or None,
            s3_secret=s3.secret_access_key or os.environ.get("AWS_SECRET_ACCESS_KEY") or None,
            s3_region=s3.region or os.environ.get("AWS_DEFAULT_REGION") or None,
        )


# ------------------------------------------------------------------------------------------ S3
_client_lock = threading.Lock()
_client_cache: dict = {}


def s3_client(opts: SourceOptions):
    """A boto3 S3 client for these settings (one per distinct setting; clients are thread-safe).

    boto3 rather than s3fs: a streamed GET per shard reads at the raw client's speed, where
    s3fs's ranged reads through its event-loop thread reached half of it with 4 readers
    (`side4video bench stream`)."""
    import boto3
    from botocore.config import Config

    cache_key = (opts.s3_endpoint_url, opts.s3_key, opts.s3_secret, opts.s3_region, opts.timeout)
    with _client_lock:
        client = _client_cache.get(cache_key)
        if client is None:
            # ResumableStream owns retrying (backoff + resume at the byte reached); botocore
            # retrying underneath would only multiply the waiting.
            config = Config(
                connect_timeout=min(opts.timeout, 10.0),
                read_timeout=opts.timeout,
                retries={"max_attempts": 1, "mode": "standard"},
                max_pool_connections=32,
            )
            client = boto3.session.Session().client(
                "s3",
                endpoint_url=opts.s3_endpoint_url,
                aws_access_key_id=opts.s3_key,
                aws_secret_access_key=opts.s3_secret,
                region_name=opts.s3_region or "us-east-1",
                config=config,
            )
            _client_cache[cache_key] = client
    return client


def _bucket_key(url: str) -> Tuple[str, str]:
    bucket, _, key = url.split("://", 1)[1].partition("/")
    return bucket, key


def _s3_error(e: Exception, what: str) -> Exception:
    """botocore's errors as the OSErrors ResumableStream and callers tell apart: missing and
    denied are final, 5xx and throttling are retried."""
    from botocore.exceptions import ClientError

    if not isinstance(e, ClientError):
        return e  # connection errors, timeouts: retried
    code = str(e.response.get("Error", {}).get("Code", ""))
    status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    if status == 404 or code in ("NoSuchKey", "NoSuchBucket", "NotFound", "404"):
        return FileNotFoundError(f"{what}: {code or 'not found'}")
    if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
        return PermissionError(f"{what}: {code or 'access denied'}")
    if status >= 500 or status in (408, 429) or code in ("SlowDown", "RequestTimeout", "Throttling"):
        return ConnectionError(f"{what}: HTTP {status} {code}")
    return UserError(f"{what}: HTTP {status} {code}")


# S3's bucket naming rules (AWS and every compatible store): 3-63 characters of lowercase
# letters, digits, dots and hyphens, starting and ending with a letter or digit.
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def check_s3_output(url: str, data_cfg: Optional[DataConfig]) -> None:
    """Before any work is done for an s3:// output: a valid bucket name, and a bucket that exists
    and takes our credentials (a typo must not cost hours of transcoding first)."""
    bucket, _ = _bucket_key(url)
    if not _BUCKET_NAME.match(bucket) or ".." in bucket:
        raise UserError(
            f"output {url!r}: {bucket!r} is not a valid S3 bucket name (3-63 lowercase letters, "
            f"digits, '.' or '-', starting and ending with a letter or digit)"
        )
    opts = SourceOptions.of(data_cfg)
    endpoint = opts.s3_endpoint_url or "AWS"
    try:
        s3_client(opts).head_bucket(Bucket=bucket)
    except Exception as e:
        err = _s3_error(e, bucket)
        if isinstance(err, FileNotFoundError):
            raise UserError(
                f"output {url!r}: bucket {bucket!r} does not exist at {endpoint} (create it first)"
            ) from None
        if isinstance(err, PermissionError):
            raise UserError(
                f"output {url!r}: access to bucket {bucket!r} at {endpoint} denied (check the S3 credentials)"
            ) from None
        raise UserError(f"output {url!r}: cannot reach bucket {bucket!r} at {endpoint}: {first_line(e)}") from None


class _S3Body:
    """The body of one streamed GET; its errors mapped as `_s3_error` does."""

    def __init__(self, body, url: str):
        self.body, self.url = body, url

    def readinto(self, buf) -> int:
        try:
            return self.body.readinto(buf)
        except Exception as e:
            raise _s3_error(e, self.url) from None

    def close(self) -> None:
        self.body.close()


def _open_s3(url: str, opts: SourceOptions) -> Callable[[int], Tuple[Any, Optional[int]]]:
    client = s3_client(opts)
    bucket, key = _bucket_key(url)

    def open_at(offset: int):
        try:
            # One GET streams the rest of the object; after a failure the next starts at the byte reached.
            resp = client.get_object(Bucket=bucket, Key=key, **({"Range": f"bytes={offset}-"} if offset else {}))
        except Exception as e:
            raise _s3_error(e, url) from None
        total = resp.get("ContentRange", "").rsplit("/", 1)[-1]
        size = int(total) if total.isdigit() else offset + int(resp["ContentLength"])
        return _S3Body(resp["Body"], url), size

    return open_at


# ---------------------------------------------------------------------------------------- HTTP
def _open_http(url: str, opts: SourceOptions) -> Callable[[int], Tuple[Any, Optional[int]]]:
    timeout = opts.timeout

    def open_at(offset: int):
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code >= 500 or e.code in (408, 429):
                raise ConnectionError(f"HTTP {e.code}") from None
            if e.code in (401, 403):
                raise PermissionError(f"{url}: HTTP {e.code} {e.reason}") from None
            raise FileNotFoundError(f"{url}: HTTP {e.code} {e.reason}") from None
        length = resp.headers.get("Content-Length")
        if offset and resp.status == 206:
            total = resp.headers.get("Content-Range", "").rsplit("/", 1)[-1]
            size = int(total) if total.isdigit() else (offset + int(length) if length else None)
        else:
            size = int(length) if length else None
            # The server ignored the Range header (python's http.server does): skip what we have.
            remaining = offset
            while remaining > 0:
                got = resp.read(min(remaining, 1 << 20))
                if not got:
                    raise ConnectionError("stream ended while skipping to the resume offset")
                remaining -= len(got)
        return resp, size

    return open_at


# ------------------------------------------------------------------------------------ retrying
_NOT_RETRYABLE = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, UserError)


class ResumableStream(io.RawIOBase):
    """A read-only byte stream over a remote object that survives dropped connections.

    `open_at(offset)` returns (body with .readinto(buf), total size or None). On a connection error,
    a timeout, a 5xx or a short read, the body is reopened at the offset reached after a delay of
    backoff * 2**attempt; `retries` failed attempts in a row give up with an OSError.
    """

    def __init__(self, url: str, open_at: Callable[[int], Tuple[Any, Optional[int]]], retries: int, backoff: float):
        super().__init__()
        self.url, self._open_at, self.retries, self.backoff = url, open_at, max(0, int(retries)), float(backoff)
        self._body = None
        self._pos = 0
        self._size: Optional[int] = None
        self.reconnects = 0

    def readable(self) -> bool:
        return True

    @property
    def position(self) -> int:
        return self._pos

    def readinto(self, buf) -> int:
        want = len(buf)
        if want == 0 or (self._size is not None and self._pos >= self._size):
            return 0
        failures = 0
        while True:
            try:
                if self._body is None:
                    self._body, size = self._open_at(self._pos)
                    self._size = size if self._size is None else self._size
                # readinto: the body writes straight into the reader's buffer (read() copies twice).
                n = self._body.readinto(buf)
                if not n and self._size is not None and self._pos < self._size:
                    raise http.client.IncompleteRead(b"", self._size - self._pos)
                self._pos += n
                return n
            except _NOT_RETRYABLE:
                raise
            except Exception as e:  # connection refused/reset, timeouts, 5xx, botocore/aiohttp errors
                self._drop_body()
                failures += 1
                if failures > self.retries:
                    raise SourceUnavailable(
                        f"cannot read {self.url}: giving up after {self.retries} retries at byte "
                        f"{self._pos} ({type(e).__name__}: {first_line(e)})"
                    ) from None
                delay = self.backoff * 2 ** (failures - 1)
                self.reconnects += 1
                log.warning(
                    "%s: %s at byte %d; retry %d/%d in %.1fs",
                    self.url,
                    type(e).__name__,
                    self._pos,
                    failures,
                    self.retries,
                    delay,
                )
                time.sleep(delay)

    def _drop_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception:
                pass

    def close(self) -> None:
        self._drop_body()
        super().close()


class _PipeReader(io.RawIOBase):
    def __init__(self, cmd: str):
        super().__init__()
        self.proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE)  # noqa: S602 - allowed by config

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        return self.proc.stdout.readinto(buf)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.stdout.close()
        self.proc.wait()
        super().close()


def open_url(url: str, data_cfg: Optional[DataConfig] = None) -> io.BufferedIOBase:
    """A buffered binary reader for any allowed shard URL (see module doc); `data_cfg` None: the
    schema's defaults."""
    opts = SourceOptions.of(data_cfg)
    kind = url_kind(check_url(url, opts.allow_pipe))
    if kind == "local":
        path = local_path(url)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such shard file: {path}")
        return open(path, "rb", buffering=1 << 20)
    if kind == "pipe":
        return io.BufferedReader(_PipeReader(url[len("pipe:") :]), buffer_size=1 << 20)
    opener = _open_s3(url, opts) if kind == "s3" else _open_http(url, opts)
    return io.BufferedReader(
        ResumableStream(url, opener, opts.retries, opts.retry_backoff), buffer_size=opts.read_chunk
    )


def read_bytes(url: str, data_cfg: Optional[DataConfig] = None) -> bytes:
    """The whole object (manifests, small files)."""
    with open_url(url, data_cfg) as f:
        return f.read()


def exists(url: str, data_cfg: Optional[DataConfig] = None) -> bool:
    kind = url_kind(url)
    if kind == "local":
        return os.path.isfile(local_path(url))
    if kind == "s3":
        bucket, key = _bucket_key(url)
        try:
            s3_client(SourceOptions.of(data_cfg)).head_object(Bucket=bucket, Key=key)
            return True
        except Exception:
            return False
    if kind == "http":
        try:
            req = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(req, timeout=SourceOptions.of(data_cfg).timeout):
                return True
        except (urllib.error.URLError, socket.timeout, ConnectionError, http.client.HTTPException):
            return False
    return False


def put_file(local: str, url: str, data_cfg: Optional[DataConfig] = None) -> None:
    """Copy a finished local file to `url` (a local path or s3://)."""
    kind = url_kind(url)
    if kind == "s3":
        bucket, key = _bucket_key(url)
        try:
            s3_client(SourceOptions.of(data_cfg)).upload_file(local, bucket, key)  # multipart above boto3's threshold
        except Exception as e:
            raise OSError(first_line(e)) from None
        return
    if kind == "local":
        import shutil

        dest = local_path(url)
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        shutil.move(local, dest)
        return
    raise UserError(f"cannot write to {url!r}: output must be a local folder or s3://bucket/prefix")


def size_of(url: str, data_cfg: Optional[DataConfig] = None) -> Optional[int]:
    """Bytes of a local file or an s3:// object; None when it is not there."""
    kind = url_kind(url)
    if kind == "local":
        path = local_path(url)
        return os.path.getsize(path) if os.path.isfile(path) else None
    if kind == "s3":
        bucket, key = _bucket_key(url)
        try:
            return int(s3_client(SourceOptions.of(data_cfg)).head_object(Bucket=bucket, Key=key)["ContentLength"])
        except Exception:
            return None
    raise UserError(f"cannot look at {url!r}: a local path or s3://bucket/key expected")


def list_names(folder: str, data_cfg: Optional[DataConfig] = None) -> List[str]:
    """Names (paths relative to `folder`) of the files under a local folder or an s3:// prefix."""
    kind = url_kind(folder)
    folder = folder.rstrip("/")
    if kind == "local":
        base = local_path(folder)
        return sorted(os.path.relpath(os.path.join(d, f), base) for d, _, files in os.walk(base) for f in files)
    if kind == "s3":
        bucket, prefix = _bucket_key(folder + "/")
        client = s3_client(SourceOptions.of(data_cfg))
        names: List[str] = []
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                names += [o["Key"][len(prefix) :] for o in page.get("Contents", [])]
        except Exception as e:
            raise _s3_error(e, folder) from None
        return sorted(names)
    raise UserError(f"cannot list {folder!r}: a local folder or s3://bucket/prefix expected")


def write_text(url: str, text: str, data_cfg: Optional[DataConfig] = None) -> None:
    """A small text file written whole or not at all: a local file renamed into place, or one
    S3 PUT (an object appears only complete)."""
    kind = url_kind(url)
    data = text.encode("utf-8")
    if kind == "local":
        path = local_path(url)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".partial", "wb") as f:
            f.write(data)
        os.replace(path + ".partial", path)
        return
    if kind == "s3":
        bucket, key = _bucket_key(url)
        try:
            s3_client(SourceOptions.of(data_cfg)).put_object(Bucket=bucket, Key=key, Body=data)
        except Exception as e:
            raise OSError(first_line(e)) from None
        return
    raise UserError(f"cannot write to {url!r}: output must be a local folder or s3://bucket/prefix")


def forget_clients() -> None:
    """In a forked worker: the parent's S3 clients are not safe to share; each worker makes its own."""
    with _client_lock:
        _client_cache.clear()
