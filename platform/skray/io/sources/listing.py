"""Which objects an input names: a file, a prefix or a glob, listed before any work so a
missing or empty input fails the job early, and how ``format: auto`` reads each one."""

from __future__ import annotations

import fnmatch
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import pyarrow.fs as pafs

from skray.core.errors import SkrayError
from skray.io.retry import IoRetry, call_with_retry
from skray.io.storage import filesystem_for, is_remote, redact_uri, s3_endpoint

Format = Literal["images", "webdataset", "parquet"]

GLOB_CHARS = "*?["


class InputError(SkrayError):
    """The input cannot be labeled at all (missing, empty, unreadable): fails the job early."""


def _scheme_prefix(uri: str) -> str:
    return "s3://" if uri.startswith("s3://") else ""


def is_hidden(relative: str) -> bool:
    """A ``.x`` or ``_x`` name anywhere in the path: tool droppings such as ``_SUCCESS``."""
    return any(part.startswith((".", "_")) for part in relative.split("/"))


@dataclass(frozen=True)
class Listing:
    """The objects an input names, sorted by key, each with the size the listing gave: a
    reader that knows an object's size never asks the store for it (a HEAD per object)."""

    keys: list[str]
    sizes: list[int]

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys)


def list_inputs(uri: str, exclude: list[str] = (), io_retry: IoRetry | None = None) -> Listing:
    """Every object under ``uri`` (a file, a prefix, or a glob), recursively and sorted,
    without hidden names (``.x``, ``_x``) or those matching an ``exclude`` glob. A store
    that keeps failing (or cannot be reached) past ``io_retry`` raises
    :class:`~skray.io.retry.StorageUnavailable` naming the endpoint, before any work."""
    glob_at = min((uri.find(c) for c in GLOB_CHARS if c in uri), default=-1)
    base = uri if glob_at < 0 else uri[:glob_at].rsplit("/", 1)[0]
    fs, base_path = filesystem_for(base)
    where = f"listing {redact_uri(base)}" + (f" at {s3_endpoint()}" if is_remote(base) else "")
    info = call_with_retry(lambda: fs.get_file_info(base_path), where, io_retry)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input not found: {redact_uri(base)}")
    prefix = _scheme_prefix(uri)
    # The glob is matched below the base, like ``exclude``: a relative or file:// base
    # names its files by absolute path, which the glob as written would never match.
    pattern = uri[len(base) :].lstrip("/")
    if info.type == pafs.FileType.File:
        files = [info]
        base_path = posixpath.dirname(base_path)
    else:
        selector = pafs.FileSelector(base_path, recursive=True)
        listed = call_with_retry(lambda: fs.get_file_info(selector), where, io_retry)
        files = [f for f in listed if f.type == pafs.FileType.File]
    kept = []
    for file in files:
        relative = file.path[len(base_path) :].lstrip("/")
        if is_hidden(relative) or any(fnmatch.fnmatch(relative, p) for p in exclude):
            continue
        if glob_at >= 0 and not fnmatch.fnmatch(relative, pattern):
            continue
        kept.append((prefix + file.path, file.size))
    if not kept:
        raise InputError(
            f"no input file matched {redact_uri(uri)}"
            + (f" (exclude: {exclude})" if exclude else "")
        )
    kept.sort()
    return Listing([key for key, _ in kept], [size for _, size in kept])


def file_format(uri: str) -> Format:
    """How ``format: auto`` reads a file: .tar shards, .parquet tables, anything else an image."""
    if uri.endswith(".tar"):
        return "webdataset"
    if uri.endswith(".parquet"):
        return "parquet"
    return "images"
