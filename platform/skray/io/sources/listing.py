"""Which objects an input names: a file, a prefix or a glob, listed as a stream of sorted
tables so that a 100M-key bucket flows into planning a bounded chunk at a time, and how
``format: auto`` reads each one.

On S3 a prefix is listed as large users list one: a LIST with ``delimiter="/"`` splits it
into its sub-prefixes (descending while there is only one), which are then listed
concurrently, each a page at a time, and read back in key order — so the listing costs one
request per 1,000 keys and runs at several pages in flight, never one sequential LIST of
everything. An S3 Inventory report (``inventory``) replaces the LIST altogether: its rows
are filtered by the same rules and sorted through :mod:`skray.io.external_sort`.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import queue
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from skray.core.concurrency import put_unless_stopped
from skray.io.external_sort import sorted_tables
from skray.io.retry import IoRetry, call_with_retry
from skray.io.sources.inputs import LISTING_SCHEMA, InputError
from skray.io.sources.inventory import inventory_tables
from skray.io.storage import filesystem_for, is_remote, list_page, redact_uri, s3_endpoint

Format = Literal["images", "webdataset", "parquet"]

GLOB_CHARS = "*?["
CHUNK_KEYS = 1 << 16  # keys per table of the stream
PREFIXES_IN_FLIGHT = 8  # sub-prefixes listed at once
PAGES_AHEAD = 8  # pages a sub-prefix lists ahead of the reader, at most

_HIDDEN = r"(^|/)[._]"


def is_hidden(relative: str) -> bool:
    """A ``.x`` or ``_x`` name anywhere in the path: tool droppings such as ``_SUCCESS``."""
    return any(part.startswith((".", "_")) for part in relative.split("/"))


@dataclass(frozen=True)
class Scope:
    """Which objects an input names: those below ``base`` (a path for its filesystem) matching
    ``pattern`` (the glob, if any), without hidden names or ``exclude`` matches — all judged
    on the path relative to ``base``, so a glob means the same locally and on S3."""

    uri: str
    base: str
    scheme: str  # "s3://" or ""
    pattern: str | None
    exclude: tuple[str, ...]

    @staticmethod
    def of(uri: str, exclude: Iterable[str] = ()) -> "Scope":
        glob_at = min((uri.find(c) for c in GLOB_CHARS if c in uri), default=-1)
        base_uri = uri if glob_at < 0 else uri[:glob_at].rsplit("/", 1)[0]
        _, base = filesystem_for(base_uri)
        # The glob is matched below the base, like ``exclude``: a relative or file:// base
        # names its files by absolute path, which the glob as written would never match.
        pattern = uri[len(base_uri) :].lstrip("/") if glob_at >= 0 else None
        scheme = "s3://" if uri.startswith("s3://") else ""
        base = base.rstrip("/") or "/"
        return Scope(uri, base, scheme, pattern, tuple(exclude))

    @property
    def base_uri(self) -> str:
        return self.scheme + self.base

    def keep(self, table: pa.Table, base: str | None = None) -> pa.Table:
        """The rows of ``table`` (full keys, as :data:`LISTING_SCHEMA`) this input names;
        ``base``: the folder their relative paths start from (default: this scope's)."""
        root = (base if base is not None else self.base_uri).rstrip("/") + "/"
        keys = table.column("key")
        under = pc.starts_with(keys, root)
        table = table.filter(pc.or_(under, pc.equal(keys, root[:-1])))
        relative = pc.utf8_slice_codeunits(table.column("key"), len(root))
        table = table.filter(pc.invert(pc.match_substring_regex(relative, _HIDDEN)))
        if self.pattern is None and not self.exclude:
            return table
        relative = pc.utf8_slice_codeunits(table.column("key"), len(root)).to_pylist()
        wanted = [
            (self.pattern is None or fnmatch.fnmatch(r, self.pattern))
            and not any(fnmatch.fnmatch(r, p) for p in self.exclude)
            for r in relative
        ]
        return table.filter(pa.array(wanted, pa.bool_()))


@dataclass(frozen=True)
class Listing:
    """A whole listing held in memory, sorted by key, each object with the size the listing
    gave (a reader that knows an object's size never asks the store for it): for inputs small
    enough to hold, such as a training set. Labeling streams :func:`listing_tables` instead."""

    keys: list[str]
    sizes: list[int]

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys)


def list_inputs(uri: str, exclude: Iterable[str] = (), io_retry: IoRetry | None = None) -> Listing:
    """:func:`listing_tables` of ``uri``, gathered."""
    table = pa.concat_tables(listing_tables(uri, exclude, io_retry))
    return Listing(table.column("key").to_pylist(), table.column("size").to_pylist())


def listing_tables(
    uri: str,
    exclude: Iterable[str] = (),
    io_retry: IoRetry | None = None,
    inventory: str | None = None,
) -> Iterator[pa.Table]:
    """Every object ``uri`` (a file, a prefix, or a glob) names, recursively, as tables of
    :data:`LISTING_SCHEMA` sorted by key across the stream, without hidden names (``.x``,
    ``_x``) or those matching an ``exclude`` glob; from the S3 Inventory report (or Parquet/CSV
    listing) ``inventory`` where given. Fails here, before any work, with :class:`InputError`
    when the input is missing or nothing matched, and with
    :class:`~skray.io.retry.StorageUnavailable` naming the endpoint when the store keeps
    failing past ``io_retry``."""
    scope = Scope.of(uri, exclude)
    if inventory is not None:
        kept = (scope.keep(t) for t in inventory_tables(inventory, io_retry))
        tables = sorted_tables((t for t in kept if t.num_rows), "key", chunk_rows=CHUNK_KEYS)
    else:
        tables = _listed(scope, io_retry)
    first = next(tables, None)
    if first is None:
        raise InputError(
            f"no input file matched {redact_uri(uri)}"
            + (f" in the inventory {redact_uri(inventory)}" if inventory else "")
            + (f" (exclude: {list(exclude)})" if exclude else "")
        )
    return _prepended(first, tables)


def _prepended(first: pa.Table, rest: Iterator[pa.Table]) -> Iterator[pa.Table]:
    """``first``, then ``rest``: a generator, so that ``close()`` stops the listing's workers."""
    yield first
    yield from rest


def _listed(scope: Scope, io_retry: IoRetry | None) -> Iterator[pa.Table]:
    fs, _ = filesystem_for(scope.base_uri)
    where = f"listing {redact_uri(scope.base_uri)}" + (
        f" at {s3_endpoint()}" if is_remote(scope.base_uri) else ""
    )
    info = call_with_retry(lambda: fs.get_file_info(scope.base), where, io_retry)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input not found: {redact_uri(scope.base_uri)}")
    if info.type == pafs.FileType.File:
        one = pa.table({"key": [scope.base_uri], "size": [info.size]}, schema=LISTING_SCHEMA)
        folder = scope.scheme + posixpath.dirname(scope.base)
        yield from (t for t in [scope.keep(one, folder)] if t.num_rows)
        return
    if scope.scheme:
        bucket, _, key = scope.base.partition("/")
        pages = _s3_pages(bucket, key + "/" if key else "", where, io_retry)
    else:
        pages = _local_pages(scope.base, where, io_retry)
    for chunk in _chunked(pages):
        table = scope.keep(chunk)
        if table.num_rows:
            yield table


def _chunked(pages: Iterator[list[tuple[str, int]]]) -> Iterator[pa.Table]:
    """Pages of (key, size) regrouped as tables of about ``CHUNK_KEYS`` rows."""
    held: list[tuple[str, int]] = []
    for page in pages:
        held += page
        if len(held) >= CHUNK_KEYS:
            yield _table(held)
            held = []
    if held:
        yield _table(held)


def _table(objects: list[tuple[str, int]]) -> pa.Table:
    keys, sizes = zip(*objects)
    return pa.table({"key": keys, "size": sizes}, schema=LISTING_SCHEMA)


def _local_pages(folder: str, where: str, io_retry: IoRetry | None) -> Iterator[list]:
    """A local folder's files, recursively in key order, a folder's files at a time."""

    def entries() -> list[os.DirEntry]:
        with os.scandir(folder) as listed:
            return list(listed)

    # a folder sorts as its name + "/", as its files' keys do
    ordered = sorted(
        call_with_retry(entries, where, io_retry),
        key=lambda e: e.name + "/" if e.is_dir() else e.name,
    )
    files: list[tuple[str, int]] = []
    for entry in ordered:
        if entry.is_dir():
            if files:
                yield files
                files = []
            yield from _local_pages(entry.path, where, io_retry)
        elif entry.is_file():
            files.append((entry.path, entry.stat().st_size))
    if files:
        yield files


def _s3_pages(bucket: str, prefix: str, where: str, io_retry: IoRetry | None) -> Iterator[list]:
    """Every object below ``prefix`` in key order, as lists of (``s3://`` key, size): the
    prefix's own objects from its delimiter listing, each sub-prefix listed by a worker
    (``PREFIXES_IN_FLIGHT`` at once, each ``PAGES_AHEAD`` pages ahead at most)."""
    stop = threading.Event()
    ahead: deque[list | queue.Queue] = deque()
    segments = _segments(bucket, prefix, where, io_retry)
    with ThreadPoolExecutor(PREFIXES_IN_FLIGHT, thread_name_prefix="skray-list") as pool:
        try:
            while True:
                while len(ahead) < 2 * PREFIXES_IN_FLIGHT:
                    segment = next(segments, None)
                    if segment is None:
                        break
                    if isinstance(segment, str):
                        pages: queue.Queue = queue.Queue(PAGES_AHEAD)
                        pool.submit(_list_into, pages, stop, bucket, segment, where, io_retry)
                        segment = pages
                    ahead.append(segment)
                if not ahead:
                    return
                head = ahead.popleft()
                if isinstance(head, list):
                    yield [(f"s3://{bucket}/{k}", size) for k, size in head]
                    continue
                while (page := head.get()) is not None:
                    if isinstance(page, BaseException):
                        raise page
                    yield [(f"s3://{bucket}/{k}", size) for k, size in page]
        finally:
            stop.set()


def _segments(
    bucket: str, prefix: str, where: str, io_retry: IoRetry | None
) -> Iterator[list[tuple[str, int]] | str]:
    """``prefix`` split on ``/`` in key order: runs of its own objects (lists) and its
    sub-prefixes (str). A level holding one sub-prefix and nothing else is descended into,
    so ``s3://bucket/images/2026/...`` splits where the keys fan out."""

    def page(at: str, token: str | None = None) -> tuple[list, list[str], str | None]:
        return call_with_retry(lambda: list_page(bucket, at, "/", token), where, io_retry)

    files, prefixes, token = page(prefix)
    while token is None and not files and len(prefixes) == 1:
        prefix = prefixes[0]
        files, prefixes, token = page(prefix)
    while True:
        # a sub-prefix sorts before every key greater than it that it does not start, so a
        # page's objects and sub-prefixes interleave by plain string order
        run: list[tuple[str, int]] = []
        for item in sorted([*files, *prefixes], key=lambda x: x if isinstance(x, str) else x[0]):
            if isinstance(item, str):
                if run:
                    yield run
                    run = []
                yield item
            else:
                run.append(item)
        if run:
            yield run
        if token is None:
            return
        files, prefixes, token = page(prefix, token)


def _list_into(
    pages: queue.Queue,
    stop: threading.Event,
    bucket: str,
    prefix: str,
    where: str,
    io_retry: IoRetry | None,
) -> None:
    """Every page of ``prefix`` (no delimiter) into ``pages``, then None; an error in its place."""
    token: str | None = None
    try:
        while True:
            files, _, token = call_with_retry(
                lambda t=token: list_page(bucket, prefix, None, t), where, io_retry
            )
            if not put_unless_stopped(pages, files, stop) or token is None:
                break
        put_unless_stopped(pages, None, stop)
    except BaseException as err:  # noqa: BLE001 - handed to the reader, which raises it
        put_unless_stopped(pages, err, stop)


def file_format(uri: str) -> Format:
    """How ``format: auto`` reads a file: .tar shards, .parquet tables, anything else an image."""
    if uri.endswith(".tar"):
        return "webdataset"
    if uri.endswith(".parquet"):
        return "parquet"
    return "images"
