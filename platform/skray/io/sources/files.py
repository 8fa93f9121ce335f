"""Loose image files: one row per file, each read whole but never past the size cap."""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa

from skray.io.sources.rows import make_row, too_large
from skray.io.storage import filesystem_for


def _read_at_most(stream: pa.NativeFile, limit: int) -> bytes:
    """Up to ``limit`` bytes: one read may return fewer than asked before the end."""
    chunks: list[bytes] = []
    left = limit
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_image_files(
    uris: tuple[str, ...], sizes: tuple[int, ...] | None, max_bytes: int
) -> Iterator[dict]:
    """One row per file. A file over ``max_bytes`` by its listed size (``sizes``, else
    looked up) is not opened; one that grew past it since the listing is read only up to
    the cap: both are ``too_large``."""
    for i, uri in enumerate(uris):
        try:
            fs, path = filesystem_for(uri)
            size = sizes[i] if sizes is not None else fs.get_file_info(path).size
            if size is not None and size > max_bytes:
                yield make_row(uri, error=too_large("the file", size, max_bytes))
                continue
            with fs.open_input_stream(path) as stream:
                data = _read_at_most(stream, max_bytes + 1)
            if len(data) > max_bytes:
                error = too_large("the file", f"more than {max_bytes}", max_bytes)
                yield make_row(uri, error=error)
            else:
                yield make_row(uri, data)
        except OSError as err:
            yield make_row(uri, error=f"unreadable: {err}")
