"""Loose image files: one row per file, each read whole but never past the size cap.

A storage fault is retried (:mod:`skray.io.retry`) and, when it outlasts the budget, raised:
the file is not read, which says nothing about it. A file deleted since the listing is a
``missing`` row.
"""

from __future__ import annotations

from typing import Iterator

from skray.io.objects import read_object
from skray.io.retry import IoRetry, call_with_retry, is_missing
from skray.io.sources.rows import make_row, too_large
from skray.io.storage import filesystem_for, redact_uri


def read_image_files(
    uris: tuple[str, ...],
    sizes: tuple[int, ...] | None,
    max_bytes: int,
    policy: IoRetry | None = None,
) -> Iterator[dict]:
    """One row per file. A file over ``max_bytes`` by its listed size (``sizes``, else
    looked up) is not opened; one that grew past it since the listing is read only up to
    the cap: both are ``too_large``."""
    for i, uri in enumerate(uris):
        fs, path = filesystem_for(uri)
        try:
            size = (
                sizes[i]
                if sizes is not None
                else call_with_retry(
                    lambda: fs.get_file_info(path).size, f"looking up {redact_uri(uri)}", policy
                )
            )
            if size is not None and size > max_bytes:
                yield make_row(uri, error=too_large("the file", size, max_bytes))
                continue
            data = read_object(fs, path, max_bytes + 1, uri, policy)
        except OSError as err:
            if not is_missing(err):
                raise
            yield make_row(uri, error=f"missing: {redact_uri(uri)} is gone since the listing")
            continue
        if len(data) > max_bytes:
            yield make_row(uri, error=too_large("the file", f"more than {max_bytes}", max_bytes))
        else:
            yield make_row(uri, data)
