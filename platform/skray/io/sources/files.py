"""Loose image files: one row per file, each read whole but never past the size cap.

A storage fault is retried (:mod:`skray.io.retry`) and, when it outlasts the budget, raised:
the file is not read, which says nothing about it. A file deleted since the listing is a
``missing`` row.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

from skray.io.objects import read_object
from skray.io.retry import IoRetry, is_missing
from skray.io.sources.rows import make_row, missing, too_large

READS_IN_FLIGHT = 8  # GETs overlapped per task: at S3's 20-50 ms each, one at a time is ~30 img/s


def read_image_files(
    uris: tuple[str, ...],
    sizes: tuple[int, ...] | None,
    max_bytes: int,
    policy: IoRetry | None = None,
) -> Iterator[dict]:
    """One row per file, in order, each one request (on S3 one GET, no HEAD), with up to
    READS_IN_FLIGHT reads ahead. A file over ``max_bytes`` by its listed size (``sizes``) is
    not opened; one that grew past it since the listing, or whose size is not known, is read
    only up to the cap: both are ``too_large``. A storage fault past ``policy`` raises, at
    the file it struck."""
    pool = ThreadPoolExecutor(READS_IN_FLIGHT, thread_name_prefix="skray-read")
    window: deque[tuple[str, int | None, Future[bytes] | None]] = deque()
    try:
        for uri, size in zip(uris, sizes or (None,) * len(uris)):
            oversize = size is not None and size > max_bytes
            read = None if oversize else pool.submit(read_object, uri, max_bytes + 1, policy)
            window.append((uri, size, read))
            if len(window) > READS_IN_FLIGHT:
                yield _row(*window.popleft(), max_bytes)
        while window:
            yield _row(*window.popleft(), max_bytes)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _row(uri: str, size: int | None, read: Future[bytes] | None, max_bytes: int) -> dict:
    if read is None:
        return make_row(uri, error=too_large("the file", size, max_bytes))
    try:
        data = read.result()
    except OSError as err:
        if not is_missing(err):
            raise
        return make_row(uri, error=missing(uri))
    if len(data) > max_bytes:
        return make_row(uri, error=too_large("the file", f"more than {max_bytes}", max_bytes))
    return make_row(uri, data)
