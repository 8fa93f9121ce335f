"""One way to read and write bytes at a local path or an ``s3://`` URI.

Every component that touches weights, datasets or results goes through here, so
S3 credentials come from one place (the standard AWS environment) and local
writes are atomic everywhere. Imports pyarrow only: pyarrow's S3 client is
already a dependency of Ray Data, so no second S3 stack is needed.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import pyarrow.fs as pafs

# Every server skray starts (Serve, the embedded S3 server, a Ray head) binds here unless told
# otherwise: nothing is reachable from other machines by default.
LOOPBACK = "127.0.0.1"

__all__ = [
    "LOOPBACK",
    "s3_options_from_env",
    "filesystem_for",
    "is_remote",
    "read_bytes",
    "read_range",
    "write_bytes_atomic",
    "exists",
    "join",
    "read_json",
    "write_json",
    "redact_uri",
]

# ``user:password@`` (or a bare token ``user@``) after ``scheme://`` or at the start (scp style),
# up to the last ``@`` before the path: a password may hold an unescaped ``@``.
# ``user@``, or after a scheme ``user:password@`` whatever the password holds (secret keys
# hold ``/``, ``+`` and ``#``, unescaped when people paste them).
_USERINFO = re.compile(
    r"^(?P<scheme>[A-Za-z][\w+.-]*://)?[^/?#\s]+@|^(?P<with>[A-Za-z][\w+.-]*://)[^\s:]*:\S*@"
)
_QUERY = re.compile(r"\?[^#]+")
_HTTP_FRAGMENT = re.compile(r"^(https?://[^#]*)#.*$", re.IGNORECASE)
_URI = re.compile(r"[A-Za-z][\w+.-]*://[^\s'\"<>()]+")

# One shared instance: the retry strategy hashes by identity, and the filesystem
# cache is keyed on the option values.
# pyarrow's own retries ride out a blip; the budget that governs is skray's (io.retry),
# the same for every call, and one a job can set.
_RETRY_STRATEGY = pafs.AwsStandardS3RetryStrategy(max_attempts=2)

_ENV_OPTIONS = {
    "access_key": ("AWS_ACCESS_KEY_ID",),
    "secret_key": ("AWS_SECRET_ACCESS_KEY",),
    "session_token": ("AWS_SESSION_TOKEN",),
    "region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
}


def _first_env(*names: str) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def s3_options_from_env(overrides: dict | None = None) -> dict:
    """Keyword arguments for ``pyarrow.fs.S3FileSystem`` from the standard AWS variables.

    ``AWS_ENDPOINT_URL_S3`` (else ``AWS_ENDPOINT_URL``) points at MinIO, moto or
    another S3-compatible store; a transient error is retried once here, then by
    :func:`skray.io.retry.call_with_retry` within its budget.
    The result holds secrets: never log it.
    """
    options: dict = {"retry_strategy": _RETRY_STRATEGY}
    for option, names in _ENV_OPTIONS.items():
        value = _first_env(*names)
        if value:
            options[option] = value
    endpoint = _first_env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint)
        if parsed.scheme:
            options["scheme"] = parsed.scheme
            options["endpoint_override"] = parsed.netloc
        else:
            options["endpoint_override"] = endpoint
    options.update(overrides or {})
    return options


@functools.cache
def _s3_filesystem(options: tuple[tuple[str, object], ...]) -> pafs.S3FileSystem:
    # Creating an S3FileSystem resolves credentials and opens a client: do it once per option set.
    return pafs.S3FileSystem(**dict(options))


def _local_path(uri: str) -> str:
    path = urlparse(uri).path if uri.startswith("file://") else uri
    return os.path.abspath(os.path.expanduser(path))


def filesystem_for(uri: str, s3_options: dict | None = None) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding ``uri`` and the path to pass to it.

    ``s3://bucket/key`` -> (S3FileSystem, ``bucket/key``); a local path or
    ``file://`` URI -> (LocalFileSystem, absolute path). ``s3_options`` values
    must be hashable; the default comes from :func:`s3_options_from_env`.
    """
    scheme = urlparse(uri).scheme
    if scheme == "s3":
        options = s3_options_from_env() if s3_options is None else s3_options
        return _s3_filesystem(tuple(sorted(options.items()))), uri[len("s3://") :]
    if scheme in ("", "file"):
        return pafs.LocalFileSystem(), _local_path(uri)
    raise ValueError(f"unsupported URI scheme {scheme!r} in {uri!r}: use a local path or s3://")


def is_remote(uri: str | os.PathLike) -> bool:
    """True for URIs with a network scheme (``s3://``, ``https://``...), False for local files."""
    return urlparse(os.fspath(uri)).scheme not in ("", "file")


def read_bytes(uri: str | os.PathLike) -> bytes:
    """The whole object as one snapshot.

    On S3 this is a single GET: pyarrow's reader takes the size from a HEAD and then
    reads ranges, so an object rewritten in between (a lease heartbeat, a manifest)
    comes back cut at the old length. Raises ``FileNotFoundError`` when absent.
    """
    uri = os.fspath(uri)
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        client = s3_client()
        try:
            return client.get_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"))[
                "Body"
            ].read()
        except client.exceptions.NoSuchKey:
            raise FileNotFoundError(uri) from None
    return Path(_local_path(uri)).read_bytes()


def write_bytes_atomic(uri: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` so that readers see the old content or the new, never a partial file.

    Locally: a temporary file in the same directory, fsynced, then ``os.replace``.
    On S3 an object only appears once its upload completes, so a plain write is atomic;
    a delayed open makes a small object one PUT, not three requests of a multipart upload.
    """
    uri = os.fspath(uri)
    if is_remote(uri):
        fs, path = filesystem_for(uri, s3_options_from_env({"allow_delayed_open": True}))
        with fs.open_output_stream(path, compression=None) as stream:  # a .gz is bytes too
            stream.write(data)
        return
    _write_local(uri, data, os.replace)


def exists(uri: str | os.PathLike) -> bool:
    fs, path = filesystem_for(os.fspath(uri))
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def join(uri: str, name: str) -> str:
    """``name`` under ``uri``, a local path or an ``s3://`` prefix alike (always ``/``)."""
    return uri.rstrip("/") + "/" + name


def read_json(uri: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON object at ``uri``, or ``None`` when there is none."""
    try:
        return json.loads(read_bytes(uri))
    except FileNotFoundError:
        return None


def write_json(uri: str | os.PathLike, value: dict[str, Any]) -> None:
    """Write ``value`` atomically (see :func:`write_bytes_atomic`); non-JSON values as ``str``."""
    write_bytes_atomic(uri, json.dumps(value, indent=2, sort_keys=False, default=str).encode())


def redact_uri(uri: str | os.PathLike) -> str:
    """``uri`` fit for logs, printed configs and MLflow: user info and the query string masked.

    ``scheme://user:password@host`` and ``user@host`` keep only the host; the whole
    query becomes ``***``, since presigned URLs and database URIs carry secrets there
    under names no list can foresee (``X-Amz-Signature``, ``sig``, ``token``, ``password``).
    """
    text = _USERINFO.sub(lambda m: f"{m['scheme'] or m['with'] or ''}***@", os.fspath(uri), count=1)
    text = _HTTP_FRAGMENT.sub(r"\1#***", text, count=1)  # s3 keys keep ``#member``
    return _QUERY.sub("?***", text, count=1)


def redact_text(text: str) -> str:
    """Every URI in ``text`` through :func:`redact_uri`: for messages that quote other
    messages (an exception's text, a traceback), where a URI may sit anywhere."""
    return _URI.sub(lambda m: redact_uri(m.group()), text)


def s3_endpoint() -> str:
    """The S3 endpoint requests go to, for messages."""
    return _first_env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL") or "AWS's default endpoint"


_S3_CLIENT_LOCK = threading.Lock()


def s3_client():
    """A boto3 S3 client from the same environment as :func:`s3_options_from_env`, for what
    pyarrow cannot do: conditional writes (``If-None-Match`` / ``If-Match``). One per
    endpoint, region and credentials, shared by threads (boto3 clients are thread-safe).

    Made under a lock: ``lru_cache`` alone lets every thread that misses build its own, and a
    pool's first requests then built one each (0.15 to 0.5 s of CPU apiece)."""
    with _S3_CLIENT_LOCK:
        return _s3_client(
            _first_env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
            _first_env("AWS_REGION", "AWS_DEFAULT_REGION"),
            os.environ.get("AWS_ACCESS_KEY_ID"),
            os.environ.get("AWS_SESSION_TOKEN"),
        )


@functools.lru_cache(maxsize=8)
def _s3_client(endpoint: str | None, region: str | None, key_id: str | None, token: str | None):
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region)


def write_bytes_exclusive(uri: str | os.PathLike, data: bytes) -> None:
    """:func:`write_bytes_atomic`, but create-only: raises ``FileExistsError`` where the
    object exists (``If-None-Match: *`` on S3, a hard link locally), so that two writers of
    one name cannot both succeed."""
    uri = os.fspath(uri)
    if is_remote(uri):
        from botocore.exceptions import BotoCoreError, ClientError

        _, path = filesystem_for(uri)
        bucket, key = path.split("/", 1)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as err:
            if err.response["Error"]["Code"] in (
                "PreconditionFailed",
                "ConditionalRequestConflict",
            ):
                raise FileExistsError(f"{redact_uri(uri)} exists") from None
            raise _s3_error(err, "writing", uri) from err
        except BotoCoreError as err:  # connection refused or reset, timeouts
            raise _s3_error(err, "writing", uri) from err
        return
    _write_local(uri, data, os.link)  # a link fails where the target exists


def read_range(uri: str | os.PathLike, start: int, length: int) -> bytes:
    """Up to ``length`` bytes of the object at ``uri`` from byte ``start`` (fewer at its end,
    none past it) in one request. On S3 that is one ranged GET: pyarrow's readers send a HEAD
    for the size first, which doubles the requests of a small object (apache/arrow#41604).
    Raises ``FileNotFoundError`` when the object is gone, ``OSError`` on a fault."""
    uri = os.fspath(uri)
    if length <= 0:
        return b""
    if not is_remote(uri):
        with open(_local_path(uri), "rb") as f:
            f.seek(start)
            return f.read(length)
    from botocore.exceptions import BotoCoreError, ClientError

    _, path = filesystem_for(uri)
    bucket, key = path.split("/", 1)
    client = s3_client()
    try:
        body = client.get_object(
            Bucket=bucket, Key=key, Range=f"bytes={start}-{start + length - 1}"
        )
        return body["Body"].read()
    except ClientError as err:
        code = err.response["Error"]["Code"]
        if code in ("NoSuchKey", "404"):
            raise FileNotFoundError(f"{redact_uri(uri)} does not exist") from None
        if code == "InvalidRange":  # starts past the end: the object is shorter than that
            return b""
        raise _s3_error(err, "reading", uri) from err
    except BotoCoreError as err:  # resets, timeouts, a body cut short
        raise _s3_error(err, "reading", uri) from err


PAGE_KEYS = 1000  # keys per LIST page: S3's most


def list_page(
    bucket: str, prefix: str, delimiter: str | None = None, token: str | None = None
) -> tuple[list[tuple[str, int]], list[str], str | None]:
    """One LIST request (``ListObjectsV2``, up to ``PAGE_KEYS`` keys): the page's objects as (key,
    size) and common prefixes, each in key order, and the token of the next page (None: the
    last). pyarrow gathers a whole listing before it returns any; a page at a time lets a
    100M-key listing stream. Raises ``FileNotFoundError`` for a missing bucket, ``OSError``
    on a fault."""
    from botocore.exceptions import BotoCoreError, ClientError

    args = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": PAGE_KEYS}
    if delimiter:
        args["Delimiter"] = delimiter
    if token:
        args["ContinuationToken"] = token
    uri = f"s3://{bucket}/{prefix}"
    try:
        page = s3_client().list_objects_v2(**args)
    except ClientError as err:
        if err.response["Error"]["Code"] == "NoSuchBucket":
            raise FileNotFoundError(f"bucket {bucket} does not exist") from None
        raise _s3_error(err, "listing", uri) from err
    except BotoCoreError as err:
        raise _s3_error(err, "listing", uri) from err
    files = [(o["Key"], o["Size"]) for o in page.get("Contents", ())]
    prefixes = [p["Prefix"] for p in page.get("CommonPrefixes", ())]
    return files, prefixes, page.get("NextContinuationToken") if page.get("IsTruncated") else None


def _s3_error(err: Exception, doing: str, uri: str) -> OSError:
    """An ``OSError`` for a boto3 failure, worded as pyarrow's are, so that
    :func:`skray.io.retry.fault_reason` reads a refusal (``HTTP status 403``) the same."""
    response = getattr(err, "response", None)
    if response is None:
        return OSError(f"{doing} {redact_uri(uri)}: {err}")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return OSError(f"{response['Error']['Code']} (HTTP status {status}) {doing} {redact_uri(uri)}")


def _write_local(uri: str, data: bytes, publish: Callable[[str, Path], None]) -> None:
    """``data`` into a fsynced temporary file beside the target, then ``publish`` (rename
    or link) puts it in place whole; the temporary file never stays."""
    target = Path(_local_path(uri))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
