"""From an output row's key back to its source object, and small thumbnails of it.

A key is what :mod:`skray.io.sources` wrote: an image file's URI, ``shard.tar#sample``
for a WebDataset sample, ``file.parquet#id`` (the ``id_column`` value, else the row
index) for a Parquet row. Source objects are read through the same readers as the
labeling job (same ``max_object_bytes`` cap) and decoded through
:func:`skray.core.images.decode_image` (same pixel bounds), since they are as untrusted
now as when they were labeled. A shard or Parquet file is read once for all the
keys wanted from it, and only up to the last of them.
"""

from __future__ import annotations

import concurrent.futures
import io
from dataclasses import dataclass, field
from typing import Iterable

from skray.core.images import ImageDecodeError, decode_image
from skray.core.preprocessing import DEFAULT_MAX_PIXELS
from skray.io.retry import IoRetry
from skray.io.sources import DEFAULT_MAX_OBJECT_BYTES, Format, Unit, file_format, unit_batches

THUMBNAIL_SIDE = 160
READERS = 8  # source objects read at once
REPORT_IO_RETRY = IoRetry(total_s=10.0)


@dataclass(frozen=True)
class Source:
    """Where a key's image lives: ``uri`` itself (an image file), or ``member`` inside it."""

    uri: str
    member: str | None
    format: Format


def locate(key: str, fmt: Format | str = "auto") -> Source:
    """The source of ``key``, for inputs read with ``format: fmt``. The first ``#`` after
    which the prefix is a shard or Parquet file splits container from member; a key with
    no such ``#`` is an image file."""
    start = 0
    while (at := key.find("#", start)) >= 0:
        container = key[:at]
        kind = file_format(container) if fmt == "auto" else fmt
        if kind in ("webdataset", "parquet"):
            return Source(container, key[at + 1 :], kind)
        start = at + 1
    return Source(key, None, "images")


@dataclass(frozen=True)
class Reading:
    """How to read the sources again: the labeling config's reading keys."""

    format: str = "auto"
    image_column: str = "image"
    id_column: str | None = None
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    io_retry: IoRetry = field(default_factory=lambda: REPORT_IO_RETRY)

    @staticmethod
    def from_config(config: dict | None) -> "Reading":
        """From a manifest's ``config`` (defaults for what it lacks, or without one). The
        retry budget is the run's, at most REPORT_IO_RETRY's: a thumbnail is not worth
        waiting out an outage for, and the labels are complete without it."""
        config = config or {}
        known = {
            k: config[k]
            for k in ("format", "image_column", "id_column", "max_object_bytes")
            if k in config
        }
        pixels = (config.get("preprocessing") or {}).get("max_pixels", DEFAULT_MAX_PIXELS)
        retry = IoRetry(**config.get("io_retry", {}))
        retry = retry.model_copy(update={"total_s": min(retry.total_s, REPORT_IO_RETRY.total_s)})
        return Reading(**known, max_pixels=pixels, io_retry=retry)


def _read_container(
    uri: str, fmt: Format, wanted: set[str], reading: Reading
) -> dict[str, bytes | str]:
    """The bytes (or the read error) of each wanted key of one container."""
    unit = Unit("thumbnails", fmt, (uri,))
    found: dict[str, bytes | str] = {}
    batches = unit_batches(
        unit,
        1,
        reading.image_column,
        reading.id_column,
        (),
        reading.max_object_bytes,
        reading.io_retry,
    )
    for batch in batches:
        for row in batch:
            if row["key"] in wanted:
                found[row["key"]] = row["error"] or row["data"]
        if len(found) == len(wanted):
            break
    batches.close()
    return found


def thumbnail(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, side: int = THUMBNAIL_SIDE
) -> bytes:
    """A JPEG at most ``side`` pixels across; raises :class:`ImageDecodeError` for bad bytes."""
    image = decode_image(data, max_pixels=max_pixels, draft_size=side)
    image.thumbnail((side, side))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=80)
    return buf.getvalue()


def thumbnails(keys: Iterable[str], reading: Reading = Reading()) -> dict[str, bytes | str]:
    """A JPEG thumbnail per key, or why there is none (the reason first, as in ``error``)."""
    by_container: dict[tuple[str, Format], set[str]] = {}
    for key in keys:
        source = locate(key, reading.format)
        by_container.setdefault((source.uri, source.format), set()).add(key)

    def read(item: tuple[tuple[str, Format], set[str]]) -> dict[str, bytes | str]:
        (uri, fmt), wanted = item
        try:
            found = _read_container(uri, fmt, wanted, reading)
        except Exception as err:  # noqa: BLE001 - any failure to read is shown beside the key
            found = dict.fromkeys(wanted, f"unreadable: {err}")
        result: dict[str, bytes | str] = {}
        for key in wanted:
            data = found.get(key, f"missing: no longer in {uri}")
            if isinstance(data, bytes):
                try:
                    data = thumbnail(data, reading.max_pixels)
                except ImageDecodeError as err:
                    data = str(err)
            result[key] = data
        return result

    with concurrent.futures.ThreadPoolExecutor(READERS) as pool:
        return {k: v for part in pool.map(read, by_container.items()) for k, v in part.items()}
